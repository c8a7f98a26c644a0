"""Feature statistics and the Frechet distance (FID's formula), as EDM computes them.

Features are accumulated as a float64 sum and sum of outer products, so any split into batches and
ranks gives the same mean and covariance as a one-shot computation; ranks are summed with
torch.distributed.all_reduce when a process group is initialised.
    FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)),  sqrtm by scipy, real part kept.
"""

import os

import numpy as np
import scipy.linalg
import torch

from d2o_fast.files import atomic_path
from d2o_fast.metrics.errors import MetricsError


class FeatureStats:
    """Running float64 first and second moments of [N, D] feature batches."""

    def __init__(self, dim, device='cpu'):
        self.dim = int(dim)
        self.count = 0
        self.total = torch.zeros([self.dim], dtype=torch.float64, device=device)
        self.outer = torch.zeros([self.dim, self.dim], dtype=torch.float64, device=device)

    def update(self, features):
        features = torch.as_tensor(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise MetricsError(f'expected features of shape [N, {self.dim}], got {list(features.shape)}')
        f = features.to(device=self.total.device, dtype=torch.float64)
        self.total += f.sum(0)
        self.outer += f.T @ f
        self.count += f.shape[0]

    def all_reduce(self):
        """Sum the moments of every rank (no-op when torch.distributed is not initialised)."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            count = torch.tensor([self.count], dtype=torch.float64, device=self.total.device)
            for t in (count, self.total, self.outer):
                torch.distributed.all_reduce(t)
            self.count = int(count.item())
        return self

    def mean_cov(self):
        """(mu [D], sigma [D, D]) as float64 numpy; the unbiased covariance needs at least 2 samples."""
        if self.count < 2:
            raise MetricsError(f'feature statistics need at least 2 images, got {self.count}')
        mu = self.total / self.count
        sigma = (self.outer - torch.outer(mu, mu) * self.count) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), as a float."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise MetricsError(f'statistics do not match: mu {mu1.shape} vs {mu2.shape}, '
                           f'sigma {sigma1.shape} vs {sigma2.shape}')
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    distance = np.square(mu1 - mu2).sum() + np.trace(sigma1 + sigma2 - 2 * covmean)
    return float(np.real(distance))


#----------------------------------------------------------------------------
# Reference statistics on disk: EDM's .npz with arrays `mu` [D] and `sigma` [D, D].

def save_stats(path, mu, sigma):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, 'wb') as f:  # a file object: np.savez would otherwise append '.npz'
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))


def load_stats(path):
    """{'mu': [D], 'sigma': [D, D]} from an EDM-format .npz."""
    if not os.path.isfile(path):
        raise MetricsError(f'reference statistics file not found: {path}')
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = {key: np.asarray(data[key], np.float64) for key in ('mu', 'sigma') if key in data.files}
    except (OSError, ValueError) as e:
        raise MetricsError(f'{path} is not a readable .npz file: {e}') from None
    for key in ('mu', 'sigma'):
        if key not in stats:
            raise MetricsError(f'{path} is not a reference statistics file: array {key!r} missing')
    d = stats['mu'].shape
    if len(d) != 1 or stats['sigma'].shape != d * 2:
        raise MetricsError(f'{path}: mu {stats["mu"].shape} and sigma {stats["sigma"].shape} do not fit together')
    return stats
