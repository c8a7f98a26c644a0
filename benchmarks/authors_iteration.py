"""The authors' D2O / D2O-F training iteration (github.com/Zyriix/D2O), run from their own code on CPU.

None of their code is in this repository: `load_authors_code(DIR)` imports their modules from a checkout that the
user fetched, and `AuthorsIteration` drives them as their training loop (training/training_loop.py) does: a G
stage, a D stage and, every 16th iteration, an R1 stage with gain 16, each one zero_grad(set_to_none) ->
their D2OLoss.accumulate_gradients -> nan_to_num of that network's gradients -> Adam step; then the EMA.
The settings are their train.sh's CIFAR-10 recipe (`CIFAR10_RECIPE`).

What is adapted at run time (their files are not modified):
  - backbones: their builder asks torchvision / timm for pretrained weights; here the same constructors build
    them with random weights (nothing can be downloaded; the time does not depend on the values).
  - precision: their D2OPrecond runs the U-Net in bf16 only on CUDA (train.sh's --fp16=True); on a CPU their code
    runs it in fp32. Path 'fp32' is their code as it runs on a CPU; path 'bf16-unet' casts the U-Net's input to
    bf16 and its output back to fp32 (forward hooks), which is what their CUDA path does (on a CPU, PyTorch runs
    its bf16 FIR resampling convolutions in slow im2col kernels). Their discriminator runs in fp32 on both paths,
    as in their runs.
  - no DistributedDataParallel wrapper: one process computes what one device of theirs computes.
  - Adam's betas are given as (0.0, 0.99): torch 2.14 rejects their [0, 0.99] (an int beside a float).
  - their console prints go to stderr.
"""

import contextlib
import copy
import pathlib
import sys
import types

import torch

REQUIRED_FILES = ('training/networks.py', 'training/loss.py', 'pg_modules/discriminator.py',
                  'feature_networks/pretrained_builder.py', 'dnnlib/util.py', 'torch_utils/persistence.py')
THEIR_PACKAGES = ('dnnlib', 'torch_utils', 'training', 'pg_modules', 'feature_networks')
STAGE_G, STAGE_D, STAGE_R1 = 0, 1, 2  # their loss's stage numbers (DO_GMAIN, DO_DMAIN, DO_DR1)

# Their train.sh, CIFAR-10 unconditional, as train.py turns its flags into keyword arguments.
CIFAR10_RECIPE = dict(
    network=dict(class_name='training.networks.D2OPrecond', model_type='SongUNet', embedding_type='fourier',
                 encoder_type='residual', decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                 model_channels=128, channel_mult=[2, 2, 2], dropout=0, use_fp16=True),
    img_resolution=32, img_channels=3, label_dim=0,
    backbones=['vgg16_bn', 'tf_efficientnet_lite0'],
    lr=1e-4, dlr=1e-4, betas=(0.0, 0.99), eps=1e-8, r1_gamma=1e-4, r1_interval=16, ema_kimg=500, ema_rampup=0.05,
)
PATHS = {'fp32': dict(unet_bf16=False), 'bf16-unet': dict(unet_bf16=True)}


class AuthorsSourceError(RuntimeError):
    """--authors-src is not a usable checkout of the authors' code, or its dependencies are missing."""

#----------------------------------------------------------------------------
# Loading their code.

def check_source(path):
    """The checkout's directory as a resolved Path; AuthorsSourceError if it is not one."""
    root = pathlib.Path(path).expanduser().resolve()
    if not root.is_dir():
        raise AuthorsSourceError(f'--authors-src {path}: no such directory')
    missing = [f for f in REQUIRED_FILES if not (root / f).is_file()]
    if missing:
        raise AuthorsSourceError(f'--authors-src {path} is not a checkout of github.com/Zyriix/D2O: '
                                 f'missing {", ".join(missing)}')
    return root


@contextlib.contextmanager
def their_prints_to_stderr():
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _random_init(constructor):
    return lambda *args, **kwargs: constructor(weights=None)


