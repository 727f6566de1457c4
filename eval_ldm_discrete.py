"""Sample a trained DiM into a folder of PNGs and score it (FID against the config's reference statistics).

    python eval_ldm_discrete.py --config=configs/imagenet256_H_DiM.py --nnet_path=PATH/nnet_ema.pth
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval_ldm_discrete.py \
        --config=configs/imagenet256_H_DiM.py --nnet_path=PATH/nnet_ema.pth [--config.sample.n_samples=10000]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval_ldm_discrete.py ...   # CPU processes

Sample i's noise and class label depend only on (config.seed, i), and the images are made in fixed batches of
config.sample.mini_batch_size indices (dealt round-robin to the processes), so any number of processes writes
the same `{i}.png` files. Restarting the same command skips batches whose images all exist (a partly written batch is
sampled again and only its missing images written). The folder gets `run.json` (what made the images; a folder
holding images of another run is refused unless --overwrite) and `results.json` (FID, timings). The network runs
under the autocast of --mixed_precision, the sampler and the VAE decoder in fp32.
"""
import hashlib
import json
import logging
import os
import re
import time

import numpy as np
import torch
from absl import app, flags
from accelerate import Accelerator
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from libs import get_nnet
from libs.config_loader import config_name
from libs.fid import IMAGE_EXTENSIONS, activation_statistics, default_weights_path, folder_activations, \
    frechet_distance, load_inception, load_statistics
from libs.sampling import generate, index_labels, index_noise, sampler_options, to_images
from libs.weights import load_nnet_weights

FLAGS = flags.FLAGS
_PNG = re.compile(r'^(0|[1-9]\d*)\.png$')
_TMP = re.compile(r'^\.\d+\.png\.\d+\.tmp$')
# run.json fields that may change between restarts of one run (they do not change which images are made).
_NOT_COMPARED = ('nnet_path', 'mini_batch_size')


def define_flags():
    config_flags.DEFINE_config_file('config', None, 'Sampling configuration (a configs/*.py file).', lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'Network weights (nnet_ema.pth), loaded strictly.')
    flags.DEFINE_string('inception_path', None, 'FID Inception weights (default: config.sample.inception_path if '
                        f'set, else {default_weights_path()}).')
    flags.DEFINE_string('output_dir', None, 'Image folder (default: config.sample.path if set, else '
                        'workdir/<config name>/eval/<nnet folder>_<nnet file stem>).')
    flags.DEFINE_bool('overwrite', False, 'Delete the images of another run found in the output folder.')
    flags.mark_flags_as_required(['config', 'nnet_path'])


def default_output_dir(config, name, nnet_path):
    if config.sample.get('path'):
        return config.sample.path
    parent = os.path.basename(os.path.dirname(os.path.abspath(nnet_path)))
    stem = os.path.splitext(os.path.basename(nnet_path))[0]
    return os.path.join('workdir', name, 'eval', f'{parent}_{stem}')


def file_sha256(path, chunk=1 << 24):
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_conditional(config):
    mode = config.get('train', {}).get('mode', 'cond')
    if mode not in ('cond', 'uncond'):
        raise ValueError(f"config.train.mode={mode!r}; expected 'cond' or 'uncond'")
    return mode == 'cond'


