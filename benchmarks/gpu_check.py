"""One prepared check of DiM on a GPU: one command, at most 8 minutes, one JSON, one table.

On the device machine (the `run` tool of this workplace; the image has torch, triton, accelerate, timm but not
ml_collections, which the training-step sections need: carry its wheel). Once, here:

    pip download --no-deps --only-binary=:all: -d assets/wheels ml_collections==1.1.0     # assets/ is git-ignored

then run(carry=["assets/wheels"], timeout_s=540, command=
    "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site assets/wheels/*.whl &&
     export PYTHONPATH=/tmp/site; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json")

Without the wheel the run still works; host_syncs and train_* are skipped with a note. The JSON (and the log beside
it, gpu_check.log) comes back under the tool's files_at: copy the JSON to benchmarks/results/gpu_check.json and the
table's figures into README, naming the card. A rerun of some sections: --sections train_256,model_compiled.
Anywhere else: `python benchmarks/gpu_check.py [--out FILE]` (default $OUT/gpu_check.json when OUT is set, else
benchmarks/results/gpu_check.json); `--dry-run`: the same code on CPU with tiny shapes and Triton interpreted
(TRITON_INTERPRET=1), written to the system's temp folder unless --out is given (tests/test_gpu_check.py).

Sections, in this order (most important first), each in its own process with its own time budget (a section
past its budget is stopped and keeps what it had saved; one that fails records its traceback; once the total
budget is spent the rest are skipped with a note); the JSON is rewritten after every section:
  card            device, copy bandwidth, bf16 matmul rate (benchmarks/gpu_check_card.py)
  dispatch        backend choice, log once, slow-backend WARNING, optional kernels by keyword
  rng             per-rank CUDA generators, exact save/restore, bit-identical resume
  scan_parity     Triton vs chunked torch vs sequential, values and all gradients, fp32 and bf16
  scan_speed      scan fwd and fwd+bwd at the DiM shapes vs the bytes bound; mamba-ssm when installed
  model_eager     DiM-H/2 forward img/s vs its GEMM bound, 50-step CFG sampling img/s, FID-50k cost; 256 and 512
  host_syncs      torch.cuda.set_sync_debug_mode around real training steps
  train_256       DiM-H/2 bf16 training step at the largest batch that fits, with/without checkpointing
  model_compiled  as model_eager through libs/model/compile.py
  scan_sweep      Triton knobs one at a time around the defaults
  train_512       as train_256 at 512
While the first sections run, background processes compile the Triton kernels of the scan_speed shapes (Triton
caches them on disk; the model and training sections use the same specialisations), so the timed sections do not
wait on compilation; scan_speed starts once they are done (or stopped at their own budget).
"""
import argparse
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.gpu_check_util import (ROOT, SIZES, Ctx, finite, forbidden_imported,  # noqa: E402
                                       write_json)

CARRY_HINT = ("ml_collections is not importable: carry its wheel (pip download --no-deps --only-binary=:all: "
              "-d assets/wheels ml_collections==1.1.0; run with carry=['assets/wheels'] and install it first, see "
              "the docstring of benchmarks/gpu_check.py)")


class Section:
    def __init__(self, name, spec, budget_s, needs_config=False, after_warm=False, args=None):
        self.name, self.spec, self.budget_s = name, spec, budget_s
        self.needs_config, self.after_warm, self.args = needs_config, after_warm, args or {}


SECTIONS = [
    Section('card', 'benchmarks.gpu_check_card:card', 30),
    Section('dispatch', 'benchmarks.gpu_check_card:dispatch', 60),
    Section('rng', 'benchmarks.gpu_check_card:rng', 45),
    Section('scan_parity', 'benchmarks.gpu_check_scan:parity', 60),
    Section('scan_speed', 'benchmarks.gpu_check_scan:speed', 75, after_warm=True),
    Section('model_eager', 'benchmarks.gpu_check_model:eager', 75),
    Section('host_syncs', 'benchmarks.gpu_check_model:host_syncs', 45, needs_config=True),
    Section('train_256', 'benchmarks.gpu_check_model:train', 180, needs_config=True, args=dict(resolution=256)),
    Section('model_compiled', 'benchmarks.gpu_check_model:compiled', 150),
    Section('scan_sweep', 'benchmarks.gpu_check_scan:sweep', 45),
    Section('train_512', 'benchmarks.gpu_check_model:train', 150, needs_config=True, args=dict(resolution=512)),
]
NAMES = [s.name for s in SECTIONS]
TOTAL_BUDGET_S = 465      # the whole run, so that it ends within 8 minutes
DRY_BUDGET_SCALE = 3      # a dry run on a loaded CPU: budgets that only stop a hang
MIN_SECTION_S = 5


