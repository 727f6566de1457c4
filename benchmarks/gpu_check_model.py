"""gpu_check sections of the whole network: DiM-H/2 throughput, sampling, host syncs, training steps.

model_eager / model_compiled  DiM-H/2 with random weights (config.nnet of configs/imagenet256_H_DiM.py and
    imagenet512_H_DiM_ft.py, read without ml_collections), bf16 autocast, eager or through libs/model/compile.py: forward
    throughput (img/s) and 50-step CFG DPM-Solver sampling (libs/sampling.generate, one batched cond + uncond call per
    step) images/s; the bound set by the forward's GEMM FLOPs (counted by torch's FlopCounterMode, and by formula)
    at the card's measured bf16 matmul rate; the cost of a 50k-sample FID run in GPU-hours from the sampling rate
    (network and sampler only: the VAE decode and the Inception pass are not measured).
host_syncs  a few real training steps (libs.training TrainState + TrainStep on synthetic latents, as
    benchmarks/train_step.py runs them) of a small config under torch.cuda.set_sync_debug_mode: every synchronizing
    CUDA call listed with where our code made it ('warn'), then the first one raised ('error'); the log-interval
    read (StepValues.read, one transfer by design) counted apart.
train_256 / train_512  one bf16 training step of DiM-H/2 at the largest batch that fits, with and without gradient
    checkpointing, through benchmarks/train_step.measure (a fresh process per case): a probe at a small batch gives
    the per-sample memory, the predicted largest batch is measured, and an out-of-memory there backs off by 20 %.
"""
import contextlib
import os
import tempfile
import time
import traceback
import warnings

from benchmarks.gpu_check_util import ROOT, config_literals, nnet_kwargs, rel_err, sync, time_fn

GEMM_OPS = ('mm', 'addmm', 'bmm', 'baddbmm')


def _build(ctx, res):
    """(network on the device in eval mode, latent shape, guidance scale, num_classes) for resolution `res`."""
    import torch
    from libs.model.build import build_nnet
    s = ctx.sizes('model')
    name = s['resolutions'][res]['config']
    kwargs = nnet_kwargs(name)
    kwargs.update(s['overrides'])
    if ctx.dry:
        kwargs['sample_size'] = s['sample_size'][res]
    sample = config_literals(name)['sample']
    guidance = float(sample['scale']) if sample.get('cfg') else 0.0
    torch.manual_seed(0)
    with torch.device(ctx.device):
        net = build_nnet(**kwargs).eval()
    side = kwargs['sample_size']
    return net, (kwargs['in_channels'], side, side), guidance, kwargs['num_embeds_ada_norm']


def gemm_flops_formula(net, h, w):
    """FLOPs of the forward's token-row GEMMs for one image on an h x w token grid (per-sample conditioning
    GEMMs, the convolutions and the scan left out)."""
    D, P, p, C = net.width, net.pad_len, net.patch_size, net.in_channels
    L = 2 + P + (h + P) * (w + P)
    m = net.transformer_blocks[0].attn1
    Di, R, N = m.d_inner, m.dt_rank, m.d_state
    block = 2 * L * (D * 2 * Di + Di * (R + 2 * N) + R * Di + Di * D)
    return net.depth * block + len(net.skip_consumers) * 2 * L * 2 * D * D + 2 * h * w * D * p * p * C


def _counted_flops(net, x, t, y):
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16), FlopCounterMode(display=False) as fc:
        net(x, t, y)
    counts = {str(k).split('.')[-1]: v for k, v in fc.get_flop_counts()['Global'].items()}
    return sum(v for k, v in counts.items() if k in GEMM_OPS), counts


def _inputs(shape, batch, K, dev, seed=0):
    import torch
    g = torch.Generator(device=dev).manual_seed(seed)
    return (torch.randn(batch, *shape, generator=g, device=dev), torch.rand(batch, generator=g, device=dev) * 1000,
            torch.randint(0, K, (batch,), generator=g, device=dev))


