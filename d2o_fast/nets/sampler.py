"""EDM's deterministic Heun sampler: the multi-step teacher D2O is compared against."""

import numpy as np
import torch

# Steps EDM uses per resolution: 18 (35 NFE) at 32x32, 40 (79 NFE) at 64x64.
DEFAULT_STEPS = {32: 18, 64: 40}


def heun_steps(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's time discretisation, with the final 0 appended (float64)."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


@torch.no_grad()
def edm_sampler(net, latents, class_labels=None, num_steps=None, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Heun 2nd-order ODE sampler (EDM Algorithm 1 with S_churn = 0); latents ~ N(0, I)."""
    if num_steps is None:
        num_steps = DEFAULT_STEPS.get(latents.shape[-1], 18)
    sigma_min = max(sigma_min, getattr(net, 'sigma_min', 0))
    sigma_max = min(sigma_max, getattr(net, 'sigma_max', np.inf))
    t_steps = heun_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        denoised = net(x_cur, t_cur.expand(x_cur.shape[0]), class_labels).to(torch.float64)
        d_cur = (x_cur - denoised) / t_cur
        x_next = x_cur + (t_next - t_cur) * d_cur
        if i < num_steps - 1:  # second-order correction, except on the last step to sigma = 0
            denoised = net(x_next, t_next.expand(x_cur.shape[0]), class_labels).to(torch.float64)
            d_prime = (x_next - denoised) / t_next
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(torch.float32)