# ------------------------------------------------------------------------------------------------------- worker

def _load(spec):
    module, fn = spec.split(':')
    return getattr(importlib.import_module(module), fn)


def worker(spec, name, ctx_path, part_path):
    """Run one section in this process; its result (or traceback) goes to part_path."""
    with open(ctx_path) as f:
        data = json.load(f)
    ctx = Ctx(name, data, part_path)
    t0 = time.perf_counter()
    try:
        result = _load(spec)(ctx) or ctx.result
        status = 'skipped' if 'skipped' in result else 'ok'
    except Exception:
        result, status = dict(ctx.result, traceback=traceback.format_exc()), 'failed'
    allowed = ('ml_collections',) if data.get('needs_config') else ()
    write_json(part_path, dict(result, status=status, seconds=time.perf_counter() - t0,
                               forbidden_imports=forbidden_imported(allowed)))


# ------------------------------------------------------------------------------------------------------- driver

class Driver:
    def __init__(self, out, dry, budget, tmp):
        self.out, self.dry, self.tmp = out, dry, tmp
        self.t0 = time.time()
        self.deadline = self.t0 + budget
        self.log = os.path.splitext(out)[0] + '.log'
        self.report = dict(script='benchmarks/gpu_check.py', dry_run=dry, budget_s=budget, argv=sys.argv[1:],
                           started=time.strftime('%Y-%m-%d %H:%M:%S %Z'), sections={})
        self.env = dict(os.environ, PYTHONUNBUFFERED='1')
        if dry:
            self.env['TRITON_INTERPRET'] = '1'
        open(self.log, 'w').close()
        self.warm = []

    def elapsed(self):
        return time.time() - self.t0

    def write(self):
        self.report['wall_s'] = self.elapsed()
        write_json(self.out, self.report)

    def _spawn(self, name, spec, args, deadline, needs_config=False):
        ctx_path = os.path.join(self.tmp, f'{name}.ctx.json')
        part = os.path.join(self.tmp, f'{name}.json')
        log = os.path.join(self.tmp, f'{name}.log')
        with open(ctx_path, 'w') as f:
            json.dump(dict(dry_run=self.dry, deadline=deadline, args=args, needs_config=needs_config,
                           results={k: v for k, v in self.report['sections'].items()}), f)
        cmd = [sys.executable, os.path.abspath(__file__), '--worker', spec, '--section', name, '--ctx', ctx_path,
               '--part', part]
        with open(log, 'w') as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT,
                                    start_new_session=True)
        return proc, part, log

    @staticmethod
    def _stop(proc):
        try:
            os.killpg(proc.pid, signal.SIGKILL)      # the worker's own process group: it and what it started
        except ProcessLookupError:
            pass
        proc.wait()

    def _collect(self, name, proc, part, log, timed_out, budget):
        try:
            with open(part) as f:
                result = json.load(f)
        except (OSError, ValueError):
            result = dict(status='failed', error=f'the worker ended (exit {proc.returncode}) without a result')
        if timed_out:
            result.update(status='timeout', note=f'stopped at its budget ({budget:.0f} s); results so far kept')
        elif result.get('status') == 'running':
            result.update(status='failed', error=f'the worker died (exit {proc.returncode}); results so far kept')
        with open(log) as f:
            text = f.read()
        with open(self.log, 'a') as f:
            f.write(f'===== {name} ({result["status"]}) =====\n{text}\n')
        if result['status'] in ('failed', 'timeout'):
            result['log_tail'] = text.strip().splitlines()[-15:]
        return result

    def start_warm(self, sizes):
        """Background compiles of the scan_speed shapes' Triton kernels."""
        w = sizes['triton_warm']
        shapes = w.get('shapes', sizes['scan_speed']['shapes'])
        deadline = min(self.deadline, time.time() + w['timeout'])
        for i, shape in enumerate(shapes[:w['parallel']]):
            args = dict(shape=list(shape), d_state=sizes['scan_speed']['d_state'])
            proc, part, log = self._spawn(f'triton_warm_{i}', 'benchmarks.gpu_check_scan:warm', args, deadline)
            self.warm.append((f'triton_warm_{i}', proc, part, log, deadline))
        self.report['triton_warm'] = dict(started_at_s=self.elapsed(), jobs=len(self.warm))

    def finish_warm(self):
        jobs = {}
        for name, proc, part, log, deadline in self.warm:
            try:
                proc.wait(timeout=max(0.0, deadline - time.time()))
                timed_out = False
            except subprocess.TimeoutExpired:
                self._stop(proc)
                timed_out = True
            r = self._collect(name, proc, part, log, timed_out, deadline - self.t0)
            jobs[name] = {k: r.get(k) for k in ('status', 'seconds', 'shape', 'traceback', 'note') if k in r}
        if self.warm:
            self.report['triton_warm'].update(done_at_s=self.elapsed(), results=jobs)
        self.warm = []

    def run_section(self, section, scale):
        left = self.deadline - time.time()
        card = self.report['sections'].get('card', {})
        if section.name != 'card' and card.get('status') != 'ok':
            return dict(status='skipped', note='the card section did not succeed: its ceilings are needed')
        if left < MIN_SECTION_S:
            return dict(status='skipped', note=f'total budget spent ({self.report["budget_s"]:.0f} s)')
        if section.needs_config and importlib.util.find_spec('ml_collections') is None:
            return dict(status='skipped', note=CARRY_HINT)
        if section.after_warm:
            self.finish_warm()
            left = self.deadline - time.time()
        budget = min(section.budget_s * scale, left)
        proc, part, log = self._spawn(section.name, section.spec, section.args, time.time() + budget,
                                      section.needs_config)
        try:
            proc.wait(timeout=budget + 5)          # the section's own checks stop it first, normally
            timed_out = False
        except subprocess.TimeoutExpired:
            self._stop(proc)
            timed_out = True
        result = self._collect(section.name, proc, part, log, timed_out, budget)
        result['budget_s'] = budget
        return result

    def run(self, sections):
        """Run `sections` (Section list, in order); the first must be 'card'."""
        scale = DRY_BUDGET_SCALE if self.dry else 1
        sizes = SIZES['dry' if self.dry else 'gpu']
        names = {s.name for s in sections}
        for section in sections:
            result = self.run_section(section, scale)
            self.report['sections'][section.name] = result
            self.write()
            print(f"[{self.elapsed():6.1f} s] {section.name:15s} {result['status']:8s} "
                  f"{result.get('seconds', 0):6.1f} s  {headline(section.name, result)}", flush=True)
            if section.name == 'card' and result['status'] == 'ok' and names & {'scan_speed'}:
                self.start_warm(sizes)
        self.finish_warm()
        self.write()