def _measure_network(ctx, net, res, shape, guidance, K, compiled_from=None):
    """Forward throughput and sampling rate of `net` (compiled_from: the eager network, for the output check)."""
    import torch
    from libs.sampling import SamplingSpec, generate
    s = ctx.sizes('model')
    rs = s['resolutions'][res]
    dev, kind = ctx.device, torch.device(ctx.device).type
    batch = rs['batch']
    x, t, y = _inputs(shape, batch, K, dev)
    autocast = lambda: torch.autocast(kind, dtype=torch.bfloat16)

    def forward():
        with torch.no_grad(), autocast():
            return net(x, t, y)
    out = dict(batch=batch, latent=list(shape))
    t0 = time.perf_counter()
    first = forward()
    sync(dev)
    out['first_call_s'] = time.perf_counter() - t0          # compilation, for a compiled network
    if compiled_from is not None:
        with torch.no_grad(), autocast():
            out['max_rel_diff_vs_eager'] = rel_err(first.float(), compiled_from(x, t, y).float())[1]
    timing = time_fn(forward, dev, s['warmup'], s['reps'], s['max_s'])
    out.update(forward_ms=timing['median_ms'], forward_reps=timing['reps'],
               forward_img_per_s=batch / timing['median_ms'] * 1e3)
    h = shape[1] // net.patch_size
    out['gemm_flops_formula'] = batch * gemm_flops_formula(net, h, h)
    if compiled_from is None:
        try:
            counted, by_op = _counted_flops(net, x[:1], t[:1], y[:1])
            out.update(gemm_flops_counted=batch * counted, flops_by_op_one_image=by_op)
        except Exception as e:
            out['flop_counter_error'] = f'{type(e).__name__}: {e}'[:300]
    flops = out.get('gemm_flops_counted') or out['gemm_flops_formula']
    bound_ms = flops / (ctx.card('bf16_matmul_TFLOPs') * 1e12) * 1e3
    out.update(gemm_bound_ms=bound_ms, fraction_of_gemm_bound=bound_ms / timing['median_ms'])
    ctx.save(**{str(res): out})
    # sampling: the config's DPM-Solver with CFG, the network under bf16 autocast
    nb = rs['sample_batch']
    if ctx.left() < 3 * (s['steps'] * 2 * timing['median_ms'] * nb / batch / 1e3) + 5:
        out['sampling'] = dict(skipped='section budget spent')
        return out
    _, _, labels = _inputs(shape, nb, K, dev, seed=1)
    spec = SamplingSpec(algorithm='dpm_solver', sample_steps=s['steps'], scale=guidance, num_classes=K,
                        conditional=True, seed=1, z_shape=tuple(shape), mini_batch_size=nb)
    runs = []
    while len(runs) < s['sample_runs']:
        sync(dev)
        t0 = time.perf_counter()
        lat = generate(net, spec, range(nb), labels, autocast=autocast)
        sync(dev)
        runs.append(time.perf_counter() - t0)
        if ctx.left() < 2 * runs[-1] + 5:
            break
    sec = min(runs)
    rate = nb / sec
    out['sampling'] = dict(batch=nb, network_batch=2 * nb if guidance > 0 else nb, steps=s['steps'],
                           guidance=guidance, runs_s=runs, img_per_s=rate, finite=bool(lat.isfinite().all()),
                           fid50k_gpu_hours=50000 / rate / 3600,
                           note='network + sampler only: the VAE decode and the Inception pass are not measured')
    return out


def _model_section(ctx, compiled):
    import torch
    from libs.model.compile import compile_network
    from libs.scan import scan_backend
    ctx.save(scan_backend=scan_backend(ctx.device), compile_mode='default' if compiled else 'none')
    s = ctx.sizes('model')
    for res in s['resolutions']:
        if compiled and res not in s['compiled_resolutions']:
            ctx.save(**{str(res): dict(skipped='not compiled in this mode (compile time)')})
            continue
        if ctx.left() < (40 if compiled and not ctx.dry else 10):
            ctx.save(**{str(res): dict(skipped='section budget spent')})
            continue
        net, shape, guidance, K = _build(ctx, res)
        ctx.save(params_m=sum(p.numel() for p in net.parameters()) / 1e6)
        run_net = compile_network(net, 'default') if compiled else net
        ctx.save(**{str(res): _measure_network(ctx, run_net, res, shape, guidance, K,
                                               compiled_from=net if compiled else None)})
        del net, run_net
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    r = ctx.result.get('256', {})
    if 'fraction_of_gemm_bound' in r:
        ctx.save(target=dict(fraction_of_gemm_bound_min=0.5, at='256, batch 64' if not ctx.dry else 'dry run',
                             met=r['fraction_of_gemm_bound'] >= 0.5))
    return ctx.result


def eager(ctx):
    return _model_section(ctx, compiled=False)


def compiled(ctx):
    return _model_section(ctx, compiled=True)


# ---------------------------------------------------------------------------------------------------- host syncs

@contextlib.contextmanager
def _sync_warnings(enabled):
    """Every 'synchronizing CUDA operation' warning inside, with the Python stack that made it (None: not CUDA)."""
    import torch
    if not enabled:
        yield None
        return
    records = []

    def show(message, category, filename, lineno, file=None, line=None):
        stack = traceback.extract_stack()[:-1]
        ours = [f for f in stack if f.filename.startswith(ROOT) and 'gpu_check' not in f.filename]
        records.append(dict(message=str(message)[:160], at=f'{filename}:{lineno}',
                            ours=f'{os.path.relpath(ours[-1].filename, ROOT)}:{ours[-1].lineno} {ours[-1].name}'
                            if ours else None))
    with warnings.catch_warnings():
        warnings.simplefilter('always')
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode('warn')
        try:
            yield records
        finally:
            torch.cuda.set_sync_debug_mode(0)


def _summary(records):
    if records is None:
        return None
    places = {}
    for r in records:
        key = f"{r['ours'] or r['at']}"
        places[key] = places.get(key, 0) + 1
    return dict(count=len(records), by_place=places, first=records[:3])


