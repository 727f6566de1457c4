"""Sample a trained DiM into a folder of PNGs and score it: FID, sFID, Inception Score, precision and recall
(ADM's suite, libs/evaluation/adm_metrics.py) against the config's reference file.

    python eval_ldm_discrete.py --config=configs/imagenet256_H_DiM.py --nnet_path=PATH/nnet_ema.pth
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 eval_ldm_discrete.py \
        --config=configs/imagenet256_H_DiM.py --nnet_path=PATH/nnet_ema.pth [--config.sample.n_samples=10000] [--npz]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 eval_ldm_discrete.py ...   # CPU processes

Sample i's noise and class label depend only on (config.seed, i), and the images are made in fixed batches of
config.sample.mini_batch_size indices (dealt round-robin to the processes), so any number of processes writes
the same `{i}.png` files. Restarting the same command skips batches whose images all exist (a partly written batch is
sampled again and only its missing images written). The folder gets `run.json` (what made the images; a folder
holding images of another run is refused unless --overwrite) and `results.json` (metrics, the ones that could not be
computed and why, timings); --npz adds `samples.npz` (`arr_0`, uint8 N x H x W x 3), the input of ADM's TensorFlow
evaluator. The network runs under the autocast of --mixed_precision, the sampler and the VAE decoder in fp32;
--config.compile=default (or max-autotune, reduce-overhead) runs it through torch.compile (libs/model/compile.py).

Every process scores its own share: the Inception features of the images it samples (in memory, from the same
uint8 pixels that its PNG writer thread stores) and of the already-written batches dealt to it (read back), batch by
batch as the plan cuts them; the features are gathered by sample index and every process computes the same metrics,
so the scores do not depend on the process count and no process waits alone while another scores.
"""
import contextlib
import hashlib
import json
import logging
import os
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from absl import app, flags
from accelerate import Accelerator
from accelerate.utils import DistributedType
from ml_collections import config_flags
from PIL import Image
from tqdm import tqdm

from libs import get_nnet
from libs.evaluation.adm_metrics import load_reference
from libs.model.compile import check_compile_mode, compile_network
from libs.config import config_name
from libs.evaluation.fid import default_weights_path, load_inception
from libs.evaluation.sample_files import (NPZ_NAME, PngWriter, image_names, png_array, prepare_output_dir, read_png,
                               write_adm_npz, write_json)
from libs.evaluation.sample_scorer import SampleScorer, to_uint8
from libs.sampling import generate, index_labels, index_noise, sampler_options, to_images
from libs.model.weights import load_nnet_weights

FLAGS = flags.FLAGS
# The last collective waits for the main process to write samples.npz (tens of GB at 512 px on a slow filesystem).
NPZ_BARRIER_TIMEOUT = timedelta(hours=4)


def define_flags():
    config_flags.DEFINE_config_file('config', None, 'Sampling configuration (a configs/*.py file).', lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'Network weights (nnet_ema.pth), loaded strictly.')
    flags.DEFINE_string('inception_path', None, 'FID Inception weights (default: config.sample.inception_path if '
                        f'set, else {default_weights_path()}).')
    flags.DEFINE_string('output_dir', None, 'Image folder (default: config.sample.path if set, else '
                        'workdir/<config name>/eval/<nnet folder>_<nnet file stem>).')
    flags.DEFINE_bool('overwrite', False, 'Delete the images of another run found in the output folder.')
    flags.DEFINE_bool('npz', False, f'Also write the samples as <output_dir>/{NPZ_NAME} (arr_0: uint8 N x H x W x 3), '
                      "the input of ADM's evaluations/evaluator.py (the tool DiT and SiT report with).")
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
    """What to sample: batch b holds the indices [b * mini_batch, (b + 1) * mini_batch) of range(n_samples)
    (config.sample.n_samples unless `n_samples` is given: the training's in-training FID takes fewer)."""

    def __init__(self, config, n_samples=None):
        s = config.sample
        self.n, self.mini_batch = int(s.n_samples if n_samples is None else n_samples), int(s.mini_batch_size)
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
    """Load what the score needs: ('fid', (reference, inception)) or ('digits', None)."""
    # HOOK (digits demo): a pixel-space digits config is scored by libs/evaluation/digits_report.py (classifier accuracy)
    # instead of FID, when that module exists.
    if config.dataset.name == 'digits':
        try:
            import libs.evaluation.digits_report  # noqa: F401
            return 'digits', None
        except ImportError:
            pass
    if not config.dataset.get('fid_stat'):
        raise ValueError(f"config.dataset.fid_stat is not set: no reference statistics for the FID of "
                         f"{config.dataset.name!r} (make them with scripts/fid_reference_stats.py)")
    return 'fid', (load(load_reference, config.dataset.fid_stat), load(load_inception, inception_path, device))