# -------------------------------------------------------------------------------------------------------- table

def _f(v, digits=1):
    if v is None or isinstance(v, bool) or not finite(v):
        return '-' if not isinstance(v, bool) else str(v)
    return f'{v:.{digits}f}' if abs(v) < 1e4 else f'{v:.3g}'


def headline(name, r):
    """A one-line summary of section `name`'s result."""
    if r.get('status') not in ('ok', 'timeout'):
        tb = (r.get('traceback') or '').strip().splitlines()
        return r.get('note') or r.get('error') or (tb[-1] if tb else '')
    try:
        if name == 'card':
            return (f"{r['device']}: copy {_f(r['copy_GBps'], 0)} GB/s, bf16 matmul "
                    f"{_f(r['bf16_matmul_TFLOPs'], 1)} TFLOP/s, {_f(r['memory_total_gb'], 0)} GiB")
        if name == 'dispatch':
            a = r['auto']
            slow = ', '.join(f"{s['mode']}->{s['backend']} warned={s['warned']} ok={s['ok']}"
                             for s in r['slow_backend'])
            return (f"auto: {a['scan_backend']} (expected {a['expected_scan_backend']}, logged {a['choice_logged']}x)"
                    f"; {slow}; mamba-ssm {r['real_kernels'].get('mamba_ssm') or 'not installed'}")
        if name == 'rng':
            z = r['resume']
            return (f"ranks differ {r['ranks_differ']}, restore exact {r['restore_round_trips']}, resume "
                    f"bit-identical {z['bit_identical']} (max diff {z['resume_max_abs_diff']:.2e}; repeat "
                    f"{z['repeat_max_abs_diff']:.2e})")
        if name == 'scan_parity':
            errs = [(c['dtype'], c['triton']['max_rel_err'], c['torch_chunked']['max_rel_err'])
                    for c in r['cases'] if 'triton' in c]
            return f"ok {r.get('ok')}; max rel err (dtype, triton, torch): " + ', '.join(
                f'{d} {a:.1e}/{b:.1e}' for d, a, b in errs)
        if name == 'scan_speed':
            return 'triton x bytes bound fwd/fwd+bwd: ' + ', '.join(
                f"{_f(x['triton'].get('fwd_x_bound'))}/{_f(x['triton'].get('fwdbwd_x_bound'))}"
                for x in r['rows'] if 'triton' in x)
        if name.startswith('model'):
            return '; '.join(f"{res}: {_f(m.get('forward_img_per_s'))} img/s fwd "
                             f"({_f(100 * m.get('fraction_of_gemm_bound', float('nan')), 0)} % of GEMM bound), "
                             f"sampling {_f(m.get('sampling', {}).get('img_per_s'), 2)} img/s"
                             for res, m in ((k, r[k]) for k in ('256', '512') if k in r) if 'forward_ms' in m)
        if name == 'host_syncs':
            s = r.get('syncs_in_steps')
            return (f"{s['count']} syncs in {r['steps']} steps at {sorted(s['by_place'])[:3]}" if s
                    else r.get('note', ''))
        if name.startswith('train'):
            return r.get('skipped') or '; '.join(
                f"ckpt {v['gradient_checkpointing']}: batch {v.get('largest_batch_measured')} "
                f"{_f(v.get('step_time_s'), 2)} s/step {_f(v.get('peak_memory_gb', v.get('peak_rss_gb')))} GB"
                for v in r['variants'])
        if name == 'scan_sweep':
            return '; '.join(f"{x['shape']}: best fwd {x.get('best_fwd')}, fwd+bwd {x.get('best_fwdbwd')}"
                             for x in r['shapes'])
    except (KeyError, TypeError, IndexError) as e:
        return f'(partial result: {type(e).__name__} {e})'
    return ''


