"""One D2O / D2O-F training iteration: G step, D step and EMA, then (every r1_interval steps) a lazy R1 step.

The generator is a D2OPrecond run at sigma = 80: G(z) = D(80 z; 80). Each phase draws its own z from a
generator keyed by (seed, step, phase) for the whole global batch, and each rank takes its slice, so the
result does not depend on the number of processes or on where a run was resumed.

With --reuse-fakes the D step takes the G step's fakes instead of drawing its own: the discriminator's frozen part
(the projected discriminator's backbones and projections, D.features) ran on them in the G step, and its output,
detached, goes to the D step, where only the trainable heads (D.heads_forward) run on it again. The D step then
trains on samples of the generator before its update; nothing of it outlives the iteration.

Nothing in an iteration reads a device value on the host: the step returns its statistics as 0-d device tensors
(the training loop reads them once per tick), and the EMA beta and R1 schedule come from Python integers. That
lets `--cudagraphs step` capture G step + D step + EMA as one CUDA graph (StepGraph) over static input buffers.
"""

import copy
import time

import torch

from d2o_fast.engine import distributed as dist
from d2o_fast.engine.compile import (SpeedOptionError, StepGraph, apply_activation_checkpointing, channels_last_input,
                                     check_speed_options, compile_forward, mark_step_begin, to_channels_last)
from d2o_fast.engine.ema import ema_beta, make_ema, update_ema
from d2o_fast.engine.profiling import nvtx_range
from d2o_fast.engine.optim import autocast_context, autocast_dtype, finish_gradients, make_adam, stepping_outside_graph
from d2o_fast.engine.gan import discriminator_loss, generator_loss, mean_logit, r1_penalty
from d2o_fast.errors import ConfigError
from d2o_fast.nets import apply_freeze, labelled_batch

PHASE_G, PHASE_D = 1, 2
ADAM_BETAS = (0.0, 0.99)
ITERATION_STATS = ('loss_g', 'loss_d', 'logit_fake', 'logit_real')   # what G step + D step report, in this order


def map_tensors(fn, value):
    """fn applied to a tensor, or to every tensor of nested tuples / lists (the structure kept)."""
    if torch.is_tensor(value):
        return fn(value)
    return type(value)(map_tensors(fn, v) for v in value)


