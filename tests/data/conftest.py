"""Small on-disk datasets built inside the tests: random (never all-zero) images as folders, zips and arrays."""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image
import pytest

from d2o_fast.data import open_dataset
from d2o_fast.data.convert import write_edm_zip


def random_images(n, resolution=8, channels=3, seed=0):
    """uint8 [n, C, R, R] with values in 1..255, so no image is ever all zeros."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, size=(n, channels, resolution, resolution), dtype=np.uint8)


def random_labels(n, num_classes=5, seed=0):
    labels = np.random.default_rng(seed + 1).integers(0, num_classes, size=n)
    labels[:num_classes] = np.arange(num_classes)          # every class present: label_dim is num_classes
    return labels


def png_bytes(chw, fmt='png'):
    hwc = chw.transpose(1, 2, 0)
    img = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_npz(path, images, labels=None, image_key='images', label_key='labels', channels_last=False):
    arrays = {image_key: images.transpose(0, 2, 3, 1) if channels_last else images}
    if labels is not None:
        arrays[label_key] = labels
    np.savez(path, **arrays)
    return str(path)


def write_folder(path, images, labels=None, names=None, fmt='png'):
    """Images as files under path (names may contain subfolders), labels in path/dataset.json."""
    names = names or [f'img{i:03d}.{fmt}' for i in range(len(images))]
    for name, img in zip(names, images):
        os.makedirs(os.path.dirname(os.path.join(path, name)), exist_ok=True)
        with open(os.path.join(path, name), 'wb') as f:
            f.write(png_bytes(img, 'jpeg' if fmt == 'jpg' else fmt))
    if labels is not None:
        with open(os.path.join(path, 'dataset.json'), 'w') as f:
            json.dump({'labels': [[n, int(c)] for n, c in zip(names, labels)]}, f)
    return str(path)


def write_zip(path, members):
    """A zip from {name: bytes or json-able object}."""
    with zipfile.ZipFile(path, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data if isinstance(data, bytes) else json.dumps(data))
    return str(path)


@pytest.fixture
def labelled_zip(tmp_path):
    """(path of an EDM zip of 13 RGB 8x8 images with 5 classes, images, labels)."""
    images, labels = random_images(13, seed=3), random_labels(13, seed=3)
    source = write_npz(tmp_path / 'src.npz', images, labels)
    dest = str(tmp_path / 'data.zip')
    write_edm_zip(open_dataset(source), dest)
    return dest, images, labels
