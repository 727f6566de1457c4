"""benchmarks/training_fid.py runs end to end (1 process, 4 samples, 2 sampler steps) and writes finite results."""
import json
import math

import pytest

from benchmarks import training_fid


@pytest.mark.slow               # a full train_ldm_discrete.py run: about 40-60 s on 2 cores
def test_training_fid_benchmark_writes_a_finite_time_and_fid(tmp_path):
    out = tmp_path / 'training_fid.json'
    training_fid.main(['--n', '4', '--steps', '2', '--batch', '2', '--processes', '1', '--out', str(out)])
    results = json.loads(out.read_text())
    assert results['n'] == 4 and [c['processes'] for c in results['cases']] == [1]
    case = results['cases'][0]
    assert math.isfinite(case['fid_time_s']) and case['fid_time_s'] > 0
    assert math.isfinite(case['fid']) and case['step'] == 2
    assert case['s_per_1000'] == pytest.approx(case['fid_time_s'] * 250, abs=0.01)
