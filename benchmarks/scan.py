"""Selective-scan core on CPU: our kernels against the plain sequential loop, time and peak memory.

    python benchmarks/scan.py                 # full grid: L in {366, 1230, 4494, 9806} x D in {256, 1024}
    python benchmarks/scan.py --quick         # L in {366, 1230} x D = 256, fewer repeats
    python benchmarks/scan.py --out DIR --threads 2 --lengths 366 4494 --dims 1024
    python benchmarks/scan.py --isa avx512 avx2 generic   # the C kernel's instruction-set variants (scan_isa.py)

Implementations (all compute the scan core: dt already softplus'd; y_t = C_t . h_t, h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t):
  loop     the algorithm of mamba_ssm's `selective_scan_ref`: precompute exp(dt A) and dt B u as (B, D, L, N), a Python
           loop over L, autograd through it (its backward is O(L^2): every `deltaA[:, :, i]` slice gets a full-size
           zero-filled gradient);
  cpu      libs/scan/cpu.py, the compiled fused kernel (if built);
  chunked  libs/scan/chunked.py, the pure-PyTorch backend (if importable).
Batch 2, d_state 16, fp32, dt of Mamba's init scale. Every measurement runs in a fresh subprocess: timing = 1 warm-up
then the median of up to --repeats runs (fewer when one run is long); forward under no_grad, fwd+bwd = y.backward(ones)
with gradients for all five inputs. Peak extra memory: a separate fresh process with MALLOC_MMAP_THRESHOLD_=1 MiB
(freed buffers go back to the OS) resets the peak with /proc/self/clear_refs and reports VmHWM - VmRSS around one
call (inputs not counted, outputs and input gradients counted).
The loop's fwd+bwd takes minutes to hours at large L: shapes whose predicted time exceeds --loop-cap seconds are not
run; their time is an ESTIMATE from a fit T = D (a L + b L^2) to the measured loop points (marked 'est'), and the
speedups use a conservative lower bound (linear scaling from the largest measured L, marked '>='). Its peak memory is
taken with a watchdog that reports VmHWM after about 3x its forward time (at most --loop-cap seconds; the peak comes in
the first backward steps); a capped figure is a lower bound (marked '>=').
Writes scan.json and scan.png to --out (default benchmarks/results/); with --tag T, scan_T.json and scan_T.png.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT_TAG = 'RESULT '
IMPLS = ('loop', 'cpu', 'chunked')
BATCH, NSTATE = 2, 16


# ----------------------------------------------------------------------------------------------- worker side
def _loop_core(delta, u, A, B, C):
    """mamba_ssm selective_scan_ref's recurrence (its lines, minus softplus/bias/D/z)."""
    import torch
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    deltaA = torch.exp(torch.einsum('bdl,dn->bdln', delta, A))
    deltaB_u = torch.einsum('bdl,bnl,bdl->bdln', delta, B, u)
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum('bdn,bn->bd', x, C[:, :, i])
        ys.append(y)
    return torch.stack(ys, dim=2), x


def _get_impl(name):
    sys.path.insert(0, ROOT)
    if name == 'loop':
        return _loop_core
    if name == 'cpu':
        from libs.scan import cpu as scan_cpu
        if not scan_cpu.is_available():
            raise RuntimeError(f'cpu kernel not available: {scan_cpu.unavailable_reason()}')
        return lambda *x: scan_cpu.scan_core(*x)
    if name == 'chunked':
        from libs.scan import chunked as scan_chunked
        return lambda *x: scan_chunked.scan_core(*x)
    raise ValueError(name)


def _inputs(d, length, seed=0):
    import torch
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(seed)
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt0 = torch.exp(torch.rand(d, generator=g) * (hi - lo) + lo)                  # Mamba's dt init
    bias = dt0 + torch.log(-torch.expm1(-dt0))
    delta = F.softplus(bias[:, None] + 0.5 * torch.randn(BATCH, d, length, generator=g))
    u = torch.randn(BATCH, d, length, generator=g)
    A = -torch.arange(1, NSTATE + 1, dtype=torch.float32).repeat(d, 1)              # S4D-real init
    B = torch.randn(BATCH, NSTATE, length, generator=g)
    C = torch.randn(BATCH, NSTATE, length, generator=g)
    return [delta, u, A, B, C]


