"""gpu_check sections about the card and the CUDA-only paths: ceilings, backend dispatch, per-rank generators.

card      device facts, copy bandwidth (a large device-to-device copy, bytes read + written) and the bf16 matmul rate
          (a large random bf16 product): the ceilings every bound in the other sections uses.
dispatch  the scan / conv backends `auto` picks on the device and that the choice is logged
          once; the WARNING when the dispatcher lands on the slow torch backend (fresh processes: Triton blocked
          under `auto`, and the torch backend forced); mamba-ssm / causal-conv1d through the dispatcher when
          installed, else mamba-ssm's and causal-conv1d's signatures (tests/kernel_standins.py) put in their place
          to drive the keyword calls and the opt-in probe on the device.
rng       RunRNG's device generators for ranks 0 and 1 differ, save/restore round-trips exactly,
          and a tiny DiM trained k steps, saved (model, optimizer, RunRNG) and resumed ends bit-identical to the
          uninterrupted run (a second uninterrupted run separates nondeterministic kernels from a resume bug).
"""
import contextlib
import io
import logging
import os
import platform
import subprocess
import sys
import time

from benchmarks.gpu_check_util import ROOT, rel_err, sync, time_fn

TESTS = os.path.join(ROOT, 'tests')


def _device(ctx):
    import torch
    return 'cpu' if ctx.dry else f'cuda:{torch.cuda.current_device()}'


def card(ctx):
    import torch
    s = ctx.sizes()
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, hip=torch.version.hip,
                python=platform.python_version())
    try:
        import triton
        info['triton'] = triton.__version__
    except ImportError as e:
        info['triton'] = f'not importable: {e}'
    if ctx.dry:
        info.update(device=platform.processor() or platform.machine(), device_type='cpu', sm_count=None,
                    memory_total_gb=os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2 ** 30)
    else:
        if not torch.cuda.is_available():
            raise RuntimeError('no CUDA device: run this on a GPU machine, or with --dry-run on CPU')
        p = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info()
        info.update(device=p.name, device_type='cuda', sm_count=p.multi_processor_count,
                    capability=f'{p.major}.{p.minor}', memory_total_gb=total / 2 ** 30, memory_free_gb=free / 2 ** 30,
                    l2_mb=getattr(p, 'L2_cache_size', 0) / 2 ** 20)
    ctx.save(**info)
    dev = ctx.device
    x = torch.rand(s['copy_mib'] * 2 ** 18, device=dev)          # 4-byte floats
    y = torch.empty_like(x)
    t = time_fn(lambda: y.copy_(x), dev, warmup=3, reps=s['reps'], max_s=5)
    ctx.save(copy_bytes=2 * x.nbytes, copy_ms=t['median_ms'], copy_GBps=2 * x.nbytes / t['median_ms'] / 1e6)
    del x, y
    n = s['matmul_n']
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    t = time_fn(lambda: a @ b, dev, warmup=3, reps=s['reps'], max_s=5)
    ctx.save(matmul_n=n, matmul_ms=t['median_ms'], bf16_matmul_TFLOPs=2 * n ** 3 / t['median_ms'] / 1e9)
    return ctx.result


# ------------------------------------------------------------------------------------------------------ dispatch

class _Patch:
    """The setitem / undo part of pytest's monkeypatch, for kernel_standins.install outside pytest."""

    _absent = object()

    def __init__(self):
        self.saved = []

    def setitem(self, mapping, key, value):
        self.saved.append((mapping, key, mapping.get(key, self._absent)))
        mapping[key] = value

    def undo(self):
        for mapping, key, old in reversed(self.saved):
            if old is self._absent:
                mapping.pop(key, None)
            else:
                mapping[key] = old
        self.saved.clear()


@contextlib.contextmanager
def _backend(name):
    """DIM_SCAN_BACKEND=name (None: unset) with the dispatcher's choices forgotten before and after."""
    import libs.scan as scan
    old = os.environ.get('DIM_SCAN_BACKEND')
    if name is None:
        os.environ.pop('DIM_SCAN_BACKEND', None)
    else:
        os.environ['DIM_SCAN_BACKEND'] = name
    scan.reset()
    try:
        yield scan
    finally:
        if old is None:
            os.environ.pop('DIM_SCAN_BACKEND', None)
        else:
            os.environ['DIM_SCAN_BACKEND'] = old
        scan.reset()


