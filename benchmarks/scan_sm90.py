"""The Triton selective scan read from its sm_90 machine code, without a GPU: registers, spills, shared memory,
occupancy, SASS per channel-step, bytes, and a static time estimate against the H100 memory bound.

    python benchmarks/scan_sm90.py                                   # DiM-H/2's shapes, bf16 and fp32
    python benchmarks/scan_sm90.py --shapes 96x3072x366 --dtypes bf16 --out /tmp/s.json

How: a stand-in Triton driver reports GPUTarget('cuda', 90, 32); the launcher (libs/scan/triton_scan.py `_forward`,
`_backward`) runs on meta tensors with 132 SMs, and each kernel launch it makes becomes that kernel's `warmup`
(compile only), so every kernel is built with exactly the launcher's grid, constexprs, warps and argument
specialisations. The inputs have the mixer's strides (libs/model/mixer.py): u and delta contiguous (B, Di, L); z a
channel-last view of in_proj's (B, L, 2 Di) output; B and C column slices of x_proj's (B, L, R + 2N) output,
R = Di / 32; the output gradient channel-last, as out_proj's backward gives it; the last state's gradient a zero
(B, Di, N) tensor, as autograd materialises it. ptxas -v (registers, spills), cuobjdump (resources) and nvdisasm
(SASS) come from the triton wheel (triton/backends/nvidia/bin).

Per kernel: warps, registers, spill stores/loads (bytes), shared memory, occupancy, the main loop (the innermost
loop with the most instructions: its length, MUFU, shuffles, bar.sync) and its SASS warp-instructions per
channel-step, and bytes moved (every distinct tensor argument once: re-reads of B and C by other channel blocks
come from L2). Torch ops the launcher runs between kernels (sums of partials, dtype casts) are rows with their
input + output bytes.

Estimate model (stated, not measured; H100 SXM): 132 SMs at 1.755 GHz, HBM 3.35 TB/s. Per SM at most 65536
registers, 228 KB shared memory, 64 warps, 32 blocks (ptxas allocates registers per warp in units of 256; Triton's
shared memory plus 1 KB reserved per block). Issue: 4 warp-instructions per clock per SM with latency hidden,
but at most one per resident warp (a grid too small to fill the SMs issues less); MUFU (ex2, lg2, rcp): 16
results per clock per SM; bytes: HBM bandwidth. A kernel takes the largest of the three; a pass sums its kernels
and torch ops; 'x bound' divides by the pass's bytes bound (benchmarks/gpu_check_scan.py `bytes_bound`: each
input read once, each output written once). Launch overheads and wave tails are not counted.
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.gpu_check_scan import bytes_bound  # noqa: E402
from benchmarks.machine import cpu_name  # noqa: E402

SHAPES = ((96, 3072, 366), (16, 3072, 1230), (1, 3072, 9806))
D_STATE = 16
DTYPES = ('bf16', 'fp32')
H100 = dict(sms=132, clock_hz=1.755e9, hbm_bytes_per_s=3.35e12, issue_per_clock=4, mufu_results_per_clock=16)
SM90 = dict(registers=65536, shared_bytes=228 * 1024, warps=64, blocks=32, reserved_shared=1024, reg_unit=256)
MUFU = ('MUFU',)



def _chunk(a):
    """Steps per saved state: an argument of the forward kernel, a constexpr of the backward one."""
    return a['chunk_len'] if 'chunk_len' in a else a['CHUNK']


def _blocks(a):
    """T-step blocks a row of programs (one sample, one channel block) walks over L, chunk by chunk."""
    full, rest = divmod(a['L'], _chunk(a))
    return full * math.ceil(_chunk(a) / a['T']) + math.ceil(rest / a['T'])


# The loop nest of each kernel: iterations of each loop level (outermost first) summed over a row of programs (one
# sample, one channel block, all segments), and the (channel, step) pairs the row covers, from the launch's
# arguments `a` (by name, constexprs included). The carry pass's 'steps' are segments.
LOOP_WORK = {
    'scan_fwd_kernel': lambda a: ([math.ceil(a['L'] / _chunk(a)), _blocks(a), a['L']], a['BLOCK_D'] * a['L']),
    'scan_bwd_segment_kernel': lambda a: ([math.ceil(a['L'] / a['T'])], a['BLOCK_D'] * a['L']),
    'scan_bwd_kernel': lambda a: ([math.ceil(a['L'] / _chunk(a)), _blocks(a)], a['BLOCK_D'] * a['L']),
    'segment_carry_kernel': lambda a: ([a['n_seg']], a['BLOCK_D'] * a['n_seg']),
}


# ------------------------------------------------------------------------------------------------ compile

_DEVICE_IDS = {}        # one stand-in device id per target: Triton keeps its compiled kernels per device


def _standin_driver(target):
    """A Triton driver for a GPU that is not there (`target`, a GPUTarget): enough for `warmup` (compile, never
    launch)."""
    import torch
    from triton.backends.driver import DriverBase
    device = _DEVICE_IDS.setdefault((target.backend, target.arch, target.warp_size), len(_DEVICE_IDS))

    class StandIn(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return target

        def get_active_torch_device(self):
            return torch.device('meta')

        def get_benchmarker(self):
            raise RuntimeError('the stand-in driver compiles only')

        def get_current_device(self):
            return device

        def get_current_stream(self, device=None):
            return 0
    return StandIn()


def model_inputs(batch, d_inner, L, d_state, dtype):
    """Meta tensors with the mixer's layouts (see the module docstring)."""
    import torch
    io = dict(bf16=torch.bfloat16, fp32=torch.float32)[dtype]
    meta = lambda *shape, dt=io: torch.empty(*shape, dtype=dt, device='meta')
    rank = -(-d_inner // 32)
    xz = meta(batch, L, 2 * d_inner)
    proj = meta(batch, L, rank + 2 * d_state)
    x = dict(u=meta(batch, d_inner, L), delta=meta(batch, d_inner, L), A=meta(d_inner, d_state, dt=torch.float32),
             B=proj[..., rank:rank + d_state].transpose(1, 2), C=proj[..., rank + d_state:].transpose(1, 2),
             D=meta(d_inner, dt=torch.float32), z=xz.transpose(1, 2)[:, d_inner:],
             delta_bias=meta(d_inner, dt=torch.float32))
    gout = meta(batch, L, d_inner).transpose(1, 2)
    glast = meta(batch, d_inner, d_state, dt=torch.float32)
    return x, gout, glast


class _Recorder:
    """Stands in for torch.library.wrap_triton: kernel[grid](*args, **kw) compiles (warmup) and is recorded."""

    def __init__(self):
        self.launches, self.phase = [], None

    def __call__(self, fn):
        rec = self

        class Launch:
            def __getitem__(self, grid):
                def go(*args, **kwargs):
                    compiled = fn.warmup(*args, grid=grid, **kwargs)
                    bound = dict(zip(fn.arg_names, args), **kwargs)
                    rec.launches.append(dict(kind='kernel', phase=rec.phase, name=fn.__name__, grid=tuple(grid),
                                             args=bound, compiled=compiled))
                return go
        return Launch()


def _torch_ops_mode(rec):
    """Records the torch ops that move data (not allocations or views) with their input + output bytes."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            view = any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns)
            if not view and not name.startswith(('empty', 'new_empty')):
                ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
                outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                        and not any(t is i for i in ins)]       # an in-place op's output is its written input
                rec.launches.append(dict(kind='torch', phase=rec.phase, name=f'torch {name}',
                                         bytes=nbytes(ins) + nbytes(outs)))
            return out
    return Mode()


def compile_shape(batch, d_inner, L, d_state, dtype, target=None, sm_count=H100['sms']):
    """Runs the launcher's forward and backward for one shape on meta tensors, each kernel launch compiled for
    `target` (default GPUTarget('cuda', 90, 32)); returns the recorded launches. A 'hip' target compiles what a
    ROCm build of torch would launch."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from libs.scan import triton_scan as ts
    target = target or GPUTarget('cuda', 90, 32)
    rec = _Recorder()
    saved = (ts.wrap_triton, ts._sm_count, torch.version.hip)
    saved_driver = triton.runtime.driver._active      # None on a machine without a GPU: restored as it was
    ts.wrap_triton, ts._sm_count = rec, (lambda device: sm_count)
    torch.version.hip = '6.0 (stand-in)' if target.backend == 'hip' else None
    triton.runtime.driver.set_active(_standin_driver(target))
    try:
        x, gout, glast = model_inputs(batch, d_inner, L, d_state, dtype)
        chunk, bwd_chunk = ts._chunks(None, None)
        with _torch_ops_mode(rec):
            rec.phase = 'fwd'
            _, _, states = ts._forward(*x.values(), True, chunk, bwd_chunk, 0, 0, True, launch=True)
            rec.phase = 'bwd'
            ts._backward(gout, glast, *x.values(), states, True, chunk, bwd_chunk, 0, 0, launch=True)
    finally:
        ts.wrap_triton, ts._sm_count, torch.version.hip = saved
        triton.runtime.driver._active = saved_driver
    return rec.launches


# ------------------------------------------------------------------------------------------------ machine code

def _tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', name)


def ptxas_report(ptx):
    """(registers, spill store bytes, spill load bytes) from ptxas -v with Triton's flags."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, 'k.ptx')
        with open(src, 'w') as f:
            f.write(ptx)
        arch = re.search(r'\.target\s+(sm_\w+)', ptx).group(1)
        log = subprocess.run([_tool('ptxas'), '-lineinfo', '-v', '--regAllocOptLevel=2', f'--gpu-name={arch}', src,
                              '-o', os.path.join(tmp, 'k.o')], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r'Used (\d+) registers', log).group(1))
    spills = re.search(r'(\d+) bytes spill stores, (\d+) bytes spill loads', log)
    return regs, int(spills.group(1)), int(spills.group(2))


def sass(cubin):
    """[(address, opcode, branch target label or None)], {label: address} from nvdisasm."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, 'k.cubin')
        with open(path, 'wb') as f:
            f.write(cubin)
        text = subprocess.run([_tool('nvdisasm'), '-c', path], capture_output=True, text=True, check=True).stdout
    instrs, labels, pending = [], {}, []
    for line in text.splitlines():
        m = re.match(r'\s*(\.L_x_\d+):', line)
        if m:
            pending.append(m.group(1))
            continue
        m = re.match(r'\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)', line)
        if m:
            addr = int(m.group(1), 16)
            for label in pending:
                labels[label] = addr
            pending = []
            target = re.search(r'`\((\.L_x_\d+)\)', m.group(3))
            instrs.append((addr, m.group(2), target.group(1) if target else None))
    return instrs, labels


def loop_nest(instrs, labels):
    """The loops (backward branches) enclosing the largest innermost loop, outermost first, each as the opcodes
    it runs itself (those of the loop inside it excluded); [] when the kernel has no loop."""
    loops = sorted({(labels[t], addr) for addr, op, t in instrs if op.startswith('BRA') and t and labels[t] <= addr})
    inside = lambda x, y: y[0] <= x[0] and x[1] <= y[1] and x != y
    inner = [x for x in loops if not any(inside(y, x) for y in loops)]
    if not inner:
        return []
    chain = [max(inner, key=lambda x: x[1] - x[0])]
    while any(inside(chain[0], y) for y in loops):
        chain.insert(0, min((y for y in loops if inside(chain[0], y)), key=lambda y: y[1] - y[0]))
    own = []
    for i, (s, e) in enumerate(chain):
        sub = chain[i + 1] if i + 1 < len(chain) else (1, 0)
        own.append([op for a, op, _ in instrs if s <= a <= e and not sub[0] <= a <= sub[1] and op != 'NOP'])
    return own


def occupancy(warps, regs, shared):
    reg_unit = SM90['reg_unit']
    per_warp = -(-regs * 32 // reg_unit) * reg_unit
    by_regs = SM90['registers'] // per_warp // warps
    by_shared = SM90['shared_bytes'] // (shared + SM90['reserved_shared'])
    blocks = min(SM90['blocks'], SM90['warps'] // warps, by_regs, by_shared)
    return blocks, blocks * warps / SM90['warps']


def kernel_row(launch):
    """The machine-code figures and estimates of one recorded kernel launch."""
    import torch
    ck, args, grid = launch['compiled'], launch['args'], launch['grid']
    warps, shared = ck.metadata.num_warps, ck.metadata.shared
    regs, spill_st, spill_ld = ptxas_report(ck.asm['ptx'])
    instrs, labels = sass(ck.asm['cubin'])
    nest = loop_nest(instrs, labels)
    programs, rows = math.prod(grid), grid[0] * grid[1]
    iterations, chan_steps = LOOP_WORK[launch['name']](args)
    if len(nest) != len(iterations):
        raise RuntimeError(f"{launch['name']}: the SASS has a loop nest of depth {len(nest)}, scan_sm90.LOOP_WORK "
                           f"describes {len(iterations)}: update LOOP_WORK to the kernel's loops")
    count = lambda ops, *prefixes: sum(op.startswith(prefixes) for op in ops)
    loop_instrs = sum(len(ops) * n for ops, n in zip(nest, iterations)) * rows
    loop_mufu = sum(count(ops, *MUFU) * n for ops, n in zip(nest, iterations)) * rows
    outside = len([1 for _, op, _ in instrs if op != 'NOP']) - sum(len(ops) for ops in nest)
    warp_instrs = (loop_instrs + programs * outside) * warps
    blocks, occ = occupancy(warps, regs, shared)
    resident_warps = min(blocks, -(-programs // H100['sms'])) * warps
    issue_s = warp_instrs / (H100['sms'] * H100['clock_hz'] * min(H100['issue_per_clock'], resident_warps))
    mufu_s = loop_mufu * warps * 32 / (H100['sms'] * H100['clock_hz'] * H100['mufu_results_per_clock'])
    buffers = {}
    for name, v in args.items():
        if isinstance(v, torch.Tensor) and not any(v is args[n] for n in buffers):
            buffers[name] = v.numel() * v.element_size()
    moved = sum(buffers.values())
    bytes_s = moved / H100['hbm_bytes_per_s']
    body = nest[-1]
    return dict(
        phase=launch['phase'], kernel=launch['name'], grid=list(grid), programs=programs, warps=warps,
        registers=regs, spill_store_bytes=spill_st, spill_load_bytes=spill_ld, shared_bytes=shared,
        blocks_per_sm=blocks, occupancy=occ, loop_depth=len(nest), loop_sass=len(body),
        loop_mufu=count(body, *MUFU), loop_shfl=count(body, 'SHFL'), loop_bar=count(body, 'BAR'),
        loop_global=count(body, 'LDG', 'STG'), loop_shared=count(body, 'LDS', 'STS'),
        sass_per_channel_step=loop_instrs * warps / (chan_steps * rows),
        mufu_per_channel_step=loop_mufu * warps / (chan_steps * rows),
        warp_instructions=warp_instrs, bytes=moved, buffer_bytes=buffers, issue_ms=1e3 * issue_s, mufu_ms=1e3 * mufu_s,
        bytes_ms=1e3 * bytes_s, estimate_ms=1e3 * max(issue_s, mufu_s, bytes_s),
        constexprs={k: v for k, v in args.items() if k.isupper()})


def torch_row(launch):
    t = launch['bytes'] / H100['hbm_bytes_per_s']
    return dict(phase=launch['phase'], kernel=launch['name'], bytes=launch['bytes'], bytes_ms=1e3 * t,
                estimate_ms=1e3 * t)


# ------------------------------------------------------------------------------------------------ report

def measure(shape, dtype, d_state=D_STATE):
    batch, d_inner, L = shape
    launches = compile_shape(batch, d_inner, L, d_state, dtype)
    rows = [kernel_row(x) if x['kind'] == 'kernel' else torch_row(x) for x in launches]
    elem = 2 if dtype == 'bf16' else 4
    bound_fwd, bound_fwdbwd = bytes_bound(batch, d_inner, L, d_state, elem)
    fwd = sum(r['estimate_ms'] for r in rows if r['phase'] == 'fwd')
    bwd = sum(r['estimate_ms'] for r in rows if r['phase'] == 'bwd')
    issue_only = lambda phases: sum(max(r.get('issue_ms', 0), r['bytes_ms']) for r in rows if r['phase'] in phases)
    ms = lambda b: 1e3 * b / H100['hbm_bytes_per_s']
    summary = dict(shape=list(shape), d_state=d_state, dtype=dtype, bound_fwd_ms=ms(bound_fwd),
                   bound_fwdbwd_ms=ms(bound_fwdbwd), fwd_ms=fwd, fwdbwd_ms=fwd + bwd,
                   fwd_x_bound=fwd / ms(bound_fwd), fwdbwd_x_bound=(fwd + bwd) / ms(bound_fwdbwd),
                   fwd_x_bound_issue_only=issue_only(('fwd',)) / ms(bound_fwd),
                   fwdbwd_x_bound_issue_only=issue_only(('fwd', 'bwd')) / ms(bound_fwdbwd),
                   spills=sum(r.get('spill_store_bytes', 0) + r.get('spill_load_bytes', 0) for r in rows),
                   min_occupancy=min(r['occupancy'] for r in rows if 'occupancy' in r),
                   max_registers=max(r['registers'] for r in rows if 'registers' in r))
    # dB / dC partials (written by the backward kernel, read by the sum) and the saved states (written by the
    # forward, read by the backward), against the bytes bound of forward + backward
    bwd_main = next(r for r in rows if r['kernel'] == 'scan_bwd_kernel')
    fwd_main = [r for r in rows if r['kernel'] == 'scan_fwd_kernel'][-1]
    summary.update(partial_bytes=2 * bwd_main['buffer_bytes']['dBC_ptr'],
                   state_bytes=2 * fwd_main['buffer_bytes']['states_ptr'], bound_fwdbwd_bytes=bound_fwdbwd)
    summary.update(partial_x_useful=summary['partial_bytes'] / bound_fwdbwd,
                   state_x_useful=summary['state_bytes'] / bound_fwdbwd)
    return dict(summary=summary, kernels=rows)


def _f(v, digits=2):
    return '-' if v is None else (f'{v:.{digits}f}' if isinstance(v, float) else str(v))


def table(results):
    lines = ['| shape | dtype | pass | kernel | warps | regs | spills st/ld B | smem B | occ % | loop SASS | '
             'MUFU/shfl/bar | SASS per ch-step | MB moved | issue / MUFU / bytes ms |',
             '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
    for res in results:
        s = res['summary']
        shape = 'x'.join(map(str, s['shape']))
        for r in res['kernels']:
            if 'registers' not in r:
                lines.append(f"| {shape} | {s['dtype']} | {r['phase']} | {r['kernel']} | | | | | | | | | "
                             f"{r['bytes'] / 1e6:.1f} | - / - / {r['bytes_ms']:.3f} |")
                continue
            lines.append(
                f"| {shape} | {s['dtype']} | {r['phase']} | {r['kernel']} | {r['warps']} | {r['registers']} | "
                f"{r['spill_store_bytes']}/{r['spill_load_bytes']} | {r['shared_bytes']} | "
                f"{100 * r['occupancy']:.1f} | "
                f"{r['loop_sass']} | {r['loop_mufu']}/{r['loop_shfl']}/{r['loop_bar']} | "
                f"{_f(r['sass_per_channel_step'], 1)} | {r['bytes'] / 1e6:.1f} | "
                f"{r['issue_ms']:.3f} / {r['mufu_ms']:.3f} / {r['bytes_ms']:.3f} |")
    lines += ['', '| shape | dtype | bound fwd ms | est fwd ms (x bound; issue only) | bound f+b ms | '
              'est f+b ms (x bound; issue only) | spills B | max regs | min occ % | dB/dC partials, states '
              '(x f+b bytes) |', '|---|---|---|---|---|---|---|---|---|---|']
    for res in results:
        s = res['summary']
        lines.append(f"| {'x'.join(map(str, s['shape']))} | {s['dtype']} | {s['bound_fwd_ms']:.3f} | "
                     f"{s['fwd_ms']:.3f} ({s['fwd_x_bound']:.1f}x; {s['fwd_x_bound_issue_only']:.1f}x) | "
                     f"{s['bound_fwdbwd_ms']:.3f} | {s['fwdbwd_ms']:.3f} ({s['fwdbwd_x_bound']:.1f}x; "
                     f"{s['fwdbwd_x_bound_issue_only']:.1f}x) | {s['spills']} | {s['max_registers']} | "
                     f"{100 * s['min_occupancy']:.1f} | {s['partial_x_useful']:.2f}, {s['state_x_useful']:.2f} |")
    return '\n'.join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--shapes', default=','.join('x'.join(map(str, s)) for s in SHAPES),
                        help='comma-separated BATCHxDIxL')
    parser.add_argument('--dtypes', default=','.join(DTYPES), help='comma-separated: bf16, fp32')
    parser.add_argument('--out', default=os.path.join(ROOT, 'benchmarks', 'results', 'scan_sm90.json'))
    args = parser.parse_args(argv)
    try:
        shapes = [tuple(int(v) for v in s.split('x')) for s in args.shapes.split(',')]
    except ValueError:
        parser.error(f'--shapes must be BATCHxDIxL[,...], got {args.shapes!r}')
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        parser.error(f'--shapes must be BATCHxDIxL[,...] with positive sizes, got {args.shapes!r}')
    dtypes = args.dtypes.split(',')
    if not set(dtypes) <= set(DTYPES):
        parser.error(f'--dtypes must be among {DTYPES}, got {args.dtypes!r}')
    import triton
    t0 = time.time()
    results = [measure(shape, dtype) for shape in shapes for dtype in dtypes]
    report = dict(script='benchmarks/scan_sm90.py', argv=sys.argv[1:] if argv is None else argv,
                  date=time.strftime('%Y-%m-%d %H:%M:%S %Z'), cpu=cpu_name(), triton=triton.__version__,
                  target="GPUTarget('cuda', 90, 32), 132 SMs", model=dict(h100=H100, sm90_limits=SM90),
                  seconds=time.time() - t0, results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(report, f, indent=1)
    print(table(results))
    print(f'\nwrote {args.out} ({report["seconds"]:.0f} s)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