class D2OTrainer:
    """Owns G, its EMA, D, both optimizers and the grad scaler; `step()` runs one iteration.

    static_step: run G step + D step + EMA through StepGraph over static input buffers (None: when --cudagraphs step).
    It captures a CUDA graph on CUDA only; tests pass static_step=True on CPU to run the same structure uncaptured.
    """

    def __init__(self, G, D, cfg, device, batch_gpu, rounds, static_step=None):
        check_speed_options(cfg, device, dist.get_world_size())
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
        # The EMA is only ever run under no_grad; its flags mirror G's so that a D2O-F snapshot of it knows
        # which tensors are trainable (stored) and which are frozen (taken from the base checkpoint).
        for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()):
            p_ema.requires_grad_(p.requires_grad)
        # Layout and checkpointing are applied after the EMA copy: the EMA never runs backward and stays NCHW,
        # the layout snapshots store. Both keep the same Parameter objects, so the optimizers below see them.
        if cfg.checkpointing:
            apply_activation_checkpointing(self.G)
        if cfg.channels_last:
            to_channels_last(self.G)
            to_channels_last(self.D)
        self.g_dtype = autocast_dtype(cfg.precision, device)
        self.d_dtype = autocast_dtype(cfg.disc_precision, device)

        # Lazy regularisation: D's lr and beta2 are rescaled for the extra R1 step every `interval` steps.
        static_step = cfg.cudagraphs == 'step' if static_step is None else static_step
        capture = static_step and device.type == 'cuda'
        ratio = cfg.r1_interval / (cfg.r1_interval + 1)
        self.opt_g = make_adam(self.g_params, cfg.lr, ADAM_BETAS, device, capturable=capture)
        self.opt_d = make_adam(self.d_params, cfg.dlr * ratio, (ADAM_BETAS[0], ADAM_BETAS[1] ** ratio), device,
                               capturable=capture)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.g_dtype == torch.float16)

        # Forward passes may be compiled (d2o_fast/engine/compile.py); R1's double backward always runs the
        # eager discriminator.
        # The D step's fakes (no grad) use G_fakes: the compiled G too, unless --compile-fakes says otherwise.
        # With --reuse-fakes, D runs as its two parts (D_features, D_heads) on fakes, and whole on reals.
        self.reuse_fakes = cfg.reuse_fakes
        self.compiled = cfg.compile or cfg.cudagraphs != 'off'
        self.G_fwd, self.D_fwd, self.G_fakes = self.G, self.D, self.G
        if self.reuse_fakes and not (hasattr(self.D, 'features') and hasattr(self.D, 'heads_forward')):
            raise ConfigError(f'--reuse-fakes needs a discriminator split into features() and heads_forward(); '
                              f'{type(self.D).__name__} is not')
        self.D_features, self.D_heads = (self.D.features, self.D.heads_forward) if self.reuse_fakes else (None, None)
        if self.compiled:
            graphs = cfg.cudagraphs == 'networks'
            self.G_fwd = compile_forward(self.G, cudagraphs=graphs)
            self.D_fwd = compile_forward(self.D, cudagraphs=graphs)
            if self.reuse_fakes:
                self.D_features = compile_forward(self.D.features, cudagraphs=graphs)
                self.D_heads = compile_forward(self.D.heads_forward, cudagraphs=graphs)
            compile_fakes = device.type == 'cuda' if cfg.compile_fakes is None else cfg.compile_fakes
            self.G_fakes = self.G_fwd if compile_fakes else self.G
        # Whole-iteration graph: static buffers (allocated at the first step) and the step structure around them.
        self.static = None
        self.step_graph = StepGraph(self.static_iteration, capture, self.copy_state, self.restore_state) if static_step else None
        self.warmup_seconds = self.warm_up() if self.compiled else None

    def warm_up(self):
        """Run one G step + D step + EMA on random data and put every weight, buffer, optimizer and RNG state back.

        With --compile this is where every graph is built (G with and without grad, D with trainable and
        with frozen parameters, forward and backward), and with --cudagraphs step where the whole-step CUDA graph is
        captured, so that this cost is measured once, here, and the training loop's throughput is steady state from
        its first tick. Returns the seconds it took.
        """
        t0 = time.perf_counter()
        G = self.G
        n = self.batch_gpu * self.rounds
        images, labels = labelled_batch(n, [G.img_channels, G.img_resolution, G.img_resolution], G.label_dim, 0,
                                        values='uniform', labels='random', device=self.device)
        labels = labels if labels is not None else torch.zeros([n, 0], device=self.device)
        saved = self.copy_state()
        devices = [self.device] if self.device.type == 'cuda' else []
        with torch.random.fork_rng(devices=devices), stepping_outside_graph():
            mark_step_begin(self.cfg.cudagraphs)
            z_g, z_d = self.draws(0, images.shape[1:], 0)
            run = self.iteration if self.step_graph is None else self.graphed_iteration
            run(images, labels, z_g, z_d, 0.0)
        self.restore_state(saved)  # in place: a graph captured above stays valid
        for p in list(self.G.parameters()) + list(self.D.parameters()):
            p.grad = None
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        self.warmup_seconds = time.perf_counter() - t0
        return self.warmup_seconds

    def speed_summary(self):
        """One line for the run log: which speed options are on and what compiling cost."""
        cfg = self.cfg
        compiled = 'on' + ('' if self.G_fakes is self.G_fwd else ' (D-step fakes eager)') if self.compiled else 'off'
        graphs = {'off': '', 'networks': ' (CUDA graphs per network)', 'step': ' (CUDA graph of the whole step)'}
        parts = [f'compile {compiled}' + graphs[cfg.cudagraphs],
                 f'G precision {self.g_dtype or torch.float32}', f'D precision {self.d_dtype or torch.float32}',
                 f'channels_last {"on" if cfg.channels_last else "off"}',
                 f'activation checkpointing {"on" if cfg.checkpointing else "off"}']
        if self.warmup_seconds is not None:
            parts.append(f'compile + warm-up {self.warmup_seconds:.1f} s (not part of the img/s figures)')
        return 'Speed: ' + ', '.join(parts)

    #------------------------------------------------------------------------

    def noise(self, step, phase, shape_one, rank):
        """z for this rank's part of the global batch, keyed by (seed, step, phase)."""
        key = dist.rng_key(self.cfg.seed, step, phase)
        return dist.global_randn(key, self.global_batch, shape_one, rank, self.batch_gpu * self.rounds, self.device)

    def draws(self, step, shape_one, rank):
        """(z of the G step, z of the D step); the D step draws none when it reuses the G step's fakes."""
        z_d = None if self.reuse_fakes else self.noise(step, PHASE_D, shape_one, rank)
        return self.noise(step, PHASE_G, shape_one, rank), z_d

    def generate(self, z, labels, grad):
        x = channels_last_input(z * self.G.sigma_generate, self.cfg.channels_last)
        forward = self.G_fwd if grad else self.G_fakes
        with torch.set_grad_enabled(grad), autocast_context(self.device, self.g_dtype):
            return forward(x, torch.full([z.shape[0]], self.G.sigma_generate, device=z.device), labels).float()

    def discriminate(self, images, labels):
        with autocast_context(self.device, self.d_dtype):
            return self.D_fwd(channels_last_input(images, self.cfg.channels_last), labels)

    def discriminate_keeping_features(self, images, labels):
        """(logits, the frozen part's output detached): D as D.heads_forward(D.features(x)), for --reuse-fakes.
        Under CUDA graph trees the kept features are copied: the next replay of D_features (the next accumulation
        round) overwrites its outputs."""
        with autocast_context(self.device, self.d_dtype):
            features = self.D_features(channels_last_input(images, self.cfg.channels_last), labels)
            logits = self.D_heads(features, labels)
        own_copy = self.cfg.cudagraphs == 'networks'
        return logits, map_tensors(lambda t: t.detach().clone() if own_copy else t.detach(), features)

    #------------------------------------------------------------------------

    def step(self, images, labels, step, images_seen, rank=0):
        """One iteration on this rank's images [B_rank, C, H, W] in [-1, 1] and one-hot labels; returns its
        statistics as 0-d device tensors (this rank's, not averaged across ranks)."""
        mark_step_begin(self.cfg.cudagraphs)
        z_g, z_d = self.draws(step, images.shape[1:], rank)
        # Half-life ramp-up from the images seen before this step, as the authors.
        beta = ema_beta(images_seen, self.global_batch, self.cfg.ema_mimg, self.cfg.ema_rampup)
        if self.step_graph is None:
            stats = self.iteration(images, labels, z_g, z_d, beta)
        else:
            stats = self.graphed_iteration(images, labels, z_g, z_d, beta)
        if self.cfg.r1_gamma > 0 and step > 0 and step % self.cfg.r1_interval == 0:
            with nvtx_range('R1 step'):
                stats.update(self.r1_phase(*self.split(images, labels)))
        return stats

    def split(self, images, labels):
        """(reals, conds): the accumulation rounds' images and labels (None for an unconditional G)."""
        conds = labels.chunk(self.rounds) if labels.shape[1] else [None] * self.rounds
        return images.chunk(self.rounds), conds

    def iteration(self, images, labels, z_g, z_d, beta):
        """G step, D step and EMA: the part of a step that --cudagraphs step captures. z_d is None with --reuse-fakes:
        the D step takes the G step's fake features."""
        reals, conds = self.split(images, labels)
        stats = {}
        with nvtx_range('G step'):
            g_stats, fake_features = self.generator_phase(reals, conds, z_g.chunk(self.rounds))
            stats.update(g_stats)
        with nvtx_range('D step'):
            zs = None if z_d is None else z_d.chunk(self.rounds)
            stats.update(self.discriminator_phase(reals, conds, zs, fake_features))
        with nvtx_range('EMA'):
            update_ema(self.G_ema, self.G, beta)
        return stats

    def graphed_iteration(self, images, labels, z_g, z_d, beta):
        """iteration() through StepGraph: the inputs are copied into static buffers, the graph (or, uncaptured, the
        same code) reads them, and the statistics come back as one vector that the next step overwrites."""
        inputs = dict(images=images, labels=labels, z_g=z_g, z_d=z_d)
        inputs = {name: value for name, value in inputs.items() if value is not None}   # no z_d with --reuse-fakes
        if self.static is None:
            self.static = {name: torch.empty_like(value) for name, value in inputs.items()}
            self.static['beta'] = torch.zeros([], device=self.device)
        for name, value in inputs.items():
            if value.shape != self.static[name].shape:
                raise SpeedOptionError(f'--cudagraphs step needs the same batch shape every step: {name} '
                                       f'{tuple(value.shape)} after {tuple(self.static[name].shape)}')
            self.static[name].copy_(value, non_blocking=True)
        self.static['beta'].fill_(beta)
        values = self.step_graph().clone()
        return dict(zip(ITERATION_STATS, values.unbind()))

    def static_iteration(self):
        """StepGraph's body: iteration() over the static buffers, its statistics stacked into one vector."""
        s = self.static
        stats = self.iteration(s['images'], s['labels'], s['z_g'], s.get('z_d'), s['beta'])
        return torch.stack([stats[k] for k in ITERATION_STATS])

    def generator_phase(self, reals, conds, zs):
        """softplus(-D(G(z))); D's parameters do not require grad, so backward computes only what reaches G.
        Returns (statistics, per round the fakes' D.features detached with --reuse-fakes, else None)."""
        for p in self.d_params:
            p.requires_grad_(False)
        self.opt_g.zero_grad(set_to_none=True)
        total = torch.zeros([], device=self.device)
        kept = [] if self.reuse_fakes else None
        for c, z in zip(conds, zs):
            with nvtx_range('G forward'):
                fake = self.generate(z, c, grad=True)
                if self.reuse_fakes:
                    logits, features = self.discriminate_keeping_features(fake, c)
                    kept.append(features)
                else:
                    logits = self.discriminate(fake, c)
                del fake
                loss = generator_loss(logits)
            with nvtx_range('G backward'):
                self.scaler.scale(loss / self.rounds).backward()
            total += loss.detach() / self.rounds
        for p in self.d_params:
            p.requires_grad_(True)
        with nvtx_range('G optimizer'):
            finish_gradients(self.g_params, self.opt_g, self.scaler if self.scaler.is_enabled() else None)
        return dict(loss_g=total), kept

    def discriminator_phase(self, reals, conds, zs, fake_features=None):
        """softplus(D(G(z))) + softplus(-D(x)), with fakes from a fresh z generated without a graph, or (fake_features:
        generator_phase's, per round) the heads alone on the G step's fakes' frozen features."""
        self.opt_g.zero_grad(set_to_none=True)  # G's gradients are used up: free them for the D and R1 steps
        self.opt_d.zero_grad(set_to_none=True)
        total = torch.zeros([], device=self.device)
        logit_fake = torch.zeros([], device=self.device)
        logit_real = torch.zeros([], device=self.device)
        # Fakes and reals in one discriminator pass (the projected D's frozen backbones run once on both; the
        # logits are those of two calls). Compiled runs keep the two calls of the compiled forward.
        pair = self.cfg.disc_pair_forward and hasattr(self.D, 'forward_pair') and not self.compiled
        fakes = zs if fake_features is None else fake_features
        for real, c, fake in zip(reals, conds, fakes):
            with nvtx_range('D forward'):
                if fake_features is not None:   # heads on the kept features first, as forward_pair orders the halves
                    with autocast_context(self.device, self.d_dtype):
                        fake_logits = self.D_heads(fake, c)
                    real_logits = self.discriminate(real, c)
                elif pair:
                    fake = self.generate(fake, c, grad=False)
                    with autocast_context(self.device, self.d_dtype):
                        fake_logits, real_logits = self.D.forward_pair(channels_last_input(fake, self.cfg.channels_last),
                                                                       channels_last_input(real, self.cfg.channels_last), c, c)
                else:
                    fake = self.generate(fake, c, grad=False)
                    fake_logits = self.discriminate(fake, c)
                    real_logits = self.discriminate(real, c)
                del fake
                loss = discriminator_loss(fake_logits, real_logits)
            with nvtx_range('D backward'):
                (loss / self.rounds).backward()
            total += loss.detach() / self.rounds
            logit_fake += mean_logit(fake_logits) / self.rounds
            logit_real += mean_logit(real_logits) / self.rounds
        with nvtx_range('D optimizer'):
            finish_gradients(self.d_params, self.opt_d)
        return dict(loss_d=total, logit_fake=logit_fake, logit_real=logit_real)

    def r1_phase(self, reals, conds):
        """gamma/2 |grad_x D(x)|^2 on reals through the whole (eager) discriminator, weighted by the interval."""
        self.opt_d.zero_grad(set_to_none=True)
        total = torch.zeros([], device=self.device)
        for real, c in zip(reals, conds):
            with autocast_context(self.device, self.d_dtype):
                penalty = r1_penalty(self.D, real, c).mean()
            (penalty * (self.cfg.r1_gamma / 2) * self.cfg.r1_interval / self.rounds).backward()
            total += penalty.detach() / self.rounds
        with stepping_outside_graph():
            finish_gradients(self.d_params, self.opt_d)
        if self.step_graph is not None:
            self.opt_d.zero_grad(set_to_none=True)  # the graph has gradient buffers of its own
        return dict(r1_penalty=total)

    #------------------------------------------------------------------------

    def state_dict(self):
        return dict(G=self.G.state_dict(), G_ema=self.G_ema.state_dict(), D=self.D.state_dict(),
                    opt_g=self.opt_g.state_dict(), opt_d=self.opt_d.state_dict(), scaler=self.scaler.state_dict())

    def load_state_dict(self, state):
        self.G.load_state_dict(state['G'])
        self.G_ema.load_state_dict(state['G_ema'])
        self.D.load_state_dict(state['D'])
        self.opt_g.load_state_dict(state['opt_g'])   # new optimizer state tensors: a captured graph would miss them
        self.opt_d.load_state_dict(state['opt_d'])
        self.scaler.load_state_dict(state['scaler'])
        if self.step_graph is not None:
            self.step_graph.invalidate()

    def copy_state(self):
        """A copy of everything an iteration changes, for restore_state (StepGraph's warm-up before capture)."""
        modules = {name: copy.deepcopy(m.state_dict()) for name, m in (('G', self.G), ('G_ema', self.G_ema), ('D', self.D))}
        optimizers = [{p: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items()} for opt in (self.opt_g, self.opt_d)]
        return dict(modules=modules, optimizers=optimizers, scaler=self.scaler.state_dict())

    def restore_state(self, saved, keep_new=None):
        """Put copy_state()'s values back into the very tensors that hold them now (a CUDA graph captured afterwards
        points at these). Optimizer state created since the copy is dropped, or kept and zeroed (keep_new; default:
        when the step is captured): step 0 with zero moments is Adam's initial state."""
        for name, m in (('G', self.G), ('G_ema', self.G_ema), ('D', self.D)):
            m.load_state_dict(saved['modules'][name])
        keep = self.step_graph is not None and self.step_graph.capture if keep_new is None else keep_new
        with torch.no_grad():
            for opt, old in zip((self.opt_g, self.opt_d), saved['optimizers']):
                for p in list(opt.state):
                    if p in old:
                        for k, v in opt.state[p].items():
                            v.copy_(old[p][k])
                    elif keep:
                        for v in opt.state[p].values():
                            v.zero_()
                    else:
                        del opt.state[p]
        self.scaler.load_state_dict(saved['scaler'])
