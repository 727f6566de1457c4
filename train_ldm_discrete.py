"""Train DiM with the discrete-time latent diffusion objective.

    python train_ldm_discrete.py --config=configs/digits_DiM_tiny.py
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_ldm_discrete.py \
        --config=configs/imagenet256_H_DiM.py [--workdir=DIR] [--config.train.n_steps=...]

Restarting the same command resumes from the newest complete checkpoint in <workdir>/ckpts.
"""
import json
import logging
import os
import time

import torch
from absl import app, flags
from accelerate import Accelerator
from accelerate.utils import DistributedType, gather_object, set_seed
from ml_collections import config_flags
from torchvision.utils import save_image
from tqdm import tqdm

import sde
from libs import get_nnet
from libs.batching import StepBatchSampler
from libs.checkpoint import load_latest_checkpoint, save_checkpoint
from libs.config_loader import config_name
from libs.datasets import augment_batch, get_dataset
from libs.optim import ema_update, make_ema, make_lr_scheduler, make_optimizer
from libs.run_logging import MetricLog, plot_loss_curve, setup_logging
from libs.sampling import generate, grid_labels, index_noise, sampler_options, to_images

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration (a configs/*.py file).', lock_config=False)
flags.DEFINE_string('workdir', None, 'Output folder (default: workdir/<config name>/default).')
flags.mark_flags_as_required(['config'])


def latent_shape(config, dataset):
    """Shape of the diffusion variable the data set yields, after the autoencoder if any."""
    C, H, W = dataset.item_shape
    if dataset.kind == 'moments':
        return (C // 2, H, W)
    if config.get('autoencoder'):
        return (4, H // 8, W // 8)
    return (C, H, W)


class Trainer:
    """Holds the run state; `train()` runs the loop until config.train.n_steps."""

    def __init__(self, config, workdir):
        self.config, self.workdir = config, workdir
        tc = config.train
        self.accelerator = acc = Accelerator(gradient_accumulation_steps=config.get('gradient_accumulation_steps', 1))
        self.is_main = acc.is_main_process
        self.ckpt_root, self.sample_dir = os.path.join(workdir, 'ckpts'), os.path.join(workdir, 'samples')
        if self.is_main:
            os.makedirs(self.ckpt_root, exist_ok=True)
            os.makedirs(self.sample_dir, exist_ok=True)
            with open(os.path.join(workdir, 'config.json'), 'w') as f:
                f.write(config.to_json_best_effort(indent=2))
        acc.wait_for_everyone()
        setup_logging(workdir, self.is_main)
        self.conditional = tc.mode == 'cond'
        if tc.mode not in ('cond', 'uncond'):
            raise ValueError(f"config.train.mode={tc.mode!r}; expected 'cond' or 'uncond'")

        self.dataset = get_dataset(**config.dataset)
        self.autoencoder = None
        if config.get('autoencoder'):
            from libs.autoencoder import load_autoencoder
            self.autoencoder = load_autoencoder(config.autoencoder.pretrained_path, device=acc.device)
        elif self.dataset.kind == 'moments':
            raise ValueError(f"data set {config.dataset.name!r} holds latents: config.autoencoder is required")
        shape = latent_shape(config, self.dataset)
        if tuple(config.z_shape) != shape:
            raise ValueError(f"config.z_shape={tuple(config.z_shape)} but data set {config.dataset.name!r} gives "
                             f"{shape} (item shape {self.dataset.item_shape})")
        K = config.nnet.get('num_embeds_ada_norm', 1000)
        if K != self.dataset.num_classes:
            raise ValueError(f"config.nnet.num_embeds_ada_norm={K} but the data set has {self.dataset.num_classes} classes")

        self.step, states = load_latest_checkpoint(self.ckpt_root)
        set_seed(config.seed)                           # the initial weights (DDP broadcasts rank 0's anyway)
        nnet_cfg = config.nnet.to_dict()
        if states is not None:
            nnet_cfg.pop('pretrained_path', None)        # the checkpoint supersedes the initial weights
        self.nnet = get_nnet(**nnet_cfg)
        self.nnet.gradient_checkpointing = bool(config.get('gradient_checkpointing', False))
        self.ema = make_ema(self.nnet)
        self.optimizer = make_optimizer(self.nnet.parameters(), **config.optimizer)
        self.lr_scheduler = make_lr_scheduler(self.optimizer, **config.lr_scheduler)
        self.generator = torch.Generator().manual_seed(config.seed * 1000 + acc.process_index)
        self.data_fingerprint, self.fingerprint_logged = None, False
        self.start_time, self.samples_per_sec = time.time(), 0.0
        if states is not None:
            self._restore(states)
        self.nnet.to(acc.device)
        self.ema.to(acc.device)
        self.nnet, self.optimizer = acc.prepare(self.nnet, self.optimizer)
        # DeepSpeed ZeRO and FSDP shard the optimiser state: each process keeps its own part.
        self.sharded = acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if states is not None:
            self._restore_optimizer(states['optimizer.pth'])
            logging.info('resumed from %s/%d.ckpt', self.ckpt_root, self.step)

        GA = acc.gradient_accumulation_steps
        self.sampler = StepBatchSampler(len(self.dataset), tc.batch_size, acc.process_index, acc.num_processes,
                                        seed=config.seed, start=self.step * GA)
        self.loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=self.sampler,
                                                  num_workers=tc.get('num_workers', 0),
                                                  persistent_workers=tc.get('num_workers', 0) > 0)
        self.metrics = MetricLog(workdir, config, f'dim_{config.dataset.name}', os.path.basename(os.path.dirname(workdir))) \
            if self.is_main else None
        n_params = sum(p.numel() for p in self.nnet.parameters())
        logging.info('DiM %s: %.2fM parameters; data %s (%d items), %d process(es), global batch %d x %d accumulation',
                     config.nnet.name, n_params / 1e6, config.dataset.name, len(self.dataset), acc.num_processes,
                     tc.batch_size, GA)
        logging.info('outputs in %s', os.path.abspath(workdir))

    # -------------------------------------------------------------------------------- state
    def _restore(self, states):
        self.nnet.load_state_dict(states['nnet.pth'])
        self.ema.load_state_dict(states['nnet_ema.pth'])
        self.lr_scheduler.load_state_dict(states['lr_scheduler.pth'])
        rng = states['rng.pth']
        rank = self.accelerator.process_index
        if rng['world_size'] == self.accelerator.num_processes:
            self.generator.set_state(rng['generators'][rank])
        else:
            logging.warning('checkpoint written by %d processes, now %d: data noise is reseeded',
                            rng['world_size'], self.accelerator.num_processes)
            self.generator.manual_seed(self.config.seed * 1000 + rank + 7919 * self.step)

    def _restore_optimizer(self, state):
        if self.sharded:
            if not isinstance(state, list) or len(state) != self.accelerator.num_processes:
                raise RuntimeError('the checkpoint\'s optimizer state was sharded over a different number of '
                                   'processes (or not sharded); resume with the same launch configuration')
            state = state[self.accelerator.process_index]
        self.optimizer.load_state_dict(state)

    def save(self):
        acc = self.accelerator
        generators = gather_object([self.generator.get_state()])
        nnet_state = acc.get_state_dict(self.nnet)              # gathered from all processes if sharded
        optimizer_state = gather_object([self.optimizer.state_dict()]) if self.sharded else self.optimizer.state_dict()
        if self.is_main:
            path = save_checkpoint(self.ckpt_root, self.step, {
                'nnet.pth': nnet_state,
                'nnet_ema.pth': self.ema.state_dict(),
                'optimizer.pth': optimizer_state,
                'lr_scheduler.pth': self.lr_scheduler.state_dict(),
                'step.pth': self.step,
                'rng.pth': {'world_size': acc.num_processes, 'generators': generators},
            }, keep=self.config.train.get('keep_ckpts'))
            logging.info('saved checkpoint %s', path)
        acc.wait_for_everyone()

    # -------------------------------------------------------------------------------- data
    @torch.no_grad()
    def to_latents(self, x):
        if self.dataset.kind == 'moments':
            return self.autoencoder.sample(x, generator=None if x.is_cuda else self.generator)
        if self.autoencoder is not None:
            return self.autoencoder.encode(x, mode='sample', generator=None if x.is_cuda else self.generator)
        return x

    def next_batch(self, it):
        x, y = next(it)
        x, y = augment_batch(x, y, self.dataset, self.config.dataset.get('p_uncond', 0.0), self.conditional,
                             self.generator)
        device = self.accelerator.device
        return self.to_latents(x.to(device)), y.to(device)

    # -------------------------------------------------------------------------------- loop
    def train_step(self, it):
        acc, losses = self.accelerator, []
        for _ in range(acc.gradient_accumulation_steps):
            z, y = self.next_batch(it)
            if self.data_fingerprint is None:
                self.data_fingerprint = z.double().sum().view(1)
            with acc.accumulate(self.nnet):
                loss = sde.diffusion_loss(self.nnet, z, y, generator=self.generator)
                acc.backward(loss.mean())
                if acc.sync_gradients:
                    max_norm = self.config.get('max_grad_norm') or float('inf')
                    grad_norm = acc.clip_grad_norm_(self.nnet.parameters(), max_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(acc.gather(loss.detach()))
        self.lr_scheduler.step()
        self.update_ema()
        self.step += 1
        loss = torch.cat(losses).mean().item()
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(
                f"training loss became {loss} at step {self.step}; stopping. The last complete checkpoint in "
                f"{self.ckpt_root} is kept (lower the learning rate or enable gradient clipping).")
        return loss, float('nan') if grad_norm is None else float(grad_norm)   # DeepSpeed clips itself

    def update_ema(self):
        decay, acc = self.config.train.get('ema_rate', 0.9999), self.accelerator
        if acc.distributed_type == DistributedType.FSDP:
            from torch.distributed.fsdp import FullyShardedDataParallel
            with FullyShardedDataParallel.summon_full_params(self.nnet, writeback=False):
                ema_update(self.ema, acc.unwrap_model(self.nnet), decay)
        else:
            ema_update(self.ema, acc.unwrap_model(self.nnet), decay)

    @torch.no_grad()
    def sample_grid(self):
        """Grid from the EMA model with the config's sampler and guidance; one row per class if conditional."""
        K, per_row = self.dataset.num_classes, self.config.train.get('grid_columns', 10)
        labels = grid_labels(K, per_row) if self.conditional else None
        n = len(labels) if self.conditional else 5 * per_row
        options = sampler_options(self.config, K)
        if not self.conditional:
            options.update(guidance=0.0, null_class=None)
        z = index_noise(range(n), tuple(self.config.z_shape), seed=self.config.seed)
        latents = generate(self.ema, z, labels, options, seed=self.config.seed)
        path = os.path.join(self.sample_dir, f'{self.step}.png')
        save_image(to_images(latents, self.autoencoder), path, nrow=per_row)
        return path, latents, labels

    @torch.no_grad()
    def digits_report(self):
        """report.json: classifier accuracy and Fréchet distance of EMA samples, n per class (libs/digits_report)."""
        from libs.digits_report import write_digits_report
        K, n = self.dataset.num_classes, self.config.train.get('report_per_class', 50)
        labels = torch.arange(K).repeat_interleave(n)
        options, batch = sampler_options(self.config, K), self.config.sample.mini_batch_size
        start, images = time.time(), []
        for b in range(0, len(labels), batch):
            idx = range(10 ** 6 + b, 10 ** 6 + min(b + batch, len(labels)))    # away from the grid's indices
            z = index_noise(idx, tuple(self.config.z_shape), seed=self.config.seed)
            images.append(to_images(generate(self.ema, z, labels[b:b + batch], options, self.config.seed, idx[0])))
        sampling_time = time.time() - start
        return write_digits_report(torch.cat(images), labels, self.workdir, extra=dict(
            step=self.step, train_wall_time_s=round(time.time() - self.start_time, 1),
            train_samples_per_sec=round(self.samples_per_sec, 1), sampler=options['algorithm'],
            sample_steps=options['steps'], guidance=options['guidance'],
            sampling_images_per_sec=round(len(labels) / sampling_time, 2)))

    def evaluate(self):
        path, _, _ = self.sample_grid()
        outputs = {'grid': path,
                   'loss_curve': plot_loss_curve(self.metrics.path, os.path.join(self.workdir, 'loss_curve.png'))}
        scores = {}
        if self.config.dataset.name == 'digits':
            outputs['report'] = self.digits_report()
            with open(outputs['report']) as f:
                report = json.load(f)
            scores = {k: report[k] for k in ('sample_accuracy', 'frechet_distance_digits')}
        self.metrics.log({'step': self.step, **scores, **{f'{k}_path': v for k, v in outputs.items()}},
                         images={'samples': path})
        logging.info('step %d: %s', self.step, ', '.join(f'{k} -> {v}' for k, v in outputs.items()))
        return outputs

    def train(self):
        tc, acc = self.config.train, self.accelerator
        it = iter(self.loader)
        bar = tqdm(total=tc.n_steps, initial=self.step, disable=not self.is_main, dynamic_ncols=True, desc='train')
        window_start, window, outputs = time.time(), [], {}
        while self.step < tc.n_steps:
            self.nnet.train()
            loss, grad_norm = self.train_step(it)
            window.append(loss)
            bar.update(1)
            if not self.fingerprint_logged:                                 # first step of this process
                prints = acc.gather(self.data_fingerprint.to(acc.device)).tolist()
                self.fingerprint_logged = True
                if self.is_main:
                    self.metrics.log({'step': self.step, 'data_fingerprints': prints})
            if self.step % tc.log_interval == 0 and self.is_main:
                rate = len(window) * tc.batch_size * acc.gradient_accumulation_steps / (time.time() - window_start)
                record = dict(step=self.step, loss=sum(window) / len(window), lr=self.lr_scheduler.get_last_lr()[0],
                              grad_norm=grad_norm, samples_per_sec=rate)
                self.metrics.log(record)
                self.samples_per_sec = rate
                bar.set_postfix(loss=f'{record["loss"]:.4f}', lr=f'{record["lr"]:.2e}', img_s=f'{rate:.1f}')
            if self.step % tc.log_interval == 0:
                window_start, window = time.time(), []
            last = self.step == tc.n_steps
            if self.step % tc.save_interval == 0 or last:
                self.save()
            if (self.step % tc.eval_interval == 0 or last) and self.is_main:
                outputs = self.evaluate()
            if self.step % tc.save_interval == 0 or self.step % tc.eval_interval == 0:
                window_start = time.time()
            acc.wait_for_everyone()
        bar.close()
        self._check_replicas()
        return outputs

    def _check_replicas(self):
        """All processes must end with identical weights (DDP keeps them in sync)."""
        acc = self.accelerator
        checksum = torch.stack([p.detach().double().sum() for p in acc.unwrap_model(self.nnet).parameters()]).sum()
        sums = acc.gather(checksum.view(1).to(acc.device)).tolist()
        if len(set(sums)) != 1:
            raise RuntimeError(f"processes ended with different weights: checksums {sums}")
        if self.is_main:
            self.metrics.log({'step': self.step, 'weight_checksums': sums})


def main(_):
    config = FLAGS.config
    name = config_name(config_flags.get_config_filename(FLAGS['config']))
    workdir = FLAGS.workdir or os.path.join('workdir', name, 'default')
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, workdir)
    outputs = trainer.train()
    if trainer.is_main:
        trainer.metrics.close()
        print(f"done: {trainer.step} steps. checkpoints: {os.path.abspath(trainer.ckpt_root)}")
        for key, path in outputs.items():
            print(f"  {key}: {os.path.abspath(path)}")
        print(f"  log: {os.path.abspath(trainer.metrics.path)}")
    # Tear the process group down before exit: left to the interpreter's shutdown, its threads can die mid-use
    # and abort a finished run (SIGABRT / SIGBUS seen with 2 gloo processes).
    trainer.accelerator.wait_for_everyone()
    trainer.accelerator.end_training()


if __name__ == '__main__':
    app.run(main)
