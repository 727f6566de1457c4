"""The evaluation run of eval_ldm_discrete.py (and of the training's final evaluation): sample config.sample.n_samples
images into a folder of PNGs and score them against the config's reference (FID, sFID, IS, precision, recall; the
classifier report for digits).

Sample i's noise and class label depend only on (config.seed, i) (libs.sampling), and the images are made in fixed
batches of config.sample.mini_batch_size indices dealt round-robin to the processes, so any number of processes
writes the same `{i}.png` files. A restarted run skips batches whose images all exist (a partly written batch is
sampled again and only its missing images written). The folder gets `run.json` (what made the images; a folder
holding images of another run is refused unless `overwrite`) and `results.json` (metrics, the ones that could not be
computed and why, timings); `npz` adds `samples.npz`, the input of ADM's TensorFlow evaluator. The network runs
under the launch's autocast, the sampler and the VAE decoder in fp32.

Every process scores its own share: the Inception features of the images it samples (in memory, from the same
uint8 pixels its PNG writer thread stores) and of the already-written batches dealt to it (read back); the features
are gathered by sample index and every process computes the same metrics, so the scores do not depend on the
process count and no process waits alone while another scores.

The main process holds the folder's lock (libs.files.FolderLock, `run.lock`) for the whole run: a second evaluation
into the same folder stops at once, naming the first. With the first sampled batch, every process checks that the
folder has room for the images still to write (and samples.npz); a write that fails anyway names the file and the OS
error.
"""
import contextlib
import json
import logging
import os
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from accelerate.utils import DistributedType
from PIL import Image
from tqdm import tqdm

from libs.data.datasets import check_dataset_config
from libs.distributed import raise_if_any_failed
from libs.evaluation.adm_metrics import load_reference
from libs.evaluation.digits_report import write_digits_report
from libs.evaluation.fid import load_inception
from libs.evaluation.sample_files import (NPZ_NAME, PngWriter, check_folder_space, image_names, png_array,
                                          prepare_output_dir, read_png, write_adm_npz)
from libs.evaluation.sample_scorer import SampleScorer, to_uint8
from libs.files import FileChecks, FolderLock, file_sha256, write_json
from libs.config import check_top_level_keys
from libs.model.compile import check_compile_mode, compile_network
from libs.model.weights import load_network, weights_file
from libs.sampling import SamplingSpec, sample_batches

__all__ = ['run_evaluation', 'default_output_dir', 'metric_files']

# The last collective waits for the main process to write samples.npz (tens of GB at 512 px on a slow filesystem).
NPZ_BARRIER_TIMEOUT = timedelta(hours=4)
METRIC_NAMES = dict(fid='FID', sfid='sFID', inception_score='IS', precision='precision', recall='recall')


def default_output_dir(config, name, nnet_path):
    """config.sample.path if set, else workdir/<config name>/eval/<nnet folder>_<nnet file stem>."""
    if config.sample.get('path'):
        return config.sample.path
    parent = os.path.basename(os.path.dirname(os.path.abspath(nnet_path)))
    stem = os.path.splitext(os.path.basename(nnet_path))[0]
    return os.path.join('workdir', name, 'eval', f'{parent}_{stem}')


def metric_files(config, inception_path, device, load):
    """What scores the images, loaded through `load` (a FileChecks): ('fid', (reference, inception)), or
    ('digits', None) for the digits data set (scored by libs.evaluation.digits_report)."""
    if config.dataset.name == 'digits':
        return 'digits', None
    if not config.dataset.get('fid_stat'):
        raise ValueError(f"config.dataset.fid_stat is not set: no reference statistics for the FID of "
                         f"{config.dataset.name!r} (make them with scripts/fid_reference_stats.py)")
    return 'fid', (load(load_reference, config.dataset.fid_stat), load(load_inception, inception_path, device))


def _digits_score(folder, spec, n):
    """The digits report's fields for the images 0..n-1 in folder (main process)."""
    images = []
    for i in range(n):
        with Image.open(os.path.join(folder, f'{i}.png')) as img:
            images.append(torch.from_numpy(np.asarray(img.convert('L'), np.float32) / 255))
    report = write_digits_report(torch.stack(images)[:, None], spec.labels(range(n)), folder)
    with open(report) as f:
        return {'digits_report': report, **json.load(f)}


def _scoring_batch(images, indices, done, folder):
    """(B, 3, H, W) uint8 images of `indices` as the folder holds them: those written earlier read back, the others
    the freshly sampled `images` (the pixels being written)."""
    images = images.expand(-1, 3, -1, -1)
    if not any(i in done for i in indices):
        return images
    return torch.stack([read_png(os.path.join(folder, f'{i}.png')) if i in done else image
                        for i, image in zip(indices, images)])


