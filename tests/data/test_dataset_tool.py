"""`python -m d2o_fast.dataset_tool`: convert and info, errors without a traceback, atomic writes."""

import os
import subprocess
import sys

import numpy as np

from d2o_fast.data import open_dataset
from d2o_fast.dataset_tool import main
from tests.data.conftest import png_bytes, random_images, random_labels, write_folder, write_npz


def test_convert_folder_and_info(tmp_path, capsys):
    images, labels = random_images(7, 16), random_labels(7, 3)
    write_folder(tmp_path / 'f', images, labels)
    main(['convert', '--source', str(tmp_path / 'f'), '--dest', str(tmp_path / 'out.zip')])
    assert 'wrote 7 images (16x16, 3 channels, labels: 3 classes)' in capsys.readouterr().out
    ds = open_dataset(tmp_path / 'out.zip')
    np.testing.assert_array_equal(ds.images(range(7)), images)
    np.testing.assert_array_equal(ds.labels, labels)
    main(['info', str(tmp_path / 'out.zip'), '--verify'])
    out = capsys.readouterr().out
    for line in ('images       7', 'resolution   16', 'channels     3', 'label_dim    3', 'all 7 images decode'):
        assert line in out


def test_convert_resolution_and_max_images(tmp_path, capsys):
    images = random_images(9, 16)
    src = write_npz(tmp_path / 'a.npz', images)
    dest = str(tmp_path / 'small.zip')
    main(['convert', '--source', src, '--dest', dest, '--resolution', '8', '--max-images', '4'])
    ds = open_dataset(dest)
    assert ds.shape == (4, 3, 8, 8) and ds.labels is None
    np.testing.assert_array_equal(ds.image(2), open_dataset(src, resize_to=8).image(2))
    assert 'labels: none' in capsys.readouterr().out


def test_bad_input_exits_1_with_the_reason(tmp_path, user_error):
    write_npz(tmp_path / 'a.npz', random_images(3, 12))
    os.makedirs(tmp_path / 'folder.zip')
    src = str(tmp_path / 'a.npz')
    cases = [
        ['info', str(tmp_path / 'missing.zip')],
        ['convert', '--source', src, '--dest', str(tmp_path / 'out.zip')],     # 12 not 2^k
        ['convert', '--source', src, '--dest', str(tmp_path / 'out.tar'), '--resolution', '8'],
        ['convert', '--source', src, '--dest', str(tmp_path / 'no' / 'out.zip'), '--resolution', '8'],
        ['convert', '--source', src, '--dest', str(tmp_path / 'out.zip'), '--resolution', '6'],
        ['convert', '--source', src, '--dest', str(tmp_path / 'out.zip'), '--resolution', '8',
         '--max-images', '0'],
        ['convert', '--source', src, '--dest', str(tmp_path / 'folder.zip'), '--resolution', '8'],
    ]
    for argv in cases:
        err = user_error(main, argv)
        assert err.count('\n') == 1, err
    assert sorted(os.listdir(tmp_path)) == ['a.npz', 'folder.zip'] and not os.listdir(tmp_path / 'folder.zip')


def test_failed_conversion_leaves_nothing_behind(tmp_path, user_error):
    good = random_images(3, 8)
    write_folder(tmp_path / 'f', good)
    (tmp_path / 'f' / 'img999.png').write_bytes(png_bytes(good[0])[:-40])      # decodes only partly
    dest = tmp_path / 'out.zip'
    dest.write_bytes(b'previous contents')
    assert 'cannot decode' in user_error(main, ['convert', '--source', str(tmp_path / 'f'), '--dest', str(dest)])
    assert dest.read_bytes() == b'previous contents'
    assert sorted(os.listdir(tmp_path)) == ['f', 'out.zip']


def test_module_entry_point_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'd2o_fast.dataset_tool', 'info', str(tmp_path / 'missing')],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                                os.path.abspath(__file__)))))
    assert result.returncode == 1
    assert result.stderr.strip() == f'error: {tmp_path / "missing"}: no such file or directory'
