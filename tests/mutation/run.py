"""Mutation pass: plant each listed bug (tests/mutation/mutants.py) in a temporary copy of the tree, one at a time,
run the tests mapped to its file, and report which test killed it, or that it survived.

    python -m tests.mutation.run                        # all mutants; writes tests/mutation/report.{md,json}
    python -m tests.mutation.run --only 16 35 --timeout 300 --out /tmp/mutation
    python -m tests.mutation.run --only 63 67 --update  # rerun these, replacing their rows in the existing report

Never edits the working tree: the copy holds the tracked files plus the prebuilt extension. One pytest process at a
time, OMP_NUM_THREADS=1, each stopped at its first failure (-x) or after --timeout seconds. Not part of CI (tens of
minutes); the file name keeps pytest from collecting it.
"""

import argparse
import datetime
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from tests.mutation.mutants import MUTANTS, TESTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAILED = re.compile(r'^(?:FAILED|ERROR) (\S+)', re.M)


def copy_tree(dest):
    """The working tree's tracked files (as they are now) and the prebuilt extension, into dest."""
    files = subprocess.run(['git', 'ls-files', '-z'], cwd=ROOT, check=True, capture_output=True).stdout.decode().split('\0')
    files += [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'd2o_fast', '_C*.so'))]
    for rel in filter(None, files):
        src = os.path.join(ROOT, rel)
        if os.path.isfile(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copy2(src, os.path.join(dest, rel))


def run_tests(tree, tests, timeout):
    """(returncode or None on timeout, seconds, output tail) of pytest -x over `tests` in `tree`."""
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONDONTWRITEBYTECODE='1')
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-rfE', *tests]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)   # pytest and any process it spawned (its own session)
        out, _ = proc.communicate()
        code = None
    return code, time.time() - t0, out[-4000:]


def status_of(code, out):
    if code is None:
        return 'timeout', None
    if code == 0:
        return 'survived', None
    failed = FAILED.findall(out)
    if code in (1, 2) and failed:
        return 'killed', failed[0]
    return 'killed', f'pytest exit {code} (collection or import error)'


def tree_version():
    """HEAD's commit, with '+changes' when tracked files differ from it (the copy holds them as they are)."""
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return commit + ('+changes' if dirty else '')


