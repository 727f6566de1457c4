"""train_ldm_discrete.py on image folders the tests write, end to end on CPU: class-conditional and unconditional
pixel-space runs resume bit-identically after a real kill and sample; the README's four commands (reference
statistics, features, training from the features with configs/image_folder_DiM_S.py, sampling by class name with
sample.py), and scoring with eval_ldm_discrete.py; damaged files named and counted in an on-the-fly latent run; data that does not fit the
config stopped before any step."""
import json
import os
import runpy
import subprocess
import sys

import pytest
import torch

import sample
from conftest import ROOT
from image_folders import folder_config, write_shapes, write_text_as_jpeg, write_truncated_jpeg
from libs import SamplingSpec, load_config, load_network, sample_images
from libs.data.image_folder import read_class_names
from tiny_assets import write_scoring_assets
from training_runs import env, records, run, run_and_kill_after, same_tree, state

pytestmark = pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')
TEMPLATE = str(ROOT / 'configs' / 'image_folder_DiM_S.py')
CLASSES = ('blue', 'red', 'yellow')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('folders')
    write_shapes(root / 'classes', classes=CLASSES, per_class=4)
    write_shapes(root / 'plain', classes=CLASSES, per_class=4, conditional=False)
    return root


@pytest.mark.parametrize('layout, num_classes', [('classes', 3), ('plain', 0)])
def test_runs_resume_exactly_after_a_kill_and_sample(folders, tmp_path, layout, num_classes):
    config = folder_config(tmp_path / 'config.py', folders / layout, num_classes, train=dict(n_steps=8))
    base = [f'--config={config}']
    run(tmp_path, tmp_path / 'straight', base=base)
    workdir = tmp_path / 'killed'
    killed_at = run_and_kill_after(tmp_path, workdir, 4, base=base)
    assert killed_at and killed_at[-1] < 8, killed_at
    out = run(tmp_path, workdir, base=base)
    assert f'resumed from {workdir}/ckpts/{killed_at[-1]}.ckpt' in out.stderr
    for name in ('nnet.pth', 'nnet_ema.pth', 'optimizer.pth', 'rng.pth'):
        assert same_tree(state(tmp_path / 'straight', 8, name), state(workdir, 8, name)), name

    names = list(CLASSES) if num_classes else []
    assert read_class_names(workdir) == read_class_names(workdir / 'ckpts') == names
    log = (workdir / 'output.log').read_text()
    assert f'image folder {folders / layout}: 12 images, ' in log
    assert [r['step'] for r in records(workdir) if 'loss' in r][-1] == 8

    cfg = load_config(config)
    nnet = load_network(cfg, str(workdir / 'ckpts' / '8.ckpt' / 'nnet_ema.pth'))
    spec = SamplingSpec.from_config(cfg)
    images = sample_images(nnet, spec, labels=[0, 2]) if num_classes else sample_images(nnet, spec, n=2)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_the_four_commands_of_the_readme(folders, tmp_path):
    """Reference statistics and features of the folder, training from the features with the template config, sampling
    classes by name with sample.py, and scoring with eval_ldm_discrete.py; a tiny VAE (8 px images <-> 4x4x4
    latents) and random Inception weights stand in for the real ones."""
    assets = write_scoring_assets(str(tmp_path))
    images, stats, features = folders / 'classes', tmp_path / 'stats.npz', tmp_path / 'features'
    runpy.run_path(str(ROOT / 'scripts' / 'fid_reference_stats.py'))['main'](
        [str(images), str(stats), '--resolution', '8', '--weights', assets['inception'], '--device', 'cpu',
         '--num-workers', '0'])
    runpy.run_path(str(ROOT / 'scripts' / 'extract_features.py'))['main'](
        [str(images), str(features), '--resolution', '8', '--vae', assets['vae'], '--device', 'cpu',
         '--num-workers', '0'])
    assert read_class_names(features) == list(CLASSES)

    values = {'dataset.path': str(features), 'dataset.fid_stat': str(stats), 'autoencoder.pretrained_path': assets['vae'],
              'z_shape': (4, 4, 4), 'nnet.sample_size': 4, 'nnet.attention_head_dim': 32, 'nnet.num_layers': 3,
              'nnet.num_embeds_ada_norm': 3, 'sample.n_samples': 4, 'sample.mini_batch_size': 4,
              'sample.sample_steps': 2}
    small = [f'--config.{key}={value}' for key, value in values.items()]
    workdir = tmp_path / 'run'
    run(tmp_path, workdir, '--config.train.n_steps=2', '--config.train.batch_size=8', '--config.train.save_interval=2',
        '--config.train.fid_interval=0', '--config.train.num_workers=0', base=[f'--config={TEMPLATE}', *small])
    assert read_class_names(workdir) == list(CLASSES)
    assert f'features {features}: 24 items, 3 classes from classes.json' in (workdir / 'output.log').read_text()

    nnet = workdir / 'ckpts' / '2.ckpt' / 'nnet_ema.pth'
    config_file = tmp_path / 'small_template.py'                # sample.py takes a config file, no overrides
    config_file.write_text(f"import runpy\n\n\ndef get_config():\n    config = runpy.run_path({TEMPLATE!r})['get_config']()\n"
                           + ''.join(f"    config.{key} = {value!r}\n" for key, value in values.items())
                           + "    return config\n")
    out = sample.main([f'--config={config_file}', f'--nnet_path={nnet}', '--classes', CLASSES[2], CLASSES[0].upper(),
                       '--n-per-class', '2', f'--out={tmp_path / "by_name"}'])
    assert sorted(os.listdir(out)) == ['0000_class2.png', '0001_class2.png', '0002_class0.png', '0003_class0.png',
                                       'grid.png']
    proc = subprocess.run([sys.executable, str(ROOT / 'eval_ldm_discrete.py'), f'--config={TEMPLATE}', *small,
                           f'--nnet_path={nnet}', f'--inception_path={assets["inception"]}',
                           f'--output_dir={tmp_path / "samples"}'],
                          env=env(tmp_path), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / 'samples' / 'results.json').read_text())
    assert results['n_samples'] == 4 and results['fid'] > 0
    assert sorted(os.listdir(tmp_path / 'samples'))[:4] == ['0.png', '1.png', '2.png', '3.png']


