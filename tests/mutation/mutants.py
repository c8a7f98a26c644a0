"""The planted bugs of the mutation pass and the tests run against each file's mutants.

Each Mutant is (file, exact original text, replacement, description[, known_survivor reason]). The original text
must occur exactly once in the file. `known_survivor` is for a mutant that no reasonable CPU test can tell apart
from the original (equivalent code, GPU-only paths): the report gives that reason if it survives. None is listed now.
"""

import collections

Mutant = collections.namedtuple('Mutant', 'file original replacement description known_survivor', defaults=(None,))

RECIPE = 'tests/engine/test_recipe_numbers.py'

# Tests run against a file's mutants, fastest first (pytest -x stops at the first failure).
TESTS = {
    'd2o_fast/engine/gan.py': [RECIPE, 'tests/engine/test_gan.py', 'tests/engine/test_trainer_phases.py::test_r1_balance_is_the_authors'],
    'd2o_fast/engine/ema.py': [RECIPE, 'tests/engine/test_gan.py'],
    'd2o_fast/engine/optim.py': [RECIPE, 'tests/engine/test_gan.py'],
    'd2o_fast/engine/trainer.py': [RECIPE, 'tests/engine/test_trainer_phases.py',
                                   'tests/engine/test_loop.py::test_rerun_resumes_and_matches_an_uninterrupted_run',
                                   'tests/engine/test_loop.py::test_run_writes_everything_a_person_looks_at'],
    'd2o_fast/engine/state.py': [RECIPE + '::test_rng_state_round_trip', 'tests/engine/test_loop.py'],
    'd2o_fast/engine/distributed.py': [RECIPE],
    'd2o_fast/engine/edm_trainer.py': [RECIPE, 'tests/engine/test_edm_trainer.py',
                                       'tests/engine/test_loop.py::test_pretraining_with_dropout_resumes_exactly'],
    'd2o_fast/nets/precond.py': [RECIPE, 'tests/nets/test_networks.py',
                                 'tests/engine/test_loop.py::test_pretraining_with_dropout_resumes_exactly'],
    'd2o_fast/nets/freeze.py': ['tests/nets/test_freeze.py', RECIPE + '::test_each_freeze_level_freezes_exactly_its_modules'],
    'd2o_fast/checkpoint/snapshot.py': ['tests/checkpoint/test_snapshot.py', 'tests/checkpoint/test_load.py',
                                        'tests/engine/test_loop.py::test_run_writes_everything_a_person_looks_at'],
    'd2o_fast/checkpoint/load.py': ['tests/checkpoint/test_load.py', 'tests/checkpoint/test_snapshot.py',
                                    'tests/engine/test_loop.py::test_partial_snapshot_loads_onto_a_base_with_another_dropout'],
    'd2o_fast/checkpoint/transfer.py': ['tests/checkpoint/test_load.py', 'tests/checkpoint/test_precision.py',
                                        'tests/checkpoint/test_snapshot.py'],
    'd2o_fast/data/loader.py': ['tests/data/test_loader.py'],
}

GAN, EMA, OPT, TRAINER = (f'd2o_fast/engine/{n}.py' for n in ('gan', 'ema', 'optim', 'trainer'))
STATE, DIST, EDM = (f'd2o_fast/engine/{n}.py' for n in ('state', 'distributed', 'edm_trainer'))
PRECOND, FREEZE = 'd2o_fast/nets/precond.py', 'd2o_fast/nets/freeze.py'
SNAP, LOAD, TRANSFER = (f'd2o_fast/checkpoint/{n}.py' for n in ('snapshot', 'load', 'transfer'))
LOADER = 'd2o_fast/data/loader.py'

