"""gpu_check sections of the selective scan: parity on the card, speed against the bytes bound, a knob sweep.

scan_parity  Triton (libs/scan/triton_scan.py) and the chunked torch scan (DIM_SCAN_BACKEND=torch) against the
             sequential scan (tests/reference_ops.py) in float64 on the same inputs: out, last state and the gradient
             of every input, ||a - b|| / ||b||. fp32 inputs, and bf16 inputs as autocast gives them (u, delta, z, B,
             C bf16; A, D, delta_bias fp32); shapes that split L (the carry passes), by the heuristic on the card
             and forced with segments=2.
scan_speed   fwd (no grad) and fwd+bwd (gradients of all eight inputs) at the DiM shapes, bf16 inputs, N = 16:
             Triton, mamba-ssm's kernel when installed and probed, the chunked torch scan (when the budget allows);
             Triton's launch config per shape. Two rows per shape: layout 'model', the strides the mixer passes
             (libs/model/mixer.py: u, delta contiguous; z a channel-last view of in_proj's output; B, C column
             slices of x_proj's output; the output gradient channel-last, as out_proj's backward gives it), what
             training runs; then layout 'contiguous'. Bytes bound: each input read once, each output written
             once, at the card's measured copy bandwidth: fwd reads u, delta, z (Di-wide) and B, C (N-wide), writes out:
             e B L (4 Di + 2 N); fwd+bwd adds the backward's reads of gout, u, delta, z, B, C and writes of du,
             ddelta, dz, dB, dC: e B L (11 Di + 6 N) in all (e = 2 bytes).
scan_sweep   one knob at a time around the defaults (chunk, bwd_chunk, block_d, segments, warps, unroll) on a
             batch-filled and an L-split shape; each variant's output checked against the default's.
triton_warm  (run by the driver in the background, not a section) one fwd+bwd at a shape, to fill Triton's
             on-disk kernel cache in parallel before the timed sections.
"""
import math
import os
import sys

from benchmarks.gpu_check_util import ROOT, rel_err, sync, time_fn

TESTS = os.path.join(ROOT, 'tests')
NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'z', 'delta_bias')
TOL = {'fp32': 1e-5, 'bf16': 1e-2}


def scan_inputs(batch, d_inner, L, d_state, dtype, device, seed=0, layout='contiguous'):
    """Scan inputs on `device` at Mamba's init scale: u, delta, z, B, C in `dtype` ('fp32' | 'bf16'), the
    parameters A, D, delta_bias in fp32. layout 'contiguous': (batch, Di, L) and (batch, N, L) tensors; 'model':
    z and B, C as the mixer's views (see the module docstring), the same values."""
    import torch
    g = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device=device)
    io = torch.bfloat16 if dtype == 'bf16' else torch.float32
    dt = torch.exp(torch.rand(d_inner, generator=g, device=device) * (math.log(0.1) - math.log(1e-3))
                   + math.log(1e-3))
    x = dict(u=r(batch, d_inner, L).to(io), delta=(0.5 * r(batch, d_inner, L)).to(io),
             A=-torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(d_inner, 1),
             B=r(batch, d_state, L).to(io), C=r(batch, d_state, L).to(io), D=r(d_inner),
             z=r(batch, d_inner, L).to(io), delta_bias=dt + torch.log(-torch.expm1(-dt)))
    if layout == 'model':
        return dict(x, **model_views(x['z'], x['B'], x['C']))
    if layout != 'contiguous':
        raise ValueError(f"layout must be 'contiguous' or 'model', got {layout!r}")
    return x


