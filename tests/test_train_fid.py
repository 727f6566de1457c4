"""The in-training FID of train_ldm_discrete.py end to end on CPU: a tiny latent DiM trained on feature files made
by the test, decoded by a tiny random VAE and scored by a randomly initialised FID Inception against statistics
made by the test (nothing downloaded). 1 and 2 processes, SIGKILL between a checkpoint and its FID, resume,
the best step, the final evaluation, missing files."""
import json
import os

import numpy as np
import pytest

from libs import get_nnet
from libs.evaluation.adm_metrics import save_reference
from tiny_assets import write_config, write_scoring_assets
from training_runs import CPU_LAUNCH, records, run, run_and_kill_after

N_FID = 4           # samples of the in-training FID (2 batches of 2: one per process with 2 processes)
NNET = dict(name='Mamba_DiT_S_2', attention_head_dim=32, num_layers=3, in_channels=4, out_channels=4, patch_size=2,
            sample_size=4, num_embeds_ada_norm=1000)

pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('fid_assets'))
    paths = write_scoring_assets(root)
    paths.update(stats=os.path.join(root, 'fid_stats.npz'), features=os.path.join(root, 'features'))
    save_reference(paths['stats'], np.full(2048, 0.1), np.eye(2048))
    os.makedirs(paths['features'])
    rng = np.random.default_rng(0)
    for i in range(16):                                  # moments (mean | logvar) and a label, the official format
        np.savez(os.path.join(paths['features'], f'{i}.npy.npz'),
                 z=rng.normal(size=(8, 4, 4)).astype(np.float32), label=np.int64(rng.integers(1000)))
    paths['config'] = write_config(
        os.path.join(root, 'tiny_fid.py'), seed=7, z_shape=(4, 4, 4),    # the tiny VAE decodes them to 8x8 images
        autoencoder=dict(pretrained_path=paths['vae']), gradient_accumulation_steps=1, max_grad_norm=1.0,
        train=dict(n_steps=4, batch_size=4, mode='cond', log_interval=2, eval_interval=2, save_interval=2,
                   fid_interval=2, num_workers=0, grid_columns=2),
        optimizer=dict(name='adamw', lr=1e-3, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8),
        lr_scheduler=dict(name='customized', warmup_steps=0), nnet=NNET,
        dataset=dict(name='imagenet256_features', path=paths['features'], p_uncond=0.1,
                     fid_stat=paths['stats']),
        sample=dict(sample_steps=2, n_samples=N_FID, intermediate_n_samples=N_FID, mini_batch_size=2,
                    algorithm='dpm_solver', cfg=True, scale=0.4, path='', inception_path=paths['inception']))
    get_nnet(**NNET)                                     # the config builds
    return paths


def _history(workdir):
    best = json.loads((workdir / 'best.json').read_text())
    return best, {e['step']: e[f'fid{N_FID}'] for e in best['history']}


def test_fid_history_survives_a_kill_and_does_not_depend_on_the_process_count(assets, tmp_path):
    base = [f'--config={assets["config"]}']
    straight = tmp_path / 'straight'
    run(tmp_path, straight, launcher=CPU_LAUNCH, base=base)
    best, fids = _history(straight)
    assert sorted(fids) == [2, 4] and all(np.isfinite(v) and v > 0 for v in fids.values())
    assert best['metric'] == f'fid{N_FID}' and best['best_step'] == min(fids, key=fids.get)
    assert best['best'] == min(fids.values())
    logged = {r['step']: r[f'fid{N_FID}'] for r in records(straight) if f'fid{N_FID}' in r}
    assert logged == fids                                                   # log.jsonl has them too
    # The final evaluation of the best checkpoint (eval_ldm_discrete.py, n_samples = N_FID, same sampler): the
    # same images, so the same FID as the in-training one at that step.
    results = json.loads(open(best['final_evaluation']['results']).read())
    assert results['fid'] == fids[best['best_step']] and results['num_processes'] == 2
    assert sorted(os.listdir(os.path.dirname(best['final_evaluation']['results']))) == sorted(
        [f'{i}.png' for i in range(N_FID)] + ['run.json', 'run.lock', 'results.json'])

    # Killed right after checkpoint 2 is committed, before its grid and FID; resumed with ONE process.
    killed = tmp_path / 'killed'
    assert run_and_kill_after(tmp_path, killed, 2, launcher=CPU_LAUNCH, base=base) == [2]
    assert not (killed / 'best.json').exists() and not (killed / 'samples' / '2.png').exists()
    out = run(tmp_path, killed, base=base)
    assert f'resumed from {killed}/ckpts/2.ckpt' in out.stderr
    assert 'checkpoint 2 was saved but not sampled nor scored: doing it now' in out.stderr
    _, resumed = _history(killed)
    assert sorted(resumed) == [2, 4]
    assert resumed[2] == fids[2]                       # the same weights: the same FID with 1 and 2 processes
    assert (killed / 'samples' / '2.png').read_bytes() == (straight / 'samples' / '2.png').read_bytes()

    # A finished run restarted: nothing is scored again, the final evaluation is not redone.
    again = run(tmp_path, killed, base=base)
    assert 'final evaluation of checkpoint' in again.stderr and 'already done' in again.stderr
    assert [r['step'] for r in records(killed) if f'fid{N_FID}' in r] == [2, 4]
    assert _history(killed)[1] == resumed


def test_missing_inception_weights_or_statistics_stop_the_run_before_anything(assets, tmp_path):
    workdir = tmp_path / 'missing'
    args = [f'--config={assets["config"]}', f'--config.dataset.fid_stat={tmp_path}/none.npz',
            f'--config.sample.inception_path={tmp_path}/none.pth']
    proc = run(tmp_path, workdir, base=args, check=False)
    assert proc.returncode != 0
    assert f'FID reference statistics not found: {tmp_path}/none.npz' in proc.stderr
    assert 'fid_reference_stats.py' in proc.stderr                          # where statistics come from
    assert f'FID Inception weights not found: {tmp_path}/none.pth' in proc.stderr and 'pt_inception' in proc.stderr
    assert 'config.train.fid_interval=0' in proc.stderr
    assert not workdir.exists()                                             # nothing written, no step trained

    # fid_interval=0: trains without the statistics, no score, no final evaluation
    proc = run(tmp_path, workdir, *args[1:], '--config.train.fid_interval=0', '--config.train.n_steps=2',
               base=args[:1])
    assert 'in-training score: none' in proc.stderr
    assert sorted(os.listdir(workdir / 'ckpts')) == ['2.ckpt'] and not (workdir / 'best.json').exists()
    assert not (workdir / 'eval').exists()
