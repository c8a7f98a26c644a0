"""What each study trains: arms (a name and the config fields that set it apart from the demo preset)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str                 # as shown in tables and plots
    slug: str                 # run-folder name
    overrides: dict           # config fields on top of the demo preset
    method: str = ''          # the method the arm belongs to (sweeps: one method, several learning rates)


D2O = Arm('D2O', 'd2o', dict(freeze=0), 'D2O')
D2O_F1 = Arm('D2O-F (level 1)', 'd2o-f1', dict(freeze=1), 'D2O-F (level 1)')
D2O_F3 = Arm('D2O-F (level 3)', 'd2o-f3', dict(freeze=3), 'D2O-F (level 3)')
RANDOM_INIT = Arm('random-init GAN', 'random-init', dict(freeze=0, reinit=True), 'random-init GAN')

D2O_F1_REUSE = Arm('D2O-F (level 1), reused fakes', 'd2o-f1-reuse', dict(freeze=1, reuse_fakes=True),
                   'D2O-F (level 1), reused fakes')

ABLATION = (D2O, D2O_F1, D2O_F3, RANDOM_INIT)
REUSE = (D2O_F1, D2O_F1_REUSE)   # the reuse study: fresh fakes in the D step (the authors' recipe) vs the G step's
PRETRAINED = (D2O, D2O_F1, D2O_F3)

SWEEP_METHODS = {'d2o': D2O, 'd2o-f': D2O_F1}


def sweep_arms(lrs, methods=('d2o', 'd2o-f')):
    """One arm per (method, generator learning rate); everything else is the demo preset."""
    arms = []
    for key in methods:
        base = SWEEP_METHODS[key]
        for lr in lrs:
            arms.append(Arm(f'{base.name}, lr {lr:g}', f'{base.slug}-lr{lr:g}', dict(base.overrides, lr=lr), base.name))
    return tuple(arms)


# Config fields every study run shares: an evaluation at every tick (0.5k images in the demo preset), a
# training state every second tick so an interrupted study resumes.
STUDY_RUN_FIELDS = dict(snapshot_ticks=1, checkpoint_ticks=2, eval_demo=True, resume='auto')