def _without_pretrained_weights(builder):
    """Their backbone builder's model zoos (torchvision.models, timm) replaced by the same constructors building
    random weights: it calls zoomodels.__dict__[name](True) and timm.create_model(name, pretrained=True)."""
    if getattr(builder, 'random_weights', False):
        return
    zoo, create_model = builder.zoomodels, builder.timm.create_model
    builder.zoomodels = types.SimpleNamespace(**{name: _random_init(f) for name, f in vars(zoo).items()
                                                 if callable(f) and not name.startswith('_')})
    builder.timm = types.SimpleNamespace(create_model=lambda name, **kwargs: create_model(name, **dict(kwargs, pretrained=False)))
    builder.random_weights = True


def load_authors_code(path):
    """Import their modules from the checkout at `path` (first on sys.path) with random-weight backbones."""
    root = check_source(path)
    for name in THEIR_PACKAGES:
        module = sys.modules.get(name)
        origin = getattr(module, '__file__', None) or ''
        if module is not None and not pathlib.Path(origin).resolve().is_relative_to(root):
            raise AuthorsSourceError(f'a module named {name!r} is already imported from {origin}; run the authors\' '
                                     'code in a process of its own')
    sys.path.insert(0, str(root))
    try:
        with their_prints_to_stderr():
            import dnnlib
            from feature_networks import pretrained_builder
            from pg_modules import discriminator
            from training import loss, networks
    except ImportError as e:
        raise AuthorsSourceError(f'importing the authors\' code from {root} failed ({type(e).__name__}: {e}); it needs '
                                 'torch + torchvision, timm 0.5.4, setuptools<81 (pkg_resources), ftfy, regex and tqdm: '
                                 'see the docstring of benchmarks/paper_config.py') from e
    _without_pretrained_weights(pretrained_builder)
    return types.SimpleNamespace(root=root, dnnlib=dnnlib, networks=networks, loss=loss, discriminator=discriminator,
                                 pretrained_builder=pretrained_builder)

#----------------------------------------------------------------------------
# Their iteration.

def _cast_unet_to_bf16(unet):
    """Their CUDA path: the U-Net's input in bf16 (weights are cast per layer by their layers), output to fp32."""
    unet.register_forward_pre_hook(lambda m, args: (args[0].to(torch.bfloat16),) + tuple(args[1:]))
    unet.register_forward_hook(lambda m, args, out: out.to(torch.float32))


