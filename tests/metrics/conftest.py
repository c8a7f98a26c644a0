"""A tiny TorchScript feature network with NVIDIA's detector calling convention, saved to a .pt file."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch


class TinyDetector(torch.nn.Module):
    """uint8 [N, 3, H, W] in; return_features=True -> [N, 12] (pooled pixels through a fixed random projection)."""

    def __init__(self, dim=12):
        super().__init__()
        g = torch.Generator().manual_seed(123)
        self.proj = torch.nn.Parameter(torch.randn(3 * 4 * 4, dim, generator=g) * 0.5)
        self.head = torch.nn.Parameter(torch.randn(dim, 5, generator=g))

    def forward(self, images: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = images.to(torch.float32) / 127.5 - 1
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        features = torch.tanh(x @ self.proj) + 0.1 * (x @ self.proj) ** 2
        if return_features:
            return features
        return features @ self.head


@pytest.fixture(scope='session')
def detector_path(tmp_path_factory):
    path = tmp_path_factory.mktemp('detector') / 'tiny-detector.pt'
    with warnings.catch_warnings():  # TorchScript is deprecated in torch, but it is the detector's format
        warnings.simplefilter('ignore', DeprecationWarning)
        torch.jit.save(torch.jit.script(TinyDetector()), str(path))
    return str(path)


def random_images(n, seed, res=16, channels=3):
    """Smooth-ish random uint8 images [n, C, res, res] (different seeds -> different distributions)."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, size=(1, channels, 1, 1))
    return np.clip(base + rng.normal(0, 60, size=(n, channels, res, res)), 0, 255).astype(np.uint8)


def write_folder(folder, images):
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        sub = folder / f'{i // 10:02d}'
        sub.mkdir(exist_ok=True)
        PIL.Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(sub / f'{i:05d}.png')
    return str(folder)
