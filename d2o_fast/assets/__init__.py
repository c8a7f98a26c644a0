"""Files that ship inside the package: the pre-trained demo model, the demo classifier, and the demo data
(built on first use from scikit-learn's bundled digits into a cache folder, so nothing is downloaded)."""

import os

ASSETS_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_CHECKPOINT = 'demo-edm-digits-32x32.safetensors'
DEMO_DATASET = 'demo-digits-32x32.zip'


def cache_dir():
    path = os.environ.get('D2O_FAST_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'd2o_fast')
    os.makedirs(path, exist_ok=True)
    return path


def demo_checkpoint_path():
    path = os.path.join(ASSETS_DIR, DEMO_CHECKPOINT)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'the shipped demo model {path} is missing; reinstall d2o_fast or re-create it with the '
                                f'pretrain command in the README')
    return path


def demo_dataset_path():
    """The demo dataset zip, built deterministically on first use."""
    from d2o_fast.data.demo import build_demo_dataset
    path = os.path.join(cache_dir(), DEMO_DATASET)
    if not os.path.isfile(path):
        build_demo_dataset(path)
    return path
