"""--reuse-fakes: the D step trains on the G step's fakes (generated before G's update) through the G step's frozen
discriminator features. Checked against a reference written out by hand: the pre-update generator run on the G
step's noise, the whole discriminator run on those fakes and on the reals, the loss and D's update."""

import copy

import pytest
import torch

from d2o_fast.engine.config import resolve_config
from d2o_fast.engine.gan import discriminator_loss, mean_logit
from d2o_fast.engine.optim import finish_gradients
from d2o_fast.engine.trainer import D2OTrainer, map_tensors
from d2o_fast.errors import ConfigError
from d2o_fast.nets import labelled_batch
from tests.engine.conftest import tiny_generator_and_discriminator

RES, CLASSES, CPU = 16, 3, torch.device('cpu')


def trainer(disc, freeze, reuse_fakes, c_dim=CLASSES, rounds=2, **config):
    G, D = tiny_generator_and_discriminator(disc, c_dim, seed=0)
    cfg = resolve_config('demo', init='random', arch='ddpmpp', disc=disc, freeze=freeze, batch=2 * rounds, seed=5,
                         lr=1e-3, dlr=1e-3, precision='fp32', r1_interval=4, reuse_fakes=reuse_fakes, **config)
    return D2OTrainer(G, D, cfg, CPU, batch_gpu=2, rounds=rounds)


def batch(t, seed=1):
    n = t.batch_gpu * t.rounds
    images, labels = labelled_batch(n, [3, RES, RES], t.G.label_dim, seed, values='uniform', labels='random')
    return images, (labels if labels is not None else torch.zeros([n, 0]))


def reference_d_step(ref, G_before, images, labels, z_g):
    """The D step of --reuse-fakes written out: fakes = the pre-update G on the G step's noise, then D (its state after
    the G step: heads' spectral-norm vectors and BatchNorm statistics moved) on fakes, then on reals, per round."""
    reals, conds = ref.split(images, labels)
    ref.opt_d.zero_grad(set_to_none=True)
    loss_d = logit_fake = logit_real = 0
    for real, c, z in zip(reals, conds, z_g.chunk(ref.rounds)):
        with torch.no_grad():
            fake = G_before(z * G_before.sigma_generate, torch.full([z.shape[0]], G_before.sigma_generate), c).float()
        fake_logits, real_logits = ref.D(fake, c), ref.D(real, c)
        loss = discriminator_loss(fake_logits, real_logits)
        (loss / ref.rounds).backward()
        loss_d += loss.detach() / ref.rounds
        logit_fake += mean_logit(fake_logits) / ref.rounds
        logit_real += mean_logit(real_logits) / ref.rounds
    finish_gradients(ref.d_params, ref.opt_d)
    return dict(loss_d=loss_d, logit_fake=logit_fake, logit_real=logit_real)


CASES = [('stylegan2', 0, CLASSES), ('stylegan2', 3, 0), ('projected', 1, CLASSES), ('projected', 2, 0)]


@pytest.mark.parametrize('disc,freeze,c_dim', CASES)
def test_d_step_equals_the_reference_from_the_g_step_fakes(disc, freeze, c_dim):
    """Two accumulation rounds: the reuse step's D-step statistics and updated D equal the reference's; its G step
    (and so G) is the plain G step's; and the D step differs from the default's, which draws fresh fakes."""
    reuse, ref, plain = (trainer(disc, freeze, r, c_dim) for r in (True, False, False))
    images, labels = batch(reuse)
    step = 1
    z_g, z_d = reuse.draws(step, images.shape[1:], 0)
    assert z_d is None
    G_before = copy.deepcopy(ref.G)
    stats = reuse.step(images, labels, step, 0)

    reals, conds = ref.split(images, labels)
    g_stats, kept = ref.generator_phase(reals, conds, z_g.chunk(ref.rounds))
    assert kept is None
    expected = reference_d_step(ref, G_before, images, labels, z_g)
    torch.testing.assert_close(stats['loss_g'], g_stats['loss_g'], rtol=1e-6, atol=1e-7)
    for k, v in expected.items():
        torch.testing.assert_close(stats[k], v, rtol=1e-5, atol=1e-6, msg=k)
    for k, v in ref.G.state_dict().items():
        torch.testing.assert_close(reuse.G.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=f'G.{k}')
    state = reuse.D.state_dict()
    for k, v in ref.D.state_dict().items():   # heads' weights (updated), BatchNorm statistics, spectral-norm vectors
        torch.testing.assert_close(state[k], v, rtol=1e-4, atol=1e-6, msg=f'D.{k}')
    before = trainer(disc, freeze, False, c_dim).D.state_dict()
    assert any(not torch.equal(v, before[k]) for k, v in state.items() if k.startswith(('heads', 'blocks', 'out')))

    fresh = plain.step(images, labels, step, 0)
    torch.testing.assert_close(fresh['loss_g'], stats['loss_g'], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(fresh['logit_fake'], stats['logit_fake'])   # other fakes in the D step


def test_g_step_keeps_only_detached_features():
    """The kept features are detached (no graph outlives the G step) and are what D.features gives on the fakes."""
    t = trainer('projected', 1, True)
    images, labels = batch(t)
    reals, conds = t.split(images, labels)
    z_g, _ = t.draws(0, images.shape[1:], 0)
    G_before = copy.deepcopy(t.G)
    _, kept = t.generator_phase(reals, conds, z_g.chunk(t.rounds))
    assert len(kept) == t.rounds
    for feats, c, z in zip(kept, conds, z_g.chunk(t.rounds)):
        tensors = [f for per_backbone in feats for f in per_backbone]
        assert len(tensors) == 4 and all(not f.requires_grad and f.grad_fn is None for f in tensors)
        with torch.no_grad():
            fake = G_before(z * G_before.sigma_generate, torch.full([z.shape[0]], G_before.sigma_generate), c).float()
            expected = t.D.features(fake, c)
        for a, b in zip(tensors, [f for per_backbone in expected for f in per_backbone]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_d_step_runs_neither_g_nor_the_backbones_on_fakes():
    """Per round, one generator forward (the G step's) and one backbone pass on fakes (the G step's); the D step runs
    the backbones on reals only."""
    t = trainer('projected', 1, True)
    images, labels = batch(t)
    fnet = next(iter(t.D.feature_networks.values()))
    calls = {'G': 0, 'backbone': []}
    generate = t.generate

    def counting(z, c, grad):
        calls['G'] += 1
        return generate(z, c, grad)
    t.generate = counting
    fnet.register_forward_hook(lambda module, args, out: calls['backbone'].append(args[0].shape[0]))
    t.step(images, labels, 1, 0)
    assert calls['G'] == t.rounds and calls['backbone'] == [2] * (2 * t.rounds)   # fakes in G step, reals in D step


def test_map_tensors_keeps_the_structure():
    x = torch.ones(2, requires_grad=True) * 2
    out = map_tensors(torch.Tensor.detach, ((x, x + 1), [x]))
    assert isinstance(out, tuple) and isinstance(out[0], tuple) and isinstance(out[1], list)
    assert all(not t.requires_grad for t in (out[0][0], out[0][1], out[1][0])) and torch.equal(out[0][1], x.detach() + 1)


def test_reuse_needs_a_split_discriminator():
    class WholeD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def trainable_parameters(self):
            return [self.w]

        def forward(self, x, c):
            return x.mean(dim=[1, 2, 3])[:, None] * self.w
    t = trainer('stylegan2', 1, True)
    with pytest.raises(ConfigError, match='--reuse-fakes'):
        D2OTrainer(t.G, WholeD(), t.cfg, CPU, batch_gpu=2, rounds=2)
