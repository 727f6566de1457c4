"""The C scan kernel's instruction-set variants side by side; run through ``benchmarks/scan.py --isa``.

    python benchmarks/scan.py --isa avx512 avx2 generic            # D in {256, 1024} x L in {366, 1230}, 1 thread
    python benchmarks/scan.py --isa avx512 avx2 --dims 1024 --lengths 1230 --repeats 15 --tag idle

Each shape is timed in one fresh process that forces each variant in turn with ``libs.scan.cpu.isa(...)``,
interleaved: every repeat runs every variant once, so a machine that gets busier or quieter during the run affects
all variants alike. Two operations are timed, each as forward (under no_grad) and forward+backward (gradients for
every input):
  full   ``libs.scan.selective_scan`` on the cpu backend with delta_bias, softplus, D and z (what the Mamba mixer
         calls), batch 2, N 16;
  core   the kernel alone, ``libs.scan.cpu.scan_core`` (dt already softplus'd).
The tables give the minimum wall time over the repeats (the median in brackets), the bytes bound of the core
(scan.py's, from the copy bandwidth measured in the same run) and every variant's time over the first one listed;
then the same ratios of the process CPU times, which a machine busy with other work inflates less. A variant the
CPU lacks is reported as such, not timed. Writes every time to scan_isa[_TAG].json in --out.
"""
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ('full', 'core')
MODES = ('fwd', 'fwdbwd')


def _inputs(d, length, batch, nstate, seed=0):
    """Mamba-init scan inputs (scan.py's), plus D, z and delta_bias; delta is the pre-softplus value."""
    import torch
    sys.path.insert(0, ROOT)
    from benchmarks.scan import _inputs as core_inputs
    delta, u, A, B, C = core_inputs(d, length, seed)
    g = torch.Generator().manual_seed(seed + 1)
    bias = 0.1 * torch.randn(d, generator=g)
    # pre-softplus delta such that softplus(delta + bias) is the core's dt
    raw = delta + torch.log(-torch.expm1(-delta)) - bias[:, None]
    extra = dict(D=torch.randn(d, generator=g), z=torch.randn(batch, d, length, generator=g), delta_bias=bias)
    return (delta, u, A, B, C), (raw, extra)


def _runner(op, mode, core_args, full_args):
    import torch
    from libs.scan import cpu as scan_cpu
    from libs.scan import selective_scan
    raw, extra = full_args

    def call(xs):
        if op == 'core':
            return scan_cpu.scan_core(*xs)[0]
        delta, u, A, B, C = xs[:5]
        return selective_scan(u, delta, A, B, C, *xs[5:], delta_softplus=True)

    base = list(core_args) if op == 'core' else [raw] + list(core_args[1:]) + [extra['D'], extra['z'],
                                                                               extra['delta_bias']]
    if mode == 'fwd':
        def run():
            with torch.no_grad():
                call(base)
    else:
        def run():
            xs = [t.detach().requires_grad_() for t in base]
            y = call(xs)
            y.backward(torch.ones_like(y))
    return run


def worker(cfg):
    """Times every (variant, op, mode) of one shape, interleaved; returns the measurements as a dict."""
    import torch
    torch.set_num_threads(cfg['threads'])
    os.environ['DIM_SCAN_BACKEND'] = 'cpu'
    sys.path.insert(0, ROOT)
    from libs.scan import cpu as scan_cpu
    core_args, full_args = _inputs(cfg['D'], cfg['L'], cfg['batch'], cfg['d_state'])
    runs = {(op, mode): _runner(op, mode, core_args, full_args) for op in OPS for mode in MODES}
    out = dict(cfg, missing={})
    isas = []
    for name in cfg['isas']:
        got = scan_cpu.isa(name)
        if got != name:
            out['missing'][name] = f'the CPU lacks it (forcing it gives {got})'
        else:
            isas.append(name)
    times = {f'{isa}_{op}_{mode}': [] for isa in isas for op in OPS for mode in MODES}
    cpu_times = {k: [] for k in times}
    try:
        for rep in range(cfg['repeats'] + 1):                # the first round warms up and is not kept
            for isa in isas:
                scan_cpu.isa(isa)
                for (op, mode), run in runs.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    run()
                    if rep:
                        times[f'{isa}_{op}_{mode}'].append(1e3 * (time.perf_counter() - t0))
                        cpu_times[f'{isa}_{op}_{mode}'].append(1e3 * (time.process_time() - c0))
    finally:
        scan_cpu.isa('auto')
    out['all_ms'] = times
    out['min_ms'] = {k: min(v) for k, v in times.items()}
    out['median_ms'] = {k: statistics.median(v) for k, v in times.items()}
    # CPU time of the process (all its threads): what a run cost, without the time other processes held the core
    out['all_cpu_ms'] = cpu_times
    out['min_cpu_ms'] = {k: min(v) for k, v in cpu_times.items()}
    out['isas_timed'] = isas
    return out


