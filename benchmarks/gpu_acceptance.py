"""GPU acceptance: one unattended command that checks and measures every GPU path of d2o_fast.

    python benchmarks/gpu_acceptance.py --outdir DIR               # one GPU, no network: ~8 minutes on one H100
    python benchmarks/gpu_acceptance.py --outdir DIR --cpu-smoke   # the same orchestration on tiny CPU stand-ins
    python benchmarks/gpu_acceptance.py --outdir DIR --stages gpu_tests,bandwidth   # a subset

Run it after the README's GPU install (D2O_FAST_CUDA=1 ...). Every stage runs in processes of its own with a time
budget (a hung CUDA call cannot be interrupted in-process); a stage that fails or overruns is reported and the next
stage still runs, and time a stage leaves unused passes to the later ones. Writes DIR/acceptance.json,
DIR/acceptance.md and each stage's logs under DIR/stages/, and exits with
    0  every correctness check passed,
    1  a correctness check failed (or a stage crashed),
    2  nothing failed, but a correctness stage did not finish within its budget (its checks are incomplete).
Speed never sets the exit code. docs/gpu.md explains the stages, the budgets and how to read the report.
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree

BENCHMARKS = pathlib.Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
WORKERS = BENCHMARKS / 'acceptance_workers.py'
SCHEMA = 'd2o_fast.gpu_acceptance/1'
STATUSES = ('passed', 'failed', 'overrun', 'skipped')
MODES = ('gpu', 'cpu-smoke')
TOTAL_BUDGET_S = {'gpu': 480, 'cpu-smoke': 420}
MARGIN_S = {'gpu': 30, 'cpu-smoke': 20}     # kept free for start-up, the report and clock differences

#----------------------------------------------------------------------------
# What runs: the stages in order, and the training-iteration stage's paths.

@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    kind: str               # correctness (its overrun leaves checks incomplete) or measurement (speed: never fails)
    checks: str             # what the report says the stage checks or measures
    budget_s: dict          # mode -> seconds


STAGES = [
    Stage('environment', 'Environment', 'correctness',
          'device, driver, CUDA, torch, Triton and DALI versions, NVML readings of this GPU (found by UUID), which '
          'fused-kernel backends load, and how warm the compile caches are', {'gpu': 30, 'cpu-smoke': 40}),
    Stage('gpu_tests', 'GPU tests', 'correctness',
          'every test marked gpu (pytest -m gpu): CUDA and Triton GroupNorm kernels forward and backward against the '
          'float64 reference on every GroupNorm site of the four U-Nets in fp32/bf16/fp16, NCHW and channels_last; '
          'the kernels\' self-check verdicts; the custom ops inside compiled graphs with no graph break; DALI GPU '
          'decoding equal to the native loader; fused Adam, compiled and CUDA-graph steps against eager; NVML; the '
          'ADM checkpoint\'s use_fp16 not setting the precision', {'gpu': 140, 'cpu-smoke': 80}),
    Stage('demo', 'Demo training', 'correctness',
          'python -m d2o_fast.train (the demo preset) on this device, to its closing table: raw one step, Heun '
          'teacher, fine-tuned one step', {'gpu': 50, 'cpu-smoke': 120}),
    Stage('bandwidth', 'Fused GroupNorm bandwidth', 'measurement',
          'achieved memory bandwidth of the fused kernels (CUDA, Triton) forward and backward as a share of the '
          'device\'s peak, beside PyTorch\'s GroupNorm + SiLU (+ modulation) and apex\'s where installed',
          {'gpu': 35, 'cpu-smoke': 40}),
    Stage('train_step', 'Training iteration', 'measurement',
          'the paper\'s CIFAR-10 iteration (full NCSN++, projected discriminator, 64 images per GPU), D2O and D2O-F '
          'interleaved, on each path: images per second and peak memory (max_memory_allocated)',
          {'gpu': 195, 'cpu-smoke': 120}),
]
STAGE_NAMES = [s.name for s in STAGES]

_BF16 = dict(precision='bf16', disc_precision='bf16', channels_last=True, disc_pair_forward=True)


@dataclasses.dataclass(frozen=True)
class TrainPath:
    name: str
    config: dict            # config fields over the paper's configuration
    kernels: str            # fused GroupNorm backend
    budget_s: float         # GPU; the CPU smoke gives each path the same share of its stage
    smoke: bool = False     # runs in the CPU smoke (no compile there: cold compiles take minutes on a CPU)

    @property
    def gpu_only(self):
        return 'cudagraphs' in self.config


# Ordered by what matters most and so that later builds reuse earlier ones' compiled graphs (compile caches).
TRAIN_PATHS = [
    TrainPath('eager fp32', dict(_BF16, precision='fp32', disc_precision='fp32', channels_last=False), 'torch', 30,
              smoke=True),
    TrainPath('eager bf16', _BF16, 'torch', 25, smoke=True),
    TrainPath('compiled bf16 + fused', dict(_BF16, compile=True), 'auto', 45),
    TrainPath('compiled bf16 + fused + CUDA graphs (step)', dict(_BF16, compile=True, cudagraphs='step'), 'auto', 30),
    TrainPath('compiled bf16 + fused + CUDA graphs (networks)', dict(_BF16, compile=True, cudagraphs='networks'),
              'auto', 35),
    TrainPath('compiled bf16', dict(_BF16, compile=True), 'torch', 30),
]

#----------------------------------------------------------------------------
# Processes with deadlines.

def _terminate(proc):
    """SIGTERM the process group, SIGKILL it 5 s later (CUDA calls may ignore the first)."""
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_processes(commands, timeout):
    """Run [(argv, log path, env)] in parallel, each in its own process group, until all exit or `timeout` passes.
    Returns ([return code or None if cut at the deadline], seconds)."""
    t0 = time.monotonic()
    procs = []
    for argv, log, env in commands:
        with open(log, 'w') as out:
            procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                          start_new_session=True))
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=max(0.0, timeout - (time.monotonic() - t0))))
        except subprocess.TimeoutExpired:
            _terminate(proc)
            codes.append(None)
    return codes, time.monotonic() - t0


class Background:
    """Commands run one after another in the background until they are done or stop() is called."""

    def __init__(self, commands):
        self.commands, self.done, self.proc, self.stopped = commands, [], None, False
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        for argv, log, env in self.commands:
            with self.lock:
                if self.stopped:
                    return
                with open(log, 'w') as out:
                    self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                                 start_new_session=True)
            code = self.proc.wait()
            with self.lock:
                if self.stopped:
                    return
                self.done.append(code)

    def stop(self):
        """Cut the running command and drop the rest; returns the exit codes of the commands that ran to their end."""
        with self.lock:
            self.stopped = True
            if self.proc is not None and self.proc.poll() is None:
                _terminate(self.proc)
        self.thread.join()
        return list(self.done)


def with_slack(own_s, later_s, remaining_s):
    """A part's timeout: its own budget, plus what is left of `remaining_s` after its own and the later parts'."""
    return own_s + max(0.0, remaining_s - own_s - later_s)


class Clock:
    """The run's time: stage timeouts are their own budget plus whatever earlier stages left unused."""

    def __init__(self, total_s, margin_s, scale=1.0):
        self.start, self.deadline_s, self.scale = time.monotonic(), total_s * scale - margin_s, scale

    def elapsed(self):
        return time.monotonic() - self.start

    def timeout(self, own_s, later_s):
        """own_s and later_s (the budgets of the stages after this one) in unscaled seconds."""
        return with_slack(own_s * self.scale, later_s * self.scale, self.deadline_s - self.elapsed())