class SamplePlan:
    """What to sample: batch b holds the indices [b * mini_batch, (b + 1) * mini_batch) of range(n_samples)."""

    def __init__(self, config):
        s = config.sample
        self.n, self.mini_batch = int(s.n_samples), int(s.mini_batch_size)
        if self.n < 1 or self.mini_batch < 1:
            raise ValueError(f"config.sample.n_samples={self.n} and mini_batch_size={self.mini_batch} must be >= 1")
        self.seed, self.z_shape = int(config.seed), tuple(config.z_shape)
        self.K = int(config.nnet.get('num_embeds_ada_norm', 1000))
        self.conditional = is_conditional(config)
        self.vis_label = s.get('vis_label')
        if self.vis_label is not None and not (self.conditional and 0 <= self.vis_label < self.K):
            raise ValueError(f"config.sample.vis_label={self.vis_label} needs a conditional model and 0 <= label < "
                             f"{self.K}")
        self.options = sampler_options(config, self.K)
        if not self.conditional:
            self.options.update(guidance=0.0, null_class=None)
        self.n_batches = -(-self.n // self.mini_batch)

    def indices(self, b):
        return range(b * self.mini_batch, min((b + 1) * self.mini_batch, self.n))

    def labels(self, indices):
        """(B,) class labels (uniform over the K classes, or all vis_label), or None if unconditional."""
        if not self.conditional:
            return None
        if self.vis_label is not None:
            return torch.full((len(indices),), int(self.vis_label))
        return index_labels(indices, self.K, self.seed)

    def record(self):
        """The run.json fields that determine the images (with the nnet's hash added by the caller)."""
        o = self.options
        extra = {k: o[k] for k in ('multi_times', 'ug_theta', 'ug_eta', 'ug_T') if k in o}
        return dict(seed=self.seed, sampler=o['algorithm'], steps=o['steps'], guidance=o['guidance'],
                    n_samples=self.n, z_shape=list(self.z_shape), conditional=self.conditional,
                    vis_label=self.vis_label, mini_batch_size=self.mini_batch, **extra)


def image_names(folder):
    """{index: name} of the `{i}.png` files in folder, and the names of its other image files."""
    ours, others = {}, []
    for name in os.listdir(folder):
        match = _PNG.match(name)
        if match:
            ours[int(match.group(1))] = name
        elif name.lower().endswith(IMAGE_EXTENSIONS):
            others.append(name)
    return ours, sorted(others)


def prepare_output_dir(folder, run, overwrite):
    """Create the folder, or check that the images already in it come from this run; write run.json.

    Images of another run (or of an unknown one) are an error unless `overwrite`, which deletes them.
    """
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):                  # leftovers of an interrupted write
        if _TMP.match(name):
            os.remove(os.path.join(folder, name))
    ours, others = image_names(folder)
    if others:
        raise RuntimeError(f"{folder} holds image files not written by this script ({others[:5]}...); they would "
                           "count in the FID. Remove them or choose another --output_dir")
    run_file = os.path.join(folder, 'run.json')
    previous = None
    if os.path.isfile(run_file):
        with open(run_file) as f:
            previous = json.load(f)
    stale = sorted(i for i in ours if i >= run['n_samples'])
    if ours and previous is None:
        problem = f"holds {len(ours)} images but no run.json (unknown run)"
    else:
        diff = {k: (previous.get(k), v) for k, v in run.items()
                if ours and k not in _NOT_COMPARED and previous.get(k) != v}
        problem = (f"holds {len(ours)} images of another run; differences (before, now): {diff}" if diff else
                   f"holds images {stale[:5]}... beyond n_samples={run['n_samples']}" if stale else None)
    if problem:
        if not overwrite:
            raise RuntimeError(f"output folder {folder} {problem}. Pass --overwrite to delete them, or choose "
                               "another --output_dir")
        logging.warning('deleting %d images of another run in %s (--overwrite)', len(ours), folder)
        for name in [*ours.values(), 'results.json']:
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    _write_json(run_file, run)


def _write_json(path, obj):
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_png(image, path):
    """(C, H, W) float image in [0, 1] -> 8-bit PNG (as torchvision's save_image), written atomically."""
    array = image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f'.{name}.{os.getpid()}.tmp')
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(tmp, format='PNG')
    os.replace(tmp, path)


def load_network(config, nnet_path):
    """The config's DiM with `nnet_path` loaded strictly (its positional table interpolated if its grid differs)."""
    kwargs = {k: v for k, v in config.nnet.to_dict().items() if k != 'pretrained_path'}
    return load_nnet_weights(get_nnet(**kwargs), nnet_path).eval().requires_grad_(False)


class FileChecks:
    """Calls loaders, collecting their FileNotFoundErrors (which name the file and its source) to report at once."""

    def __init__(self):
        self.missing = []

    def __call__(self, loader, *args, **kwargs):
        try:
            return loader(*args, **kwargs)
        except FileNotFoundError as e:
            self.missing.append(str(e))

    def raise_if_missing(self):
        if self.missing:
            raise FileNotFoundError('\n'.join(self.missing))


def check_metric_files(config, inception_path, device, load):
    """Load what the score needs: ('fid', (mu, sigma, inception)) or ('digits', None)."""
    # HOOK (digits demo): a pixel-space digits config is scored by libs/digits_report.py (classifier accuracy)
    # instead of FID, when that module exists.
    if config.dataset.name == 'digits':
        try:
            import libs.digits_report  # noqa: F401
            return 'digits', None
        except ImportError:
            pass
    if not config.dataset.get('fid_stat'):
        raise ValueError(f"config.dataset.fid_stat is not set: no reference statistics for the FID of "
                         f"{config.dataset.name!r} (make them with scripts/fid_reference_stats.py)")
    stats = load(load_statistics, config.dataset.fid_stat) or (None, None)
    return 'fid', (*stats, load(load_inception, inception_path, device))


def score(kind, assets, folder, plan):
    """The metric of the images in folder: {'fid': ...} or the digits report's fields."""
    if kind == 'fid':
        mu_ref, sigma_ref, inception = assets
        mu, sigma = activation_statistics(folder_activations(folder, inception))
        return {'fid': frechet_distance(mu, sigma, mu_ref, sigma_ref)}
    from libs.digits_report import write_digits_report  # HOOK (digits demo), see check_metric_files
    images = []
    for i in range(plan.n):
        with Image.open(os.path.join(folder, f'{i}.png')) as img:
            images.append(torch.from_numpy(np.asarray(img.convert('L'), np.float32) / 255))
    report = write_digits_report(torch.stack(images)[:, None], plan.labels(range(plan.n)), folder)
    with open(report) as f:
        return {'digits_report': report, **json.load(f)}


