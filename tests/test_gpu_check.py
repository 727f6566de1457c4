"""benchmarks/gpu_check.py: it starts, runs every section's code on CPU (--dry-run) without the packages the GPU
machine lacks, and records failures, hangs and spent budgets instead of dying."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import gpu_check                                       # noqa: E402
from benchmarks.gpu_check_util import FORBIDDEN, config_literals, nnet_kwargs  # noqa: E402

ALL = [s.name for s in gpu_check.SECTIONS]

# Hides packages from every process it starts in (as `importlib.util.find_spec` and `import` see a machine without
# them): the names in GPU_CHECK_TEST_BLOCK.
SITECUSTOMIZE = '''
import importlib.machinery, os, sys
_BLOCKED = set(filter(None, os.environ.get('GPU_CHECK_TEST_BLOCK', '').split(',')))
class _Hiding(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if name.split('.')[0] in _BLOCKED else super().find_spec(name, path, target)
sys.meta_path[:] = [_Hiding if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
'''


def _run(tmp_path, *args, blocked=FORBIDDEN, timeout=900):
    site = tmp_path / 'site'
    site.mkdir(exist_ok=True)
    (site / 'sitecustomize.py').write_text(SITECUSTOMIZE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get('PYTHONPATH', '')]),
               GPU_CHECK_TEST_BLOCK=','.join(blocked))
    env.pop('OUT', None)
    out = tmp_path / 'gpu_check.json'
    t0 = time.time()
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--dry-run', '--out',
                        str(out), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out) as f:
        return json.load(f), p.stdout, time.time() - t0


def _numbers(obj):
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [obj]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return []


def _check_card(r):
    assert r['copy_GBps'] > 0 and r['bf16_matmul_TFLOPs'] > 0 and r['memory_total_gb'] > 0


def _check_dispatch(d):
    assert d['auto']['ok'] and d['auto']['logged_once']
    assert [r['mode'] for r in d['slow_backend']] == ['block_triton', 'force_torch']
    assert all(r['ok'] for r in d['slow_backend'])
    forced = d['slow_backend'][1]
    assert forced['backend'] == 'torch' and forced['warning_count'] == 1 and forced['warning_names_cost_and_fix']
    assert d['real_kernels']['mamba_ssm'] is None or 'scan_backend' in d['real_kernels']
    assert d['standin_kernels']['opt_in_build']['auto_backend'] == d['auto']['scan_backend']


def _check_rng(r):
    assert r['ranks_differ'] and r['same_rank_same_draws'] and r['restore_round_trips']
    assert r['resume']['weights_changed'] and r['resume']['repeat_bit_identical'] and r['resume']['bit_identical']


def _check_scan_parity(p):
    assert p['ok'] and {c['dtype'] for c in p['cases']} == {'fp32', 'bf16'}
    assert any(c['launch_config']['bwd']['segments'] > 1 for c in p['cases'])        # the carry passes ran
    for c in p['cases']:
        for impl in ('triton', 'torch_chunked'):
            assert set(c[impl]['rel_err']) == {'out', 'last_state', 'du', 'ddelta', 'dA', 'dB', 'dC', 'dD', 'dz',
                                               'ddelta_bias'}
            assert 0 <= c[impl]['max_rel_err'] <= c['tolerance']


def _check_scan_speed(r):
    assert [row['layout'] for row in r['rows']] == ['model', 'contiguous'] * 4          # the mixer's strides first
    for row in r['rows']:
        for key in ('fwd_ms', 'fwdbwd_ms', 'fwd_x_bound', 'fwdbwd_x_bound'):
            assert row['triton'][key] > 0
        assert row['torch_chunked']['fwd_ms'] > 0 and row['bound_fwd_ms'] < row['bound_fwdbwd_ms']


def _check_model(r, resolutions=('256', '512')):
    for res in resolutions:
        m = r[res]
        assert m['forward_img_per_s'] > 0 and 0 < m['fraction_of_gemm_bound'] < 1
        assert m['sampling']['finite'] and m['sampling']['img_per_s'] > 0 and m['sampling']['fid50k_gpu_hours'] > 0
        if 'gemm_flops_counted' in m:      # the counter sees the formula's GEMMs plus the per-sample ones
            assert m['gemm_flops_formula'] <= m['gemm_flops_counted'] <= 1.1 * m['gemm_flops_formula']


def _check_scan_sweep(r):
    variants = r['shapes'][0]['variants']
    assert variants[0]['change'] == 'defaults' and all(v['max_rel_diff_vs_default'] < 1e-2 for v in variants)


def _check_host_syncs(r):
    assert r['losses_finite'] and r['steps'] >= 1 and r['syncs_in_steps'] is None     # no CUDA: not counted


def _check_train(r):
    assert [v['gradient_checkpointing'] for v in r['variants']] == [False, True]
    for v in r['variants']:
        assert v['step_time_s'] > 0 and v['samples_per_s'] > 0 and v['largest_batch_measured'] >= 1


CHECKS = dict(card=_check_card, dispatch=_check_dispatch, rng=_check_rng, scan_parity=_check_scan_parity,
              scan_speed=_check_scan_speed, model_eager=_check_model, scan_sweep=_check_scan_sweep,
              host_syncs=_check_host_syncs, train_256=_check_train,
              model_compiled=lambda r: _check_model(r, resolutions=('256',)))


def _check(secs, names, allowed=()):
    """Each section ran, imported nothing the GPU machine lacks, measured finite values, and shows its checks."""
    for name in names:
        r = secs[name]
        assert r['status'] == 'ok', (name, r.get('traceback'), r.get('log_tail'))
        assert r['forbidden_imports'] in ([], list(allowed)), name
        assert all(math.isfinite(x) for x in _numbers(r)), name
        CHECKS[name](r)


def test_dry_run_starts_and_runs_the_card_paths_without_the_missing_packages(tmp_path):
    names = ['card', 'dispatch', 'scan_parity', 'model_eager']
    report, stdout, wall = _run(tmp_path, '--sections', ','.join(names))
    assert list(report['sections']) == names
    _check(report['sections'], names)
    assert '| scan_parity | ok |' in stdout and '| model | res |' in stdout
    assert report['wall_s'] <= wall


@pytest.mark.slow
def test_dry_run_of_every_section(tmp_path):
    # ml_collections stays importable: on the GPU machine it is carried as a wheel for the config sections
    report, stdout, _ = _run(tmp_path, blocked=[m for m in FORBIDDEN if m != 'ml_collections'])
    secs = report['sections']
    assert list(secs) == ALL
    _check(secs, [n for n in ALL if n in CHECKS and not gpu_check_section(n).needs_config])
    _check(secs, [n for n in ALL if n in CHECKS and gpu_check_section(n).needs_config], allowed=['ml_collections'])
    assert secs['model_compiled']['256']['max_rel_diff_vs_eager'] < 5e-2
    assert secs['train_512']['status'] == 'skipped'
    assert report['triton_warm']['results']['triton_warm_0']['status'] == 'ok'
    assert '| training | checkpointing |' in stdout and '| B x Di x L |' in stdout


def gpu_check_section(name):
    return next(s for s in gpu_check.SECTIONS if s.name == name)


def test_config_sections_say_how_to_bring_ml_collections(tmp_path):
    report, _, _ = _run(tmp_path, '--sections', 'card,host_syncs,train_256')
    secs = report['sections']
    assert secs['card']['status'] == 'ok'
    for name in ('host_syncs', 'train_256'):
        assert secs[name]['status'] == 'skipped' and 'assets/wheels' in secs[name]['note']


def test_a_spent_budget_skips_every_section_and_still_writes(tmp_path):
    report, stdout, wall = _run(tmp_path, '--budget', '0')
    assert list(report['sections']) == ALL
    assert all(r['status'] == 'skipped' and r['note'] for r in report['sections'].values())
    assert wall < 30 and '| card | skipped |' in stdout


def test_unknown_section_is_an_error():
    p = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'gpu_check.py'), '--sections', 'card,gpu'],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode != 0 and "unknown section(s) ['gpu']" in p.stderr


# -------------------------------------------------------------------------- the driver with sections of its own

def _fake_card(ctx):
    return dict(device='fake', copy_GBps=1.0, bf16_matmul_TFLOPs=1.0, memory_total_gb=1.0)


def _fake_failure(ctx):
    ctx.save(partial=1, saw_card=ctx.card('device'))
    raise ValueError('boom')


def _fake_hang(ctx):
    ctx.save(partial=2)
    time.sleep(120)


def _fake_ok(ctx):
    return dict(left=ctx.left())


def test_a_failing_and_a_hanging_section_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join([os.path.dirname(__file__), os.environ.get('PYTHONPATH', '')]))
    spec = 'test_gpu_check:'          # the workers import this module to run the fake sections below
    sections = [gpu_check.Section('card', spec + '_fake_card', 30),
                gpu_check.Section('fails', spec + '_fake_failure', 30),
                gpu_check.Section('hangs', spec + '_fake_hang', 2),
                gpu_check.Section('after', spec + '_fake_ok', 30)]
    out = str(tmp_path / 'r.json')
    driver = gpu_check.Driver(out, dry=False, budget=100, tmp=str(tmp_path))
    t0 = time.time()
    driver.run(sections)
    assert time.time() - t0 < 60
    with open(out) as f:
        secs = json.load(f)['sections']
    assert secs['card']['status'] == 'ok' and secs['card']['device'] == 'fake'
    assert secs['fails']['status'] == 'failed' and 'ValueError: boom' in secs['fails']['traceback']
    assert secs['fails']['partial'] == 1 and secs['fails']['saw_card'] == 'fake'
    assert secs['hangs']['status'] == 'timeout' and secs['hangs']['partial'] == 2
    assert secs['after']['status'] == 'ok' and 0 < secs['after']['left'] <= 30
    assert '| hangs | timeout |' in gpu_check.table(driver.report)


# --------------------------------------------------------------------------------------------- config literals

# the configs whose networks gpu_check builds without ml_collections, and the others written the same way
CONFIG_NAMES = ['imagenet256_H_DiM', 'imagenet512_H_DiM_ft', 'imagenet256_L_DiM', 'cifar10_S_DiM', 'digits_DiM_tiny']


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_literals_are_the_configs_values(name):
    from libs.config import load_config
    config = load_config(os.path.join(ROOT, 'configs', f'{name}.py'))
    lit = config_literals(name)
    assert lit['nnet'] == config.nnet.to_dict()
    assert tuple(lit['z_shape']) == tuple(config.z_shape)
    assert lit['sample'] == config.sample.to_dict()
    assert 'pretrained_path' not in nnet_kwargs(name)


def test_a_config_without_a_literal_nnet_is_an_error():
    with pytest.raises(ValueError, match='no literal `config.nnet = d'):
        config_literals('imagenet512_H_DiM_upsample_3x_test')


def test_nnet_kwargs_build_dim_h2():
    import torch
    from libs.model.build import build_nnet
    for name, grid in (('imagenet256_H_DiM', 16), ('imagenet512_H_DiM_ft', 32)):
        with torch.device('meta'):
            net = build_nnet(**nnet_kwargs(name))
        assert net.width == 1536 and net.depth == 49 and net.additional_embed.shape[1] == 2 + grid ** 2
        assert 8.5e8 < sum(p.numel() for p in net.parameters()) < 8.8e8
