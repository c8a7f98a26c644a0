"""Studies on the demo: the paper's claims in miniature, each method over several seeds, with error bars.

    python -m d2o_fast.experiments ablation --seeds 3     # D2O, D2O-F level 1 and 3, random-init GAN
    python -m d2o_fast.experiments sweep --lrs 1e-4,3e-4,1e-3 --seeds 2   # one recipe for D2O and D2O-F
    python -m d2o_fast.experiments demo-seeds --seeds 3                  # the default demo command on seeds 0-2
    python -m d2o_fast.experiments reuse --seeds 3        # D2O-F with and without --reuse-fakes

Every study trains the demo (its preset, data and pre-trained model) once per (arm, seed), evaluates demo-FID
and class accuracy every 0.5k images, and writes <study>.json, <study>.md and <study>.png to --outdir with the
command, commit and machine that produced them. Re-running the same command skips the runs that finished and
resumes an interrupted one from its last training state.

    arms.py     what each study trains (arms = config overrides), and the study table
    runs.py     runs an arm on one seed (in this process, or the train command in a subprocess), resumable
    report.py   statistics over seeds, tables, the plot with a band per arm, verdicts, provenance
"""