def table(report):
    """The report as markdown."""
    secs = report['sections']
    lines = [f"## gpu_check ({'dry run' if report['dry_run'] else secs.get('card', {}).get('device', '?')}, "
             f"{_f(report.get('wall_s'), 0)} s)", '', '| section | status | s | result |', '|---|---|---|---|']
    lines += [f"| {n} | {r['status']} | {_f(r.get('seconds'))} | {headline(n, r)} |" for n, r in secs.items()]
    rows = secs.get('scan_speed', {}).get('rows', [])
    if rows:
        lines += ['', '| B x Di x L | bound fwd ms | triton fwd ms (x) | bound f+b ms | triton f+b ms (x) | '
                  'mamba-ssm fwd / f+b ms | torch fwd ms | segments fwd/bwd |', '|---|---|---|---|---|---|---|---|']
        for x in rows:
            t, m, c = x.get('triton', {}), x.get('mamba_ssm', {}), x.get('torch_chunked', {})
            lc = x.get('launch_config', {})
            lines.append(f"| {'x'.join(map(str, x['shape']))} {x.get('layout', '')} | {_f(x['bound_fwd_ms'], 3)} | "
                         f"{_f(t.get('fwd_ms'), 3)} ({_f(t.get('fwd_x_bound'))}) | {_f(x['bound_fwdbwd_ms'], 3)} | "
                         f"{_f(t.get('fwdbwd_ms'), 3)} ({_f(t.get('fwdbwd_x_bound'))}) | "
                         f"{_f(m.get('fwd_ms'), 3)} / {_f(m.get('fwdbwd_ms'), 3)} | {_f(c.get('fwd_ms'), 2)} | "
                         f"{lc.get('fwd', {}).get('segments')}/{lc.get('bwd', {}).get('segments')} |")
    model = [(n, res, secs[n][res]) for n in ('model_eager', 'model_compiled') if n in secs
             for res in ('256', '512') if 'forward_ms' in secs[n].get(res, {})]
    if model:
        lines += ['', '| model | res | batch | fwd ms | img/s | % GEMM bound | sampling img/s (batch) | '
                  'FID-50k GPU-h | first call s |', '|---|---|---|---|---|---|---|---|---|']
        for n, res, m in model:
            sm = m.get('sampling', {})
            lines.append(f"| {n} | {res} | {m['batch']} | {_f(m['forward_ms'])} | {_f(m['forward_img_per_s'])} | "
                         f"{_f(100 * m['fraction_of_gemm_bound'], 0)} | {_f(sm.get('img_per_s'), 2)} "
                         f"({sm.get('batch', '-')}) | {_f(sm.get('fid50k_gpu_hours'), 2)} | "
                         f"{_f(m['first_call_s'])} |")
    train = [(n, v) for n in ('train_256', 'train_512') for v in secs.get(n, {}).get('variants', [])]
    if train:
        lines += ['', '| training | checkpointing | batch | s/step | samples/s | peak GB | of card |',
                  '|---|---|---|---|---|---|---|']
        lines += [f"| {n} | {v['gradient_checkpointing']} | {v.get('largest_batch_measured', '-')} | "
                  f"{_f(v.get('step_time_s'), 3)} | {_f(v.get('samples_per_s'))} | "
                  f"{_f(v.get('peak_memory_gb', v.get('peak_rss_gb')))} | {_f(v.get('fraction_of_card'), 2)} |"
                  for n, v in train]
    return '\n'.join(lines)