def model_views(z, B, C):
    """z (batch, Di, L), B, C (batch, N, L) -> the same values as the mixer's views: z the second half of a
    (batch, L, 2 Di) in_proj output, B and C column slices of a (batch, L, R + 2N) x_proj output, R = Di / 32."""
    import torch
    batch, d_inner, L = z.shape
    N, rank = B.shape[1], -(-d_inner // 32)
    xz = torch.empty(batch, L, 2 * d_inner, dtype=z.dtype, device=z.device)
    xz[..., d_inner:] = z.transpose(1, 2)
    proj = torch.zeros(batch, L, rank + 2 * N, dtype=B.dtype, device=B.device)
    proj[..., rank:rank + N] = B.transpose(1, 2)
    proj[..., rank + N:] = C.transpose(1, 2)
    return dict(z=xz.transpose(1, 2)[:, d_inner:], B=proj[..., rank:rank + N].transpose(1, 2),
                C=proj[..., rank + N:].transpose(1, 2))


def _grads(fn, x, gout, glast):
    """(out, last, gradients of every input) of fn(**leaves) -> (out, last)."""
    import torch
    leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
    out, last = fn(leaves)
    loss = (out.double() * gout.double()).sum() + (last.double() * glast.double()).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in NAMES])
    return out.detach(), last.detach(), dict(zip(NAMES, grads))


def parity(ctx):
    import torch
    sys.path.insert(0, TESTS)
    from reference_ops import sequential_scan
    os.environ['DIM_SCAN_BACKEND'] = 'torch'          # the dispatcher's chunked torch backend in this process
    from libs.scan import selective_scan
    from libs.scan import triton_scan
    s = ctx.sizes()
    dev, N = ctx.device, s['d_state']
    cases = []
    for dtype, (batch, Di, L), segments in s['cases']:
        if ctx.left() < 5:
            cases.append(dict(dtype=dtype, shape=[batch, Di, L], skipped='section budget spent'))
            break
        x = scan_inputs(batch, Di, L, N, dtype, dev, seed=len(cases))
        g = torch.Generator(device=dev).manual_seed(99)
        gout = torch.randn(batch, Di, L, generator=g, device=dev)
        glast = torch.randn(batch, Di, N, generator=g, device=dev)
        kw = dict(delta_softplus=True, return_last_state=True)
        ref = _grads(lambda a: sequential_scan(**{k: v.double() for k, v in a.items()}, delta_softplus=True),
                     x, gout, glast)
        impls = dict(triton=lambda a: triton_scan.scan(**a, **kw, segments=segments),
                     torch_chunked=lambda a: selective_scan(**a, **kw))
        case = dict(dtype=dtype, shape=[batch, Di, L], d_state=N, segments_forced=segments, tolerance=TOL[dtype],
                    launch_config=triton_scan.launch_config(batch, Di, L, N, dev, segments=segments))
        for name, fn in impls.items():
            out, last, grads = _grads(fn, x, gout, glast)
            sync(dev)
            errs = dict(out=rel_err(out, ref[0])[0], last_state=rel_err(last, ref[1])[0],
                        **{f'd{k}': rel_err(grads[k], ref[2][k])[0] for k in NAMES})
            case[name] = dict(rel_err=errs, max_rel_err=max(errs.values()), out_dtype=str(out.dtype).split('.')[-1],
                              ok=max(errs.values()) <= TOL[dtype])
        cases.append(case)
        ctx.save(cases=cases)
    done = [c for c in cases if 'skipped' not in c]
    ctx.save(cases=cases, ok=bool(done) and all(c[k]['ok'] for c in done for k in ('triton', 'torch_chunked')))
    return ctx.result


# -------------------------------------------------------------------------------------------------------- speed

def bytes_bound(batch, Di, L, N, elem=2):
    """(fwd, fwd+bwd) bytes that must move at least (see the module docstring)."""
    return elem * batch * L * (4 * Di + 2 * N), elem * batch * L * (11 * Di + 6 * N)


def _timers(fn, x, dev, s, layout='contiguous'):
    """fwd and fwd+bwd timings of fn(**inputs) -> out; the output gradient channel-last for layout 'model'."""
    import torch
    with torch.no_grad():
        fwd = time_fn(lambda: fn(x), dev, s['warmup'], s['reps'], s['max_s'])
    leaves = {k: v.detach().requires_grad_() for k, v in x.items()}       # views stay views
    gout = torch.randn_like(x['u'])
    if layout == 'model':
        gout = gout.transpose(1, 2).contiguous().transpose(1, 2)

    def fwdbwd():
        out = fn(leaves)
        torch.autograd.grad(out, list(leaves.values()), gout)
    return fwd, time_fn(fwdbwd, dev, s['warmup'], s['reps'], s['max_s'])


