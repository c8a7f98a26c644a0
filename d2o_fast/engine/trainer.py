"""One D2O / D2O-F training iteration: G step, then D step, then (every r1_interval steps) a lazy R1 step.

The generator is a D2OPrecond run at sigma = 80: G(z) = D(80 z; 80). Each phase draws its own z from a
generator keyed by (seed, step, phase) for the whole global batch, and each rank takes its slice, so the
result does not depend on the number of processes or on where a run was resumed.
"""

import contextlib
import dataclasses

import torch

from d2o_fast.engine import distributed as dist
from d2o_fast.engine.ema import ema_beta, make_ema, update_ema
from d2o_fast.engine.gan import discriminator_loss, generator_loss, mean_logit, r1_penalty
from d2o_fast.nets import apply_freeze

PHASE_G, PHASE_D = 1, 2
ADAM_BETAS = (0.0, 0.99)
ADAM_EPS = 1e-8
GRAD_CLAMP = 1e5   # nan_to_num bounds for gradients, as the authors


@dataclasses.dataclass
class StepStats:
    loss_g: float
    loss_d: float
    logit_real: float
    logit_fake: float
    r1_penalty: float = float('nan')

    def finite(self):
        return all(torch.isfinite(torch.tensor(v)) for v in (self.loss_g, self.loss_d))


def autocast_dtype(precision, device):
    if precision == 'auto':
        precision = 'bf16' if device.type == 'cuda' else 'fp32'
    return {'bf16': torch.bfloat16, 'fp16': torch.float16, 'fp32': None}[precision]


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _make_adam(params, lr, betas, device):
    # fused Adam on CUDA (one kernel for all tensors), foreach on CPU.
    fused = device.type == 'cuda'
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=ADAM_EPS, fused=fused or None, foreach=None if fused else True)


