"""Preconditioners: EDM's multi-step denoiser and D2O's one-step generator.

Both wrap a U-Net F and return the denoised image D(x; sigma) (EDM's contract
`net(x, sigma, class_labels=None)`):
    EDMPrecond: D = c_skip x + c_out F(c_in x, ln(sigma)/4), sigma_data = 0.5.
    D2OPrecond: the same with the boundary eps = 2e-3 in c_skip and c_out; as a one-step
                generator it maps z ~ N(0, I) to G(z) = D(80 z; 80).
EDM weights load into either unchanged (same module tree under `model`).

The U-Net always receives float32 inputs: reduced precision comes only from the caller's autocast (a run's
--precision). EDM's `use_fp16` switch (True in its ImageNet ADM checkpoint) is accepted and kept in the
architecture record, so its checkpoints and snapshots of them load unchanged, but never acted on.
"""

import torch

from d2o_fast.nets.dhariwal_unet import DhariwalUNet
from d2o_fast.nets.layers import UNetBlock
from d2o_fast.nets.song_unet import SongUNet

UNET_CLASSES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet}

#----------------------------------------------------------------------------

class _Precond(torch.nn.Module):
    """Shared plumbing: architecture record, label handling."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__()
        if model_type not in UNET_CLASSES:
            raise ValueError(f'unknown model_type {model_type!r}; expected one of {sorted(UNET_CLASSES)}')
        # The architecture, as keyword arguments: what snapshots store to rebuild the net.
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data,
                                model_type=model_type, **model_kwargs)
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = UNET_CLASSES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                              out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def _labels(self, class_labels, x):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=x.device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def _coefficients(self, sigma):
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = self._labels(class_labels, x)
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma)
        F_x = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def set_dropout(self, p):
        """Change the U-Net's dropout (D2O fine-tunes with none) and record it in the architecture."""
        for m in self.model.modules():
            if isinstance(m, UNetBlock):
                m.dropout = p
        self.init_kwargs['dropout'] = p
        return self

#----------------------------------------------------------------------------

class EDMPrecond(_Precond):
    """EDM's denoiser D(x; sigma), used with the Heun sampler as the multi-step teacher."""

    def _coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class D2OPrecond(_Precond):
    """The one-step generator: EDM preconditioning with a boundary eps at the data end."""

    eps = 2e-3              # c_out vanishes at sigma = eps, c_skip is then 1.
    sigma_generate = 80.0   # the noise level the generator is run at: G(z) = D(80 z; 80).

    def _coefficients(self, sigma):
        sd, eps = self.sigma_data, self.eps
        c_skip = sd ** 2 / ((sigma - eps) ** 2 + sd ** 2)
        c_out = (sigma - eps) * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def generate(self, z, class_labels=None, **model_kwargs):
        """One step from noise z ~ N(0, I) to an image in [-1, 1] (roughly)."""
        sigma = torch.full([z.shape[0]], self.sigma_generate, device=z.device)
        return self(z * self.sigma_generate, sigma, class_labels=class_labels, **model_kwargs)


PRECOND_CLASSES = {'EDMPrecond': EDMPrecond, 'D2OPrecond': D2OPrecond, 'GDDPrecond': D2OPrecond}
