"""The Heun sampler against the exact probability-flow ODE of Gaussian data."""

import torch

from d2o_fast.nets.sampler import edm_sampler, heun_steps


def test_time_steps():
    t = heun_steps(18)
    assert len(t) == 19 and t[-1] == 0
    torch.testing.assert_close(t[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(t[-2], torch.tensor(0.002, dtype=torch.float64))
    assert (t[:-1] > t[1:]).all()


class GaussianDenoiser(torch.nn.Module):
    """Ideal denoiser for data ~ N(0, s^2 I): D(x; sigma) = s^2 / (s^2 + sigma^2) x."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        self.calls = 0

    def forward(self, x, sigma, class_labels=None):
        self.calls += 1
        sigma = sigma.reshape(-1, 1, 1, 1).to(x.dtype)
        return self.s ** 2 / (self.s ** 2 + sigma ** 2) * x


def test_heun_solves_the_gaussian_ode():
    s = 0.5
    net = GaussianDenoiser(s)
    z = torch.randn(4, 3, 32, 32)
    x = edm_sampler(net, z)
    assert net.calls == 2 * 18 - 1  # 35 NFE at 32x32
    # Exact solution of dx/dsigma = (x - D)/sigma: x(sigma) proportional to sqrt(s^2 + sigma^2).
    exact = 80 * z * s / (s ** 2 + 80 ** 2) ** 0.5
    errors = {}
    for n in (18, 50, 100, 400):
        x = edm_sampler(GaussianDenoiser(s), z, num_steps=n)
        errors[n] = ((x - exact).norm() / exact.norm()).item()
    assert errors[18] < 0.07 and errors[400] < 2e-4
    # Heun is second order: halving the step size cuts the error about fourfold.
    assert 3.0 < errors[50] / errors[100] < 5.0
    net64 = GaussianDenoiser(s)
    edm_sampler(net64, torch.randn(1, 3, 64, 64))
    assert net64.calls == 2 * 40 - 1  # 79 NFE at 64x64
