"""The demo feature network: a small CNN trained on the demo digits, for a "demo FID" and class accuracy.

NVIDIA's Inception detector cannot be downloaded everywhere, and Inception features say little about
32x32 digits anyway. This classifier is trained by the project on the demo dataset
(d2o_fast/data/demo.py) and shipped as d2o_fast/assets/demo_classifier.safetensors, made with

    python -m d2o_fast.evaluate train-demo-classifier --dest d2o_fast/assets/demo_classifier.safetensors

It follows the detector's calling convention (uint8 [N, 3, 32, 32] in; return_features=True gives the
128-d penultimate features, otherwise class logits), so the FID machinery runs on it unchanged. The
"demo FID" is the Frechet distance in these features to the demo dataset's statistics: a proxy for
tracking the demo runs, not comparable with Inception FIDs. Light augmentation in training (small
affine jitter, blur, contrast/tint/brightness, pixel noise) keeps its judgement stable on imperfect
generated digits.
"""

import functools
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from d2o_fast.files import atomic_path
from d2o_fast.metrics.errors import MetricsError
from d2o_fast.metrics.feature_stats import FeatureStats, frechet_distance
from d2o_fast.metrics.fid import images_to_uint8

DEFAULT_WEIGHTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets',
                               'demo_classifier.safetensors')
TRAIN_COMMAND = 'python -m d2o_fast.evaluate train-demo-classifier --dest d2o_fast/assets/demo_classifier.safetensors'


class DemoClassifier(torch.nn.Module):
    """(conv-BN-SiLU-pool) x3 -> global average -> 128-d features -> 10 logits, on 32x32 RGB."""

    def __init__(self, channels=(16, 32, 64), feature_dim=128, num_classes=10, img_channels=3):
        super().__init__()
        self.config = dict(channels=list(channels), feature_dim=feature_dim, num_classes=num_classes,
                           img_channels=img_channels)
        widths = [img_channels, *channels]
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(a, b, 3, padding=1, bias=False)
                                         for a, b in zip(widths, widths[1:]))
        self.norms = torch.nn.ModuleList(torch.nn.BatchNorm2d(c) for c in channels)  # fast, stable training
        self.fc = torch.nn.Linear(channels[-1], feature_dim)
        self.head = torch.nn.Linear(feature_dim, num_classes)

    def embed(self, x):
        """Images as float in [-1, 1] -> penultimate features [N, feature_dim]."""
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.silu(norm(conv(x)))
            x = F.max_pool2d(x, 2) if i < len(self.convs) - 1 else x.mean([2, 3])
        return self.fc(x)  # before the ReLU: no dead units, so feature covariances stay full rank

    def logits(self, features):
        return self.head(F.relu(features))

    def forward(self, images, return_features=False):
        """uint8 images [N, 3, H, W] -> features (return_features=True) or logits: the detector convention."""
        if images.dtype != torch.uint8:
            raise MetricsError(f'the demo classifier takes uint8 images, got {images.dtype}')
        features = self.embed(images.to(torch.float32) / 127.5 - 1)
        return features if return_features else self.logits(features)


#----------------------------------------------------------------------------
# Training (deterministic: fixed split, fixed seed, CPU).

def _augment(x, gen):
    """Random small rotation/scale/shift, occasional blur, colour jitter, pixel noise; x in [-1, 1], [N, 3, 32, 32]."""
    n = x.shape[0]
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(n, *shape, generator=gen)  # noqa: E731
    angle, scale = u(-0.2, 0.2), u(0.9, 1.1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    shift = u(-0.2, 0.2, 2)  # up to ~3 pixels of 32 in normalised coordinates
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode='border', align_corners=False)
    blur = F.avg_pool2d(F.pad(x, [1, 1, 1, 1], mode='replicate'), 3, stride=1)
    x = torch.lerp(x, blur, u(0, 1, 1, 1, 1) * (torch.rand(n, 1, 1, 1, generator=gen) < 0.3))
    x = x * (u(0.7, 1.1, 1, 1, 1) * u(0.9, 1.1, 3, 1, 1)) + u(-0.1, 0.1, 1, 1, 1)  # contrast, tint, brightness
    x = x + torch.randn(x.shape, generator=gen) * u(0, 0.1, 1, 1, 1)
    return x.clamp(-1, 1)


def split_demo_data(val_fraction=0.2, seed=0):
    """(train_images, train_labels, val_images, val_labels): uint8 tensors, a fixed random split."""
    from d2o_fast.data.demo import demo_images
    images, labels = demo_images()
    order = np.random.default_rng(seed).permutation(len(labels))
    num_val = int(round(len(labels) * val_fraction))
    val, train = order[:num_val], order[num_val:]
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    return images[train], labels[train], images[val], labels[val]