def digits_score(folder, plan):
    """The digits report's fields for the images in folder (main process)."""
    from libs.evaluation.digits_report import write_digits_report  # HOOK (digits demo), see check_metric_files
    images = []
    for i in range(plan.n):
        with Image.open(os.path.join(folder, f'{i}.png')) as img:
            images.append(torch.from_numpy(np.asarray(img.convert('L'), np.float32) / 255))
    report = write_digits_report(torch.stack(images)[:, None], plan.labels(range(plan.n)), folder)
    with open(report) as f:
        return {'digits_report': report, **json.load(f)}


def raise_if_any_failed(accelerator, error, group=None):
    """Collective: every process says whether it failed; a failed one re-raises its error, the others raise too
    (so that none goes on to wait alone at the next collective)."""
    if accelerator.num_processes > 1:
        device = torch.device('cpu') if group is not None else accelerator.device
        flag = torch.tensor([int(error is not None)], device=device)
        flags = [torch.zeros_like(flag) for _ in range(accelerator.num_processes)]
        dist.all_gather(flags, flag, group=group)
        failed = [rank for rank, f in enumerate(flags) if f.item()]
    else:
        failed = [0] if error is not None else []
    if error is not None:
        raise error
    if failed:
        raise RuntimeError(f'process(es) {failed} failed (their error is in their log); stopping')


def scoring_batch(images, indices, done, folder):
    """(B, 3, H, W) uint8 images of `indices` as the folder holds them: those written earlier read back, the others
    the freshly sampled `images` (the pixels being written)."""
    images = images.expand(-1, 3, -1, -1)
    if not any(i in done for i in indices):
        return images
    return torch.stack([read_png(os.path.join(folder, f'{i}.png')) if i in done else image
                        for i, image in zip(indices, images)])


def evaluate(config, nnet_path, output_dir=None, inception_path=None, overwrite=False, name='config', npz=False):
    """Sample config.sample.n_samples images into output_dir and score them (see the module docstring); returns
    the results dict (main process) or None (other processes)."""
    accelerator = Accelerator()
    results = run_evaluation(accelerator, config, nnet_path, output_dir, inception_path, overwrite, name, npz)
    # Tear the process group down before exit: left to the interpreter's shutdown, its threads can die mid-use
    # and abort a finished run (SIGABRT / SIGBUS seen with 2 gloo processes). run_evaluation ended on a collective.
    accelerator.end_training()
    return results


def run_evaluation(accelerator, config, nnet_path, output_dir=None, inception_path=None, overwrite=False,
                   name='config', npz=False, network_autocast=None):
    """evaluate() on a given Accelerator (every process calls it); ends with a collective call.
    `network_autocast`: a context factory the network runs in, besides the autocast accelerate gives a model of a
    --mixed_precision launch (the training passes its launch's, which also covers DeepSpeed and FSDP2)."""
    start = time.time()
    is_main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    plan = SamplePlan(config)
    compile_mode = check_compile_mode(config.get('compile', 'none'))
    if compile_mode != 'none' and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"config.compile={compile_mode!r} is not supported under {accelerator.distributed_type.value}"
                         " (untested): use --config.compile=none")
    folder = output_dir or default_output_dir(config, name, nnet_path)
    inception_path = inception_path or config.sample.get('inception_path') or None
    npz_group = dist.new_group(backend='gloo', timeout=NPZ_BARRIER_TIMEOUT) if npz and world > 1 else None

    # Every input file is loaded (and so checked) on every process before any sampling; all missing ones are
    # reported together.
    error = metric = metric_assets = nnet = autoencoder = None
    try:
        load = FileChecks()
        metric, metric_assets = check_metric_files(config, inception_path, device, load)
        nnet = load(load_network, config, nnet_path)
        if config.get('autoencoder'):
            from libs.data.autoencoder import load_autoencoder
            autoencoder = load(load_autoencoder, config.autoencoder.pretrained_path, device=device)
        load.raise_if_missing()
        if is_main:
            run = dict(config=name, nnet_path=os.path.abspath(nnet_path), nnet_bytes=os.path.getsize(nnet_path),
                       nnet_sha256=file_sha256(nnet_path),
                       autoencoder=config.autoencoder.pretrained_path if autoencoder is not None else None,
                       mixed_precision=accelerator.mixed_precision, **plan.record())
            prepare_output_dir(folder, run, overwrite)
    except Exception as e:
        error = e
    raise_if_any_failed(accelerator, error)
    done = set(image_names(folder)[0])
    pending = [b for b in range(plan.n_batches) if not all(i in done for i in plan.indices(b))]
    complete = sorted(set(range(plan.n_batches)) - set(pending))
    to_write = sum(i not in done for b in pending for i in plan.indices(b))
    accelerator.wait_for_everyone()                  # every process has listed the folder before any writes

    # accelerate places no model on the device under an FSDP launch (the training's final evaluation runs in one)
    nnet = accelerator.prepare_model(nnet.to(device), evaluation_mode=True)   # autocast of --mixed_precision
    nnet = compile_network(nnet, compile_mode)
    n_params = sum(p.numel() for p in nnet.parameters())
    logging.info('DiM %s (%.2fM parameters) from %s; %s, %d steps, guidance %g; %d images in batches of %d '
                 '(%d to make, %d done) on %d process(es), %s, compile %s', config.nnet.name, n_params / 1e6, nnet_path,
                 plan.options['algorithm'], plan.options['steps'], plan.options['guidance'], plan.n,
                 plan.mini_batch, to_write, len(done), world, device, compile_mode)
    scorer = SampleScorer(metric_assets[1], plan.n) if metric == 'fid' else None
    sample_start = time.time()
    sampling_time = 0.0
    try:
        with PngWriter(max_pending=4 * plan.mini_batch) as writer:
            for b in tqdm(pending[rank::world], desc='sample', unit='batch', disable=not is_main,
                          dynamic_ncols=True):
                indices = plan.indices(b)
                z = index_noise(indices, plan.z_shape, plan.seed)
                latents = generate(nnet, z, plan.labels(indices), plan.options, plan.seed, indices[0],
                                   autocast=network_autocast or contextlib.nullcontext)
                images = to_uint8(to_images(latents, autoencoder))
                for i, image in zip(indices, images):
                    if i not in done:
                        writer.put(png_array(image), os.path.join(folder, f'{i}.png'))
                if scorer is not None:
                    scorer.add(scoring_batch(images, indices, done, folder), indices)
        sampling_time = time.time() - sample_start
        if scorer is not None:
            for b in tqdm(complete[rank::world], desc='score written images', unit='batch', disable=not is_main,
                          dynamic_ncols=True):
                indices = plan.indices(b)
                scorer.add(torch.stack([read_png(os.path.join(folder, f'{i}.png')) for i in indices]), indices)
    except Exception as e:
        error = e
    raise_if_any_failed(accelerator, error)          # every PNG of every process is written from here on
    score_start = time.time()
    metrics, not_computed = scorer.score(metric_assets[0]) if scorer is not None else ({}, {})
    scoring_time = time.time() - score_start
    results = None
    try:
        if is_main:
            timings = dict(images_written=to_write, sampling_time_s=round(sampling_time, 2),
                           scoring_time_s=round(scoring_time, 2),
                           images_per_s=round(to_write / sampling_time, 3) if to_write else None)
            results = report(metric, metric_assets, metrics, not_computed, folder, plan, timings, start, nnet_path,
                             accelerator, npz)
    except Exception as e:
        error = e
    raise_if_any_failed(accelerator, error, group=npz_group)
    return results