def _status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1]) / 1024.0   # MB
    return float('nan')


def _worker(cfg):
    if cfg['what'] == 'isa':
        from benchmarks import scan_isa
        return scan_isa.worker(cfg)
    import torch
    torch.set_num_threads(cfg['threads'])
    fn = _get_impl(cfg['impl'])
    d, length, mode = cfg['D'], cfg['L'], cfg['mode']
    out = dict(cfg)
    if cfg['what'] == 'constants':
        return _constants(cfg['threads'])
    if cfg['what'] == 'time':
        xs = _inputs(d, length)

        def run():
            if mode == 'fwd':
                with torch.no_grad():
                    fn(*xs)
            else:
                ins = [t.clone().requires_grad_() for t in xs]
                y = fn(*ins)[0]
                y.backward(torch.ones_like(y))
        t0 = time.perf_counter()
        run()                                            # warm-up (also measures one run)
        first = time.perf_counter() - t0
        n = max(1, min(cfg['repeats'], int(cfg['budget'] / max(first, 1e-9))))
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            run()
            ts.append(time.perf_counter() - t0)
        out.update(ms=1e3 * statistics.median(ts), runs=n, warmup_ms=1e3 * first, all_ms=[1e3 * t for t in ts])
        return out
    # memory
    xs = _inputs(d, length)
    warm = _inputs(16, 8)                                # thread pools, autograd engine etc. outside the measurement
    if mode == 'fwd':
        with torch.no_grad():
            fn(*warm)
    else:
        warm = [t.requires_grad_() for t in warm]
        y = fn(*warm)[0]
        y.backward(torch.ones_like(y))                   # the same ops as measured (their code pages count in RSS)
    del warm
    ins = [t.clone().requires_grad_() for t in xs] if mode == 'fwdbwd' else xs
    import gc
    gc.collect()
    base = _status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    cap = cfg.get('mem_cap')
    if cap:
        def watchdog():
            time.sleep(cap)
            res = dict(out, peak_extra_mb=_status('VmHWM') - base, capped=True)
            print(RESULT_TAG + json.dumps(res), flush=True)
            os._exit(0)
        threading.Thread(target=watchdog, daemon=True).start()
    if mode == 'fwd':
        with torch.no_grad():
            keep = fn(*ins)
    else:
        y = fn(*ins)[0]
        y.backward(torch.ones_like(y))
        keep = (y, [t.grad for t in ins])
    out.update(peak_extra_mb=_status('VmHWM') - base, capped=False)
    del keep
    return out


def _median_time(f, n=5):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _constants(threads):
    """The study's machine constants, measured now with the same thread count: copy bandwidth, matmul FLOP/s,
    torch.exp throughput."""
    import torch
    torch.set_num_threads(threads)
    x = torch.rand(64 * 2 ** 20)
    y = torch.empty_like(x)
    y.copy_(x)
    copy_gbs = 2 * x.numel() * 4 / _median_time(lambda: y.copy_(x)) / 1e9
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    a @ b
    gflops = 2 * 2048 ** 3 / _median_time(lambda: a @ b) / 1e9
    e = torch.rand(16 * 2 ** 20) * -3
    o = torch.empty_like(e)
    torch.exp(e, out=o)
    exp_gs = e.numel() / _median_time(lambda: torch.exp(e, out=o)) / 1e9
    return dict(copy_GBps=copy_gbs, matmul_GFLOPs=gflops, exp_Gelem_s=exp_gs, threads=threads)


# ----------------------------------------------------------------------------------------------- driver side
def _run_worker(cfg, timeout, memory=False):
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg['threads']), MKL_NUM_THREADS=str(cfg['threads']))
    if memory:
        env['MALLOC_MMAP_THRESHOLD_'] = str(1 << 20)
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), '--worker', json.dumps(cfg)], env=env,
                           capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return dict(cfg, error=f'timeout after {timeout:.0f} s')
    for line in p.stdout.splitlines()[::-1]:
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    return dict(cfg, error=(p.stderr.strip().splitlines() or ['no output'])[-1][:300])


