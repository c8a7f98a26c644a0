"""Dataset tool: convert a folder / array / zip to EDM's dataset ZIP, or print what a dataset holds.

    python -m d2o_fast.dataset_tool convert --source SRC --dest OUT.zip [--resolution R] [--max-images N]
    python -m d2o_fast.dataset_tool info PATH [--verify]

SRC: a folder of PNG/JPEG images (labels from its dataset.json, if any), an EDM dataset .zip,
or a uint8 .npy / .npz array. --resolution center-crops and Lanczos-resizes every image to R x R.
"""

import argparse

from d2o_fast.cli import run_main
from d2o_fast.data import open_dataset
from d2o_fast.data.convert import write_edm_zip


def convert(args):
    dataset = open_dataset(args.source, resize_to=args.resolution)
    count = write_edm_zip(dataset, args.dest, max_images=args.max_images)
    labels = f'{dataset.label_dim} classes' if dataset.labels is not None else 'none'
    print(f'wrote {count} images ({dataset.resolution}x{dataset.resolution}, {dataset.channels} channels, '
          f'labels: {labels}) to {args.dest}')


def info(args):
    dataset = open_dataset(args.path)
    if args.verify:
        dataset.verify()
    for key, value in dataset.describe().items():
        if key == 'class_counts' and len(value) > 20:       # e.g. ImageNet: summarise 1000 counts
            value = f'{len(value)} classes, {min(value)}..{max(value)} images per class'
        print(f'{key:12s} {value}')
    if args.verify:
        print(f'{"verified":12s} all {len(dataset)} images decode')


def main(argv):
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.dataset_tool', description=__doc__.split('\n')[0])
    commands = parser.add_subparsers(dest='command', required=True)
    p = commands.add_parser('convert', help='write an EDM dataset ZIP')
    p.add_argument('--source', required=True, help='folder, .zip, .npy or .npz')
    p.add_argument('--dest', required=True, help='output .zip')
    p.add_argument('--resolution', type=int, default=None, help='center-crop and resize to R x R')
    p.add_argument('--max-images', type=int, default=None, help='keep only the first N images')
    p.set_defaults(run=convert)
    p = commands.add_parser('info', help='print length, resolution, channels and labels of a dataset')
    p.add_argument('path')
    p.add_argument('--verify', action='store_true', help='also decode every image')
    p.set_defaults(run=info)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == '__main__':
    run_main(main)