def report(metric, metric_assets, metrics, not_computed, folder, plan, timings, start, nnet_path, accelerator, npz):
    """Main process: checks the folder is complete, writes results.json (and samples.npz); returns the results."""
    device, world = accelerator.device, accelerator.num_processes
    ours, _ = image_names(folder)
    if sorted(ours) != list(range(plan.n)):
        raise RuntimeError(f"{folder} holds {len(ours)} images, expected exactly 0.png ... {plan.n - 1}.png")
    results = dict(metrics, metrics_not_computed=not_computed) if metric == 'fid' else digits_score(folder, plan)
    if metric == 'fid':
        results.update(reference=os.path.abspath(metric_assets[0].path))
    results.update(
        n_samples=plan.n, sampler=plan.options['algorithm'], steps=plan.options['steps'],
        guidance=plan.options['guidance'], **timings, wall_time_s=round(time.time() - start, 2),
        nnet_path=os.path.abspath(nnet_path),
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type,
        num_processes=world, mixed_precision=accelerator.mixed_precision, images=os.path.abspath(folder))
    if npz:
        npz_path = os.path.join(os.path.abspath(folder), NPZ_NAME)
        shape = write_adm_npz(npz_path, [os.path.join(folder, f'{i}.png') for i in range(plan.n)])
        results.update(npz=npz_path)
        logging.info('wrote %s: arr_0 uint8 %s', npz_path, 'x'.join(map(str, shape)))
    write_json(os.path.join(folder, 'results.json'), results)
    if metric == 'fid':
        names = dict(fid='FID', sfid='sFID', inception_score='IS', precision='precision', recall='recall')
        summary = ', '.join(f'{names[k]} {results[k]:.4f}' for k in names if k in results)
        reasons = {}
        for k, why in not_computed.items():
            reasons.setdefault(why, []).append(k)
        summary += ''.join(f'; no {", ".join(ks)}: {why}' for why, ks in reasons.items())
    else:
        summary = f"digits report {results['digits_report']}"
    logging.info('%s over %d images; images in %s, results in %s', summary, plan.n, os.path.abspath(folder),
                 os.path.join(os.path.abspath(folder), 'results.json'))
    return results


def main(_):
    logging.basicConfig(level=logging.INFO if int(os.environ.get('RANK', 0)) == 0 else logging.ERROR, force=True,
                        format='%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S')
    name = config_name(config_flags.get_config_filename(FLAGS['config']))
    evaluate(FLAGS.config, FLAGS.nnet_path, FLAGS.output_dir, FLAGS.inception_path, FLAGS.overwrite, name,
             FLAGS.npz)


if __name__ == '__main__':
    define_flags()
    app.run(main)