class AuthorsIteration:
    """Their G, feature networks, discriminator heads, optimizers, EMA and loss, built with the recipe.

    `freeze` is the D2O-F level (0 = D2O). `network` and `backbones` override the recipe's (smaller networks in
    tests). The real images are given once; each stage draws its own z inside their loss, as in their runs.
    """

    def __init__(self, code, freeze, batch, unet_bf16=False, network=None, backbones=None, recipe=CIFAR10_RECIPE,
                 seed=0):
        from d2o_fast.nets.freeze import FREEZE_KEYS, is_frozen
        torch.manual_seed(seed)
        self.recipe = r = dict(recipe, network=dict(recipe['network'], **(network or {})),
                               backbones=list(backbones or recipe['backbones']))
        self.batch = batch
        self.freeze = freeze
        res, channels, label_dim = r['img_resolution'], r['img_channels'], r['label_dim']
        with their_prints_to_stderr():
            self.net = code.dnnlib.util.construct_class_by_name(**r['network'], img_resolution=res, img_channels=channels,
                                                                label_dim=label_dim)
            self.net.train().requires_grad_(True)
            self.feature_net, self.discriminator = self._build_discriminator(code, r, res, channels, label_dim)
        if unet_bf16:
            _cast_unet_to_bf16(self.net.model)

        # Their optimizer set: the freeze rule by parameter name; the G stage re-applies their own rule each step.
        g_params = []
        for name, p in self.net.named_parameters():
            if is_frozen(name, freeze):
                p.requires_grad_(False)
            else:
                g_params.append(p)
        self.g_params = g_params
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        interval = r['r1_interval']
        ratio = interval / (interval + 1)
        self.opt_g = torch.optim.Adam(g_params, lr=r['lr'], betas=list(r['betas']), eps=r['eps'])
        self.opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=r['dlr'] * ratio,
                                      betas=[r['betas'][0], r['betas'][1] ** ratio], eps=r['eps'])
        with their_prints_to_stderr():
            self.loss = code.loss.D2OLoss(g=self.net, d=self.discriminator, feature_net=self.feature_net,
                                          lpips_net=None, score_net=None, freeze_layer=list(FREEZE_KEYS[freeze]),
                                          multi_step_g=1, cond=bool(label_dim), teacher_only=False, teacher_type='none',
                                          loss_type='ns', r1_type='r1', r1_gamma=r['r1_gamma'], use_gp=True)
        g = torch.Generator().manual_seed(seed + 1)
        self.images = torch.rand([batch, channels, res, res], generator=g) * 2 - 1
        self.labels = torch.zeros([batch, label_dim])

    @staticmethod
    def _build_discriminator(code, r, res, channels, label_dim):
        """Their feature networks (frozen) and discriminator heads, with training_loop's keyword arguments."""
        interp224 = res < 224
        kwargs = dict(backbones=r['backbones'], diffaug=False, interp224=interp224,
                      backbone_kwargs=dict(cout=64, expand=True, proj_type=2, num_discs=4, cond=int(bool(label_dim)),
                                           rand_embedding=False, im_res=256 if interp224 else res))
        common = dict(c_dim=label_dim, img_resolution=res, img_channels=channels)
        feature_net = code.discriminator.ProjectedFeatureOnly(**copy.deepcopy(kwargs), **common)
        feature_net = feature_net.train().requires_grad_(False)
        heads = code.discriminator.ProjectedDiscriminatorOnly(
            **kwargs, channels=[f.CHANNELS for f in feature_net.feature_networks.values()],
            resolutions=[f.RESOLUTIONS for f in feature_net.feature_networks.values()], **common)
        return feature_net, heads.train().requires_grad_(True)

    #------------------------------------------------------------------------

    def _stage(self, stage, optimizer, network, gain, images_seen):
        optimizer.zero_grad(set_to_none=True)
        with their_prints_to_stderr():
            self.loss.accumulate_gradients(images=self.images, class_labels=self.labels, augment_pipe=None,
                                           stage=stage, gain=gain, cur_nimg=images_seen)
        for p in network.parameters():
            if p.grad is not None:
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        optimizer.step()

    def generator_phase(self, images_seen=0):
        self._stage(STAGE_G, self.opt_g, self.net, 1, images_seen)

    def discriminator_phase(self, images_seen=0):
        self._stage(STAGE_D, self.opt_d, self.discriminator, 1, images_seen)

    def r1_phase(self, images_seen=0):
        self._stage(STAGE_R1, self.opt_d, self.discriminator, self.recipe['r1_interval'], images_seen)

    @torch.no_grad()
    def update_ema(self, images_seen):
        half_life = self.recipe['ema_kimg'] * 1000
        if self.recipe['ema_rampup']:
            half_life = min(half_life, images_seen * self.recipe['ema_rampup'])
        beta = 0.5 ** (self.batch / max(half_life, 1e-8))
        for p_ema, p_net in zip(self.ema.parameters(), self.net.parameters()):
            p_ema.copy_(p_net.detach().lerp(p_ema, beta))

    def step(self, index, images_seen):
        """Iteration `index` of their loop (R1 when index is a positive multiple of the interval)."""
        self.generator_phase(images_seen)
        self.discriminator_phase(images_seen)
        if index and index % self.recipe['r1_interval'] == 0:
            self.r1_phase(images_seen)
        self.update_ema(images_seen)