#----------------------------------------------------------------------------
# The stages.

class Acceptance:
    def __init__(self, outdir, mode, selected, shards, budget_scale):
        self.outdir, self.mode, self.selected = pathlib.Path(outdir).resolve(), mode, selected
        self.smoke = mode == 'cpu-smoke'
        self.stage_dir = self.outdir / 'stages'
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.shards = shards or (1 if self.smoke else max(1, min(4, (os.cpu_count() or 1) // 4)))
        self.clock = Clock(TOTAL_BUDGET_S[mode], MARGIN_S[mode], budget_scale)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
        if self.smoke:  # shared CPUs: one thread per process, no OpenMP spinning against other jobs
            self.env.update(OMP_NUM_THREADS='1')
        self.background, self.background_skipped = None, 'no CUDA device'

    def budget(self, stage):
        return stage.budget_s[self.mode]

    def worker(self, stage, result, *args):
        argv = [sys.executable, str(WORKERS), stage, '--result', str(result), *args]
        return argv + (['--cpu-smoke'] if self.smoke else [])

    def run_worker(self, worker, name, timeout, *args):
        """One worker process: its result dict, or a failed / overrun one built from its log."""
        result_path, log = self.stage_dir / f'{name}.json', self.stage_dir / f'{name}.log'
        result_path.unlink(missing_ok=True)
        (code,), seconds = run_processes([(self.worker(worker, result_path, *args), log, self.env)], timeout)
        if code is None:
            return dict(status='overrun', summary=f'cut at its budget of {timeout:.0f} s', wall_s=seconds,
                        failed_checks=[], details={}, logs=[str(log)])
        if code != 0 or not result_path.exists():
            return dict(status='failed', summary=f'crashed (exit {code}): {log_tail(log)}', wall_s=seconds,
                        failed_checks=[f'worker exit {code}'], details={}, logs=[str(log)])
        return dict(json.loads(result_path.read_text()), wall_s=seconds, logs=[str(log)])

    # environment, bandwidth: one worker each.
    def environment(self, stage, timeout):
        return self.run_worker('environment', 'environment', timeout)

    def bandwidth(self, stage, timeout):
        return self.run_worker('bandwidth', 'bandwidth', timeout)

    # gpu_tests: pytest -m gpu in parallel shards, results from JUnit XML (or the verbose log of a cut shard).
    def gpu_tests(self, stage, timeout):
        files = [str(p.relative_to(ROOT)) for p in gpu_test_files()]
        commands, xmls = [], []
        for i in range(self.shards):
            xml, log = self.stage_dir / f'gpu_tests-{i}.xml', self.stage_dir / f'gpu_tests-{i}.log'
            xml.unlink(missing_ok=True)
            env = dict(self.env, D2O_FAST_TEST_SHARD=f'{i}/{self.shards}')
            argv = [sys.executable, '-m', 'pytest', '-m', 'gpu', '-v', '-p', 'no:cacheprovider', f'--junitxml={xml}',
                    *files]
            commands.append((argv, log, env))
            xmls.append(xml)
        codes, seconds = run_processes(commands, timeout)
        return summarize_tests(codes, xmls, [c[1] for c in commands], seconds, files, self.smoke)

    # demo: the training entry point as a user runs it, then its run folder.
    def demo(self, stage, timeout):
        outdir = self.outdir / 'demo'
        args = ['--outdir', str(outdir), '--resume', 'none']
        if self.smoke:  # two steps, 10 images per table row; fp32: CPUs without AVX-512 BF16 run bf16 convs slowly
            args += ['--kimg', '0.032', '--tick-kimg', '0.016', '--eval-images', '10', '--snapshot-ticks', '2',
                     '--checkpoint-ticks', '2', '--grid-size', '4', '--workers', '1', '--precision', 'fp32']
        log = self.stage_dir / 'demo.log'
        (code,), seconds = run_processes([([sys.executable, '-m', 'd2o_fast.train', *args], log, self.env)], timeout)
        return summarize_demo(code, seconds, outdir, log, self.smoke, timeout)

    # train_step: each path in a process of its own, within the stage's time.
    def train_step(self, stage, timeout):
        deadline = time.monotonic() + timeout
        runs = [p for p in TRAIN_PATHS if p.smoke or not self.smoke]
        own = {p.name: (self.budget(stage) / len(runs) if self.smoke else p.budget_s) * self.clock.scale for p in runs}
        paths, failed, wall = [], [], 0.0
        for path in TRAIN_PATHS:
            row = dict(path=path.name, config=path.config, kernels=path.kernels)
            if path not in runs:
                row.update(status='skipped', summary='GPU only' if path.gpu_only else
                           'not in the CPU smoke: cold compiles take minutes on a CPU')
            else:
                remaining = deadline - time.monotonic()
                later = sum(own[p.name] for p in runs[runs.index(path) + 1:])
                path_timeout = min(remaining, with_slack(own[path.name], later, remaining))
                if path_timeout <= 1:
                    row.update(status='overrun', summary='not started: the stage\'s budget was used up')
                else:
                    row.update(self.run_worker('train-step', f'train_step--{slug(path.name)}', path_timeout,
                                               *self.path_args(path)))
                    wall += row['wall_s']
            failed += [f'{path.name}: {c}' for c in row.get('failed_checks', [])]
            paths.append(row)
        statuses = [p['status'] for p in paths]
        status = 'failed' if 'failed' in statuses else 'overrun' if 'overrun' in statuses else 'passed'
        summary = f'{statuses.count("passed")} of {len(paths)} paths measured' + ''.join(
            f', {statuses.count(s)} {s}' for s in STATUSES[1:] if s in statuses)
        return dict(status=status, failed_checks=failed, wall_s=wall, details=dict(paths=paths), summary=summary,
                    logs=[log for p in paths for log in p.get('logs', [])])

    def path_args(self, path):
        return ['--path-config', json.dumps(path.config), '--kernels', path.kernels]

    # Compile caches warmed in the background while the correctness stages run (GPU only).
    def start_warming(self):
        if self.smoke or 'train_step' not in self.selected:
            self.background_skipped = 'the CPU smoke times no compiled path' if self.smoke else 'train_step not selected'
            return
        compiled = [p for p in TRAIN_PATHS if p.config.get('compile')]
        for p in compiled:
            (self.stage_dir / f'warm--{slug(p.name)}.json').unlink(missing_ok=True)
        commands = [(self.worker('train-step', self.stage_dir / f'warm--{slug(p.name)}.json', *self.path_args(p),
                                 '--build-only'), self.stage_dir / f'warm--{slug(p.name)}.log', self.env)
                    for p in compiled]
        self.background = (Background(commands), compiled, time.monotonic())

    def stop_warming(self):
        if self.background is None:
            return dict(status='skipped', summary=self.background_skipped, failed_checks=[], details={})
        runner, compiled, t0 = self.background
        runner.stop()
        results = [self.stage_dir / f'warm--{slug(p.name)}.json' for p in compiled]
        built = [p.name for p, r in zip(compiled, results) if r.exists() and json.loads(r.read_text())['status'] == 'passed']
        return dict(status='passed' if len(built) == len(compiled) else 'overrun', failed_checks=[],
                    wall_s=time.monotonic() - t0, details=dict(built=built, paths=[p.name for p in compiled]),
                    summary=f'built {len(built)} of {len(compiled)} compiled paths before the measurements began',
                    logs=[str(self.stage_dir / f'warm--{slug(p.name)}.log') for p in compiled])

    #------------------------------------------------------------------------

    def run(self):
        started = datetime.datetime.now().astimezone().isoformat(timespec='seconds')
        results, no_gpu = {}, False
        for i, stage in enumerate(STAGES):
            if stage.name == 'bandwidth':  # measurements run alone on the GPU
                results['warm_caches'] = self.stop_warming()
            if stage.name not in self.selected or no_gpu:
                reason = 'no CUDA device (see Environment; --cpu-smoke runs without one)' if no_gpu else 'not selected'
                results[stage.name] = dict(status='skipped', summary=reason, failed_checks=[], details={})
            else:
                later = sum(self.budget(s) for s in STAGES[i + 1:] if s.name in self.selected)
                timeout = self.clock.timeout(self.budget(stage), later)
                print(f'[{self.clock.elapsed():5.0f} s] {stage.name} (up to {timeout:.0f} s) ...', flush=True)
                results[stage.name] = getattr(self, stage.name)(stage, timeout)
                print(f'[{self.clock.elapsed():5.0f} s] {stage.name}: {results[stage.name]["status"]} - '
                      f'{results[stage.name]["summary"]}', flush=True)
            if stage.name == 'environment':
                no_gpu = 'CUDA device' in results[stage.name]['failed_checks']
                if not no_gpu:
                    self.start_warming()
        return self.report(started, results)

    def report(self, started, results):
        stages = []
        warm = Stage('warm_caches', 'Compile caches warmed (background)', 'preparation',
                     'the compiled paths of the training-iteration stage built (compiled + warmed up) in the '
                     'background during the correctness stages, so that its timed builds find warm compile caches',
                     {'gpu': 0, 'cpu-smoke': 0})
        for stage in STAGES[:1] + [warm] + STAGES[1:]:
            r = results[stage.name]
            assert r['status'] in STATUSES, r
            stages.append(dict(name=stage.name, title=stage.title, kind=stage.kind, checks=stage.checks,
                               status=r['status'], budget_s=stage.budget_s[self.mode] * self.clock.scale,
                               wall_s=r.get('wall_s'), summary=r['summary'], failed_checks=r.get('failed_checks', []),
                               details=r.get('details', {}), logs=r.get('logs', [])))
        code = exit_code(stages)
        return dict(schema=SCHEMA, mode=self.mode, command=' '.join(sys.argv), started=started,
                    wall_s=self.clock.elapsed(), budget_s=TOTAL_BUDGET_S[self.mode] * self.clock.scale,
                    exit_code=code, verdict={0: 'passed', 1: 'failed', 2: 'incomplete'}[code], stages=stages)


def exit_code(stages):
    if any(s['status'] == 'failed' or s['failed_checks'] for s in stages):
        return 1
    if any(s['status'] == 'overrun' and s['kind'] == 'correctness' for s in stages):
        return 2
    return 0

#----------------------------------------------------------------------------
# Reading what the stages left.

def slug(text):
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


def log_tail(path, lines=3):
    text = pathlib.Path(path).read_text(errors='replace').strip().splitlines() if pathlib.Path(path).exists() else []
    return ' | '.join(text[-lines:]) or '(empty log)'


def gpu_test_files():
    """The test files that hold GPU tests: those that use the marker (pytest.mark.gpu)."""
    return sorted(p for p in (ROOT / 'tests').rglob('test_*.py') if 'pytest.mark.gpu' in p.read_text())


VERBOSE_OUTCOME = re.compile(r'^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)')


def read_junit(path):
    """[{id, outcome: passed|failed|error|skipped, seconds, message}] of a JUnit XML file."""
    outcomes = {'failure': 'failed', 'error': 'error', 'skipped': 'skipped'}
    cases = []
    for case in ElementTree.parse(path).getroot().iter('testcase'):
        outcome, message = 'passed', ''
        for child in case:
            if child.tag in outcomes:
                outcome, message = outcomes[child.tag], (child.get('message') or child.text or '').strip()
        name = f'{case.get("classname", "")}::{case.get("name", "")}'
        cases.append(dict(id=name, outcome=outcome, seconds=float(case.get('time') or 0), message=message[:500]))
    return cases


def read_verbose_log(path):
    """The outcomes a cut pytest process printed before it stopped (pytest -v lines)."""
    outcomes = {'PASSED': 'passed', 'FAILED': 'failed', 'ERROR': 'error', 'SKIPPED': 'skipped', 'XFAIL': 'skipped',
                'XPASS': 'passed'}
    cases = []
    text = pathlib.Path(path).read_text(errors='replace') if pathlib.Path(path).exists() else ''
    for line in text.splitlines():
        found = VERBOSE_OUTCOME.match(line)
        if found:
            cases.append(dict(id=found.group(1), outcome=outcomes[found.group(2)], seconds=0.0, message=''))
    return cases


def summarize_tests(codes, xmls, logs, seconds, files, smoke):
    cases, problems = [], []
    for i, (code, xml, log) in enumerate(zip(codes, xmls, logs)):
        if code is None:
            problems.append(f'shard {i} cut at the stage budget')
        elif code not in (0, 1, 5):  # 5: no test selected in this shard
            problems.append(f'shard {i}: pytest exit {code}: {log_tail(log)}')
        cases += read_junit(xml) if xml.exists() else read_verbose_log(log)
    counts = {k: sum(c['outcome'] == k for c in cases) for k in ('passed', 'failed', 'error', 'skipped')}
    failed = [f'{c["id"]}: {c["message"].splitlines()[0] if c["message"] else c["outcome"]}' for c in cases
              if c['outcome'] in ('failed', 'error')]
    if not smoke and not counts['passed'] and not failed:
        failed.append('no GPU test ran')
    skips = {}
    for c in cases:
        if c['outcome'] == 'skipped':
            skips[c['message']] = skips.get(c['message'], 0) + 1
    crashed = [p for p in problems if 'cut at' not in p]
    status = 'failed' if failed or crashed else 'overrun' if problems else 'passed'
    slowest = sorted(cases, key=lambda c: -c['seconds'])[:10]
    summary = ', '.join(f'{n} {k}' for k, n in counts.items()) + (f'; {"; ".join(problems)}' if problems else '')
    return dict(status=status, summary=summary, failed_checks=failed + crashed, wall_s=seconds, logs=[str(p) for p in logs],
                details=dict(files=files, shards=len(codes), counts=counts, failures=failed, skip_reasons=skips,
                             slowest=[dict(id=c['id'], seconds=c['seconds']) for c in slowest], problems=problems))


def summarize_demo(code, seconds, outdir, log, smoke, timeout):
    if code is None:
        return dict(status='overrun', summary=f'cut at its budget of {timeout:.0f} s', wall_s=seconds,
                    failed_checks=[], details={}, logs=[str(log)])
    runs = sorted(p for p in outdir.glob('*') if p.is_dir()) if outdir.exists() else []
    if code != 0 or not runs or not (runs[-1] / 'demo-eval.json').exists():
        return dict(status='failed', summary=f'exit {code}: {log_tail(log)}', wall_s=seconds, logs=[str(log)],
                    failed_checks=['the demo did not finish with its table'], details={})
    run = runs[-1]
    rows = json.loads((run / 'demo-eval.json').read_text())
    ticks = [json.loads(line) for line in (run / 'stats.jsonl').read_text().splitlines() if line.strip()]
    setup = [line for line in (run / 'log.txt').read_text().splitlines() if line.startswith(('Data:', 'Speed:'))]
    failed = []
    if not smoke:
        if 'device cuda' not in ' '.join(setup):
            failed.append('the demo did not train on the GPU')
        if not all('gpu_util' in t for t in ticks):
            failed.append('NVML telemetry missing from the run\'s ticks')
        if not rows[2]['fid'] < rows[0]['fid']:
            failed.append(f'fine-tuning did not improve the one-step demo-FID ({rows[0]["fid"]:.2f} -> {rows[2]["fid"]:.2f})')
    tick_keys = ('kimg', 'img_per_sec', 'peak_mem_gb', 'gpu_util', 'gpu_mem_gb', 'gpu_power_w')
    summary = '; '.join(f'{r["name"].split(")")[0]}) demo-FID {r["fid"]:.2f}' for r in rows)
    return dict(status='failed' if failed else 'passed', summary=summary, failed_checks=failed, wall_s=seconds,
                logs=[str(log), str(run / 'log.txt')],
                details=dict(run_dir=str(run), table=rows, setup=setup,
                             ticks=[{k: t[k] for k in tick_keys if k in t} for t in ticks]))

#----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--outdir', required=True, help='folder for the report, the logs and the demo run')
    p.add_argument('--cpu-smoke', action='store_true', help='tiny CPU stand-ins for every stage (CI, no GPU)')
    p.add_argument('--stages', default=','.join(STAGE_NAMES), help=f'comma-separated subset of {",".join(STAGE_NAMES)}')
    p.add_argument('--budget-scale', type=float, default=1.0, help='multiply every time budget (slower GPUs: 1.5-2)')
    p.add_argument('--shards', type=int, default=None, help='parallel pytest processes for the GPU tests '
                                                            '(default: 1 per 4 CPUs, at most 4)')
    a = p.parse_args(argv)
    selected = [s for s in a.stages.split(',') if s]
    unknown = [s for s in selected if s not in STAGE_NAMES]
    if unknown or a.budget_scale <= 0 or (a.shards is not None and a.shards < 1):
        p.error(f'unknown stage(s) {unknown}; expected a subset of {STAGE_NAMES}' if unknown else
                '--budget-scale must be > 0 and --shards >= 1')
    sys.path.insert(0, str(BENCHMARKS))
    from acceptance_report import write_report
    acceptance = Acceptance(a.outdir, 'cpu-smoke' if a.cpu_smoke else 'gpu', selected, a.shards, a.budget_scale)
    report = acceptance.run()
    paths = write_report(report, acceptance.outdir)
    print(f'{report["verdict"].upper()} (exit {report["exit_code"]}) in {report["wall_s"]:.0f} s; report: '
          f'{", ".join(map(str, paths))}', flush=True)
    return report['exit_code']


if __name__ == '__main__':
    sys.exit(main())