def _fit_loop(points):
    """T(D, L) = D (a L + b L^2), least squares over measured loop fwd+bwd points [(D, L, ms)]."""
    if not points:
        return None
    if len(points) == 1:
        d, length, ms = points[0]
        return (0.0, ms / (d * length ** 2))
    s11 = sum((d * length) ** 2 for d, length, _ in points)
    s12 = sum((d * length) * (d * length ** 2) for d, length, _ in points)
    s22 = sum((d * length ** 2) ** 2 for d, length, _ in points)
    r1 = sum(ms * d * length for d, length, ms in points)
    r2 = sum(ms * d * length ** 2 for d, length, ms in points)
    det = s11 * s22 - s12 * s12
    if det <= 0:
        return (0.0, r2 / s22)
    a, b = (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det
    if a < 0 or b < 0:                                   # fall back to pure quadratic
        return (0.0, r2 / s22)
    return (a, b)


def _mem_cap(row, loop_cap):
    """Watchdog delay for the loop's fwd+bwd memory run: its forward (about 2x the no-grad forward with the tape)
    plus some backward steps; the peak comes within the first backward steps."""
    fwd_s = (row.get('loop_fwd_ms') or 1e4) / 1e3
    return min(loop_cap, max(15.0, 3 * fwd_s + 10))


def _bounds(d, length, c):
    """The study's lower bounds (ms) for the scan core with these constants."""
    bdl, bnl, bdln = BATCH * d * length, BATCH * NSTATE * length, BATCH * d * length * NSTATE
    return {
        'bytes_fwd_ms': 1e3 * 4 * (3 * bdl + 2 * bnl) / (c['copy_GBps'] * 1e9),
        'bytes_fwdbwd_ms': 1e3 * 4 * (8 * bdl + 6 * bnl) / (c['copy_GBps'] * 1e9),
        'flop_fwd_ms': 1e3 * 6 * bdln / (c['matmul_GFLOPs'] * 1e9),
        'flop_fwdbwd_ms': 1e3 * 24 * bdln / (c['matmul_GFLOPs'] * 1e9),
        'exp_fwd_ms': 1e3 * bdln / (c['exp_Gelem_s'] * 1e9),
        'exp_fwdbwd_ms': 1e3 * 2 * bdln / (c['exp_Gelem_s'] * 1e9),
    }


def _fmt(v, est=False, lower=False, unit=''):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return '-'
    s = f'{v:.0f}' if v >= 100 else (f'{v:.1f}' if v >= 10 else f'{v:.2f}')
    return ('>=' if lower else '') + s + unit + (' est' if est else '')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results'))
    ap.add_argument('--quick', action='store_true', help='L in {366, 1230}, D = 256, 3 repeats')
    ap.add_argument('--lengths', type=int, nargs='+', default=None)
    ap.add_argument('--dims', type=int, nargs='+', default=None)
    ap.add_argument('--impls', nargs='+', default=list(IMPLS), choices=IMPLS)
    ap.add_argument('--threads', type=int, default=None, help='default: torch.get_num_threads(); 1 with --isa')
    ap.add_argument('--repeats', type=int, default=None, help='timed runs after the warm-up (default 5; 3 quick; 7 with --isa)')
    ap.add_argument('--budget', type=float, default=20.0, help='seconds of timed runs per measurement (at least 1 run)')
    ap.add_argument('--loop-cap', type=float, default=90.0,
                    help='longest loop fwd+bwd run attempted (s); longer ones are estimated')
    ap.add_argument('--no-memory', action='store_true')
    ap.add_argument('--reuse', metavar='JSON',
                    help='take the columns of implementations not in --impls from an earlier scan.json '
                         '(e.g. --impls cpu --reuse old.json re-measures only the kernel)')
    ap.add_argument('--isa', nargs='+', choices=('avx512', 'avx2', 'generic'),
                    help="time the C kernel's instruction-set variants against each other instead (scan_isa.py; "
                         "default there: 1 thread, D in {256, 1024} x L in {366, 1230}, 7 repeats)")
    ap.add_argument('--tag', help='suffix of the output file names (scan_TAG.json, scan_isa_TAG.json)')
    ap.add_argument('--worker', help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        sys.path.insert(0, ROOT)
        res = _worker(json.loads(args.worker))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return

    import torch
    sys.path.insert(0, ROOT)
    from benchmarks.machine import cpu_name
    if args.isa:
        for flag in ('impls', 'budget', 'loop_cap', 'no_memory', 'reuse', 'quick'):
            if getattr(args, flag) != ap.get_default(flag):
                ap.error(f"--{flag.replace('_', '-')} does not apply to --isa")
        from benchmarks import scan_isa
        meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                    cpu=cpu_name(), nproc=os.cpu_count(), batch=BATCH, d_state=NSTATE,
                    date=time.strftime('%Y-%m-%d %H:%M:%S'), loadavg_start=os.getloadavg())
        from libs.scan import cpu as scan_cpu
        if not scan_cpu.is_available():
            raise SystemExit(f'--isa: the C kernel is not available: {scan_cpu.unavailable_reason()}')
        meta.update(cpu_kernel=scan_cpu.library_path(), cpu_kernel_segment=scan_cpu.SEGMENT)
        scan_isa.main(args, meta, _run_worker, _bounds)
        return
    threads = args.threads or torch.get_num_threads()
    lengths = args.lengths or ([366, 1230] if args.quick else [366, 1230, 4494, 9806])
    dims = args.dims or ([256] if args.quick else [256, 1024])
    repeats = args.repeats or (3 if args.quick else 5)
    impls = list(args.impls)
    meta = dict(threads=threads, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), cpu=cpu_name(), nproc=os.cpu_count(), batch=BATCH, d_state=NSTATE,
                date=time.strftime('%Y-%m-%d %H:%M:%S'), loadavg_start=os.getloadavg())
    try:
        from libs.scan import cpu as scan_cpu
        if scan_cpu.is_available():
            meta.update(cpu_kernel=scan_cpu.library_path(), cpu_kernel_isa=scan_cpu.isa(),
                        cpu_kernel_segment=scan_cpu.SEGMENT)
        else:
            meta.update(cpu_kernel=None, cpu_kernel_reason=scan_cpu.unavailable_reason())
            impls = [i for i in impls if i != 'cpu']
    except ImportError as e:
        meta.update(cpu_kernel=None, cpu_kernel_reason=repr(e))
        impls = [i for i in impls if i != 'cpu']
    try:
        from libs.scan import chunked as scan_chunked  # noqa: F401
    except ImportError:
        impls = [i for i in impls if i != 'chunked']
    print(f"threads={threads}  impls={impls}  lengths={lengths}  dims={dims}  cpu={meta['cpu']}", flush=True)

    consts = _run_worker(dict(what='constants', threads=threads, impl='loop', D=0, L=0, mode=''), timeout=300)
    print('machine constants:', {k: round(v, 2) if isinstance(v, float) else v for k, v in consts.items()}, flush=True)

    rows, loop_pts = [], []
    for d in dims:
        for length in lengths:
            row = dict(D=d, L=length)
            for impl in impls:
                for mode in ('fwd', 'fwdbwd'):
                    key = f'{impl}_{mode}'
                    cfg = dict(what='time', impl=impl, D=d, L=length, mode=mode, threads=threads,
                               repeats=repeats, budget=args.budget)
                    if impl == 'loop' and mode == 'fwdbwd':
                        fit = _fit_loop(loop_pts)
                        pred = None if fit is None else d * (fit[0] * length + fit[1] * length ** 2) / 1e3
                        if pred is not None and pred > args.loop_cap:
                            row[key + '_ms'] = 1e3 * pred
                            row[key + '_estimated'] = True
                            print(f'  D={d} L={length} {key}: predicted {pred:.0f} s > cap, estimated', flush=True)
                            continue
                        cfg.update(repeats=1 if (pred or 0) > 10 else repeats, budget=0)
                        res = _run_worker(cfg, timeout=max(3 * args.loop_cap, 60))
                    else:
                        res = _run_worker(cfg, timeout=1800)
                    if 'error' in res:
                        print(f'  D={d} L={length} {key}: {res["error"]}', flush=True)
                        row[key + '_error'] = res['error']
                        continue
                    row[key + '_ms'] = res['ms']
                    row[key + '_runs'] = res['runs']
                    if impl == 'loop' and mode == 'fwdbwd':
                        loop_pts.append((d, length, res['ms']))
                    print(f'  D={d} L={length} {key}: {res["ms"]:.1f} ms ({res["runs"]} runs)', flush=True)
                    if not args.no_memory:
                        mcfg = dict(what='mem', impl=impl, D=d, L=length, mode=mode, threads=threads)
                        if impl == 'loop' and mode == 'fwdbwd':
                            mcfg['mem_cap'] = _mem_cap(row, args.loop_cap)
                        mres = _run_worker(mcfg, timeout=3 * args.loop_cap + 600, memory=True)
                        if 'error' not in mres:
                            row[key + '_mem_mb'] = mres['peak_extra_mb']
                            row[key + '_mem_lower_bound'] = mres.get('capped', False)
                # memory of an estimated loop fwd+bwd: still measured, with the watchdog
                if impl == 'loop' and row.get('loop_fwdbwd_estimated') and not args.no_memory:
                    mcfg = dict(what='mem', impl='loop', D=d, L=length, mode='fwdbwd', threads=threads,
                                mem_cap=_mem_cap(row, args.loop_cap))
                    mres = _run_worker(mcfg, timeout=3 * args.loop_cap + 600, memory=True)
                    if 'error' not in mres:
                        row['loop_fwdbwd_mem_mb'] = mres['peak_extra_mb']
                        row['loop_fwdbwd_mem_lower_bound'] = mres.get('capped', False)
            if 'error' not in consts:
                row.update(_bounds(d, length, consts))
            rows.append(row)

    if args.reuse:
        with open(args.reuse) as f:
            old = json.load(f)
        old_rows = {(r['D'], r['L']): r for r in old['rows']}
        for row in rows:
            prev = old_rows.get((row['D'], row['L']), {})
            for k, v in prev.items():
                if k.split('_')[0] in IMPLS and k.split('_')[0] not in impls:
                    row[k] = v
                    if k == 'loop_fwdbwd_ms' and not prev.get('loop_fwdbwd_estimated'):
                        loop_pts.append((row['D'], row['L'], v))
        reused = sorted({k.split('_')[0] for r in old['rows'] for k in r} & set(IMPLS) - set(impls))
        impls = impls + reused
        meta['reused'] = dict(file=os.path.abspath(args.reuse), impls=reused, date=old['meta'].get('date'),
                              threads=old['meta'].get('threads'))
        if old['meta'].get('threads') != threads:
            print(f"WARNING: reused columns were measured with {old['meta'].get('threads')} threads", flush=True)
    # re-estimate every skipped loop fwd+bwd with the final fit, and the conservative (linear) lower bound
    fit = _fit_loop(loop_pts)
    for row in rows:
        if row.get('loop_fwdbwd_estimated') and fit is not None:
            d, length = row['D'], row['L']
            row['loop_fwdbwd_ms'] = d * (fit[0] * length + fit[1] * length ** 2)
            same_d = [(ln, ms) for dd, ln, ms in loop_pts if dd == d]
            if same_d:
                ln, ms = max(same_d)
            else:
                dd, ln, ms = max(loop_pts, key=lambda p: p[1])
                ms = ms * d / dd
            row['loop_fwdbwd_lower_ms'] = ms * length / ln
    meta['loop_fwdbwd_fit_ms'] = None if fit is None else dict(a=fit[0], b=fit[1], model='D*(a*L + b*L^2)')
    meta['loadavg_end'] = os.getloadavg()
    _speedups(rows, impls)
    _print_table(rows, impls)
    os.makedirs(args.out, exist_ok=True)
    name = 'scan' + (f'_{args.tag}' if args.tag else '')
    with open(os.path.join(args.out, name + '.json'), 'w') as f:
        json.dump(dict(meta=meta, constants=consts, rows=rows), f, indent=1)
    _plot(rows, impls, os.path.join(args.out, name + '.png'), meta)
    print(f"wrote {os.path.join(args.out, name + '.json')} and {name}.png", flush=True)


