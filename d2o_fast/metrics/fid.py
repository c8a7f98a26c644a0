"""FID of an image folder/zip or of a one-step generator against reference statistics (EDM's protocol).

Work is split over ranks the way EDM does it: the images (or generator seeds) are cut into batches,
every rank takes every world_size-th batch, and the float64 moments are summed with all_reduce.
Generated images are reproducible per seed, whatever the batch size or number of ranks: each image's
latent and class label come from its own torch.Generator seeded with the image's seed.
"""

import torch

from d2o_fast.metrics.detector import extract_features
from d2o_fast.metrics.errors import MetricsError
from d2o_fast.metrics.feature_stats import FeatureStats, frechet_distance
from d2o_fast.nets import labelled_batch

FULL_FID_IMAGES = 50_000   # the paper's (and EDM's) protocol; fewer images give a proxy FID


def fid_label(num_images):
    return 'FID' if num_images >= FULL_FID_IMAGES else f'proxy FID ({num_images} images)'


def images_to_uint8(images):
    """Images in [-1, 1] -> uint8 [0, 255], rounded as EDM does when it saves PNGs."""
    return (images.to(torch.float32) * 127.5 + 128).clamp(0, 255).to(torch.uint8)


def _dist_rank_world():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def rank_batches(num_items, batch_size, rank=None, world_size=None):
    """This rank's share of range(num_items): a list of index tensors, the same count on every rank."""
    default_rank, default_world = _dist_rank_world()
    rank = default_rank if rank is None else rank
    world_size = default_world if world_size is None else world_size
    if num_items < world_size:
        raise MetricsError(f'{num_items} images cannot be split over {world_size} ranks')
    num_batches = -(-num_items // (batch_size * world_size)) * world_size
    return list(torch.arange(num_items).tensor_split(num_batches))[rank::world_size]


def accumulate_stats(batches, detector, device='cpu'):
    """Feature statistics of an iterable of uint8 [N, C, H, W] batches, summed over all ranks."""
    stats = None
    for images in batches:
        if images.shape[0] == 0:
            continue
        features = extract_features(detector, images.to(device))
        if stats is None:
            stats = FeatureStats(features.shape[1], device=device)
        stats.update(features)
    if stats is None:
        raise MetricsError('no images to compute feature statistics from')
    return stats.all_reduce()


def _stats_dict(stats):
    mu, sigma = stats.mean_cov()
    return {'mu': mu, 'sigma': sigma, 'num_images': stats.count}


#----------------------------------------------------------------------------
# Images on disk: anything d2o_fast.data.open_dataset reads (EDM zip, folder, uint8 .npy/.npz), in its order.

def image_stats(path, detector, batch_size=64, num_images=None, device='cpu'):
    """Feature statistics of the first num_images (default: all) images of a dataset, folder or zip."""
    from d2o_fast.data import open_dataset
    dataset = open_dataset(path)
    if num_images is not None and len(dataset) < num_images:
        raise MetricsError(f'found {len(dataset)} images in {path}, expected at least {num_images} '
                           f'(pass a smaller count for a proxy FID)')
    count = len(dataset) if num_images is None else num_images
    batches = (torch.from_numpy(dataset.images(idx.tolist())) for idx in rank_batches(count, batch_size) if len(idx))
    return _stats_dict(accumulate_stats(batches, detector, device))


#----------------------------------------------------------------------------
# A one-step generator: per-seed latents and labels, images via net.generate(z, class_labels).

def parse_seeds(text):
    """'0-49999' or '1,5,10-19' -> list of ints."""
    seeds = []
    try:
        for part in str(text).split(','):
            lo, sep, hi = part.strip().partition('-')
            seeds.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise MetricsError(f'cannot parse seeds {text!r}; expected e.g. 0-49999 or 1,5,10-19') from None
    if not seeds:
        raise MetricsError(f'no seeds in {text!r}')
    return seeds


def seed_latents(net, seeds, device='cpu'):
    """Latents [N, C, R, R] and one-hot class labels (or None) for the given seeds, one Generator per seed."""
    shape = [net.img_channels, net.img_resolution, net.img_resolution]
    batches = [labelled_batch(1, shape, net.label_dim, seed, labels='random') for seed in seeds]
    z = torch.cat([z for z, _ in batches]).to(device)
    return z, (torch.cat([c for _, c in batches]).to(device) if net.label_dim else None)


@torch.no_grad()
def generate_uint8(net, seeds, device='cpu'):
    """(uint8 images [N, C, R, R], their one-hot labels or None) of the given seeds from a one-step generator."""
    z, labels = seed_latents(net, seeds, device)
    return images_to_uint8(net.generate(z, labels)), labels


def generator_stats(net, detector, seeds, batch_size=64, device='cpu'):
    """Feature statistics of net.generate over the seeds, split over ranks."""
    if not callable(getattr(net, 'generate', None)):
        raise MetricsError(f'{type(net).__name__} is not a one-step generator (it has no .generate(z, class_labels))')
    seeds = list(seeds)
    batches = (generate_uint8(net, [seeds[i] for i in idx], device)[0] for idx in rank_batches(len(seeds), batch_size)
               if len(idx))
    return _stats_dict(accumulate_stats(batches, detector, device))


def fid_from_stats(stats, ref):
    """{'fid', 'num_images', 'label'} of statistics against a reference ({'mu', 'sigma'})."""
    value = frechet_distance(stats['mu'], stats['sigma'], ref['mu'], ref['sigma'])
    return {'fid': value, 'num_images': stats['num_images'], 'label': fid_label(stats['num_images'])}
