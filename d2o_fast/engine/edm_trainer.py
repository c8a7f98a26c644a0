"""One EDM pre-training iteration (Karras et al. 2022): denoising score matching with log-normal sigmas.

    sigma = exp(P_mean + P_std * n),  weight = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2
    loss  = weight * |D(y + sigma * eps; sigma) - y|^2
"""

import torch

from d2o_fast.engine import distributed as dist
from d2o_fast.engine.compile import apply_activation_checkpointing, to_channels_last
from d2o_fast.engine.ema import ema_beta, make_ema, update_ema
from d2o_fast.engine.optim import autocast_context, autocast_dtype, finish_gradients, make_adam


def edm_loss(net, images, labels, noise, log_sigma_normal, p_mean, p_std, sigma_data):
    """Per-sample EDM loss (mean over pixels) for given standard-normal draws."""
    sigma = (log_sigma_normal * p_std + p_mean).exp().reshape(-1, 1, 1, 1)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2
    denoised = net(images + noise * sigma, sigma.flatten(), labels)
    return (weight * (denoised - images) ** 2).mean(dim=[1, 2, 3])


class EDMTrainer:
    """Owns the denoiser, its EMA and the optimizer; `step()` runs one iteration."""

    def __init__(self, net, cfg, device, batch_gpu, rounds):
        self.cfg = cfg
        self.device = device
        self.batch_gpu = batch_gpu
        self.rounds = rounds
        self.G = net.to(device).train()
        self.params = [p for p in self.G.parameters() if p.requires_grad]
        self.G_ema = make_ema(self.G)
        # As in D2OTrainer, after the EMA copy (which stays NCHW, the layout snapshots store). With NHWC weights the
        # first convolution turns the NCHW input into NHWC activations, so step() needs no change of its own.
        if cfg.checkpointing:
            apply_activation_checkpointing(self.G)
        if cfg.channels_last:
            to_channels_last(self.G)
        self.dtype = autocast_dtype(cfg.precision, device)
        self.opt = make_adam(self.params, cfg.lr, (0.9, 0.999), device)
        self.fwd = torch.compile(self.G, dynamic=False) if cfg.compile else self.G

    def _draws(self, step, shape_one, rank):
        per_rank = self.batch_gpu * self.rounds
        noise = dist.global_randn(dist.rng_key(self.cfg.seed, step, 0), self.cfg.batch, shape_one, rank, per_rank, self.device)
        log_sigma = dist.global_randn(dist.rng_key(self.cfg.seed, step, 1), self.cfg.batch, [], rank, per_rank, self.device)
        return noise, log_sigma

    def step(self, images, labels, step, images_seen, rank=0):
        """One iteration; returns {'loss': 0-d device tensor} (this rank's, read by the loop once per tick)."""
        labels = labels if labels.shape[1] else None
        noise, log_sigma = self._draws(step, images.shape[1:], rank)
        for group in self.opt.param_groups:  # EDM's linear learning-rate warm-up
            group['lr'] = self.cfg.lr * min(images_seen / max(self.cfg.lr_rampup_kimg * 1000, 1e-8), 1)
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros([], device=self.device)
        pieces = zip(images.chunk(self.rounds), labels.chunk(self.rounds) if labels is not None else [None] * self.rounds,
                     noise.chunk(self.rounds), log_sigma.chunk(self.rounds))
        for x, c, n, s in pieces:
            with autocast_context(self.device, self.dtype):
                loss = edm_loss(self.fwd, x, c, n, s, self.cfg.p_mean, self.cfg.p_std, self.cfg.sigma_data).mean()
            (loss / self.rounds).backward()
            total += loss.detach() / self.rounds
        finish_gradients(self.params, self.opt)
        update_ema(self.G_ema, self.G, ema_beta(images_seen, self.cfg.batch, self.cfg.ema_mimg, self.cfg.ema_rampup))
        return dict(loss=total)

    def state_dict(self):
        return dict(G=self.G.state_dict(), G_ema=self.G_ema.state_dict(), opt=self.opt.state_dict())

    def load_state_dict(self, state):
        self.G.load_state_dict(state['G'])
        self.G_ema.load_state_dict(state['G_ema'])
        self.opt.load_state_dict(state['opt'])
