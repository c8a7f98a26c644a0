"""Forward (and optionally forward+backward to the image) time of a discriminator.

  python benchmarks/bench_discriminator.py --backbones vgg16_bn,tf_efficientnet_lite0 --batch 8 --res 32
  python benchmarks/bench_discriminator.py ... --bf16 --channels-last --backward
  python benchmarks/bench_discriminator.py --kind stylegan2 --res 32 --batch 64

Random-init weights (timing does not depend on them). Prints one line per configuration.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from d2o_fast.discriminators import build_discriminator, logit_parts


def time_discriminator(d, img, c, bf16, backward, warmup, iters):
    def step():
        x = img.detach().requires_grad_(backward)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(backward):
            logits = d(x, c)
        if backward:
            torch.autograd.grad(sum(p.float().sum() for p in logit_parts(logits)), [x])
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return min(times), sum(times) / len(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--kind', default='projected', choices=['projected', 'stylegan2'])
    p.add_argument('--backbones', default='vgg16_bn,tf_efficientnet_lite0')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--res', type=int, default=32, help='image resolution fed to the discriminator')
    p.add_argument('--c-dim', type=int, default=0)
    p.add_argument('--bf16', action='store_true', help='bfloat16 autocast')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--no-fold-bn', action='store_true', help='keep backbone BatchNorms unfolded')
    p.add_argument('--backward', action='store_true', help='also backpropagate to the input image (G step / R1)')
    p.add_argument('--train-mode', action='store_true', help='heads in train mode (batch-stat BN, spectral-norm power iteration)')
    p.add_argument('--warmup', type=int, default=1)
    p.add_argument('--iters', type=int, default=3)
    p.add_argument('--threads', type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    if a.kind == 'projected':
        d = build_discriminator('projected', a.res, 3, a.c_dim, backbones=a.backbones.split(','), pretrained=False,
                                fold_bn=not a.no_fold_bn, channels_last=a.channels_last)
    else:
        d = build_discriminator('stylegan2', a.res, 3, a.c_dim)
        if a.channels_last:
            d = d.to(memory_format=torch.channels_last)
    d.train(a.train_mode)
    img = torch.rand(a.batch, 3, a.res, a.res) * 2 - 1
    c = F.one_hot(torch.arange(a.batch) % a.c_dim, a.c_dim).float() if a.c_dim else None
    best, mean = time_discriminator(d, img, c, a.bf16, a.backward, a.warmup, a.iters)
    what = 'fwd+bwd' if a.backward else 'fwd'
    config = f'{a.kind} {a.backbones if a.kind == "projected" else ""} batch={a.batch} res={a.res} ' \
             f'{"bf16" if a.bf16 else "fp32"} {"channels_last" if a.channels_last else "contiguous"} ' \
             f'fold_bn={not a.no_fold_bn} threads={torch.get_num_threads()}'
    print(f'{config}: {what} best {best * 1e3:.0f} ms, mean {mean * 1e3:.0f} ms, '
          f'{a.batch / best:.1f} img/s')


if __name__ == '__main__':
    main()