def _load_inputs(accelerator, config, spec, nnet_path, folder, inception_path, overwrite, name):
    """(metric, metric assets, network, autoencoder, lock), loaded on every process before any sampling (all missing
    files reported together); the main process takes the output folder's lock and prepares the folder."""
    error = metric = assets = nnet = autoencoder = None
    lock = FolderLock(folder, 'evaluation run')
    try:
        load = FileChecks()
        metric, assets = metric_files(config, inception_path, accelerator.device, load)
        nnet = load(load_network, config, nnet_path)
        if config.get('autoencoder'):
            from libs.data.autoencoder import load_autoencoder
            autoencoder = load(load_autoencoder, config.autoencoder.pretrained_path, device=accelerator.device)
        load.raise_if_missing()
        if accelerator.is_main_process:
            weights = weights_file(nnet_path)          # the file itself, or the one in a diffusers folder
            run = dict(config=name, nnet_path=os.path.abspath(nnet_path), nnet_bytes=os.path.getsize(weights),
                       nnet_sha256=file_sha256(weights),
                       autoencoder=config.autoencoder.pretrained_path if autoencoder is not None else None,
                       mixed_precision=accelerator.mixed_precision, n_samples=int(config.sample.n_samples),
                       **spec.record())
            lock.acquire()
            prepare_output_dir(folder, run, overwrite)
    except Exception as e:
        error = e
        lock.release()
    raise_if_any_failed(error, accelerator.device)
    return metric, assets, nnet, autoencoder, lock


def _check(accelerator, config):
    """(SamplingSpec, n_samples, compile mode) of `config`, every key checked before anything is loaded."""
    check_top_level_keys(config)
    check_dataset_config(**config.dataset)
    spec, n = SamplingSpec.from_config(config), int(config.sample.n_samples)
    if n < 1:
        raise ValueError(f"config.sample.n_samples={n} must be >= 1")
    compile_mode = check_compile_mode(config.get('compile', 'none'))
    if compile_mode != 'none' and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"config.compile={compile_mode!r} is not supported under {accelerator.distributed_type.value}"
                         " (untested): use --config.compile=none")
    return spec, n, compile_mode


def _write_and_score(nnet, spec, folder, batches, done, scorer, autoencoder, autocast, accelerator, npz_images):
    """Sample this process's share of the pending batches, write their missing PNGs and score them; then score its
    share of the complete batches from their files. With the first batch, the folder's free space is checked for
    every image still to write and `npz_images` images of samples.npz. Returns the sampling time (s)."""
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    pending = [b for b in batches if not all(i in done for i in b)]
    complete = [b for b in batches if all(i in done for i in b)]
    to_write = sum(i not in done for b in pending for i in b)
    start = time.time()
    with PngWriter(max_pending=4 * spec.mini_batch_size) as writer:
        for indices, images in sample_batches(nnet, spec, pending[rank::world], autoencoder=autoencoder,
                                              autocast=autocast, progress=dict(desc='sample', disable=not is_main)):
            images = to_uint8(images)
            if to_write:                                # the first batch: is there room for them all?
                check_folder_space(folder, to_write, png_array(images[0]), npz_images)
                to_write = 0
            for i, image in zip(indices, images):
                if i not in done:
                    writer.put(png_array(image), os.path.join(folder, f'{i}.png'))
            if scorer is not None:
                scorer.add(_scoring_batch(images, indices, done, folder), indices)
    sampling_time = time.time() - start
    if scorer is not None:
        for indices in tqdm(complete[rank::world], desc='score written images', unit='batch', disable=not is_main,
                            dynamic_ncols=True):
            scorer.add(torch.stack([read_png(os.path.join(folder, f'{i}.png')) for i in indices]), indices)
    return sampling_time


def run_evaluation(accelerator, config, nnet_path, output_dir=None, inception_path=None, overwrite=False,
                   name='config', npz=False, network_autocast=None):
    """Sample and score (see the module docstring) on every process of `accelerator`; returns the results dict on
    the main process, None on the others; ends with a collective call. `network_autocast`: a context factory the
    network runs in, besides the autocast accelerate gives a model of a --mixed_precision launch (the training
    passes its launch's, which also covers DeepSpeed and FSDP2)."""
    start = time.time()
    spec, n, compile_mode = _check(accelerator, config)
    folder = output_dir or default_output_dir(config, name, nnet_path)
    inception_path = inception_path or config.sample.get('inception_path') or None
    world = accelerator.num_processes
    npz_group = dist.new_group(backend='gloo', timeout=NPZ_BARRIER_TIMEOUT) if npz and world > 1 else None
    metric, assets, nnet, autoencoder, lock = _load_inputs(accelerator, config, spec, nnet_path, folder,
                                                           inception_path, overwrite, name)
    try:
        return _sample_and_score(accelerator, config, spec, folder, nnet, (metric, assets, autoencoder), nnet_path,
                                 dict(n=n, compile_mode=compile_mode, npz=npz, npz_group=npz_group, start=start,
                                      network_autocast=network_autocast))
    finally:
        lock.release()