def evaluate(config, nnet_path, output_dir=None, inception_path=None, overwrite=False, name='config'):
    """Sample config.sample.n_samples images into output_dir and score them; returns the results dict (main
    process) or None (other processes)."""
    start = time.time()
    accelerator = Accelerator()
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    plan = SamplePlan(config)
    folder = output_dir or default_output_dir(config, name, nnet_path)
    inception_path = inception_path or config.sample.get('inception_path') or None

    # Every input file is loaded (and so checked) before any sampling; all missing ones are reported together.
    load = FileChecks()
    metric, metric_assets = check_metric_files(config, inception_path, device, load) if is_main else (None, None)
    nnet = load(load_network, config, nnet_path)
    autoencoder = None
    if config.get('autoencoder'):
        from libs.autoencoder import load_autoencoder
        autoencoder = load(load_autoencoder, config.autoencoder.pretrained_path, device=device)
    load.raise_if_missing()
    if is_main:
        run = dict(config=name, nnet_path=os.path.abspath(nnet_path), nnet_bytes=os.path.getsize(nnet_path),
                   nnet_sha256=file_sha256(nnet_path),
                   autoencoder=config.autoencoder.pretrained_path if autoencoder is not None else None,
                   mixed_precision=accelerator.mixed_precision, **plan.record())
        prepare_output_dir(folder, run, overwrite)
    accelerator.wait_for_everyone()
    done = set(image_names(folder)[0])
    pending = [b for b in range(plan.n_batches) if not all(i in done for i in plan.indices(b))]
    to_write = sum(i not in done for b in pending for i in plan.indices(b))
    accelerator.wait_for_everyone()                  # every process has listed the folder before any writes

    nnet = accelerator.prepare_model(nnet, evaluation_mode=True)   # device, autocast of --mixed_precision
    n_params = sum(p.numel() for p in nnet.parameters())
    logging.info('DiM %s (%.2fM parameters) from %s; %s, %d steps, guidance %g; %d images in batches of %d '
                 '(%d to make, %d done) on %d process(es), %s', config.nnet.name, n_params / 1e6, nnet_path,
                 plan.options['algorithm'], plan.options['steps'], plan.options['guidance'], plan.n,
                 plan.mini_batch, to_write, len(done), world, device)
    sample_start = time.time()
    for b in tqdm(pending[rank::world], desc='sample', unit='batch', disable=not is_main, dynamic_ncols=True):
        indices = plan.indices(b)
        z = index_noise(indices, plan.z_shape, plan.seed)
        latents = generate(nnet, z, plan.labels(indices), plan.options, plan.seed, indices[0])
        for i, image in zip(indices, to_images(latents, autoencoder)):
            if i not in done:
                save_png(image, os.path.join(folder, f'{i}.png'))
    accelerator.wait_for_everyone()
    sampling_time = time.time() - sample_start
    results = None
    if is_main:
        results = score_and_report(metric, metric_assets, folder, plan, to_write, sampling_time, start, nnet_path, accelerator)
    # Tear the process group down before exit: left to the interpreter's shutdown, its threads can die mid-use
    # and abort a finished run (SIGABRT / SIGBUS seen with 2 gloo processes).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results


def score_and_report(metric, metric_assets, folder, plan, to_write, sampling_time, start, nnet_path, accelerator):
    """Main process: checks the folder is complete, scores it and writes results.json; returns the results."""
    device, world = accelerator.device, accelerator.num_processes
    ours, _ = image_names(folder)
    if sorted(ours) != list(range(plan.n)):
        raise RuntimeError(f"{folder} holds {len(ours)} images, expected exactly 0.png ... {plan.n - 1}.png")
    results = score(metric, metric_assets, folder, plan)
    results.update(
        n_samples=plan.n, sampler=plan.options['algorithm'], steps=plan.options['steps'],
        guidance=plan.options['guidance'], images_written=to_write, sampling_time_s=round(sampling_time, 2),
        images_per_s=round(to_write / sampling_time, 3) if to_write else None,
        wall_time_s=round(time.time() - start, 2), nnet_path=os.path.abspath(nnet_path),
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type,
        num_processes=world, mixed_precision=accelerator.mixed_precision, images=os.path.abspath(folder))
    _write_json(os.path.join(folder, 'results.json'), results)
    summary = f"FID {results['fid']:.4f}" if 'fid' in results else f"digits report {results['digits_report']}"
    logging.info('%s over %d images; images in %s, results in %s', summary, plan.n, os.path.abspath(folder),
                 os.path.join(os.path.abspath(folder), 'results.json'))
    return results


def main(_):
    logging.basicConfig(level=logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.ERROR, force=True,
                        format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    name = config_name(config_flags.get_config_filename(FLAGS['config']))
    evaluate(FLAGS.config, FLAGS.nnet_path, FLAGS.output_dir, FLAGS.inception_path, FLAGS.overwrite, name)


if __name__ == '__main__':
    define_flags()
    app.run(main)