def _fmt(v):
    return '-' if v is None else (f'{v:.0f}' if v >= 100 else (f'{v:.1f}' if v >= 10 else f'{v:.2f}'))


def print_tables(rows, isas):
    """One table per op: times (min, median in brackets) and ratios to the first variant."""
    first = isas[0]
    for op in OPS:
        hdr = ['D', 'L', 'bytes bound fwd'] + [f'{i} {m}' for m in ('fwd', 'f+b') for i in isas]
        hdr += [f'{i}/{first} {m}' for m in ('fwd', 'f+b') for i in isas[1:]]
        lines = [hdr]
        for r in rows:
            line = [str(r['D']), str(r['L']), _fmt(r.get('bytes_fwd_ms'))]
            for mode in MODES:
                for i in isas:
                    k = f'{i}_{op}_{mode}'
                    line.append(f"{_fmt(r['min_ms'][k])} ({_fmt(r['median_ms'][k])})" if k in r['min_ms'] else '-')
            for mode in MODES:
                for i in isas[1:]:
                    a, b = r['min_ms'].get(f'{i}_{op}_{mode}'), r['min_ms'].get(f'{first}_{op}_{mode}')
                    line.append(f'{a / b:.2f}' if a and b else '-')
            lines.append(line)
        widths = [max(len(x[c]) for x in lines) for c in range(len(hdr))]
        print(f"\n{op}: " + ('selective_scan, cpu backend, delta_bias + softplus + D + z' if op == 'full'
                              else 'libs.scan.cpu.scan_core (the kernel alone)'))
        for k, x in enumerate(lines):
            print('  '.join(v.rjust(w) for v, w in zip(x, widths)))
            if k == 0:
                print('  '.join('-' * w for w in widths))
    print('times in ms: minimum (median) over the repeats; ratios of the minima')
    print(f'\nratios to {first} of the minimum process CPU time (a busy machine inflates wall time, less CPU time):')
    for r in rows:
        cells = [f"{i}/{first} {op} {m}: {r['min_cpu_ms'][f'{i}_{op}_{m}'] / r['min_cpu_ms'][f'{first}_{op}_{m}']:.2f}"
                 for op in OPS for m in MODES for i in isas[1:] if f'{i}_{op}_{m}' in r['min_cpu_ms']]
        print(f"  D={r['D']} L={r['L']}: " + ', '.join(cells))


def main(args, meta, run_worker, bounds):
    """Driver: `args` from scan.py's parser; `run_worker(cfg, timeout)` runs a scan.py worker; `bounds(d, L, consts)`."""
    isas = list(args.isa)
    threads = args.threads or 1
    lengths = args.lengths or [366, 1230]
    dims = args.dims or [256, 1024]
    repeats = args.repeats or 7
    meta = dict(meta, threads=threads, isas=isas, repeats=repeats,
                command='python benchmarks/scan.py ' + ' '.join(sys.argv[1:]))
    print(f"ISA comparison: variants={isas} threads={threads} lengths={lengths} dims={dims} repeats={repeats} "
          f"cpu={meta['cpu']}", flush=True)
    consts = run_worker(dict(what='constants', threads=threads, impl='loop', D=0, L=0, mode=''), timeout=300)
    rows = []
    for d in dims:
        for length in lengths:
            cfg = dict(what='isa', isas=isas, D=d, L=length, threads=threads, repeats=repeats, batch=meta['batch'],
                       d_state=meta['d_state'], impl='cpu', mode='')
            res = run_worker(cfg, timeout=3600)
            if 'error' in res:
                print(f'  D={d} L={length}: {res["error"]}', flush=True)
                continue
            for name, why in res['missing'].items():
                print(f'  {name}: not timed, {why}', flush=True)
            if 'error' not in consts:
                res.update(bounds(d, length, consts))
            rows.append(res)
            print(f'  D={d} L={length} done', flush=True)
    meta['loadavg_end'] = os.getloadavg()
    timed = [i for i in isas if rows and i in rows[0]['isas_timed']]
    if timed:
        print_tables(rows, timed)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, 'scan_isa' + (f'_{args.tag}' if args.tag else '') + '.json')
    with open(path, 'w') as f:
        json.dump(dict(meta=meta, constants=consts, rows=rows), f, indent=1)
    print(f'wrote {path}', flush=True)
