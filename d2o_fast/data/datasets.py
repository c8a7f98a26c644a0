"""Training datasets of uint8 images: EDM's dataset ZIP, a folder of images, a uint8 .npy/.npz array.

All share one interface (ImageDataset):
    len(ds), ds.resolution, ds.channels, ds.label_dim (0 = unlabelled)
    ds.image(i) -> uint8 [C, R, R]      ds.images(indices) -> uint8 [n, C, R, R]
    ds.label(i) -> int (-1 if none)     ds.one_hot(indices, label_dim=None) -> float32 [n, label_dim]
Problems surface as early as possible: at open time every image header is read, so a bad
resolution, mixed sizes or missing labels fail before training starts; a corrupt image body
fails when decoded, naming the file. With resize_to=R, images of any size are center-cropped
and resized to R x R on load (used by the converter; training reads datasets already at size).
"""

import json
import os
import zipfile

import numpy as np

from d2o_fast.data.errors import DatasetError
from d2o_fast.data.image_files import decode_image, fit_square, is_image_name, open_store, read_image_header

LABELS_FILE = 'dataset.json'
ARRAY_IMAGE_KEYS = ('images', 'x')
ARRAY_LABEL_KEYS = ('labels', 'y')


def check_resolution(resolution, where):
    if resolution < 4 or resolution & (resolution - 1):
        raise DatasetError(f'{where}: resolution {resolution} is not a power of two >= 4')


def one_hot(labels, label_dim):
    """int labels [n] -> float32 [n, label_dim]; label_dim 0 gives [n, 0]."""
    out = np.zeros((len(labels), label_dim), dtype=np.float32)
    if label_dim:
        out[np.arange(len(labels)), labels] = 1
    return out


class ImageDataset:
    """Base: subclasses call _init_common() and implement _load(i) -> uint8 HWC at native size."""

    def _init_common(self, path, length, size, channels, labels, resize_to):
        self.path = str(path)
        self.channels = channels
        self.labels = labels                       # int64 [N] or None
        self.resized = resize_to is not None      # fit_square is a no-op on images already at size
        if resize_to is not None:
            check_resolution(resize_to, self.path)
            self.resolution = resize_to
        else:
            check_resolution(size, self.path)
            self.resolution = size
        self._length = length
        if labels is not None and len(labels) != length:
            raise DatasetError(f'{self.path}: {len(labels)} labels for {length} images')

    def __len__(self):
        return self._length

    @property
    def label_dim(self):
        return 0 if self.labels is None else int(self.labels.max()) + 1

    @property
    def shape(self):
        return (len(self), self.channels, self.resolution, self.resolution)

    def image(self, i):
        hwc = self._load(i)
        if self.resized:
            hwc = fit_square(hwc, self.resolution)
        elif hwc.shape != (self.resolution, self.resolution, self.channels):
            raise DatasetError(f'{self.path}: image {i} has shape {hwc.shape} (HWC), expected '
                               f'{(self.resolution, self.resolution, self.channels)}')
        return hwc.transpose(2, 0, 1)

    def images(self, indices):
        return np.stack([self.image(int(i)) for i in indices])

    def label(self, i):
        return -1 if self.labels is None else int(self.labels[i])

    def __getitem__(self, i):
        return self.image(i), self.label(i)

    def one_hot(self, indices, label_dim=None):
        """One-hot labels of the given images, width label_dim (default: the dataset's own)."""
        label_dim = self.label_dim if label_dim is None else label_dim
        if label_dim == 0:
            return one_hot(np.zeros(len(indices), np.int64), 0)
        if self.labels is None:
            raise DatasetError(f'{self.path}: labels requested (label_dim={label_dim}) but the dataset has none')
        if label_dim < self.label_dim:
            raise DatasetError(f'{self.path}: label_dim {label_dim} is too small for labels up to {self.label_dim - 1}')
        return one_hot(self.labels[np.asarray(indices, dtype=np.int64)], label_dim)

    def describe(self):
        info = dict(path=self.path, format=self.format, images=len(self), resolution=self.resolution,
                    channels=self.channels, label_dim=self.label_dim)
        if self.labels is not None:
            info['class_counts'] = np.bincount(self.labels, minlength=self.label_dim).tolist()
        return info

    def verify(self):
        """Decode every image (catches corrupt bodies that header probing cannot see)."""
        for i in range(len(self)):
            self.image(i)


