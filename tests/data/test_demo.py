"""The demo dataset zip: EDM layout, labels, image format, byte-for-byte determinism."""

import hashlib
import io
import json
import zipfile

import numpy as np
import PIL.Image

from d2o_fast.data.demo import build_demo_dataset, demo_images


def test_demo_zip_layout_labels_and_pixels(tmp_path):
    path = build_demo_dataset(str(tmp_path / 'demo.zip'))
    images, labels = demo_images()
    assert images.shape == (1797, 3, 32, 32) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    with zipfile.ZipFile(path) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        entries = json.loads(zf.read('dataset.json'))['labels']
        assert len(entries) == 1797
        assert entries[0] == ['00000/img00000000.png', int(labels[0])]
        assert entries[1796] == ['00001/img00001796.png', int(labels[1796])]
        assert [e[1] for e in entries] == labels.tolist()
        for idx in (0, 1000, 1796):
            img = PIL.Image.open(io.BytesIO(zf.read(entries[idx][0])))
            assert img.mode == 'RGB' and img.size == (32, 32)
            np.testing.assert_array_equal(np.asarray(img).transpose(2, 0, 1), images[idx])
    # The digit sits inside a dark margin; strokes are bright.
    assert images[:, :, :2, :].max() <= 44 and images.max() > 240


def test_demo_zip_is_deterministic(tmp_path):
    a = build_demo_dataset(str(tmp_path / 'a.zip'))
    b = build_demo_dataset(str(tmp_path / 'sub' / 'b.zip'))
    digests = []
    for path in (a, b):
        with open(path, 'rb') as f:
            digests.append(hashlib.sha256(f.read()).hexdigest())
    assert digests[0] == digests[1]
