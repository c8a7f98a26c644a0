"""Generate images from a snapshot: one step for a D2O generator, EDM's Heun sampler for an EDM denoiser.

    python -m d2o_fast.sample --ckpt network-snapshot-005000.safetensors --seeds 0-63 --grid out.png
    torchrun --nproc_per_node 8 -m d2o_fast.sample --ckpt SNAPSHOT --seeds 0-49999 --outdir images/

Each seed gives one image (its latent, and for conditional nets a random class, come from that seed alone),
so results are the same for any batch size or number of processes. --class fixes the class.
"""

import argparse
import os

import PIL.Image
import torch

from d2o_fast.checkpoint import load_network
from d2o_fast.cli import run_main
from d2o_fast.engine import distributed as dist
from d2o_fast.engine.progress import save_image_grid
from d2o_fast.errors import ConfigError
from d2o_fast.metrics.fid import images_to_uint8, parse_seeds, seed_latents
from d2o_fast.nets import edm_sampler


def parse_args(argv):
    p = argparse.ArgumentParser(prog='python -m d2o_fast.sample', description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', required=True, help='snapshot (.safetensors), EDM or D2O pickle')
    p.add_argument('--seeds', default='0-63', help='e.g. 0-63 or 1,5,10-19')
    p.add_argument('--grid', help='write one PNG grid here')
    p.add_argument('--outdir', help='write one PNG per seed here')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--class', dest='class_idx', type=int, help='class index for conditional nets (default: random per seed)')
    p.add_argument('--steps', type=int, help='Heun steps for an EDM denoiser (default: 18 at 32x32, 40 at 64x64)')
    args = p.parse_args(argv)
    if not args.grid and not args.outdir:
        p.error('give --grid PATH and/or --outdir DIR')
    if args.batch < 1:
        p.error('--batch must be >= 1')
    return args


def sample_batch(net, z, labels, steps):
    if callable(getattr(net, 'generate', None)):
        return net.generate(z, labels)
    return edm_sampler(net, z, labels, num_steps=steps)


@torch.no_grad()
def main(argv):
    args = parse_args(argv)
    rank, world, device = dist.init_distributed()
    net = load_network(args.ckpt).to(device).eval()
    seeds = parse_seeds(args.seeds)
    if args.class_idx is not None and not 0 <= args.class_idx < max(net.label_dim, 1):
        raise ConfigError(f'--class {args.class_idx} is out of range for a net with {net.label_dim} classes')
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
    mine = seeds[rank::world]
    images = []
    for i in range(0, len(mine), args.batch):
        part = mine[i:i + args.batch]
        z, labels = seed_latents(net, part, device)
        if labels is not None and args.class_idx is not None:
            labels = torch.nn.functional.one_hot(torch.full([len(part)], args.class_idx), net.label_dim).float().to(device)
        x = sample_batch(net, z, labels, args.steps).clamp(-1, 1)
        if args.outdir:
            for seed, img in zip(part, images_to_uint8(x).cpu()):
                PIL.Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy()).save(os.path.join(args.outdir, f'seed{seed:06d}.png'))
        if args.grid:
            images.append((part, x.cpu()))
        if dist.is_main():
            print(f'{min(i + args.batch, len(mine)) * world}/{len(seeds)} images', flush=True)
    if args.grid:
        gathered = dist.gather_objects(images)
        if dist.is_main():
            by_seed = {s: img for chunk in gathered for part, x in chunk for s, img in zip(part, x)}
            save_image_grid(torch.stack([by_seed[s] for s in seeds]), args.grid)
            print(f'grid: {args.grid}')


if __name__ == '__main__':
    run_main(main)