# ----------------------------------------------------------------------------------------------

class ImageFileDataset(ImageDataset):
    """PNG/JPEG files in an EDM dataset ZIP or a folder (recursive, sorted by relative path).

    Labels come from dataset.json at the root: {"labels": [["00000/img00000000.png", 6], ...]}
    or {"labels": null}; no file means unlabelled. Gray images become 1-channel datasets only
    if every image is gray; otherwise gray images are expanded to RGB.
    """

    def __init__(self, path, resize_to=None):
        self._store = open_store(path)
        self.format = 'folder' if os.path.isdir(path) else 'zip'
        self._names = [n for n in self._store.names() if is_image_name(n)]
        if not self._names:
            raise DatasetError(f'{path}: no PNG or JPEG images found')
        headers = [read_image_header(self._store, n) for n in self._names]
        width, height, _ = headers[0]
        if resize_to is None:
            if width != height:
                raise DatasetError(f'{path}: images must be square, {self._names[0]} is {width}x{height}')
            for name, (w, h, _) in zip(self._names, headers):
                if (w, h) != (width, height):
                    raise DatasetError(f'{path}: mixed image sizes: {self._names[0]} is {width}x{height} '
                                       f'but {name} is {w}x{h}')
        channels = 1 if all(gray for _, _, gray in headers) else 3
        labels = self._read_labels()
        self._init_common(path, len(self._names), width, channels, labels, resize_to)

    def _read_labels(self):
        path = self._store.path
        if not self._store.has(LABELS_FILE):
            return None
        try:
            meta = json.loads(self._store.read(LABELS_FILE))
        except (ValueError, UnicodeDecodeError) as e:
            raise DatasetError(f'{path}: {LABELS_FILE} is not valid JSON ({e})') from None
        if not isinstance(meta, dict):
            raise DatasetError(f'{path}: {LABELS_FILE} must hold an object with a "labels" key')
        entries = meta.get('labels')
        if entries is None:
            return None
        if not isinstance(entries, list):
            raise DatasetError(f'{path}: "labels" in {LABELS_FILE} must be a list of [file, class] pairs or null')
        by_name = {}
        for entry in entries:
            ok = isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
            if not ok:
                raise DatasetError(f'{path}: bad entry {entry!r} in {LABELS_FILE}; expected [file, class]')
            name, label = entry[0].replace('\\', '/'), entry[1]
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise DatasetError(f'{path}: label of {name} is {label!r}; expected a class index >= 0')
            if name in by_name:
                raise DatasetError(f'{path}: {name} is labelled twice in {LABELS_FILE}')
            by_name[name] = label
        missing = [n for n in self._names if n not in by_name]
        if missing:
            raise DatasetError(f'{path}: {len(missing)} of {len(self._names)} images have no label in '
                               f'{LABELS_FILE} (first: {missing[0]})')
        unknown = sorted(set(by_name) - set(self._names))
        if unknown:
            raise DatasetError(f'{path}: {LABELS_FILE} labels {len(unknown)} files that are not images of the '
                               f'dataset (first: {unknown[0]})')
        return np.array([by_name[n] for n in self._names], dtype=np.int64)

    def name(self, i):
        return self._names[i]

    def encoded(self, i):
        """The image file's bytes, undecoded (for decoders outside Python, e.g. DALI)."""
        return self._store.read(self._names[i])

    def _load(self, i):
        name = self._names[i]
        return decode_image(self._store.read(name), self.channels, f'{self.path}: {name}')


# ----------------------------------------------------------------------------------------------