def test_damaged_files_are_named_and_counted_in_the_log(tmp_path):
    """Encoded on the fly by a tiny VAE, read by two loader workers: the text file named .jpg is skipped at the scan,
    the truncated JPEG replaced whenever it is drawn; both named, the counts in the log; the run finishes."""
    images = tmp_path / 'images'
    write_shapes(images, classes=('blue', 'red'), per_class=3)
    write_truncated_jpeg(images / 'red' / 'red_cut.jpg')
    write_text_as_jpeg(images / 'blue' / 'notes.jpg')
    assets = write_scoring_assets(str(tmp_path))
    config = folder_config(tmp_path / 'config.py', images, 2, resolution=8, z_shape=(4, 4, 4),
                           autoencoder=dict(pretrained_path=assets['vae']),
                           nnet=dict(in_channels=4, out_channels=4, patch_size=2, sample_size=4),
                           train=dict(batch_size=7, num_workers=2))                  # every item in every step
    proc = run(tmp_path, tmp_path / 'run', base=[f'--config={config}'])
    log = (tmp_path / 'run' / 'output.log').read_text()
    assert f"skipped {images / 'blue' / 'notes.jpg'}: not a readable image (UnidentifiedImageError" in log
    assert f'1 of 8 image files under {images} skipped: not readable images' in log
    assert f"damaged image {images / 'red' / 'red_cut.jpg'}: OSError: image file is truncated" in proc.stderr
    assert 'replaced by the next readable image of its class' in proc.stderr
    assert '1 damaged image file(s) met so far by this process' in proc.stderr
    assert state(tmp_path / 'run', 4, 'step.pth') == 4


@pytest.mark.parametrize('layout, num_classes, sections, message', [
    ('classes', 5, {}, "config.nnet.num_embeds_ada_norm=5 but data set 'image_folder' ({images}) has 3 classes "
                       "(blue, red, yellow): set config.nnet.num_embeds_ada_norm=3"),
    ('plain', 0, {'train': dict(mode='cond')}, "config.train.mode='cond' but data set 'image_folder' ({images}) has "
                                               "no classes"),
    ('plain', 0, {'sample': dict(cfg=True, scale=1.0)}, "config.sample.cfg=True needs a class-conditional run"),
], ids=['class count', 'cond mode', 'guidance'])
def test_data_that_does_not_fit_the_config_stops_the_run_before_any_step(folders, tmp_path, layout, num_classes,
                                                                          sections, message):
    config = folder_config(tmp_path / 'config.py', folders / layout, num_classes, **sections)
    workdir = tmp_path / 'bad'
    proc = run(tmp_path, workdir, base=[f'--config={config}'], check=False)
    assert proc.returncode != 0 and message.format(images=folders / layout) in proc.stderr, proc.stderr[-3000:]
    assert not workdir.exists()                                         # nothing written, no step trained
