"""Datasets: the three formats, round trips through the EDM zip writer, every bad input's error."""

import io
import json
import os
import pickle
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest

from d2o_fast.data import ArrayDataset, DatasetError, ImageFileDataset, check_compatible, open_dataset
from d2o_fast.data.convert import edm_member_name, write_edm_zip
from d2o_fast.data.image_files import encode_png
from tests.data.conftest import (png_bytes, random_images, random_labels, write_folder, write_npz,
                                 write_zip)


def dataset_pixels(ds):
    return np.stack([ds.image(i) for i in range(len(ds))])


# ----------------------------------------------------------------------------------------------
# Formats and round trips.

@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('channels', [1, 3])
def test_array_to_zip_round_trip(tmp_path, channels, channels_last):
    images, labels = random_images(11, 8, channels, seed=channels), random_labels(11, 4)
    src = open_dataset(write_npz(tmp_path / 'a.npz', images, labels, channels_last=channels_last))
    assert isinstance(src, ArrayDataset) and src.shape == (11, channels, 8, 8) and src.label_dim == 4
    np.testing.assert_array_equal(dataset_pixels(src), images)
    write_edm_zip(src, tmp_path / 'a.zip')
    ds = open_dataset(tmp_path / 'a.zip')
    assert isinstance(ds, ImageFileDataset) and ds.format == 'zip'
    assert (len(ds), ds.resolution, ds.channels, ds.label_dim) == (11, 8, channels, 4)
    np.testing.assert_array_equal(dataset_pixels(ds), images)
    np.testing.assert_array_equal(ds.images(np.arange(11)[::-1]), images[::-1])
    assert [ds.label(i) for i in range(11)] == labels.tolist()
    with zipfile.ZipFile(tmp_path / 'a.zip') as zf:            # EDM's layout, stored uncompressed
        assert zf.namelist()[0] == '00000/img00000000.png' == edm_member_name(0)
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())
        assert json.loads(zf.read('dataset.json'))['labels'][3] == ['00000/img00000003.png', int(labels[3])]


def test_edm_member_names_and_deterministic_bytes(tmp_path):
    assert edm_member_name(123456) == '00123/img00123456.png'
    src = open_dataset(write_npz(tmp_path / 'a.npz', random_images(4)))
    write_edm_zip(src, tmp_path / 'a.zip')
    write_edm_zip(src, tmp_path / 'b.zip')
    assert (tmp_path / 'a.zip').read_bytes() == (tmp_path / 'b.zip').read_bytes()


def test_npy_unlabelled_and_alternative_npz_keys(tmp_path):
    images = random_images(6, 4, 3)
    np.save(tmp_path / 'a.npy', images.transpose(0, 2, 3, 1))
    ds = open_dataset(tmp_path / 'a.npy')
    assert ds.label_dim == 0 and ds.labels is None and ds.label(2) == -1
    np.testing.assert_array_equal(ds.images([5, 0]), images[[5, 0]])
    assert ds.one_hot([0, 1]).shape == (2, 0)
    gray = random_images(6, 4, 1)
    np.save(tmp_path / 'g.npy', gray[:, 0])                      # [N, H, W] is one channel
    np.testing.assert_array_equal(dataset_pixels(open_dataset(tmp_path / 'g.npy')), gray)
    labels = random_labels(6, 3)
    ds = open_dataset(write_npz(tmp_path / 'b.npz', images, labels, image_key='x', label_key='y'))
    np.testing.assert_array_equal(ds.labels, labels)


def test_folder_recursive_sorted_with_labels_and_one_hot(tmp_path):
    images, labels = random_images(5, 8), random_labels(5, 3)
    names = ['b/img1.png', 'a/z.png', 'a/img0.PNG', 'c.png', 'a/sub/x.png']
    write_folder(tmp_path / 'f', images, labels, names)
    (tmp_path / 'f' / 'notes.txt').write_text('not an image')
    (tmp_path / 'f' / '.hidden.png').write_bytes(b'ignored')
    ds = open_dataset(tmp_path / 'f')
    assert ds.format == 'folder'
    order = sorted(range(5), key=lambda i: names[i])
    assert [ds.name(i) for i in range(5)] == sorted(names)
    np.testing.assert_array_equal(dataset_pixels(ds), images[order])
    np.testing.assert_array_equal(ds.labels, labels[order])
    image, label = ds[2]
    np.testing.assert_array_equal(image, images[order[2]])
    assert label == labels[order[2]]
    one_hot = ds.one_hot([0, 1, 2], label_dim=7)
    assert one_hot.shape == (3, 7) and one_hot.dtype == np.float32
    np.testing.assert_array_equal(one_hot.argmax(1), labels[order[:3]])
    assert one_hot.sum() == 3


