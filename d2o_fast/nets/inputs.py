"""A random labelled batch, one recipe for every caller: progress grids, evaluation latents, warm-up and benchmark
batches."""

import torch

VALUE_KINDS = ('normal', 'uniform')    # N(0, I) latents; images uniform in [-1, 1]
LABEL_KINDS = ('cycle', 'random')      # classes 0, 1, ..., label_dim - 1, 0, ...; uniform random classes


def labelled_batch(n, shape, label_dim, seed, values='normal', labels='cycle', device='cpu'):
    """(x [n, *shape], one-hot float32 labels [n, label_dim] or None when label_dim is 0), drawn in this order from
    torch.Generator().manual_seed(seed): first x, then (labels='random') the classes."""
    if values not in VALUE_KINDS or labels not in LABEL_KINDS:
        raise ValueError(f'labelled_batch: values must be one of {VALUE_KINDS} and labels one of {LABEL_KINDS}, '
                         f'got {values!r} and {labels!r}')
    g = torch.Generator().manual_seed(int(seed))
    x = torch.randn([n, *shape], generator=g) if values == 'normal' else torch.rand([n, *shape], generator=g) * 2 - 1
    if not label_dim:
        return x.to(device), None
    classes = torch.arange(n) % label_dim if labels == 'cycle' else torch.randint(label_dim, [n], generator=g)
    return x.to(device), torch.eye(label_dim)[classes].to(device)
