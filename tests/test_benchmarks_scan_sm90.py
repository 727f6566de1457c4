"""benchmarks/scan_sm90.py: the Triton scan's kernels compiled for sm_90 through the launcher, without a GPU."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import scan_sm90  # noqa: E402

triton = pytest.importorskip('triton')


def test_loop_nest_is_read_from_the_branches_of_the_sass():
    # an outer loop (0x00-0x50) around an inner one (0x10-0x30), then a second, smaller inner loop (0x60-0x70)
    ops = ['MOV', 'FFMA', 'MUFU.EX2', 'BRA', 'IADD3', 'BRA', 'FADD', 'BRA', 'EXIT']
    targets = {3: '.L_x_1', 5: '.L_x_0', 7: '.L_x_2'}
    instrs = [(16 * i, op, targets.get(i)) for i, op in enumerate(ops)]
    labels = {'.L_x_0': 0x00, '.L_x_1': 0x10, '.L_x_2': 0x60}
    outer, inner = scan_sm90.loop_nest(instrs, labels)
    assert inner == ['FFMA', 'MUFU.EX2', 'BRA'] and outer == ['MOV', 'IADD3', 'BRA']
    assert scan_sm90.loop_nest(instrs[:3] + instrs[8:], labels) == []


def test_occupancy_follows_the_sm90_limits():
    assert scan_sm90.occupancy(1, 128, 512) == (16, 0.25)           # registers: 128 x 32 x 16 = 64K
    assert scan_sm90.occupancy(8, 255, 0) == (1, 0.125)             # 255 registers round to 256 per thread
    assert scan_sm90.occupancy(1, 32, 0) == (32, 0.5)               # at most 32 blocks
    assert scan_sm90.occupancy(4, 32, 100 * 1024)[0] == 2           # shared memory: 2 x (100 + 1) KB <= 228 KB


@pytest.mark.slow
def test_every_kernel_of_every_shape_is_read(tmp_path):
    # DiM-H/2's three shapes in bf16 and fp32 (minutes: every kernel compiled for sm_90 through the launcher)
    out = tmp_path / 'scan_sm90.json'
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'scan_sm90.py'), '--out', str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=3600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads(out.read_text())
    results = report['results']
    assert [(tuple(r['summary']['shape']), r['summary']['dtype']) for r in results] == [
        (shape, dtype) for shape in scan_sm90.SHAPES for dtype in scan_sm90.DTYPES]
    for res in results:
        s = res['summary']
        kernels = [r for r in res['kernels'] if 'registers' in r]
        names = {(r['phase'], r['kernel']) for r in kernels}
        assert {('fwd', 'scan_fwd_kernel'), ('bwd', 'scan_bwd_kernel')} <= names
        if s['shape'][0] == 1:          # batch 1 at 1536 px: L split into segments, with their carry passes
            assert {('fwd', 'segment_carry_kernel'), ('bwd', 'scan_bwd_segment_kernel'),
                    ('bwd', 'segment_carry_kernel')} <= names
        for r in kernels:
            assert 0 < r['registers'] <= 255 and 0 < r['occupancy'] <= 1 and r['warps'] >= 1
            assert r['sass_per_channel_step'] > 0 and r['loop_sass'] > 0 and r['estimate_ms'] > 0
            assert r['estimate_ms'] == max(r['issue_ms'], r['mufu_ms'], r['bytes_ms'])
        assert any(r['kernel'].startswith('torch') for r in res['kernels'])        # the sums of the partials
        assert s['bound_fwd_ms'] < s['bound_fwdbwd_ms'] and s['fwd_ms'] < s['fwdbwd_ms']
        assert s['fwd_x_bound'] >= 1 and s['fwdbwd_x_bound'] >= 1 and s['partial_bytes'] > 0
        line = f"| {'x'.join(map(str, s['shape']))} | {s['dtype']} | {s['bound_fwd_ms']:.3f} |"
        assert line in p.stdout
    assert p.stdout.count('| scan_bwd_kernel |') == len(results)
