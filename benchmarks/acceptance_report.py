"""The GPU acceptance report: acceptance.json (the record) and acceptance.md (the same, to read).

The Markdown explains itself: what each stage checks, its status, its numbers and how to read them.
"""

import json
import pathlib

STATUS_MEANING = {
    'passed': 'ran to the end and every check held',
    'failed': 'a correctness check failed, or the stage crashed (sets exit code 1)',
    'overrun': 'cut at its time budget; what it finished is reported (a correctness stage then sets exit code 2)',
    'skipped': 'not run here (not selected, or GPU only in the CPU smoke); the reason is given',
}
HOW_TO_READ = {
    'environment': 'Required checks fail the run (a GPU component the README\'s GPU install should provide is '
                   'missing); optional ones (DALI, apex) are reported only. Warm compile caches make the compiled '
                   'paths\' builds in the training-iteration stage much shorter.',
    'warm_caches': 'Builds the timing stage\'s compiled paths while the correctness stages run, so that their timed '
                   'builds find Inductor\'s and Triton\'s caches warm. Cut (overrun) when the measurements begin; never '
                   'a failure.',
    'gpu_tests': 'Every failure is listed with its first message line; the full output is in the shard logs. Skips '
                 'are grouped by reason: on a GPU machine only optional components (apex) should skip.',
    'demo': 'The demo\'s own closing table. On a GPU the run checks that it trained on CUDA with NVML telemetry in '
            'every tick and that fine-tuning lowered the one-step demo-FID; the exact figures move with rounding, as '
            'on CPU (the README\'s CPU table is one such trajectory).',
    'bandwidth': 'GB/s = minimal DRAM traffic / median time (CUDA events): forward reads x and writes y (2 accesses '
                 'per element), backward reads x and dy and writes dx (3). "% of peak" divides by the device\'s peak '
                 '(source given). A fused kernel near or above 70% is memory-bound as it should be; PyTorch\'s '
                 'unfused sequence moves the tensor several times, so its GB/s by this count is low by design.',
    'train_step': 'img/s = batch / (median timed iteration + 1/16 of a separately timed R1 step). D2O and D2O-F of a '
                  'path are built side by side and their iterations interleaved, so their ratio compares like with '
                  'like. "vs first" is each variant\'s speed-up over the first measured path (eager fp32). Peak '
                  'memory = training state + max_memory_allocated growth over an iteration + R1 step. Build = compile '
                  '+ warm-up.',
}


def fmt(value, spec='.2f', missing='-'):
    return missing if value is None else format(value, spec)


def table(header, rows):
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    return lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]

#----------------------------------------------------------------------------
# Per-stage details.

def environment_md(d):
    lines = table(['component', 'version'], sorted((d.get('versions') or {}).items()))
    gpu = d.get('gpu')
    if gpu:
        lines += [''] + table(['GPU', 'value'], [(k, v) for k, v in gpu.items() if k != 'nvml'])
        lines += [''] + table(['NVML reading', 'value'], sorted(gpu['nvml'].items()))
    lines += [''] + table(['check', 'required', 'ok', 'detail'],
                          [(c['name'], 'yes' if c['required'] else 'no', 'yes' if c['ok'] else '**NO**', c['detail'])
                           for c in d.get('checks', [])])
    caches = d.get('compile_caches', {})
    if caches:
        lines += ['', 'Compile caches at the start: ' + '; '.join(f'{k} {v["path"]} ({v["size_mb"]} MB)'
                                                               for k, v in caches.items())]
    return lines


def gpu_tests_md(d):
    counts = d.get('counts', {})
    lines = [f'{d.get("shards", 1)} pytest process(es) over {len(d.get("files", []))} files: '
             + ', '.join(f'{v} {k}' for k, v in counts.items())]
    if d.get('failures'):
        lines += ['', '**Failures:**', ''] + [f'- `{f}`' for f in d['failures'][:50]]
    if d.get('skip_reasons'):
        lines += [''] + table(['skip reason', 'tests'], sorted(d['skip_reasons'].items(), key=lambda kv: -kv[1]))
    slowest = [c for c in d.get('slowest', []) if c['seconds'] >= 0.1]
    if slowest:
        lines += ['', 'Slowest: ' + '; '.join(f'`{c["id"]}` {c["seconds"]:.1f} s' for c in slowest)]
    if d.get('problems'):
        lines += ['', 'Problems: ' + '; '.join(d['problems'])]
    return lines


def demo_md(d):
    if not d.get('table'):
        return []
    lines = table(['generator', 'NFE', 'demo-FID', 'class accuracy'],
                  [(r['name'], r['nfe'], f'{r["fid"]:.2f}', '-' if r['accuracy'] is None else f'{100 * r["accuracy"]:.1f}%')
                   for r in d['table']])
    lines += ['', *[f'`{line}`' for line in d.get('setup', [])]]
    if d.get('ticks'):
        keys = sorted({k for t in d['ticks'] for k in t}, key=lambda k: list(d['ticks'][0]).index(k)
                      if k in d['ticks'][0] else 99)
        lines += [''] + table(keys, [[fmt(t.get(k), '.3g') for k in keys] for t in d['ticks']])
    return lines


