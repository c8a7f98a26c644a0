"""Finding and loading timm's pretrained state dicts into our backbone re-implementations.

Sources, in order: a file `<weights_dir>/<name>.{safetensors,pth,pt,bin}` holding timm's
state dict; else timm's own download when timm is importable; else a BackboneWeightsError
that says how to make the file. Keys the discriminator never runs (classifier heads) are
skipped; every other key must match by name and shape, so a wrong file fails loudly.
"""

import os

import torch

from d2o_fast.discriminators.errors import BackboneWeightsError

WEIGHT_SUFFIXES = ('.safetensors', '.pth', '.pt', '.bin')


def weight_file_candidates(name, weights_dir):
    return [os.path.join(weights_dir, name + suffix) for suffix in WEIGHT_SUFFIXES]


def how_to_provide_weights(name, weights_dir):
    target = weights_dir or 'DIR'
    return (f'To provide them, on a machine with internet and timm run\n'
            f'  python -c "import timm, safetensors.torch as st; '
            f"st.save_file({{k: v.contiguous() for k, v in timm.create_model('{name}', pretrained=True).state_dict().items()}}, "
            f"'{target}/{name}.safetensors')\"\n"
            f'and pass --disc-weights {target} (weights_dir). A torch.save()d state dict named {name}.pth works too.')


def read_state_dict(path):
    """A flat {key: tensor} dict from a .safetensors file or a torch-saved (weights-only) checkpoint."""
    if path.endswith('.safetensors'):
        try:
            import safetensors.torch
        except ImportError as e:
            raise BackboneWeightsError(f'{path}: reading .safetensors needs the safetensors package (pip install safetensors)') from e
        return safetensors.torch.load_file(path, device='cpu')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise BackboneWeightsError(f'{path}: not a readable weights-only torch checkpoint ({e})') from e
    for wrapper in ('state_dict', 'model'):  # common checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneWeightsError(f'{path}: expected a state dict of tensors')
    return state


def timm_state_dict(name):
    """timm's pretrained state dict via its normal download, or None when timm cannot be imported."""
    try:
        import timm
    except Exception:  # ImportError, or timm failing on a missing torchvision
        return None
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except Exception as e:
        raise BackboneWeightsError(f'timm could not provide pretrained {name} ({e}).\n' + how_to_provide_weights(name, None)) from e


def pretrained_state_dict(name, weights_dir=None):
    """(state dict, where it came from) for a backbone by timm name."""
    if weights_dir is not None:
        if not os.path.isdir(weights_dir):
            raise BackboneWeightsError(f'backbone weights directory {weights_dir!r} does not exist')
        for path in weight_file_candidates(name, weights_dir):
            if os.path.isfile(path):
                return read_state_dict(path), path
    state = timm_state_dict(name)
    if state is not None:
        return state, f'timm:{name}'
    looked = ', '.join(weight_file_candidates(name, weights_dir)) if weights_dir else 'no weights_dir given'
    raise BackboneWeightsError(f'pretrained weights for {name} not found ({looked}) and timm is not importable.\n'
                               + how_to_provide_weights(name, weights_dir))


def load_backbone_weights(backbone, weights_dir=None, state_dict=None):
    """Load timm's pretrained weights into `backbone` (a class from backbones.BACKBONES), strictly."""
    source = 'given state dict'
    if state_dict is None:
        state_dict, source = pretrained_state_dict(backbone.name, weights_dir)
    ours = backbone.state_dict()
    missing = [k for k in ours if k not in state_dict]
    unexpected = [k for k in state_dict if k not in ours and not k.startswith(backbone.unused_pretrained_prefixes)]
    wrong_shape = [f'{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}'
                   for k, v in ours.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or wrong_shape:
        problems = []
        for label, items in (('missing', missing), ('unexpected', unexpected), ('wrong shape', wrong_shape)):
            if items:
                problems.append(f'{len(items)} {label} (e.g. {", ".join(items[:3])})')
        raise BackboneWeightsError(f'{source} does not fit {backbone.name}: ' + '; '.join(problems))
    backbone.load_state_dict({k: state_dict[k] for k in ours}, strict=True)
    return source
