"""The FID feature network: NVIDIA's Inception-v3 (inception-2015-12-05), loaded from a local file.

Calling convention (EDM, StyleGAN2-ADA/3): detector(images, return_features=True) -> [N, 2048], where
images are uint8 RGB [N, 3, H, W]; the network resizes to 299x299 itself. Two file forms exist:
    inception-2015-12-05.pt   TorchScript, loaded with torch.jit.load (no Python code runs);
    inception-2015-12-05.pkl  a persistence pickle, read only through the project's safe loader
                              (d2o_fast.checkpoint.safe_pickle), never with pickle.load.
Nothing here downloads: the file must already be on this machine.
"""

import os
import warnings

import torch

from d2o_fast.metrics.errors import MetricsError

INCEPTION_PKL_URL = ('https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/'
                     'metrics/inception-2015-12-05.pkl')   # what EDM's fid.py uses
INCEPTION_PT_URL = ('https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/'
                    'inception-2015-12-05.pt')             # the same network as TorchScript
INCEPTION_FEATURE_DIM = 2048


def missing_detector_message(path):
    where = f'no FID detector file at {path!r}' if path else 'no FID detector given (--detector PATH)'
    return (f'{where}: download NVIDIA\'s Inception-v3 detector as EDM uses it, {INCEPTION_PKL_URL} '
            f'(or the TorchScript form {INCEPTION_PT_URL}), place it on this machine and pass its local path')


def load_detector(path, device='cpu'):
    """Load the feature network from a local .pt (TorchScript) or .pkl (persistence pickle), in eval mode."""
    if not path or not os.path.isfile(path):
        raise MetricsError(missing_detector_message(path))
    ext = os.path.splitext(path)[1].lower()
    if ext == '.pkl':
        detector = _load_pickled_detector(path)
    elif ext in ('.pt', '.pth', '.jit'):
        try:
            with warnings.catch_warnings():  # torch deprecates TorchScript; NVIDIA's detector exists only in it
                warnings.simplefilter('ignore', DeprecationWarning)
                detector = torch.jit.load(path, map_location='cpu')
        except RuntimeError as e:
            raise MetricsError(f'{path} is not a TorchScript detector: {str(e).splitlines()[0]}') from None
    else:
        raise MetricsError(f'unknown detector file type {ext!r} ({path}); expected a TorchScript .pt or a .pkl')
    return detector.eval().to(device)  # features are extracted under torch.no_grad


def _load_pickled_detector(path):
    """The .pkl form is read only through the project's safe persistence loader, which runs no pickled code.

    That loader yields inert records (class name, tensors); running NVIDIA's pickled Inception from them
    needs a native rebuild of its network, which the checkpoint layer may offer as safe_pickle.load_detector.
    """
    try:
        from d2o_fast.checkpoint import safe_pickle
    except ImportError:
        safe_pickle = None
    loader = getattr(safe_pickle, 'load_detector', None)
    if loader is None:
        raise MetricsError(f'{path}: a .pkl detector cannot be run safely yet (its pickled code is never executed and '
                           f'this install has no native rebuild of it); use the TorchScript form {INCEPTION_PT_URL}')
    return loader(path)


@torch.no_grad()
def extract_features(detector, images):
    """uint8 images [N, C, H, W] (C = 1 or 3) -> float64 features [N, D] on the images' device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise MetricsError(f'detector input must be uint8 [N, 1 or 3, H, W], got {images.dtype} {list(images.shape)}')
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])  # grayscale datasets: the detector expects RGB
    features = detector(images, return_features=True)
    if features.ndim != 2 or features.shape[0] != images.shape[0]:
        raise MetricsError(f'detector returned features of shape {list(features.shape)} for {images.shape[0]} images')
    return features.to(torch.float64)
