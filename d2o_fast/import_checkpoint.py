"""Convert an EDM / D2O pickle into a d2o_fast snapshot, without running the pickle's code.

    python -m d2o_fast.import_checkpoint edm-cifar10-32x32-cond-vp.pkl cifar10-cond-vp.safetensors [--as D2OPrecond]
"""

import argparse
import os

from d2o_fast.checkpoint import file_sha256, load_network, save_snapshot
from d2o_fast.cli import run_main
from d2o_fast.nets import ARCHITECTURES, PRECOND_CLASSES

# The kwargs that tell EDM's architecture presets apart.
_PRESET_KEYS = ('model_type', 'embedding_type', 'encoder_type', 'decoder_type')


def architecture_name(init_kwargs):
    """'ddpmpp', 'ncsnpp', 'adm', or the distinguishing kwargs when no preset matches."""
    for name, preset in ARCHITECTURES.items():
        if all(init_kwargs.get(k) == preset[k] for k in _PRESET_KEYS if k in preset):
            return name
    return ', '.join(f'{k}={init_kwargs[k]}' for k in _PRESET_KEYS if k in init_kwargs)


def main(argv):
    parser = argparse.ArgumentParser(prog='python -m d2o_fast.import_checkpoint', description=__doc__.strip().splitlines()[0])
    parser.add_argument('input', help='EDM / D2O network pickle (.pkl) or d2o_fast snapshot')
    parser.add_argument('output', help='snapshot to write (.safetensors)')
    parser.add_argument('--as', dest='as_class', choices=sorted(PRECOND_CLASSES), default=None,
                        help='network class to convert to (default: the class in the pickle)')
    args = parser.parse_args(argv)
    net = load_network(args.input, as_class=args.as_class)
    info = net.checkpoint_info
    save_snapshot(net, args.output, metadata=dict(source=os.path.basename(info.path), source_sha256=info.sha256))
    out_sha256 = file_sha256(args.output)
    kw = info.init_kwargs
    print(f'converted {args.input} -> {args.output}')
    entry = f', entry {info.key!r}' if info.key else ''
    print(f'  class   {info.class_name} (from {info.source_class_name}{entry})')
    print(f'  arch    {architecture_name(kw)} ({kw.get("model_type")}, {kw["img_resolution"]}x{kw["img_resolution"]}, '
          f'label_dim {kw.get("label_dim", 0)}, augment_dim {kw.get("augment_dim", 0)})')
    print(f'  params  {sum(p.numel() for p in net.parameters()):,}')
    print(f'  sha256  {info.sha256}  {args.input}')
    print(f'          {out_sha256}  {args.output}')


if __name__ == '__main__':
    run_main(main)