def _speedups(rows, impls):
    for row in rows:
        for impl in impls:
            if impl == 'loop':
                continue
            for mode in ('fwd', 'fwdbwd'):
                ours, ref = row.get(f'{impl}_{mode}_ms'), row.get(f'loop_{mode}_ms')
                if ours and ref:
                    row[f'{impl}_{mode}_speedup'] = ref / ours
                    lower = row.get(f'loop_{mode}_lower_ms')
                    if lower:
                        row[f'{impl}_{mode}_speedup_lower'] = lower / ours
                mo, mr = row.get(f'{impl}_{mode}_mem_mb'), row.get(f'loop_{mode}_mem_mb')
                if mo and mr:
                    row[f'{impl}_{mode}_mem_ratio'] = mo / mr


def _print_table(rows, impls):
    others = [i for i in impls if i != 'loop']
    hdr = ['D', 'L', 'loop fwd', 'loop f+b']
    for i in others:
        hdr += [f'{i} fwd', 'x', f'{i} f+b', 'x']
    hdr += ['MB loop f/f+b'] + [f'MB {i} f/f+b' for i in others]
    if 'cpu' in others:
        hdr += ['cpu/bound fwd (B,F,E)', 'cpu/bound f+b (B,F,E)']
    lines = [hdr]
    for r in rows:
        est = r.get('loop_fwdbwd_estimated', False)
        line = [str(r['D']), str(r['L']), _fmt(r.get('loop_fwd_ms')), _fmt(r.get('loop_fwdbwd_ms'), est=est)]
        for i in others:
            line.append(_fmt(r.get(f'{i}_fwd_ms')))
            line.append(_fmt(r.get(f'{i}_fwd_speedup')) + 'x' if r.get(f'{i}_fwd_speedup') else '-')
            line.append(_fmt(r.get(f'{i}_fwdbwd_ms')))
            sp = r.get(f'{i}_fwdbwd_speedup_lower') if est else r.get(f'{i}_fwdbwd_speedup')
            line.append((_fmt(sp, lower=est) + 'x') if sp else '-')
        line.append(f"{_fmt(r.get('loop_fwd_mem_mb'))}/"
                    f"{_fmt(r.get('loop_fwdbwd_mem_mb'), lower=r.get('loop_fwdbwd_mem_lower_bound', False))}")
        for i in others:
            line.append(f"{_fmt(r.get(f'{i}_fwd_mem_mb'))}/{_fmt(r.get(f'{i}_fwdbwd_mem_mb'))}")
        if 'cpu' in others:
            for mode in ('fwd', 'fwdbwd'):
                t = r.get(f'cpu_{mode}_ms')
                if t and r.get(f'bytes_{mode}_ms'):
                    line.append('/'.join(f"{t / r[f'{k}_{mode}_ms']:.1f}" for k in ('bytes', 'flop', 'exp')))
                else:
                    line.append('-')
        lines.append(line)
    widths = [max(len(x[i]) for x in lines) for i in range(len(hdr))]
    for k, x in enumerate(lines):
        print('  '.join(v.rjust(w) for v, w in zip(x, widths)))
        if k == 0:
            print('  '.join('-' * w for w in widths))
    print("times in ms (median); x = speedup over loop ('>=': against the linear lower bound of an estimated loop "
          "time); MB = peak extra memory fwd/fwd+bwd; cpu/bound = cpu time over the bytes/FLOP/torch.exp bounds")