def test_folder_jpeg_and_mixed_gray_rgb(tmp_path):
    rgb, gray = random_images(2, 8, 3), random_images(1, 8, 1, seed=5)
    write_folder(tmp_path / 'f', rgb, fmt='jpg')
    (tmp_path / 'f' / 'gray.png').write_bytes(png_bytes(gray[0]))
    ds = open_dataset(tmp_path / 'f')
    assert ds.channels == 3                                      # one colour image makes the dataset RGB
    for i in range(2):
        decoded = np.asarray(PIL.Image.open(tmp_path / 'f' / ds.name(i)).convert('RGB')).transpose(2, 0, 1)
        np.testing.assert_array_equal(ds.image(i), decoded)
    np.testing.assert_array_equal(ds.image(0 if ds.name(0) == 'gray.png' else 2), np.repeat(gray[0], 3, axis=0))


def test_resize_to_crops_and_resizes_any_size(tmp_path):
    os.makedirs(tmp_path / 'f')
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(12, 20), (16, 16), (7, 9)]):
        PIL.Image.fromarray(rng.integers(1, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / 'f' / f'{i}.png')
    with pytest.raises(DatasetError, match='square'):
        open_dataset(tmp_path / 'f')
    ds = open_dataset(tmp_path / 'f', resize_to=8)
    assert ds.resolution == 8 and ds.resized
    assert all(ds.image(i).shape == (3, 8, 8) for i in range(3))
    center = np.asarray(PIL.Image.open(tmp_path / 'f' / '0.png'))[:, 4:16]    # 12x20 -> center 12x12
    expected = np.asarray(PIL.Image.fromarray(center).resize((8, 8), PIL.Image.LANCZOS)).transpose(2, 0, 1)
    np.testing.assert_array_equal(ds.image(0), expected)


# ----------------------------------------------------------------------------------------------
# Bad inputs: each gets its own clear DatasetError.

def _png(res=8, channels=3, seed=0):
    return png_bytes(random_images(1, res, channels, seed)[0])


def _zip(members):
    return lambda p: write_zip(p / 'z.zip', members)


def _file(name, data):
    def build(p):
        (p / name).write_bytes(data)
        return str(p / name)
    return build


def _npy(array):
    return _file('a.npy', (lambda b: np.save(b, array) or b.getvalue())(io.BytesIO()))


def _npz(images, labels=None):
    return lambda p: write_npz(p / 'a.npz', images, labels)


def _bad_inputs():
    """name -> (builder(tmp_path) -> path, expected message fragment, fails at open (else at decode))."""
    good = {'a.png': _png(), 'b.png': _png(seed=1)}
    truncated = _png()[:-30]                      # header intact, image data cut: found only when decoded
    sixteen_bit = bytearray(_png())
    sixteen_bit[24] = 16                          # IHDR bit depth

    def labelled(entries):
        return _zip({**good, 'dataset.json': {'labels': entries}})

    def mkdir(p):
        os.makedirs(p / 'e')
        return str(p / 'e')

    return {
        'missing': (lambda p: str(p / 'nope.zip'), 'no such file', True),
        'unsupported': (_file('a.txt', b'x'), 'unsupported dataset format', True),
        'corrupt zip': (_file('c.zip', b'PK not really'), 'not a readable ZIP', True),
        'empty zip': (_zip({'dataset.json': {'labels': None}}), 'no PNG or JPEG', True),
        'empty folder': (mkdir, 'no PNG or JPEG', True),
        'bad png signature': (_zip({**good, 'c.png': b'GIF89a' + bytes(40)}), 'not a valid PNG', True),
        'bad jpeg': (_zip({**good, 'c.jpg': b'\xff\xd8 garbage'}), 'not a readable image', True),
        'truncated png': (_zip({**good, 'c.png': truncated}), 'cannot decode', False),
        '16-bit png': (_zip({'a.png': bytes(sixteen_bit)}), '16-bit', True),
        'non-square': (_npz(random_images(2, 8)[:, :, :, :4]), 'square', True),
        'non-power-of-two': (_zip({'a.png': _png(12)}), 'power of two', True),
        'too small': (_zip({'a.png': _png(2)}), 'power of two', True),
        'mixed sizes': (_zip({'a.png': _png(8), 'b.png': _png(16)}), 'mixed image sizes', True),
        'labels missing': (labelled([['a.png', 1]]), '1 of 2 images have no label', True),
        'labels unknown file': (labelled([['a.png', 1], ['b.png', 0], ['x.png', 2]]), 'not images of the', True),
        'label duplicated': (labelled([['a.png', 1], ['a.png', 0]]), 'labelled twice', True),
        'label negative': (labelled([['a.png', -1], ['b.png', 0]]), 'class index', True),
        'label float': (labelled([['a.png', 1.5], ['b.png', 0]]), 'class index', True),
        'label entry shape': (labelled([['a.png'], ['b.png', 0]]), 'bad entry', True),
        'labels not list': (labelled('abc'), 'must be a list', True),
        'json invalid': (_zip({**good, 'dataset.json': b'{not json'}), 'not valid JSON', True),
        'json not object': (_zip({**good, 'dataset.json': [1, 2]}), 'must hold an object', True),
        'float array': (_npy(np.ones((2, 8, 8, 3), np.float32)), 'must be uint8', True),
        'no channel axis': (_npy(random_images(2, 8, 2).transpose(0, 2, 3, 1)), 'channel axis', True),
        'empty array': (_npy(np.zeros((0, 8, 8, 3), np.uint8)), 'non-empty', True),
        'corrupt npy': (_file('a.npy', b'\x93NUMPY garbage'), 'not a readable npy', True),
        'npz no images': (lambda p: np.savez(p / 'a.npz', pixels=random_images(2)) or str(p / 'a.npz'),
                          'no image array', True),
        'npz labels short': (_npz(random_images(3), np.array([0, 1])), '2 labels for 3 images', True),
        'npz labels float': (_npz(random_images(2), np.array([0.0, 1.0])), 'must be integers', True),
        'npz labels negative': (_npz(random_images(2), np.array([0, -3])), '>= 0', True),
    }


@pytest.mark.parametrize('case', list(_bad_inputs()))
def test_bad_input_errors(tmp_path, case):
    build, message, at_open = _bad_inputs()[case]
    path = build(tmp_path)
    if at_open:
        with pytest.raises(DatasetError, match=message) as info:
            open_dataset(path)
    else:
        ds = open_dataset(path)
        with pytest.raises(DatasetError, match=message) as info:
            ds.verify()
    assert '\n' not in str(info.value)


def test_check_compatible(tmp_path):
    labelled = open_dataset(write_npz(tmp_path / 'a.npz', random_images(6, 8, 3), random_labels(6, 5)))
    unlabelled = open_dataset(write_npz(tmp_path / 'b.npz', random_images(6, 8, 3)))
    check_compatible(labelled, 8, 3, 5)
    check_compatible(labelled, 8, 3, 10)               # a net with more classes than the data uses
    check_compatible(labelled, 8, 3, 0)                # unconditional net: labels ignored
    check_compatible(unlabelled, 8, 3, 0)
    with pytest.raises(DatasetError, match='images are 8x8 but the network expects 32x32'):
        check_compatible(labelled, 32, 3, 5)
    with pytest.raises(DatasetError, match='3 channels but the network expects 1'):
        check_compatible(labelled, 8, 1, 5)
    with pytest.raises(DatasetError, match='class-conditional .* has no labels'):
        check_compatible(unlabelled, 8, 3, 10)
    with pytest.raises(DatasetError, match='labels up to 4 but the network has only 3'):
        check_compatible(labelled, 8, 3, 3)
    with pytest.raises(DatasetError, match='too small'):
        labelled.one_hot([0], label_dim=3)
    with pytest.raises(DatasetError, match='has none'):
        unlabelled.one_hot([0], label_dim=3)


def test_zip_dataset_is_picklable_and_thread_safe(labelled_zip):
    path, images, _ = labelled_zip
    ds = pickle.loads(pickle.dumps(open_dataset(path)))
    with ThreadPoolExecutor(4) as pool:
        decoded = list(pool.map(ds.image, list(range(len(ds))) * 3))
    np.testing.assert_array_equal(np.stack(decoded), np.concatenate([images] * 3))


def test_encode_png_is_lossless():
    for channels in (1, 3):
        img = random_images(1, 16, channels, seed=9)[0].transpose(1, 2, 0)
        decoded = np.asarray(PIL.Image.open(io.BytesIO(encode_png(img))))
        np.testing.assert_array_equal(decoded.reshape(img.shape), img)


def test_deflated_zip_reads_like_stored(tmp_path, labelled_zip):
    """Zips from other tools may compress their members: read through zipfile instead of os.pread."""
    path, images, labels = labelled_zip
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp_path / 'deflated.zip', 'w', zipfile.ZIP_DEFLATED) as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name))
    ds = open_dataset(tmp_path / 'deflated.zip')
    np.testing.assert_array_equal(ds.images(range(len(ds))), images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds._store.read_head(ds.name(0), 8) == b'\x89PNG\r\n\x1a\n'