def _mamba(dev):
    """(selective_scan_fn, None) when mamba-ssm is installed and its probe passes on `dev`, else (None, why)."""
    import importlib.util
    if importlib.util.find_spec('mamba_ssm') is None:
        return None, 'not installed'
    import libs.scan as scan
    from libs.scan import cuda_ext
    os.environ['DIM_SCAN_BACKEND'] = 'mamba_ssm'
    scan.reset()
    try:
        scan.scan_backend(dev)
        return cuda_ext.selective_scan_fn(), None
    except Exception as e:
        return None, f'{type(e).__name__}: {e}'[:300]
    finally:
        os.environ.pop('DIM_SCAN_BACKEND', None)
        scan.reset()


def speed(ctx):
    import torch
    import libs.scan as scan
    from libs.scan import cuda_ext, triton_scan
    s = ctx.sizes()
    dev, N = ctx.device, s['d_state']
    GBps = ctx.card('copy_GBps')
    mamba_fn, mamba_why = _mamba(dev) if dev != 'cpu' else (None, 'CUDA only')
    ctx.save(copy_GBps=GBps, mamba_ssm=mamba_why or 'installed, probed', rows=[])
    impls = {'triton': lambda a: triton_scan.scan(**a, delta_softplus=True)}
    if mamba_fn is not None:
        impls['mamba_ssm'] = lambda a: cuda_ext.selective_scan(mamba_fn, **a, delta_softplus=True)
    rows = []
    for (batch, Di, L), layout in ((shape, layout) for shape in s['shapes'] for layout in ('model', 'contiguous')):
        bf, bfb = bytes_bound(batch, Di, L, N)
        row = dict(shape=[batch, Di, L], layout=layout, d_state=N, bytes_fwd=bf, bytes_fwdbwd=bfb,
                   bound_fwd_ms=bf / GBps / 1e6, bound_fwdbwd_ms=bfb / GBps / 1e6,
                   launch_config=triton_scan.launch_config(batch, Di, L, N, dev))
        rows.append(row)
        x = scan_inputs(batch, Di, L, N, 'bf16', dev, layout=layout)
        for name, fn in impls.items():
            if ctx.left() < 5:
                row[name] = dict(skipped='section budget spent')
                continue
            fwd, fb = _timers(fn, x, dev, s, layout)
            row[name] = dict(fwd_ms=fwd['median_ms'], fwdbwd_ms=fb['median_ms'], reps=[fwd['reps'], fb['reps']],
                             fwd_x_bound=fwd['median_ms'] / row['bound_fwd_ms'],
                             fwdbwd_x_bound=fb['median_ms'] / row['bound_fwdbwd_ms'])
            ctx.save(rows=rows)
        del x
    # the chunked torch scan (the dispatcher's torch backend) last: the slowest, timed while the budget lasts
    os.environ['DIM_SCAN_BACKEND'] = 'torch'
    scan.reset()
    core = lambda a: scan.selective_scan(**a, delta_softplus=True)
    for row in rows:
        if ctx.left() < 15:
            row['torch_chunked'] = dict(skipped='section budget spent')
            continue
        x = scan_inputs(*row['shape'], N, 'bf16', dev, layout=row['layout'])
        with torch.no_grad():
            t = time_fn(lambda: core(x), dev, 1, min(3, s['reps']), s['max_s'])
        row['torch_chunked'] = dict(fwd_ms=t['median_ms'], fwd_x_bound=t['median_ms'] / row['bound_fwd_ms'])
        ctx.save(rows=rows)
        del x
    done = [r for r in rows if 'fwd_ms' in r.get('triton', {})]
    ctx.save(rows=rows, targets=dict(fwd_x_bound_max=2.0, fwdbwd_x_bound_max=3.0,
                                     met=bool(done) and all(r['triton']['fwd_x_bound'] <= 2.0 and
                                                            r['triton']['fwdbwd_x_bound'] <= 3.0 for r in done)))
    return ctx.result