def default_out(dry):
    if os.environ.get('OUT'):
        return os.path.join(os.environ['OUT'], 'gpu_check.json')
    if dry:
        return os.path.join(tempfile.gettempdir(), 'gpu_check_dry_run.json')
    return os.path.join(ROOT, 'benchmarks', 'results', 'gpu_check.json')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', default=None, help='the JSON (default: see above); the log goes beside it')
    parser.add_argument('--dry-run', action='store_true', help='on CPU, tiny shapes, Triton interpreted')
    parser.add_argument('--budget', type=float, default=None,
                        help=f'seconds for the whole run (default {TOTAL_BUDGET_S}; x{DRY_BUDGET_SCALE} dry)')
    parser.add_argument('--sections', default=','.join(NAMES), help='comma-separated subset, run in the fixed order')
    parser.add_argument('--worker', help=argparse.SUPPRESS)        # internal: run one section (module:function)
    parser.add_argument('--section', help=argparse.SUPPRESS)
    parser.add_argument('--ctx', help=argparse.SUPPRESS)
    parser.add_argument('--part', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.section, args.ctx, args.part)
        return 0
    names = set(filter(None, args.sections.split(',')))
    unknown = sorted(names - set(NAMES))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; the sections are {', '.join(NAMES)}")
    if args.budget is not None and args.budget < 0:
        parser.error('--budget must be >= 0')
    budget = args.budget if args.budget is not None else TOTAL_BUDGET_S * (DRY_BUDGET_SCALE if args.dry_run else 1)
    out = os.path.abspath(args.out or default_out(args.dry_run))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix='gpu_check_') as tmp:
        driver = Driver(out, args.dry_run, budget, tmp)
        try:
            driver.run([s for s in SECTIONS if s.name in names])
        finally:
            for _, proc, *_ in driver.warm:
                driver._stop(proc)
    print('\n' + table(driver.report) + '\n', flush=True)
    print(f'wrote {out} and {driver.log}', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
