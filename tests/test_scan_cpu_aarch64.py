"""The C scan kernel built for aarch64 (its baseline variant: NEON through GCC vector extensions) and run under
qemu-user with libs/scan/csrc/scan_cpu_check.c: values and gradients against the float64 sequential scan and the exp
edge cases, as tests/test_scan_cpu.py checks the builds this machine runs; and the compiled forward keeps its state
loop in NEON vectors. Skipped without the cross tools (Debian/Ubuntu: apt-get install gcc-aarch64-linux-gnu
qemu-user)."""
import pathlib
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch

from test_scan_cpu import TOL, _loss_weights, assert_exp_like_expf, exp_edge_inputs, make_inputs, rel_err, run_ref

CC, OBJDUMP, QEMU = 'aarch64-linux-gnu-gcc', 'aarch64-linux-gnu-objdump', 'qemu-aarch64'
CSRC = pathlib.Path(__file__).resolve().parent.parent / 'libs' / 'scan' / 'csrc'
# setup.py's flags for the kernel; static, so that the emulator needs no aarch64 libraries
CFLAGS = ['-O3', '-std=gnu11', '-fno-math-errno', '-Wno-psabi', '-static', '-pthread']

pytestmark = pytest.mark.skipif(
    platform.machine() == 'aarch64' or not all(shutil.which(t) for t in (CC, OBJDUMP, QEMU)),
    reason=f'needs {CC}, {OBJDUMP} and {QEMU} on a non-aarch64 host')


@pytest.fixture(scope='module')
def check_binary(tmp_path_factory):
    path = tmp_path_factory.mktemp('aarch64') / 'scan_cpu_check'
    cmd = [CC, *CFLAGS, str(CSRC / 'scan_cpu_check.c'), str(CSRC / 'scan_cpu.c'), '-o', str(path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return path


def run_check(binary, tmp_path, inputs, segment, gy, glast, x, threads=1):
    """The driver's results under the emulator: (active ISA code, [y, last, gdt, gu, gA, gB, gC], exp(x))."""
    delta, u, A, B, C = inputs
    bsz, d, length = delta.shape
    n = A.shape[1]
    header = np.array([bsz, d, length, n, segment, threads, x.numel()], dtype='<i8').tobytes()
    body = b''.join(t.contiguous().numpy().astype('<f4').tobytes() for t in (delta, u, A, B, C, gy, glast, x))
    (tmp_path / 'in.bin').write_bytes(header + body)
    done = subprocess.run([QEMU, str(binary), str(tmp_path / 'in.bin'), str(tmp_path / 'out.bin')],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    raw = (tmp_path / 'out.bin').read_bytes()
    isa = int(np.frombuffer(raw[:4], dtype='<i4')[0])
    flat = torch.from_numpy(np.frombuffer(raw[4:], dtype='<f4').copy())
    shapes = [(bsz, d, length), (bsz, d, n), (bsz, d, length), (bsz, d, length), (d, n), (bsz, n, length),
              (bsz, n, length), (x.numel(),)]
    parts = torch.split(flat, [int(np.prod(s)) for s in shapes])
    assert sum(p.numel() for p in parts) == flat.numel()
    out = [p.reshape(s) for p, s in zip(parts, shapes)]
    return isa, out[:7], out[7]


@pytest.mark.parametrize('shape,dt_scale,segment,threads', [
    ((2, 20, 1000, 16), 'normal', 64, 1),
    ((3, 16, 65, 40), 'large', 7, 2),       # |dt*A*log2 e| > 125: the exp path for any argument
    ((1, 33, 7, 5), 'normal', 7, 1),
])
def test_aarch64_build_matches_the_float64_scan(check_binary, tmp_path, shape, dt_scale, segment, threads):
    inputs = make_inputs(*shape, dt_scale, seed=shape[2] + shape[1])
    gy, glast = _loss_weights(inputs, 1)
    x = exp_edge_inputs()
    isa, ours, exps = run_check(check_binary, tmp_path, inputs, segment, gy, glast, x, threads)
    assert isa == 1                                   # the baseline variant: the only one built for aarch64
    y64, last64, grads64 = run_ref(inputs)
    for name, got, want in zip(('y', 'last', 'delta', 'u', 'A', 'B', 'C'), ours, [y64, last64] + grads64):
        assert got.shape == want.shape and rel_err(got, want) <= TOL, (name, rel_err(got, want))
    assert_exp_like_expf(x, exps, 'aarch64')


def test_aarch64_state_loop_is_vectorised(check_binary):
    """The forward's state loop compiles to NEON arithmetic on 4-lane vectors, never to per-lane scalar code."""
    asm = subprocess.run([OBJDUMP, '-d', '--no-show-raw-insn', str(check_binary)], capture_output=True, text=True,
                         timeout=300).stdout
    body = asm.split('<fwd_unit_generic>:', 1)[1].split('\n\n', 1)[0]
    ops = [line.split('\t')[1:] for line in body.splitlines() if '\t' in line]
    vector_fma = sum(1 for op in ops if op and op[0] == 'fmla' and '.4s' in ''.join(op))
    scalar_fma = sum(1 for op in ops if op and op[0] in ('fmadd', 'fmsub', 'fnmadd', 'fnmsub'))
    scalar_cmp = sum(1 for op in ops if op and op[0] in ('fcmp', 'fcmpe', 'fcsel'))
    assert vector_fma >= 2 * 8 * 7, vector_fma         # two exp paths x 8 states x (6 polynomial + 1 state update)
    assert scalar_fma == 0, scalar_fma                 # a scalarised polynomial would show as scalar fused ops
    # the exp's clamps done lane by lane would show as hundreds of scalar compares and selects; one per segment
    # (the choice of exp path) is expected
    assert scalar_cmp <= 4, scalar_cmp