class D2OTrainer:
    """Owns G, its EMA, D, both optimizers and the grad scaler; `step()` runs one iteration."""

    def __init__(self, G, D, cfg, device, batch_gpu, rounds):
        self.cfg = cfg
        self.device = device
        self.batch_gpu = batch_gpu
        self.rounds = rounds
        self.global_batch = cfg.batch
        self.G = G.to(device).train()
        self.D = D.to(device).train()
        self.g_params = apply_freeze(self.G, cfg.freeze)
        self.d_params = list(self.D.trainable_parameters())
        self.G_ema = make_ema(self.G)
        self.g_dtype = autocast_dtype(cfg.precision, device)
        self.d_dtype = autocast_dtype(cfg.disc_precision, device)

        # Lazy regularisation: D's lr and beta2 are rescaled for the extra R1 step every `interval` steps.
        ratio = cfg.r1_interval / (cfg.r1_interval + 1)
        self.opt_g = _make_adam(self.g_params, cfg.lr, ADAM_BETAS, device)
        self.opt_d = _make_adam(self.d_params, cfg.dlr * ratio, (ADAM_BETAS[0], ADAM_BETAS[1] ** ratio), device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.g_dtype == torch.float16)

        # Forward passes may be compiled; R1's double backward always runs the eager discriminator.
        self.G_fwd, self.D_fwd = self.G, self.D
        if cfg.compile:
            self.G_fwd = torch.compile(self.G, dynamic=False)
            self.D_fwd = torch.compile(self.D, dynamic=False)

    #------------------------------------------------------------------------

    def noise(self, step, phase, shape_one, rank):
        """z for this rank's part of the global batch, keyed by (seed, step, phase)."""
        g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + step) * 4 + phase)
        z = torch.randn([self.global_batch, *shape_one], generator=g)
        per_rank = self.batch_gpu * self.rounds
        return z[rank * per_rank:(rank + 1) * per_rank].to(self.device)

    def generate(self, z, labels, grad):
        with torch.set_grad_enabled(grad), _autocast(self.device, self.g_dtype):
            return self.G_fwd(z * self.G.sigma_generate, torch.full([z.shape[0]], self.G.sigma_generate, device=z.device),
                              labels).float()

    def discriminate(self, images, labels):
        with _autocast(self.device, self.d_dtype):
            return self.D_fwd(images, labels)

    def _finish(self, opt, params, scaler=None):
        if scaler is not None:
            scaler.unscale_(opt)
        dist.average_gradients(params)
        for p in params:
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=GRAD_CLAMP, neginf=-GRAD_CLAMP, out=p.grad)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    #------------------------------------------------------------------------

    def step(self, images, labels, step, images_seen, rank=0):
        """One iteration on this rank's images [B_rank, C, H, W] in [-1, 1] and one-hot labels."""
        shape_one = images.shape[1:]
        labels = labels if labels.shape[1] else None
        chunks = list(zip(images.chunk(self.rounds), labels.chunk(self.rounds) if labels is not None else [None] * self.rounds))

        # G step: D's parameters do not require grad, so backward computes only what reaches G.
        z_all = self.noise(step, PHASE_G, shape_one, rank).chunk(self.rounds)
        for p in self.d_params:
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g = logit_fake = 0.0
        for (real, c), z in zip(chunks, z_all):
            fake = self.generate(z, c, grad=True)
            logits = self.discriminate(fake, c)
            loss = generator_loss(logits)
            self.scaler.scale(loss / self.rounds).backward()
            loss_g += loss.item() / self.rounds
        for p in self.d_params:
            p.requires_grad_(True)
        self._finish(self.opt_g, self.g_params, self.scaler if self.scaler.is_enabled() else None)

        # D step: fakes from a fresh z, generated without a graph.
        z_all = self.noise(step, PHASE_D, shape_one, rank).chunk(self.rounds)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d = logit_real = 0.0
        for (real, c), z in zip(chunks, z_all):
            fake = self.generate(z, c, grad=False)
            fake_logits = self.discriminate(fake, c)
            real_logits = self.discriminate(real, c)
            loss = discriminator_loss(fake_logits, real_logits)
            (loss / self.rounds).backward()
            loss_d += loss.item() / self.rounds
            logit_fake += mean_logit(fake_logits).item() / self.rounds
            logit_real += mean_logit(real_logits).item() / self.rounds
        self._finish(self.opt_d, self.d_params)

        stats = StepStats(loss_g=dist.all_reduce_mean(loss_g, self.device), loss_d=dist.all_reduce_mean(loss_d, self.device),
                          logit_real=dist.all_reduce_mean(logit_real, self.device),
                          logit_fake=dist.all_reduce_mean(logit_fake, self.device))

        # Lazy R1 on reals, through the whole (eager) discriminator, weighted by the interval.
        if self.cfg.r1_gamma > 0 and step > 0 and step % self.cfg.r1_interval == 0:
            self.opt_d.zero_grad(set_to_none=True)
            penalty_sum = 0.0
            for real, c in chunks:
                with _autocast(self.device, self.d_dtype):
                    penalty = r1_penalty(self.D, real, c)
                (penalty.mean() * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval / self.rounds).backward()
                penalty_sum += penalty.mean().item() / self.rounds
            self._finish(self.opt_d, self.d_params)
            stats.r1_penalty = dist.all_reduce_mean(penalty_sum, self.device)

        # EMA with the half-life ramp-up (images seen before this step, as the authors).
        update_ema(self.G_ema, self.G, ema_beta(images_seen, self.global_batch, self.cfg.ema_mimg, self.cfg.ema_rampup))
        return stats

    #------------------------------------------------------------------------

    def state_dict(self):
        return dict(G=self.G.state_dict(), G_ema=self.G_ema.state_dict(), D=self.D.state_dict(),
                    opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(), scaler=self.scaler.state_dict())

    def load_state_dict(self, state):
        self.G.load_state_dict(state['G'])
        self.G_ema.load_state_dict(state['G_ema'])
        self.D.load_state_dict(state['D'])
        self.opt_g.load_state_dict(state['opt_g'])
        self.opt_d.load_state_dict(state['opt_d'])
        self.scaler.load_state_dict(state['scaler'])
