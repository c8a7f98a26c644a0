"""Writing EDM's dataset ZIP format: uncompressed PNGs in 00000/, 00001/, ... plus dataset.json labels.

Member names follow EDM's dataset_tool ('00000/img00000000.png'), so the result is readable
by EDM's own training code as well as by ImageFileDataset, and byte-for-byte deterministic.
The ZIP is written atomically (d2o_fast/files.py atomic_path), so a crash never leaves a partial
dataset.
"""

import json
import os
import zipfile

from d2o_fast.data.datasets import LABELS_FILE
from d2o_fast.data.errors import DatasetError
from d2o_fast.data.image_files import encode_png
from d2o_fast.files import atomic_path

ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)     # fixed member timestamps: the same input gives the same bytes


def edm_member_name(index):
    digits = f'{index:08d}'
    return f'{digits[:5]}/img{digits}.png'


def write_edm_zip(dataset, dest, max_images=None, progress=None):
    """Write the first max_images images (all if None) of a dataset to dest; returns the count written."""
    dest = os.fspath(dest)
    if not dest.lower().endswith('.zip'):
        raise DatasetError(f'{dest}: the destination must be a .zip file')
    if max_images is not None and max_images < 1:
        raise DatasetError(f'--max-images must be >= 1, got {max_images}')
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    folder = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(folder):
        raise DatasetError(f'{dest}: the destination folder {folder} does not exist')
    try:
        with atomic_path(dest) as tmp, zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED) as zf:
            labels = []
            for i in range(count):
                name = edm_member_name(i)
                zf.writestr(zipfile.ZipInfo(name, ZIP_DATE_TIME), encode_png(dataset.image(i).transpose(1, 2, 0)))
                labels.append([name, dataset.label(i)])
                if progress is not None:
                    progress(i + 1, count)
            meta = {'labels': labels if dataset.labels is not None else None}
            zf.writestr(zipfile.ZipInfo(LABELS_FILE, ZIP_DATE_TIME), json.dumps(meta))
    except OSError as e:                    # disk full, destination is a folder, ...
        raise DatasetError(f'{dest}: cannot write ({e})') from None
    return count