def _sample_and_score(accelerator, config, spec, folder, nnet, inputs, nnet_path, run):
    """run_evaluation once its `inputs` (metric, metric assets, autoencoder) are loaded and the folder is locked;
    `run`: its settings (n, compile_mode, npz, npz_group, start, network_autocast)."""
    (metric, assets, autoencoder), world, n = inputs, accelerator.num_processes, run['n']
    compile_mode, npz, npz_group, start = run['compile_mode'], run['npz'], run['npz_group'], run['start']
    done, batches = set(image_names(folder)[0]), spec.index_batches(n)
    to_write = sum(i not in done for i in range(n))
    accelerator.wait_for_everyone()                  # every process has listed the folder before any writes
    # accelerate places no model on the device under an FSDP launch (the training's final evaluation runs in one)
    nnet = accelerator.prepare_model(nnet.to(accelerator.device), evaluation_mode=True)  # --mixed_precision autocast
    nnet = compile_network(nnet, compile_mode)
    logging.info('DiM %s (%.2fM parameters) from %s; %s, %d steps, guidance %g; %d images in batches of %d '
                 '(%d to make, %d done) on %d process(es), %s, compile %s', config.nnet.name,
                 sum(p.numel() for p in nnet.parameters()) / 1e6, nnet_path, spec.algorithm, spec.sample_steps,
                 spec.scale, n, spec.mini_batch_size, to_write, len(done), world, accelerator.device, compile_mode)
    scorer = SampleScorer(assets[1], n) if metric == 'fid' else None
    sampling_time, error = 0.0, None
    try:
        sampling_time = _write_and_score(nnet, spec, folder, batches, done, scorer, autoencoder,
                                         run['network_autocast'] or contextlib.nullcontext, accelerator,
                                         n if npz else 0)
    except Exception as e:
        error = e
    raise_if_any_failed(error, accelerator.device)   # every PNG of every process is written from here on
    score_start = time.time()
    metrics, not_computed = scorer.score(assets[0]) if scorer is not None else ({}, {})
    timings = dict(images_written=to_write, sampling_time_s=round(sampling_time, 2),
                   scoring_time_s=round(time.time() - score_start, 2),
                   images_per_s=round(to_write / sampling_time, 3) if to_write else None)
    results = None
    try:
        if accelerator.is_main_process:
            results = _report(metric, assets, metrics, not_computed, folder, spec, n, timings, start, nnet_path,
                              accelerator, npz)
    except Exception as e:
        error = e
    raise_if_any_failed(error, accelerator.device, group=npz_group)
    return results


def _summary(metric, results, not_computed):
    if metric != 'fid':
        return f"digits report {results['digits_report']}"
    summary = ', '.join(f'{METRIC_NAMES[k]} {results[k]:.4f}' for k in METRIC_NAMES if k in results)
    reasons = {}
    for k, why in not_computed.items():
        reasons.setdefault(why, []).append(k)
    return summary + ''.join(f'; no {", ".join(ks)}: {why}' for why, ks in reasons.items())


def _report(metric, assets, metrics, not_computed, folder, spec, n, timings, start, nnet_path, accelerator, npz):
    """Main process: checks the folder is complete, writes results.json (and samples.npz); returns the results."""
    device = accelerator.device
    ours, _ = image_names(folder)
    if sorted(ours) != list(range(n)):
        raise RuntimeError(f"{folder} holds {len(ours)} images, expected exactly 0.png ... {n - 1}.png")
    results = dict(metrics, metrics_not_computed=not_computed) if metric == 'fid' else _digits_score(folder, spec, n)
    if metric == 'fid':
        results.update(reference=os.path.abspath(assets[0].path))
    results.update(
        n_samples=n, sampler=spec.algorithm, steps=spec.sample_steps, guidance=spec.scale, **timings,
        wall_time_s=round(time.time() - start, 2), nnet_path=os.path.abspath(nnet_path),
        device=torch.cuda.get_device_name(device) if device.type == 'cuda' else device.type,
        num_processes=accelerator.num_processes, mixed_precision=accelerator.mixed_precision,
        images=os.path.abspath(folder))
    if npz:
        npz_path = os.path.join(os.path.abspath(folder), NPZ_NAME)
        shape = write_adm_npz(npz_path, [os.path.join(folder, f'{i}.png') for i in range(n)])
        results.update(npz=npz_path)
        logging.info('wrote %s: arr_0 uint8 %s', npz_path, 'x'.join(map(str, shape)))
    write_json(os.path.join(folder, 'results.json'), results)
    logging.info('%s over %d images; images in %s, results in %s', _summary(metric, results, not_computed), n,
                 os.path.abspath(folder), os.path.join(os.path.abspath(folder), 'results.json'))
    return results