class ArrayDataset(ImageDataset):
    """uint8 images in a .npy ([N,H,W,C], [N,C,H,W] or [N,H,W]) or a .npz with keys
    'images'/'x' and optional integer 'labels'/'y' of shape [N]. .npy files are memory-mapped."""

    def __init__(self, path, resize_to=None):
        self.format = os.path.splitext(str(path))[1].lstrip('.').lower()
        labels = None
        try:
            if self.format == 'npy':
                array = np.load(path, mmap_mode='r', allow_pickle=False)
            else:
                with np.load(path, allow_pickle=False) as archive:
                    array = _pick_key(archive, ARRAY_IMAGE_KEYS, path, required=True)
                    labels = _pick_key(archive, ARRAY_LABEL_KEYS, path, required=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f'{path}: not a readable {self.format} array file ({e})') from None
        if array.dtype != np.uint8:
            raise DatasetError(f'{path}: images must be uint8, got {array.dtype}')
        if array.ndim == 3:
            array = array[..., np.newaxis]
        if array.ndim != 4 or len(array) == 0:
            raise DatasetError(f'{path}: expected a non-empty image array [N,H,W,C] or [N,C,H,W], got {array.shape}')
        if array.shape[1] in (1, 3) and array.shape[3] not in (1, 3):
            self._channels_last = False
            channels, height, width = array.shape[1:]
        elif array.shape[3] in (1, 3):
            self._channels_last = True
            height, width, channels = array.shape[1:]
        else:
            raise DatasetError(f'{path}: cannot find a channel axis of size 1 or 3 in shape {array.shape}')
        if resize_to is None and height != width:
            raise DatasetError(f'{path}: images must be square, got {height}x{width}')
        self._array = array
        if labels is not None:
            labels = self._check_labels(labels, path, len(array))
        self._init_common(path, len(array), height, channels, labels, resize_to)

    @staticmethod
    def _check_labels(labels, path, length):
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DatasetError(f'{path}: labels must be integers of shape [N], got {labels.dtype} {labels.shape}')
        if len(labels) != length:
            raise DatasetError(f'{path}: {len(labels)} labels for {length} images')
        if len(labels) and labels.min() < 0:
            raise DatasetError(f'{path}: labels must be class indices >= 0, found {labels.min()}')
        return labels.astype(np.int64)

    def _load(self, i):
        img = np.asarray(self._array[i])
        return img if self._channels_last else img.transpose(1, 2, 0)

    def images(self, indices):
        if self.resized:
            return super().images(indices)
        batch = np.asarray(self._array[np.asarray(indices, dtype=np.int64)])   # one gather from the mmap
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2)) if self._channels_last else batch


def _pick_key(archive, keys, path, required):
    for key in keys:
        if key in archive.files:
            return archive[key]
    if required:
        raise DatasetError(f'{path}: no image array; expected one of the keys {list(keys)}, found {archive.files}')
    return None


# ----------------------------------------------------------------------------------------------

def open_dataset(path, resize_to=None):
    """Open a dataset by its path: a folder, a .zip, a .npy or a .npz."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DatasetError(f'{path}: no such file or directory')
    if os.path.isdir(path) or path.lower().endswith('.zip'):
        return ImageFileDataset(path, resize_to)
    if path.lower().endswith(('.npy', '.npz')):
        return ArrayDataset(path, resize_to)
    raise DatasetError(f'{path}: unsupported dataset format (expected a folder, .zip, .npy or .npz)')


def check_compatible(dataset, img_resolution, img_channels, label_dim):
    """Raise DatasetError unless the network (resolution, channels, label_dim) can train on the dataset.

    An unconditional network (label_dim 0) may use a labelled dataset: the labels are ignored.
    """
    if dataset.resolution != img_resolution:
        raise DatasetError(f'{dataset.path}: images are {dataset.resolution}x{dataset.resolution} but the network '
                           f'expects {img_resolution}x{img_resolution} (re-encode with `python -m d2o_fast.dataset_tool '
                           f'convert --resolution {img_resolution}`)')
    if dataset.channels != img_channels:
        raise DatasetError(f'{dataset.path}: images have {dataset.channels} channels but the network expects '
                           f'{img_channels}')
    if label_dim and dataset.label_dim == 0:
        raise DatasetError(f'{dataset.path}: the network is class-conditional (label_dim={label_dim}) but the dataset '
                           f'has no labels')
    if label_dim and dataset.label_dim > label_dim:
        raise DatasetError(f'{dataset.path}: the dataset has class labels up to {dataset.label_dim - 1} but the '
                           f'network has only {label_dim} classes')