@torch.no_grad()
def classify(classifier, images, batch_size=500):
    """uint8 images -> predicted class indices."""
    return torch.cat([classifier(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def _train(epochs, batch_size, lr, seed, log):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_y, val_x, val_y = split_demo_data(seed=seed)
    net = DemoClassifier()
    steps_per_epoch = -(-len(train_y) // batch_size)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    for epoch in range(epochs):
        net.train()
        order = torch.randperm(len(train_y), generator=gen)
        total_loss = 0.0
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = _augment(train_x[idx].to(torch.float32) / 127.5 - 1, gen)
            loss = F.cross_entropy(net.logits(net.embed(x)), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
        net.eval()
        val_accuracy = (classify(net, val_x) == val_y).double().mean().item()
        log(f'epoch {epoch + 1}/{epochs}  train loss {total_loss / len(train_y):.4f}  val accuracy {val_accuracy:.4f}')
    return net, val_accuracy


def train_demo_classifier(dest, epochs=20, batch_size=64, lr=3e-3, seed=0, num_threads=1, log=print):
    """Train on the demo digits, save to dest (safetensors, architecture and val accuracy in the metadata).

    Runs on num_threads CPU threads: with one, the weights are bitwise reproducible and a CPU shared
    with other jobs is not thrashed (two contending threads run this small net ~10x slower).
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        net, val_accuracy = _train(epochs, batch_size, lr, seed, log)
    finally:
        torch.set_num_threads(previous_threads)
    if os.path.dirname(dest):
        os.makedirs(os.path.dirname(dest), exist_ok=True)
    metadata = dict(config=json.dumps(net.config), val_accuracy=f'{val_accuracy:.4f}', epochs=str(epochs),
                    seed=str(seed), command=TRAIN_COMMAND)
    with atomic_path(dest) as tmp:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp, metadata=metadata)
    return {'val_accuracy': val_accuracy, 'path': dest}


#----------------------------------------------------------------------------
# Loading and the demo metrics.

@functools.lru_cache(maxsize=4)
def load_demo_classifier(path=None, device='cpu'):
    """The trained classifier in eval mode (cached per path and device)."""
    path = path or DEFAULT_WEIGHTS
    if not os.path.isfile(path):
        raise MetricsError(f'demo classifier weights not found at {path}; make them with: {TRAIN_COMMAND}')
    try:
        with safe_open(path, framework='pt') as f:
            config = json.loads((f.metadata() or {})['config'])
        net = DemoClassifier(**config)
        net.load_state_dict(load_file(path))
    except (SafetensorError, KeyError, TypeError, RuntimeError, ValueError) as e:
        raise MetricsError(f'{path} is not a demo classifier file: {str(e).splitlines()[0]}') from None
    return net.eval().to(device)


def demo_classifier_info(path=None):
    """The metadata stored with the weights (val accuracy, epochs, seed, command)."""
    with safe_open(path or DEFAULT_WEIGHTS, framework='pt') as f:
        return dict(f.metadata() or {})


@torch.no_grad()
def _features_and_logits(classifier, images_uint8, batch_size):
    features = [classifier.embed(images_uint8[i:i + batch_size].to(torch.float32) / 127.5 - 1)
                for i in range(0, len(images_uint8), batch_size)]
    features = torch.cat(features)
    return features, classifier.logits(features)


def _stats(features):
    stats = FeatureStats(features.shape[1], device=features.device)
    stats.update(features)
    mu, sigma = stats.mean_cov()
    return {'mu': mu, 'sigma': sigma, 'num_images': stats.count}


@functools.lru_cache(maxsize=4)
def demo_reference_stats(path=None, device='cpu'):
    """Feature statistics of the whole demo dataset (1,797 images) under the classifier; cached in memory."""
    from d2o_fast.data.demo import demo_images
    classifier = load_demo_classifier(path, device)
    images, _labels = demo_images()
    features, _logits = _features_and_logits(classifier, torch.from_numpy(images).to(device), batch_size=500)
    return _stats(features)


def demo_metrics(images, labels=None, ref_stats=None, classifier_path=None, batch_size=500):
    """{'fid', 'accuracy', 'num_images'} of images in [-1, 1] [N, 3, 32, 32] against the demo data.

    labels: the intended classes (int [N] or one-hot [N, 10]) of conditional samples, or None (accuracy None).
    ref_stats: {'mu', 'sigma'} (default: demo_reference_stats()). Images are quantised to uint8 first,
    exactly like saved samples, so real and generated images go through the same path.
    """
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise MetricsError(f'demo metrics take images [N, 3, 32, 32], got {list(images.shape)}')
    device = images.device
    classifier = load_demo_classifier(classifier_path, str(device))
    ref_stats = ref_stats if ref_stats is not None else demo_reference_stats(classifier_path, str(device))
    features, logits = _features_and_logits(classifier, images_to_uint8(images), batch_size)
    stats = _stats(features)
    result = {'fid': frechet_distance(stats['mu'], stats['sigma'], ref_stats['mu'], ref_stats['sigma']),
              'accuracy': None, 'num_images': stats['num_images']}
    if labels is not None:
        labels = labels.to(device)
        labels = labels.argmax(1) if labels.ndim == 2 else labels.to(torch.int64)
        if labels.shape != (len(images),):
            raise MetricsError(f'labels of shape {list(labels.shape)} do not match {len(images)} images')
        result['accuracy'] = (logits.argmax(1) == labels).double().mean().item()
    return result