def write_report(out_dir, results, started, seconds, complete, commit, reruns=()):
    counted = [r for r in results if r['status'] in ('killed', 'survived', 'timeout')]
    killed = sum(r['status'] == 'killed' for r in counted)
    score = killed / len(counted) if counted else 0.0
    summary = dict(started=started, seconds=round(seconds), commit=commit, complete=complete, mutants=len(results),
                   killed=killed, survived=sum(r['status'] == 'survived' for r in counted),
                   timeout=sum(r['status'] == 'timeout' for r in counted), score=round(score, 4),
                   command='python -m tests.mutation.run', reruns=list(reruns))
    with open(os.path.join(out_dir, 'report.json'), 'w') as f:
        json.dump(dict(summary=summary, results=results), f, indent=1)
    lines = ['# Mutation pass', '',
             f'`{summary["command"]}` on commit {commit[:12]}, started {started}, {seconds / 60:.1f} min, one pytest '
             f'process at a time (OMP_NUM_THREADS=1).' + ('' if complete else ' **Incomplete run.**'), '',
             f'**Score: {killed} / {len(counted)} killed ({100 * score:.1f}%)**, {summary["survived"]} survived, '
             f'{summary["timeout"]} timed out.', '']
    for rerun in reruns:
        lines += [f'Rerun of mutants {", ".join(map(str, rerun["ids"]))} (`--update`) on commit {rerun["commit"][:12]}, '
                  f'started {rerun["started"]}, {rerun["seconds"] / 60:.1f} min; their rows below are from it.', '']
    lines += [
             '| # | file | mutant | status | killed by / reason | s |', '|---|---|---|---|---|---|']
    for r in results:
        detail = r['killed_by'] or r.get('reason') or ''
        lines.append(f'| {r["id"]} | {r["file"].replace("d2o_fast/", "")} | {r["description"]} | {r["status"]} | '
                     f'{detail} | {r["seconds"]:.0f} |')
    survivors = [r for r in results if r['status'] != 'killed']
    lines += ['', '## Survivors', '']
    lines += [f'- #{r["id"]} {r["description"]} ({r["status"]}): {r.get("reason") or "no reason recorded: a test gap"}'
              for r in survivors] or ['None.']
    with open(os.path.join(out_dir, 'report.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--only', type=int, nargs='*', help='mutant numbers (positions in MUTANTS) to run')
    parser.add_argument('--timeout', type=float, default=240, help='seconds per mutant')
    parser.add_argument('--out', default=os.path.join(ROOT, 'tests', 'mutation'), help='folder for report.md / report.json')
    parser.add_argument('--update', action='store_true', help="rerun --only's mutants and replace their rows in --out's report")
    parser.add_argument('--no-baseline', action='store_true', help='skip checking that each test set passes unmutated')
    args = parser.parse_args(argv)
    chosen = [(i, m) for i, m in enumerate(MUTANTS) if args.only is None or i in args.only]
    os.makedirs(args.out, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix='d2o-mutation-') as tree:
        commit = tree_version()
        copy_tree(tree)
        for i, m in chosen:
            if m.file not in TESTS:
                sys.exit(f'mutant {i}: no tests mapped to {m.file}')
            count = open(os.path.join(tree, m.file)).read().count(m.original)
            if count != 1:
                sys.exit(f'mutant {i} ({m.description}): its original text occurs {count} times in {m.file}, expected once')
        if not args.no_baseline:
            for file in sorted({m.file for _, m in chosen}):
                code, seconds, out = run_tests(tree, TESTS[file], args.timeout * 2)
                print(f'baseline {file}: exit {code} in {seconds:.0f} s', flush=True)
                if code != 0:
                    sys.exit(f'the tests mapped to {file} fail without any mutant:\n{out}')
        previous = dict(summary={}, results=[])
        if args.update:
            if args.only is None:
                sys.exit('--update reruns the mutants given by --only')
            with open(os.path.join(args.out, 'report.json')) as f:
                previous = json.load(f)
        results = [r for r in previous['results'] if args.only is None or r['id'] not in args.only]
        summary = previous['summary']
        reruns = list(summary.get('reruns', []))
        main_seconds = summary.get('seconds', 0)
        if args.update:
            rerun = dict(ids=[i for i, _ in chosen], started=started, commit=commit, seconds=0)
            reruns.append(rerun)
            started, commit = summary['started'], summary['commit']

        def report(complete):
            if args.update:   # the main pass's duration stays; the rerun records its own
                rerun['seconds'] = round(time.time() - t0)
                complete = complete and summary.get('complete', False)
            seconds = main_seconds if args.update else time.time() - t0
            return write_report(args.out, sorted(results, key=lambda r: r['id']), started, seconds, complete, commit, reruns)
        for i, m in chosen:
            path = os.path.join(tree, m.file)
            pristine = open(path).read()
            with open(path, 'w') as f:
                f.write(pristine.replace(m.original, m.replacement))
            try:
                code, seconds, out = run_tests(tree, TESTS[m.file], args.timeout)
            finally:
                with open(path, 'w') as f:
                    f.write(pristine)
            status, killer = status_of(code, out)
            result = dict(id=i, file=m.file, description=m.description, status=status, killed_by=killer,
                          seconds=round(seconds, 1), tests=TESTS[m.file])
            if status != 'killed':
                result['reason'] = m.known_survivor
            results.append(result)
            print(f'#{i} {status:8s} {seconds:5.0f} s  {m.description}  {killer or ""}', flush=True)
            report(complete=False)
        print(json.dumps(report(complete=True)))


if __name__ == '__main__':
    main()