# -------------------------------------------------------------------------------------------------------- sweep

def _variants(cfg):
    """One knob changed at a time: scan() overrides, then module constants of triton_scan."""
    seg = cfg['fwd']['segments']
    out = [dict(chunk=8), dict(chunk=32), dict(bwd_chunk=2), dict(bwd_chunk=8), dict(block_d=32),
           dict(block_d=128)]
    if seg > 1:
        out += [dict(segments=max(1, seg // 2)), dict(segments=2 * seg)]
    out += [dict(FWD_STEPS=2), dict(FWD_STEPS=8), dict(BWD_STATES_PER_THREAD=2), dict(BWD_STATES_PER_THREAD=8),
            dict(MAX_REGISTERS=0), dict(WARPS_PER_SM=16), dict(WARPS_PER_SM=64)]
    return out


def sweep(ctx):
    import torch
    from libs.scan import triton_scan
    s = ctx.sizes()
    N = ctx.sizes('scan_speed')['d_state']
    shapes = [ctx.sizes('scan_speed')['shapes'][i] for i in s['shapes']]
    dev = ctx.device
    results = []
    for batch, Di, L in shapes:
        x = scan_inputs(batch, Di, L, N, 'bf16', dev, layout='model')
        default_cfg = triton_scan.launch_config(batch, Di, L, N, dev)
        with torch.no_grad():
            ref = triton_scan.scan(**x, delta_softplus=True).float()
        entry = dict(shape=[batch, Di, L], default_config=default_cfg, variants=[])
        results.append(entry)
        variants = [{}] + _variants(default_cfg)
        for v in variants[:s.get('max_variants', len(variants))]:
            if ctx.left() < 8:
                entry['stopped'] = 'section budget spent'
                break
            args = {k: v[k] for k in v if k.islower()}
            consts = {k: v[k] for k in v if k.isupper()}
            saved = {k: getattr(triton_scan, k) for k in consts}
            try:
                for k, val in consts.items():
                    setattr(triton_scan, k, val)
                fn = lambda a: triton_scan.scan(**a, delta_softplus=True, **args)
                with torch.no_grad():
                    err = rel_err(fn(x).float(), ref)[1]
                fwd, fb = _timers(fn, x, dev, s, 'model')
                entry['variants'].append(dict(change=v or 'defaults', fwd_ms=fwd['median_ms'],
                                              fwdbwd_ms=fb['median_ms'], max_rel_diff_vs_default=err,
                                              config=triton_scan.launch_config(batch, Di, L, N, dev, **args)))
            except Exception as e:
                entry['variants'].append(dict(change=v, error=f'{type(e).__name__}: {e}'[:300]))
            finally:
                for k, val in saved.items():
                    setattr(triton_scan, k, val)
            ctx.save(shapes=results)
        timed = [r for r in entry['variants'] if 'fwd_ms' in r]
        if timed:
            entry['best_fwd'] = min(timed, key=lambda r: r['fwd_ms'])['change']
            entry['best_fwdbwd'] = min(timed, key=lambda r: r['fwdbwd_ms'])['change']
        ctx.save(shapes=results)
        del x
    return ctx.result


def warm(ctx):
    """One bf16 fwd + bwd at ctx.args['shape'] (and the dispatcher's probe): compiles and caches its kernels."""
    import torch
    from libs.scan import scan_backend, triton_scan
    dev = ctx.device
    scan_backend(dev)
    batch, Di, L = ctx.args['shape']
    N = ctx.args['d_state']
    x = scan_inputs(batch, Di, L, N, ctx.args.get('dtype', 'bf16'), dev)
    with torch.no_grad():
        triton_scan.scan(**x, delta_softplus=True)
    leaves = {k: v.requires_grad_() for k, v in x.items()}
    out = triton_scan.scan(**leaves, delta_softplus=True, return_last_state=True)[0]
    torch.autograd.grad(out.float().sum(), list(leaves.values()))
    sync(dev)
    return dict(shape=[batch, Di, L], dtype=ctx.args.get('dtype', 'bf16'))