def host_syncs(ctx):
    import torch
    s = ctx.sizes()
    os.environ['ACCELERATE_MIXED_PRECISION'] = 'bf16'
    if ctx.dry:
        os.environ['ACCELERATE_USE_CPU'] = '1'
    from benchmarks.train_step import SyntheticLatents
    from libs.config import load_config
    from libs.training.launch import configure_cuda, make_accelerator
    from libs.training.state import TrainState
    from libs.training.step import StepValues, TrainStep
    config = load_config(os.path.join(ROOT, 'configs', f"{s['config']}.py"))
    config.train.batch_size, config.gradient_accumulation_steps = s['batch'], 1
    acc = make_accelerator(config)
    configure_cuda(acc.device)
    cuda = acc.device.type == 'cuda'
    with tempfile.TemporaryDirectory() as empty:
        state = TrainState(config, acc, empty)
    step = TrainStep(config, acc, state, SyntheticLatents(config, s['batch'], acc.device))
    values = StepValues('(none)')
    for _ in range(s['warmup']):
        values.add(state.step, *step(None))
    values.read()
    sync(acc.device)
    with _sync_warnings(cuda) as in_steps:
        for _ in range(s['steps']):
            values.add(state.step, *step(None))
    sync(acc.device)
    with _sync_warnings(cuda) as in_read:
        values.read()
    out = dict(config=s['config'], batch=s['batch'], device=str(acc.device), steps=s['steps'],
               losses_finite=all(v == v and abs(v) != float('inf') for v in values.losses),
               syncs_in_steps=_summary(in_steps), syncs_in_log_read=_summary(in_read))
    if cuda:
        torch.cuda.set_sync_debug_mode('error')
        try:
            step(None)
            out['error_mode'] = 'a step ran with no synchronizing call'
        except RuntimeError as e:
            ours = [f for f in traceback.extract_tb(e.__traceback__) if f.filename.startswith(ROOT)]
            out['error_mode'] = dict(raised=str(e)[:200], ours=f'{os.path.relpath(ours[-1].filename, ROOT)}:'
                                     f'{ours[-1].lineno}' if ours else None)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    else:
        out['note'] = ('torch.cuda.set_sync_debug_mode needs CUDA: the steps ran, no syncs counted '
                       '(tests/test_training_step.py counts them on CPU)')
    ctx.save(**out)
    return ctx.result


# -------------------------------------------------------------------------------------------------------- train

def _oom(r):
    return 'out of memory' in r.get('error', '').lower()


def _round(b, multiple):
    return max(multiple, b // multiple * multiple)


def train(ctx):
    """Largest-batch training step per gradient-checkpointing setting at ctx.args['resolution']."""
    from benchmarks.train_step import measure
    s = ctx.sizes('train')
    res = ctx.args['resolution']
    name = s['configs'].get(res)
    if name is None:
        ctx.save(skipped=f'no {res} config in this mode: the dry run covers this code through train_256')
        return ctx.result
    cap_gb = ctx.card('memory_total_gb') if s['device'] == 'cuda' else None
    ctx.save(config=name, resolution=res, device_memory_gb=cap_gb, variants=[])
    variants = ctx.result['variants']

    def run(v, batch, steps):
        timeout = ctx.left() - 5
        if timeout < 20:
            v.setdefault('notes', []).append(f'batch {batch}: section budget spent')
            return None
        r = measure(name, device=s['device'], batch=batch, gradient_checkpointing=v['gradient_checkpointing'],
                    bf16=True, steps=steps, warmup=s['warmup'], timeout=timeout)
        v['runs'].append(r)
        ctx.save(variants=variants)
        return r

    for gc in (False, True):
        v = dict(gradient_checkpointing=gc, runs=[])
        variants.append(v)
        b = s['probe'][gc]
        probe = run(v, b, 1)
        while probe is not None and _oom(probe) and b > 1:
            b //= 2
            probe = run(v, b, 1)
        if probe is None or 'error' in probe:
            continue
        final, target = probe, b
        if 'peak_memory_gb' in probe and cap_gb:
            fixed = probe['params_m'] * 1e6 * 20 / 2 ** 30      # fp32 weights, gradients, AdamW moments, EMA
            per_sample = max((probe['peak_memory_gb'] - fixed) / b, 1e-3)
            target = _round(int((cap_gb * s['usable'] - fixed) / per_sample), s['multiple'])
            v['prediction'] = dict(fixed_gb=fixed, per_sample_gb=per_sample, batch=target)
        target = max(b, min(target, s['max_batch']))
        while target > b:
            r = run(v, target, s['steps'])
            if r is None:
                break
            if 'error' not in r:
                final = r
                break
            if not _oom(r):
                break
            target = _round(int(target * 0.8), s['multiple'])
        v['largest_batch_measured'] = final['batch']
        v.update({k: final[k] for k in ('step_time_s', 'samples_per_s', 'peak_memory_gb', 'peak_reserved_gb',
                                        'peak_rss_gb', 'steps') if k in final})
        if cap_gb and 'peak_memory_gb' in final:
            v['fraction_of_card'] = final['peak_memory_gb'] / cap_gb
        ctx.save(variants=variants)
    return ctx.result
