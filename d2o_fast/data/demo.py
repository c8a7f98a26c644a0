"""The demo dataset: scikit-learn's bundled handwritten digits as a 32x32 RGB, class-conditional EDM zip.

scikit-learn ships 1,797 8x8 digit images (intensities 0..16, 10 classes) inside the package, so the
project has a real, labelled image dataset without any download. Each digit is upscaled smoothly
(bicubic) to 24x24, centred in a 32x32 frame, and coloured with a fixed three-stop palette (navy
background -> red -> warm yellow strokes) so all three channels carry signal. The zip is
byte-for-byte deterministic: same images, same PNG encoder settings, fixed zip timestamps.

    python -c "from d2o_fast.data.demo import build_demo_dataset; build_demo_dataset('datasets/demo-digits-32x32.zip')"
"""

import io
import json
import os
import zipfile

import numpy as np
import PIL.Image

DEMO_RESOLUTION = 32
DEMO_NUM_CLASSES = 10
_DIGIT_SIZE = 24  # the upscaled digit, centred in the 32x32 frame

# Palette stops at intensity 0, 0.5 and 1 (RGB, 0..255): navy background, red mid-tones, yellow strokes.
_PALETTE = np.array([[18, 22, 44], [205, 62, 86], [255, 226, 140]], dtype=np.float64)
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: no wall-clock in the bytes


def _upscale(digit):
    """One 8x8 digit (0..16) -> 32x32 float in [0, 1]: bicubic to 24x24, overshoot clipped, 4-pixel margin.

    The digits fill their 8x8 box edge to edge; the margin keeps strokes off the image border.
    """
    img = PIL.Image.fromarray((digit / 16.0).astype(np.float32))  # mode 'F'
    img = img.resize((_DIGIT_SIZE, _DIGIT_SIZE), resample=PIL.Image.BICUBIC)
    pad = (DEMO_RESOLUTION - _DIGIT_SIZE) // 2
    return np.pad(np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0), pad)


def _colourise(t):
    """Intensity map [H, W] in [0, 1] -> uint8 RGB [H, W, 3] along the piecewise-linear palette."""
    lo = np.clip(t * 2.0, 0.0, 1.0)[..., None]          # first half: background -> mid
    hi = np.clip(t * 2.0 - 1.0, 0.0, 1.0)[..., None]    # second half: mid -> stroke
    rgb = _PALETTE[0] + lo * (_PALETTE[1] - _PALETTE[0]) + hi * (_PALETTE[2] - _PALETTE[1])
    return np.rint(rgb).astype(np.uint8)


def demo_images():
    """The demo dataset in memory: (uint8 images [N, 3, 32, 32], int64 labels [N]), N = 1,797."""
    from sklearn.datasets import load_digits  # imported here: only the demo needs scikit-learn
    digits = load_digits()
    images = np.stack([_colourise(_upscale(d)) for d in digits.images])  # [N, H, W, 3]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2)), digits.target.astype(np.int64)


def build_demo_dataset(path):
    """Write the demo dataset as an EDM zip (00000/img00000000.png ..., dataset.json labels); returns path."""
    images, labels = demo_images()
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    entries = []
    with zipfile.ZipFile(path, mode='w', compression=zipfile.ZIP_STORED) as zf:
        def write(name, data):
            zf.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME), data)

        for idx, (img, label) in enumerate(zip(images, labels)):
            name = f'{idx // 1000:05d}/img{idx:08d}.png'  # EDM's layout: folder = first 5 of 8 digits
            buf = io.BytesIO()
            PIL.Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(buf, format='png', compress_level=0)
            write(name, buf.getvalue())
            entries.append([name, int(label)])
        write('dataset.json', json.dumps({'labels': entries}))
    return path