def _mixer_pass(width, batch, L, dev):
    """A MambaMixer (seed 0) forward + backward under bf16 autocast: (out, grad of the input)."""
    import torch
    from libs.model.mixer import MambaMixer
    torch.manual_seed(0)
    mixer = MambaMixer(width).to(dev)
    u = torch.randn(batch, L, width, generator=torch.Generator().manual_seed(1)).to(dev).requires_grad_()
    with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
        out = mixer(u)
    out.float().square().sum().backward()
    sync(dev)
    return out.detach().float(), u.grad.detach()


# Run in a fresh process with Triton blocked: which backend `auto` gives, then the torch backend forced; what
# each logs. Blocking Triton stands for "not installed"; mamba-ssm is absent or probed as usual.
_SLOW_PROBE = r'''
import logging, os, sys
sys.modules['triton'] = None          # import triton raises ImportError
logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
sys.path.insert(0, sys.argv[2])
import torch
import libs.scan as scan
dev = sys.argv[1]
g = torch.Generator().manual_seed(0)
x = [torch.randn(2, 8, 12, generator=g).to(dev) for _ in range(3)]
A = -torch.rand(8, 4, generator=g).to(dev) - 0.5
B, C = [torch.randn(2, 4, 12, generator=g).to(dev) for _ in range(2)]
for mode, value in (('block_triton', None), ('force_torch', 'torch')):
    os.environ.pop('DIM_SCAN_BACKEND', None) if value is None else os.environ.update(DIM_SCAN_BACKEND=value)
    scan.reset()
    print('MODE', mode, file=sys.stderr, flush=True)
    for _ in range(2):
        scan.selective_scan(x[0], x[1], A, B, C, z=x[2], delta_softplus=True)
    print('BACKEND', mode, scan.scan_backend(dev), flush=True)
'''