def _plot(rows, impls, path, meta):
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib not installed: no plot')
        return
    colors = {'loop': 'tab:red', 'cpu': 'tab:blue', 'chunked': 'tab:green'}
    styles = {256: '-', 1024: '--'}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    dims = sorted({r['D'] for r in rows})
    panels = (('fwd_ms', 'fwd_estimated', 'ms', 'forward (no_grad)'),
              ('fwdbwd_ms', 'fwdbwd_estimated', 'ms', 'forward + backward (open markers: estimated)'),
              ('fwdbwd_mem_mb', 'fwdbwd_mem_lower_bound', 'MB', 'peak extra memory, fwd+bwd (open: lower bound)'))
    for ax, (value, flag, unit, title) in zip(axes, panels):
        for impl in impls:
            for d in dims:
                pts = [(r['L'], r[f'{impl}_{value}'], r.get(f'{impl}_{flag}', False))
                       for r in rows if r['D'] == d and r.get(f'{impl}_{value}')]
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(d, ':'), color=colors[impl],
                        label=f'{impl} D={d}')
                for length, y, open_marker in pts:
                    ax.plot(length, y, 'o', color=colors[impl], mfc='none' if open_marker else colors[impl])
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('sequence length L')
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"selective-scan core, CPU fp32, batch {BATCH}, N {NSTATE}, threads={meta['threads']}, {meta['cpu']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == '__main__':
    main()
