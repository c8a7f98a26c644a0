"""Image files in a ZIP archive or a folder: listing, header probing, PNG/JPEG decode and PNG encode.

A ZIP and a folder look the same to the datasets: a store with sorted member names
('/'-separated, relative), `read(name) -> bytes` and `read_head(name, size)`. Headers are probed without decoding
(for PNG the 33-byte signature + IHDR chunk) so a dataset can validate every image at open time.
"""

import io
import os
import struct
import threading
import zipfile

import numpy as np
import PIL.Image

from d2o_fast.data.errors import DatasetError

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_GRAY_COLOR_TYPES = (0, 4)          # IHDR color types: 0 gray, 4 gray+alpha (2 RGB, 3 palette, 6 RGBA)
GRAY_PIL_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'F')
LOCAL_HEADER_SIGNATURE, LOCAL_HEADER_SIZE = b'PK\x03\x04', 30     # ZIP local file header (APPNOTE 4.3.7)


def is_image_name(name):
    parts = name.split('/')
    hidden = any(p.startswith('.') or p == '__MACOSX' for p in parts)
    return not hidden and name.lower().endswith(IMAGE_EXTENSIONS)


# ----------------------------------------------------------------------------------------------
# File stores.

class ZipStore:
    """Members of a ZIP archive.

    Stored (uncompressed) members - all of EDM's datasets - are read with os.pread at their data
    offset: no per-read zipfile bookkeeping and no shared file position, so any number of threads
    can read at once. Compressed members fall back to zipfile with one handle per thread.
    """

    def __init__(self, path):
        self.path = str(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = [info for info in zf.infolist() if not info.is_dir()]
        except (zipfile.BadZipFile, OSError) as e:
            raise DatasetError(f'{self.path}: not a readable ZIP archive ({e})') from None
        self._infos = {info.filename: info for info in infos}
        self._names = sorted(self._infos)
        self._data_offsets = {}
        self._open()

    def _open(self):
        self._fd = os.open(self.path, os.O_RDONLY)
        self._local = threading.local()

    def names(self):
        return self._names

    def has(self, name):
        return name in self._infos

    def _pread(self, size, offset, name):
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise DatasetError(f'{self.path}: member {name} is truncated')
        return data

    def _data_offset(self, name):
        offset = self._data_offsets.get(name)
        if offset is None:      # the local header's name/extra lengths may differ from the central directory's
            info = self._infos[name]
            local = self._pread(LOCAL_HEADER_SIZE, info.header_offset, name)
            if local[:4] != LOCAL_HEADER_SIGNATURE:
                raise DatasetError(f'{self.path}: member {name} has a corrupt local header')
            name_len, extra_len = struct.unpack('<HH', local[26:30])
            offset = self._data_offsets[name] = info.header_offset + LOCAL_HEADER_SIZE + name_len + extra_len
        return offset

    def read_head(self, name, size):
        info = self._infos[name]
        if info.compress_type == zipfile.ZIP_STORED:
            return self._pread(min(size, info.file_size), self._data_offset(name), name)
        return self.read(name)[:size]

    def read(self, name):
        info = self._infos[name]
        if info.compress_type == zipfile.ZIP_STORED:
            return self._pread(info.file_size, self._data_offset(name), name)
        try:
            zf = getattr(self._local, 'zip', None)
            if zf is None:
                zf = self._local.zip = zipfile.ZipFile(self.path)
            return zf.read(name)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as e:   # bad CRC, unknown codec, ...
            raise DatasetError(f'{self.path}: cannot read member {name} ({e})') from None

    def __getstate__(self):     # picklable for process workers: the file is reopened on unpickling
        return {k: v for k, v in self.__dict__.items() if k not in ('_fd', '_local')}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open()

    def __del__(self):
        if hasattr(self, '_fd'):
            os.close(self._fd)


class DirectoryStore:
    """Files under a folder, recursively; names are relative paths with '/' separators."""

    def __init__(self, path):
        self.path = str(path)
        names = []
        for root, dirs, files in os.walk(self.path):
            dirs.sort()
            rel = os.path.relpath(root, self.path)
            names += [f if rel == '.' else f'{rel}/{f}'.replace(os.sep, '/') for f in files]
        self._names = sorted(names)
        self._name_set = set(self._names)

    def names(self):
        return self._names

    def has(self, name):
        return name in self._name_set

    def read_head(self, name, size):
        return self.read(name, size)

    def read(self, name, size=-1):
        try:
            with open(os.path.join(self.path, name), 'rb') as f:
                return f.read(size)
        except OSError as e:
            raise DatasetError(f'{self.path}: cannot read {name} ({e})') from None


def open_store(path):
    return DirectoryStore(path) if os.path.isdir(path) else ZipStore(path)


# ----------------------------------------------------------------------------------------------
# Headers, decode, encode.

def read_image_header(store, name):
    """(width, height, is_gray) of one image without decoding its pixels."""
    where = f'{store.path}: {name}'
    if name.lower().endswith('.png'):
        head = store.read_head(name, 33)
        if len(head) < 33 or head[:8] != PNG_SIGNATURE or head[12:16] != b'IHDR':
            raise DatasetError(f'{where}: not a valid PNG file (bad signature or header)')
        width, height, bit_depth, color_type = struct.unpack('>IIBB', head[16:26])
        if bit_depth > 8:
            raise DatasetError(f'{where}: {bit_depth}-bit PNG is not supported (8-bit images only)')
        return width, height, color_type in PNG_GRAY_COLOR_TYPES
    try:
        with PIL.Image.open(io.BytesIO(store.read(name))) as img:
            return img.width, img.height, img.mode in GRAY_PIL_MODES
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise DatasetError(f'{where}: not a readable image ({e})') from None


def decode_image(data, channels, where):
    """PNG/JPEG bytes -> uint8 HWC with the requested channel count (1 = gray, 3 = RGB)."""
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img.convert('L' if channels == 1 else 'RGB'))
    except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
        raise DatasetError(f'{where}: cannot decode image ({e})') from None
    return arr[:, :, np.newaxis] if channels == 1 else arr


def encode_png(hwc):
    """uint8 HWC -> PNG bytes, stored uncompressed like EDM's datasets (decode speed over size)."""
    img = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    img.save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue()


def fit_square(hwc, resolution):
    """Center-crop to a square and Lanczos-resize to resolution x resolution (no-op if already so)."""
    h, w = hwc.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    hwc = hwc[top:top + s, left:left + s]
    if s == resolution:
        return np.ascontiguousarray(hwc)
    img = PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    arr = np.asarray(img.resize((resolution, resolution), PIL.Image.LANCZOS))
    return arr[:, :, np.newaxis] if arr.ndim == 2 else arr