def bandwidth_md(d):
    peak = d.get('peak_gbs')
    lines = [f'Peak: {fmt(peak, ".0f", "unknown")} GB/s ({d.get("peak_source")}); median of {d.get("reps")} '
             f'repetitions; implementations: {", ".join(d.get("implementations", []))}.', '']
    share = lambda v: fmt(v and 100 * v, '.0f') + '%' if v is not None else '-'
    lines += table(['shape', 'layout', 'modulation', 'dtype', 'implementation', 'fwd ms', 'fwd GB/s', 'fwd % peak',
                    'bwd ms', 'bwd GB/s', 'bwd % peak'],
                   [('x'.join(map(str, r['shape'])), r['layout'], r['modulation'], r['dtype'], r['implementation'],
                     f'{r["forward_ms"]:.3f}', f'{r["forward_gbs"]:.0f}', share(r['forward_share_of_peak']),
                     f'{r["backward_ms"]:.3f}', f'{r["backward_gbs"]:.0f}', share(r['backward_share_of_peak']))
                    for r in d.get('rows', [])])
    if d.get('errors'):
        lines += ['', 'Errors:', ''] + [f'- {e["implementation"]} on {"x".join(map(str, e["shape"]))} {e["layout"]} '
                                        f'{e["modulation"]}: {e["error"]}' for e in d['errors']]
    if d.get('self_check'):
        lines += ['', 'First-call self-check verdicts (the fused op against the float64 reference):', '']
        lines += table(['backend', 'device', 'dtype', 'layout', 'parameters / add / scale / shift / act', 'trusted'],
                       [(v['backend'], v['device'], v['dtype'], v['layout'], v['configuration'],
                         'yes' if v['trusted'] else '**NO**') for v in d['self_check']])
    return lines


def train_step_md(d):
    paths = d.get('paths', [])
    base = next((p for p in paths if p['status'] == 'passed'), None)
    rows = []
    for p in paths:
        v = p.get('details', {}).get('variants')
        if not v:
            rows.append((p['path'], p['status'], '', '', '', '', '', '', p['summary']))
            continue
        speedup = lambda k: fmt(v[k]['img_per_s'] / base['details']['variants'][k]['img_per_s']) + 'x'
        rows.append((p['path'], p['status'], f'{v["d2o"]["img_per_s"]:.1f}', f'{v["d2o-f"]["img_per_s"]:.1f}',
                     f'{p["details"]["d2o_f_over_d2o"]:.2f}x', f'{speedup("d2o")} / {speedup("d2o-f")}',
                     f'{fmt(v["d2o"]["peak_mem_gb"])} / {fmt(v["d2o-f"]["peak_mem_gb"])}',
                     f'{v["d2o"]["build_s"]:.0f} / {v["d2o-f"]["build_s"]:.0f}', p['details'].get('kernels', '')))
    batch = next((p['details']['batch'] for p in paths if p.get('details', {}).get('batch')), '?')
    return [f'Batch {batch} per iteration; "vs" = speed-up over the first measured path ({base["path"] if base else "-"}).',
            ''] + table(['path', 'status', 'D2O img/s', 'D2O-F img/s', 'D2O-F / D2O', 'vs first (D2O / D2O-F)',
                         'peak GB (D2O / D2O-F)', 'build s (D2O / D2O-F)', 'kernels / note'], rows)


def warm_caches_md(d):
    return [f'Built: {", ".join(d.get("built", [])) or "none"} (of {", ".join(d.get("paths", []))}).'] if d else []


DETAILS = {'environment': environment_md, 'warm_caches': warm_caches_md, 'gpu_tests': gpu_tests_md, 'demo': demo_md,
           'bandwidth': bandwidth_md, 'train_step': train_step_md}

#----------------------------------------------------------------------------

def markdown(report):
    smoke = report['mode'] == 'cpu-smoke'
    lines = [f'# GPU acceptance: {report["verdict"].upper()} (exit code {report["exit_code"]})', '',
             f'Mode: {report["mode"]}' + (' (tiny CPU stand-ins: this run checks the orchestration, not a GPU)'
                                          if smoke else '') +
             f'. Started {report["started"]}; {report["wall_s"]:.0f} s of a {report["budget_s"]:.0f} s budget. '
             f'Command: `{report["command"]}`', '',
             'Exit code 0: every correctness check passed; 1: a check failed or a stage crashed; 2: no failure, but a '
             'correctness stage was cut at its budget. Speed never sets it. Statuses: '
             + '; '.join(f'**{k}**: {v}' for k, v in STATUS_MEANING.items()) + '.', '']
    lines += table(['#', 'stage', 'kind', 'status', 'wall / budget s', 'summary'],
                   [(i + 1, s['title'], s['kind'], f'**{s["status"]}**', f'{fmt(s["wall_s"], ".0f")} / {s["budget_s"]:.0f}',
                     s['summary']) for i, s in enumerate(report['stages'])])
    for i, s in enumerate(report['stages']):
        lines += ['', f'## {i + 1}. {s["title"]}: {s["status"]}', '', f'Checks: {s["checks"]}.', '',
                  f'How to read: {HOW_TO_READ[s["name"]]}', '', f'Result: {s["summary"]}']
        if s['failed_checks']:
            lines += ['', '**Failed checks:**', ''] + [f'- {c}' for c in s['failed_checks'][:50]]
        detail = DETAILS[s['name']](s['details'])
        if detail:
            lines += [''] + detail
        if s['logs']:
            lines += ['', 'Logs: ' + ', '.join(f'`{pathlib.Path(p).name}`' for p in s['logs'])]
    return '\n'.join(lines) + '\n'


def write_report(report, outdir):
    outdir = pathlib.Path(outdir)
    paths = outdir / 'acceptance.json', outdir / 'acceptance.md'
    paths[0].write_text(json.dumps(report, indent=2, default=str) + '\n')
    paths[1].write_text(markdown(report))
    return paths