MUTANTS = [
    # The GAN objective.
    Mutant(GAN, 'return _per_sample(fake_logits, lambda t: softplus(-t)).mean()',
           'return _per_sample(fake_logits, softplus).mean()', 'G loss: saturating sign'),
    Mutant(GAN, 'return _per_sample(fake_logits, softplus).mean() +',
           'return _per_sample(fake_logits, lambda t: softplus(-t)).mean() +', 'D loss: sign of the fake term'),
    Mutant(GAN, '_per_sample(real_logits, lambda t: softplus(-t)).mean()', '_per_sample(real_logits, softplus).mean()',
           'D loss: sign of the real term'),
    Mutant(GAN, '.reshape(p.shape[0], -1).mean(dim=1) for p', '.reshape(p.shape[0], -1).sum(dim=1) for p',
           'losses: sum over a part\'s logits instead of the mean'),
    Mutant(GAN, 'return grad.square().sum(dim=[1, 2, 3])', 'return grad.abs().sum(dim=[1, 2, 3])',
           'R1: |grad| instead of |grad|^2'),
    Mutant(GAN, 'dim=1).mean()\n', 'dim=1).sum()\n', 'mean_logit: sum instead of mean (a logged statistic)'),
    # EMA.
    Mutant(EMA, 'half_life = min(half_life, images_seen * rampup)', 'half_life = max(half_life, images_seen * rampup)',
           'EMA ramp-up: max instead of min'),
    Mutant(EMA, 'return 0.5 ** (batch / max(half_life, 1e-8))', 'return 0.5 ** (max(half_life, 1e-8) / batch)',
           'EMA beta: exponent inverted'),
    Mutant(EMA, 'half_life = ema_mimg * 1e6', 'half_life = ema_mimg * 1e3', 'EMA: half-life in kimg instead of Mimg'),
    Mutant(EMA, 'p_ema.copy_(p_net.detach().lerp(p_ema, beta))', 'p_ema.copy_(p_ema.lerp(p_net.detach(), beta))',
           'EMA update: beta weighs the network instead of the average'),
    Mutant(EMA, '        b_ema.copy_(b_net)', '        pass', 'EMA: buffers not copied'),
    # Optimizer plumbing.
    Mutant(OPT, 'ADAM_EPS = 1e-8', 'ADAM_EPS = 1e-6', 'Adam eps 1e-6 instead of 1e-8'),
    Mutant(OPT, 'GRAD_CLAMP = 1e5', 'GRAD_CLAMP = 1e4', 'nan_to_num bound 1e4 instead of 1e5'),
    Mutant(OPT, 'torch.nan_to_num(p.grad, nan=0,', 'torch.nan_to_num(p.grad, nan=1,', 'nan_to_num: NaN -> 1'),
    Mutant(OPT, '    dist.average_gradients(params)\n', '    pass\n', 'finish_gradients: no averaging across ranks'),
    Mutant(OPT, '    else:\n        optimizer.step()', '    else:\n        pass', 'finish_gradients: no optimizer step'),
    # The D2O iteration.
    Mutant(TRAINER, '(penalty * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval / self.rounds)',
           '(penalty * (self.cfg.r1_gamma / 2) / self.rounds)', 'R1: not weighted by the interval'),
    Mutant(TRAINER, '(penalty * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval / self.rounds)',
           '(penalty * self.cfg.r1_gamma * self.cfg.r1_interval / self.rounds)', 'R1: gamma instead of gamma / 2'),
    Mutant(TRAINER, '(penalty * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval / self.rounds)',
           '(penalty * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval)', 'R1: accumulation rounds summed, not averaged'),
    Mutant(TRAINER, 'step > 0 and step % self.cfg.r1_interval == 0', 'step % self.cfg.r1_interval == 0',
           'R1 schedule: also at step 0'),
    Mutant(TRAINER, 'step > 0 and step % self.cfg.r1_interval == 0', 'step > 0 and step % self.cfg.r1_interval == 1',
           'R1 schedule: off by one'),
    Mutant(TRAINER, 'ratio = cfg.r1_interval / (cfg.r1_interval + 1)', 'ratio = 1.0', 'lazy R1: no D lr / beta2 rescale'),
    Mutant(TRAINER, '(ADAM_BETAS[0], ADAM_BETAS[1] ** ratio)', '(ADAM_BETAS[0], ADAM_BETAS[1])',
           'lazy R1: beta2 not rescaled'),
    Mutant(TRAINER, 'ADAM_BETAS = (0.0, 0.99)', 'ADAM_BETAS = (0.5, 0.99)', 'Adam beta1 0.5 instead of 0'),
    Mutant(TRAINER, 'x = channels_last_input(z * self.G.sigma_generate,', 'x = channels_last_input(z,',
           'generator input not scaled by sigma 80'),
    Mutant(TRAINER, 'self.G.sigma_generate, device=z.device)', 'self.G.sigma_generate / 2, device=z.device)',
           'generator run at sigma 40'),
    Mutant(TRAINER, 'beta = ema_beta(images_seen, self.global_batch,', 'beta = ema_beta(images_seen + self.global_batch, self.global_batch,',
           'EMA beta from the images seen after the step'),
    Mutant(TRAINER, "            update_ema(self.G_ema, self.G, beta)", '            pass', 'no EMA update'),
    Mutant(TRAINER, 'self.scaler.scale(loss / self.rounds).backward()', 'self.scaler.scale(loss).backward()',
           'G step: rounds summed, not averaged'),
    Mutant(TRAINER, "'D backward'):\n                (loss / self.rounds).backward()", "'D backward'):\n                loss.backward()",
           'D step: rounds summed, not averaged'),
    Mutant(TRAINER, 'self.g_params = apply_freeze(self.G, cfg.freeze)', 'self.g_params = apply_freeze(self.G, 0)',
           'freeze level ignored'),
    Mutant(TRAINER, 'z_d = None if self.reuse_fakes else self.noise(step, PHASE_D, shape_one, rank)',
           'z_d = None if self.reuse_fakes else self.noise(step, PHASE_G, shape_one, rank)',
           'D step reuses the G step\'s z'),
    Mutant(TRAINER, "        self.opt_d.load_state_dict(state['opt_d'])", '        pass', 'resume: D optimizer not restored'),
    Mutant(TRAINER, "        self.scaler.load_state_dict(state['scaler'])", '        pass', 'resume: grad scaler not restored'),
    Mutant(TRAINER, '        for p in self.d_params:\n            p.requires_grad_(False)\n',
           '        for p in self.d_params:\n            pass\n', 'G step: D parameters left trainable'),
    # Training state and RNG.
    Mutant(STATE, "    torch.set_rng_state(state['torch'])", '    pass', 'resume: torch RNG not restored'),
    Mutant(STATE, "    random.setstate((py['version'], tuple(py['internal']), py['gauss']))", '    pass',
           'resume: Python RNG not restored'),
    Mutant(STATE, "np.random.set_state(('MT19937',", "(('MT19937',", 'resume: numpy RNG not restored'),
    Mutant(STATE, 'has_gauss=int(np_state[3])', 'has_gauss=0', 'numpy RNG: cached Gaussian dropped'),
    Mutant(STATE, 'list_states(run_dir)[:-keep]', 'list_states(run_dir)[:-keep - 1]', 'keep_checkpoints off by one'),
    # Distributed.
    Mutant(DIST, '    flat /= get_world_size()', '    pass', 'gradients summed across ranks, not averaged'),
    Mutant(DIST, '        dist.broadcast(t.data, src=src)', '        pass', 'broadcast_module does nothing'),
    Mutant(DIST, 'return (seed * 1_000_003 + step) * 4 + stream', 'return (seed * 1_000_003 + step) * 4',
           'noise key ignores the stream'),
    Mutant(DIST, 'z[rank * per_rank:(rank + 1) * per_rank]', 'z[:per_rank]', 'every rank takes the first slice of noise'),
    # EDM pre-training.
    Mutant(EDM, 'weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2',
           'weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data)', 'EDM loss weight: denominator not squared'),
    Mutant(EDM, '(log_sigma_normal * p_std + p_mean).exp()', '(log_sigma_normal * p_mean + p_std).exp()',
           'EDM sigma: P_mean and P_std swapped'),
    Mutant(EDM, 'min(images_seen / max(self.cfg.lr_rampup_kimg * 1000, 1e-8), 1)',
           'min(images_seen / max(self.cfg.lr_rampup_kimg * 100, 1e-8), 1)', 'EDM lr warm-up 10x too short'),
    Mutant(EDM, 'ema_beta(images_seen, self.cfg.batch,', 'ema_beta(images_seen + self.cfg.batch, self.cfg.batch,',
           'EDM EMA beta from the images seen after the step'),
    Mutant(EDM, '(loss / self.rounds).backward()', 'loss.backward()', 'EDM: rounds summed, not averaged'),
    # Preconditioning.
    Mutant(PRECOND, 'eps = 2e-3              #', 'eps = 2e-2              #', 'generator eps 2e-2'),
    Mutant(PRECOND, 'sigma_generate = 80.0', 'sigma_generate = 40.0', 'generator sigma 40'),
    Mutant(PRECOND, 'c_skip = sd ** 2 / ((sigma - eps) ** 2 + sd ** 2)', 'c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)',
           'D2O c_skip without eps'),
    Mutant(PRECOND, 'c_out = (sigma - eps) * sd / (sigma ** 2 + sd ** 2).sqrt()', 'c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()',
           'D2O c_out without eps'),
    Mutant(PRECOND, 'c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)', 'c_skip = sd / (sigma ** 2 + sd ** 2)',
           'EDM c_skip: sd instead of sd^2'),
    Mutant(PRECOND, 'return c_skip * x + c_out * F_x.to(torch.float32)', 'return c_skip * x - c_out * F_x.to(torch.float32)',
           'preconditioning: sign of the network term'),
    Mutant(PRECOND, 'return self(z * self.sigma_generate, sigma,', 'return self(z, sigma,', 'generate: z not scaled by sigma'),
    Mutant(PRECOND, '                m.dropout = p\n', '                pass\n', 'set_dropout does not change the blocks'),
    # Freeze levels.
    Mutant(FREEZE, "1: ('conv', 'proj'),", "1: ('conv',),", 'level 1 leaves attention proj trainable'),
    Mutant(FREEZE, "3: ('conv', 'proj', 'qkv', 'skip')", "3: ('conv', 'proj', 'qkv')", 'level 3 leaves skip trainable'),
    Mutant(FREEZE, "BLOCK_KEYS = ('block', 'up', 'down', 'in')", "BLOCK_KEYS = ('block', 'up', 'down')",
           "decoder 'in' blocks not frozen"),
    Mutant(FREEZE, 'return any(k in name for k in BLOCK_KEYS) and any(', 'return any(k in name for k in BLOCK_KEYS) or any(',
           'freeze rule: or instead of and'),
    Mutant(FREEZE, '        p.requires_grad_(not frozen)', '        p.requires_grad_(True)', 'apply_freeze freezes nothing'),
    # Checkpoints.
    Mutant(SNAP, "} | {n for n, _ in net.named_buffers()}", '}', 'trainable-only snapshot drops buffers'),
    Mutant(SNAP, "if header.get('format_version') != str(FORMAT_VERSION):", 'if False:', 'snapshot version not checked'),
    Mutant(LOAD, '    if actual != expected:', '    if False:', 'base checkpoint hash not checked'),
    Mutant(LOAD, "            net.set_dropout(record['init_kwargs']['dropout'])", '            pass',
           "snapshot's dropout not applied over its base"),
    Mutant(TRANSFER, '            expected[name].copy_(t)', '            pass', 'overlay does not write the tensors'),
    Mutant(TRANSFER, "t.detach().to(device='cpu', dtype=expected[name].dtype)", "t.detach().to(device='cpu')",
           'loaded tensors keep the file dtype'),
    # The data stream.
    Mutant(LOADER, 'PIXEL_MEAN = 127.5', 'PIXEL_MEAN = 128.0', 'pixels shifted by half a level'),
    Mutant(LOADER, 'images[flips] = images[flips][..., ::-1]', 'images[flips] = images[flips][..., ::-1, :]',
           'x-flip flips vertically'),
    Mutant(LOADER, 'self.order.take(position + self.rank * self.batch_per_device,', 'self.order.take(position,',
           'every rank reads the same images'),
    Mutant(LOADER, 'self.position = epoch * self.order.num_items + offset', 'self.position = offset',
           'resume position ignores the epoch'),
    Mutant(LOADER, '        self.position = epoch * self.order.num_items + offset\n        self._restart()',
           '        self.position = epoch * self.order.num_items + offset', 'resume keeps stale prefetched batches'),
]