def _slow_backend_runs(dev, timeout):
    env = dict(os.environ)
    env.pop('DIM_SCAN_BACKEND', None)
    p = subprocess.run([sys.executable, '-c', _SLOW_PROBE, dev, ROOT], env=env, capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    backends = dict(line.split()[1:3] for line in p.stdout.splitlines() if line.startswith('BACKEND '))
    logs, mode = {}, None
    for line in p.stderr.splitlines():
        if line.startswith('MODE '):
            mode = line.split()[1]
        elif 'selective scan on' in line and mode:
            logs.setdefault(mode, []).append(line)
    runs = []
    for mode in ('block_triton', 'force_torch'):
        backend, lines = backends.get(mode), logs.get(mode, [])
        warned = [line for line in lines if line.startswith('WARNING')]
        out = dict(mode=mode, backend=backend, scan_log_lines=lines, warned=bool(warned), warning_count=len(warned),
                   warning_names_cost_and_fix=bool(warned) and all(w in warned[0] for w in ("'torch'", 'Fix')))
        out['ok'] = p.returncode == 0 and backend is not None and out['warned'] == (backend == 'torch') and (
            not warned or (out['warning_names_cost_and_fix'] and len(warned) == 1))
        runs.append(out)
    if p.returncode != 0:
        runs[0]['stderr_tail'] = p.stderr.strip().splitlines()[-5:]
    return runs


def _installed(module, dists):
    import importlib.metadata
    import importlib.util
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return 'unknown version'


def _real_kernels(dev, width, batch, L, reference):
    """mamba-ssm and causal-conv1d through the dispatcher, when installed."""
    out = {'mamba_ssm': _installed('mamba_ssm', ('mamba-ssm', 'mamba_ssm')),
           'causal_conv1d': _installed('causal_conv1d', ('causal-conv1d', 'causal_conv1d'))}
    if out['mamba_ssm'] is None:
        out['note'] = 'mamba-ssm not installed' + ('' if out['causal_conv1d'] else ', causal-conv1d not installed')
        return out
    with _backend('mamba_ssm') as scan:
        try:
            out['scan_backend'] = scan.scan_backend(dev)
            out['conv_backend'] = scan.conv_backend(dev)
            y, gu = _mixer_pass(width, batch, L, dev)
            out['mixer_vs_auto_rel_err'] = rel_err(y, reference[0])[0]
            out['mixer_grad_vs_auto_rel_err'] = rel_err(gu, reference[1])[0]
        except Exception as e:       # a forced backend that cannot run raises, naming the reason and the fix
            out['error'] = f'{type(e).__name__}: {e}'[:500]
    return out


def _standins(dev, width, batch, L, reference):
    """mamba-ssm's and causal-conv1d's signatures (tests/kernel_standins.py) as the installed modules, on `dev`."""
    sys.path.insert(0, TESTS)
    import kernel_standins
    out = {}
    patch = _Patch()
    try:
        kernel_standins.install(patch)
        with _backend('mamba_ssm') as scan:
            try:
                out['scan_backend'], out['conv_backend'] = scan.scan_backend(dev), scan.conv_backend(dev)
                y, gu = _mixer_pass(width, batch, L, dev)
                out['calls'] = sorted(set(kernel_standins.calls))
                out['keyword_calls_ran'] = {'selective_scan_fn', 'causal_conv1d_fn'} <= set(out['calls'])
                out['mixer_vs_auto_rel_err'] = rel_err(y, reference[0])[0]
                out['mixer_grad_vs_auto_rel_err'] = rel_err(gu, reference[1])[0]
            except Exception as e:
                out['error'] = f'{type(e).__name__}: {e}'[:500]
        patch.undo()
        # mamba-ssm after 2.3.2 without MAMBA_KEEP_CUDA_BUILD: the import works, the first call raises
        kernel_standins.install(patch, scan=kernel_standins.failing_selective_scan_fn)
        with _backend('mamba_ssm') as scan:
            try:
                out['opt_in_build'] = dict(scan_backend=scan.scan_backend(dev), caught=False)
            except RuntimeError as e:
                msg = str(e)
                out['opt_in_build'] = dict(error=msg[:500], caught='selective_scan_cuda is not available' in msg)
        with _backend(None) as scan:
            out['opt_in_build']['auto_backend'] = scan.scan_backend(dev)
    finally:
        patch.undo()
    return out


def dispatch(ctx):
    s = ctx.sizes()
    dev = _device(ctx)
    records = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    scan_log = logging.getLogger('libs.scan')
    scan_log.addHandler(handler)
    scan_log.setLevel(logging.INFO)
    from libs.scan import cpu as scan_cpu
    with _backend(None) as scan:
        reference = _mixer_pass(s['mixer_width'], s['batch'], s['mixer_L'], dev)
        _mixer_pass(s['mixer_width'], s['batch'], s['mixer_L'], dev)
        choice, conv = scan.scan_backend(dev), scan.conv_backend(dev)
    logs = [(r.levelname, r.getMessage()) for r in records]
    choice_logs = [m for m in logs if m[1].startswith('selective scan on')]
    expected = 'triton' if dev.startswith('cuda') else ('cpu' if scan_cpu.is_available() else 'torch')
    ctx.save(device=dev, auto=dict(scan_backend=choice, conv_backend=conv, expected_scan_backend=expected,
                                   logs=logs, choice_logged=len(choice_logs), logged_once=len(choice_logs) == 1,
                                   ok=choice == expected and len(choice_logs) == 1))
    scan_log.removeHandler(handler)
    ctx.save(slow_backend=_slow_backend_runs(dev, timeout=max(10, min(120, ctx.left() / 2))))
    ctx.save(real_kernels=_real_kernels(dev, s['mixer_width'], s['batch'], s['mixer_L'], reference))
    if ctx.result['real_kernels']['mamba_ssm'] is None:
        ctx.save(standin_kernels=_standins(dev, s['mixer_width'], s['batch'], s['mixer_L'], reference))
    return ctx.result


# ------------------------------------------------------------------------------------------------------------ rng

def _tiny_dim(model, dev, seed):
    import torch
    from libs.model.build import build_nnet
    torch.manual_seed(seed)
    with torch.device(dev):
        return build_nnet('Mamba_DiT_S_2', **model)


def _serialize(obj):
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _train_steps(s, dev, first, last, start=None, snapshot_at=None):
    """Steps [first, last) of a tiny DiM's bf16 training; from `start` (a snapshot) or a fresh seed-0 model.
    Returns (flat fp32 weights, snapshot taken before step `snapshot_at` or None)."""
    import torch
    import sde
    from libs.training.optimizer import make_optimizer
    from libs.training.rng import RunRNG
    net = _tiny_dim(s['model'], dev, seed=0 if start is None else 1)
    opt = make_optimizer(net.parameters(), lr=1e-3, weight_decay=0.03, betas=(0.99, 0.99), eps=1e-15, fused=True)
    rng = RunRNG(1234, 0, dev)
    if start is not None:
        net.load_state_dict(start['nnet'])
        opt.load_state_dict(start['optimizer'])
        rng.restore(start['rng'], world_size=1, step=first)
    side, K, snap = s['model']['sample_size'], s['model']['num_embeds_ada_norm'], None
    kind = torch.device(dev).type
    for step in range(first, last):
        if step == snapshot_at:
            snap = _serialize(dict(nnet=net.state_dict(), optimizer=opt.state_dict(),
                                   rng=RunRNG.file_state([rng.state()], kind)))
        x0 = torch.randn(s['batch'], 4, side, side, generator=rng.data)
        y = torch.randint(0, K, (s['batch'],), generator=rng.data)
        if kind == 'cuda':
            x0, y = x0.pin_memory().to(dev, non_blocking=True), y.pin_memory().to(dev, non_blocking=True)
        with torch.autocast(kind, dtype=torch.bfloat16):
            loss = sde.diffusion_loss(net, x0, y, generator=rng.device).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(dev)
    return torch.cat([p.detach().float().flatten() for p in net.parameters()]), snap


def rng(ctx):
    import torch
    from libs.training.rng import RunRNG
    s = ctx.sizes()
    dev = _device(ctx)
    kind = torch.device(dev).type
    r0, r1, again0 = RunRNG(1234, 0, dev), RunRNG(1234, 1, dev), RunRNG(1234, 0, dev)
    draw = lambda r: torch.randn(4096, generator=r.device, device=dev)
    a0, a1, b0 = draw(r0), draw(r1), draw(again0)
    ctx.save(device=dev, generator_device=str(r0.device.device), ranks_differ=not torch.equal(a0, a1),
             same_rank_same_draws=torch.equal(a0, b0))
    saved = _serialize(RunRNG.file_state([r0.state(), r1.state()], kind))
    cont = [(draw(r), torch.randn(64, generator=r.data)) for r in (r0, r1)]
    restored = []
    for rank in (0, 1):
        fresh = RunRNG(1234, rank, dev)
        fresh.restore(saved, world_size=2, step=5)
        restored.append((draw(fresh), torch.randn(64, generator=fresh.data)))
    ctx.save(restore_round_trips=all(torch.equal(c[0], r[0]) and torch.equal(c[1], r[1])
                                     for c, r in zip(cont, restored)))
    t0 = time.perf_counter()
    n, k = s['steps'], s['resume_at']
    full, snap = _train_steps(s, dev, 0, n, snapshot_at=k)
    resumed, _ = _train_steps(s, dev, k, n, start=snap)
    repeat, _ = _train_steps(s, dev, 0, n)
    resume_diff = (full - resumed).abs().max().item()
    repeat_diff = (full - repeat).abs().max().item()
    out = dict(steps=n, resumed_at=k, params=full.numel(), bit_identical=torch.equal(full, resumed),
               resume_max_abs_diff=resume_diff, repeat_bit_identical=torch.equal(full, repeat),
               repeat_max_abs_diff=repeat_diff, seconds=time.perf_counter() - t0)
    init = torch.cat([p.detach().float().flatten() for p in _tiny_dim(s['model'], dev, 0).parameters()])
    out['weights_changed'] = not torch.equal(full, init)
    if not out['bit_identical']:
        out['why'] = ('the uninterrupted run does not repeat itself either: nondeterministic kernels (atomics in '
                      'index_select / embedding backward, cuDNN convolution backward) set the floor'
                      if not out['repeat_bit_identical'] else
                      'the uninterrupted run repeats bit-identically but the resumed one differs: resume does not '
                      'restore everything (model, optimizer, RunRNG)')
    ctx.save(resume=out)
    return ctx.result
