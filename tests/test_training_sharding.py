"""ParamLayout: the replicated layout in one process, and every sharded layout against the libraries' own full
state dicts (2 CPU processes through tests/sharded_launch.py running tests/sharded_layout_check.py)."""
import subprocess

import pytest
import torch

from conftest import ROOT
from libs.training.sharding import ParamLayout, replica_record
from training_runs import SHIM, env, sharded_launcher


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def test_replicated_layout_and_replica_record():
    model = _model()
    layout = ParamLayout('replicated', model, model, {n: p.shape for n, p in model.named_parameters()}, 0, 1)
    assert not layout.sharded and layout.local_numel == sum(p.numel() for p in model.parameters())
    full = layout.gather_full(layout.local_tensors())
    assert list(full) == list(model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(full.values(), model.state_dict().values()))
    assert all(torch.equal(layout.take_local(k, full[n]), p) for k, (n, p) in enumerate(model.named_parameters()))
    record = replica_record(layout, step=3, lr=0.1)
    total = sum(p.double().sum().item() for p in model.parameters())
    assert record['weight_checksums'] == [record['weight_checksum']] and abs(record['weight_checksum'] - total) < 1e-9


def test_names_must_match_the_model():
    model = _model()
    with pytest.raises(RuntimeError, match="parameters differ from the model's"):
        ParamLayout('replicated', model, model, {'0.weight': torch.Size([4, 3])}, 0, 1)


@pytest.mark.slow
@pytest.mark.parametrize('mode', ['fsdp1', 'fsdp2', 'fsdp2_bf16', 'zero2', 'zero2_bf16'])
def test_sharded_layouts_assemble_what_the_libraries_gather(tmp_path, mode):
    if mode.startswith('zero2'):
        pytest.importorskip('deepspeed', reason='the ZeRO path needs the extra: pip install -e ".[deepspeed]"')
    launcher = sharded_launcher(mode)
    assert launcher[-1] == SHIM
    proc = subprocess.run([*launcher, str(ROOT / 'tests' / 'sharded_layout_check.py')], env=env(tmp_path, use_cpu=False),
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count(f'layout ok: {mode.split("_")[0]}') == 2, proc.stdout
