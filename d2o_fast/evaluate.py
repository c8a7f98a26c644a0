"""FID and the demo metrics from the command line (EDM's protocol; NVIDIA's Inception detector from a local file).

    # Reference statistics of a dataset (EDM zip or folder) -> EDM-format .npz (mu, sigma)
    python -m d2o_fast.evaluate ref --data datasets/cifar10-32x32.zip --dest refs/cifar10-32x32.npz \\
        --detector inception-2015-12-05.pt

    # FID of a folder of images, or of 50,000 images from a one-step generator snapshot
    python -m d2o_fast.evaluate calc --images samples/ --ref refs/cifar10-32x32.npz --detector inception-2015-12-05.pt
    torchrun --standalone --nproc_per_node=8 -m d2o_fast.evaluate calc --snapshot run/snapshot.pt \\
        --ref refs/cifar10-32x32.npz --detector inception-2015-12-05.pt --num 50000

    # The demo feature network (ships trained in d2o_fast/assets/) and the demo metrics of a snapshot
    python -m d2o_fast.evaluate train-demo-classifier --dest d2o_fast/assets/demo_classifier.safetensors
    python -m d2o_fast.evaluate demo --snapshot run/snapshot.pt --num 2000

With fewer than 50,000 images the result is printed as "proxy FID (N images)".
"""

import argparse

import torch

from d2o_fast.cli import run_main
from d2o_fast.engine.distributed import init_distributed
from d2o_fast.metrics import (FULL_FID_IMAGES, MetricsError, fid_from_stats, generator_stats, image_stats,
                              load_detector, load_stats, parse_seeds, save_stats)


def _load_generator(args, device):
    """The one-step generator of --snapshot; --as-generator loads EDM teacher weights into D2OPrecond."""
    from d2o_fast.checkpoint import CheckpointError, load_network
    try:
        return load_network(args.snapshot, device=device, as_class='D2OPrecond' if args.as_generator else None)
    except CheckpointError as e:
        raise MetricsError(f'cannot load the generator: {e}') from None


def _seeds(args):
    return parse_seeds(args.seeds) if args.seeds else range(args.num)


#----------------------------------------------------------------------------

def cmd_ref(args):
    rank, _world_size, device = init_distributed()
    detector = load_detector(args.detector, device)
    stats = image_stats(args.data, detector, batch_size=args.batch, device=device)
    if rank == 0:
        save_stats(args.dest, stats['mu'], stats['sigma'])
        print(f'reference statistics of {stats["num_images"]} images saved to {args.dest}')


def cmd_calc(args):
    rank, _world_size, device = init_distributed()
    ref = load_stats(args.ref)
    detector = load_detector(args.detector, device)
    if args.images:
        stats = image_stats(args.images, detector, batch_size=args.batch, num_images=args.num, device=device)
    else:
        seeds = _seeds(args)
        net = _load_generator(args, device)
        stats = generator_stats(net, detector, seeds, batch_size=args.batch, device=device)
    if rank == 0:
        result = fid_from_stats(stats, ref)
        print(f'{result["label"]}: {result["fid"]:.4f}')


def cmd_train_demo_classifier(args):
    from d2o_fast.metrics.demo_classifier import train_demo_classifier
    result = train_demo_classifier(args.dest, epochs=args.epochs, seed=args.seed)
    print(f'demo classifier saved to {result["path"]} (val accuracy {result["val_accuracy"]:.4f})')


def cmd_demo(args):
    from d2o_fast.metrics.demo_classifier import demo_metrics
    from d2o_fast.metrics.fid import generate_uint8
    _rank, _world_size, device = init_distributed()
    seeds = list(_seeds(args))
    net = _load_generator(args, device)
    images, labels = [], []
    for i in range(0, len(seeds), args.batch):
        batch = seeds[i:i + args.batch]
        batch_images, batch_labels = generate_uint8(net, batch, device)
        images.append(batch_images)
        labels.append(batch_labels)
    images = torch.cat(images).to(torch.float32) / 127.5 - 1  # the saved-sample quantisation, back in [-1, 1]
    labels = torch.cat(labels) if net.label_dim else None
    result = demo_metrics(images, labels, classifier_path=args.classifier)
    accuracy = 'n/a (unconditional)' if result['accuracy'] is None else f'{result["accuracy"]:.4f}'
    print(f'demo FID ({result["num_images"]} images): {result["fid"]:.4f}  class accuracy: {accuracy}')


#----------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.evaluate', description=__doc__.split('\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)

    p = sub.add_parser('ref', help='reference statistics (.npz with mu, sigma) of a dataset')
    p.add_argument('--data', required=True, help='dataset: EDM zip or folder of images')
    p.add_argument('--dest', required=True, help='output .npz')
    p.add_argument('--detector', help='local inception-2015-12-05.pt (TorchScript; the .pkl form is refused: it would have to run pickled code)')
    p.add_argument('--batch', type=int, default=64, help='images per detector batch (default 64)')
    p.set_defaults(run=cmd_ref)

    p = sub.add_parser('calc', help='FID of a folder of images or of a one-step generator snapshot')
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument('--images', help='folder or zip of generated images')
    source.add_argument('--snapshot', help='one-step generator (D2OPrecond) snapshot or pickle')
    p.add_argument('--ref', required=True, help='reference statistics .npz (EDM format)')
    p.add_argument('--detector', help='local inception-2015-12-05.pt (TorchScript; the .pkl form is refused: it would have to run pickled code)')
    p.add_argument('--num', type=int, default=FULL_FID_IMAGES, help='number of images (default 50000)')
    p.add_argument('--batch', type=int, default=64, help='images per batch (default 64)')
    p.add_argument('--seeds', help='generator seeds, e.g. 0-49999 (default 0..num-1); overrides --num')
    p.add_argument('--as-generator', action='store_true',
                   help='load an EDM (teacher) pickle as a one-step D2O generator')
    p.set_defaults(run=cmd_calc)

    p = sub.add_parser('train-demo-classifier', help='train the demo digit classifier (demo FID, class accuracy)')
    p.add_argument('--dest', required=True, help='output .safetensors')
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--seed', type=int, default=0)
    p.set_defaults(run=cmd_train_demo_classifier)

    p = sub.add_parser('demo', help='demo FID and class accuracy of a generator trained on the demo digits')
    p.add_argument('--snapshot', required=True, help='one-step generator snapshot (32x32 RGB)')
    p.add_argument('--num', type=int, default=2000, help='number of images (default 2000)')
    p.add_argument('--batch', type=int, default=250, help='images per batch (default 250)')
    p.add_argument('--seeds', help='generator seeds (default 0..num-1); overrides --num')
    p.add_argument('--as-generator', action='store_true',
                   help='load an EDM (teacher) pickle as a one-step D2O generator')
    p.add_argument('--classifier', help='classifier weights (default: the shipped ones)')
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv):
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ('num', 'batch'):
        if getattr(args, name, 1) < 1:
            parser.error(f'--{name} must be at least 1')
    args.run(args)


if __name__ == '__main__':
    run_main(main)
