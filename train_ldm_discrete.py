"""Train DiM with the discrete-time latent diffusion objective.

    python train_ldm_discrete.py --config=configs/digits_DiM_tiny.py
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 train_ldm_discrete.py \
        --config=configs/imagenet256_H_DiM.py [--workdir=DIR] [--config.train.n_steps=...]
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml train_ldm_discrete.py --config=...

Restarting the same command resumes from the newest complete checkpoint in <workdir>/ckpts.
The pieces live in libs/training: config and launch checks, state and checkpoints, data, the step, evaluation.
"""
import logging
import os
import time

import torch
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from libs.config_loader import config_name
from libs.run_logging import MetricLog, setup_logging
from libs.training.config import check_config
from libs.training.data import TrainData
from libs.training.evaluation import Evaluator
from libs.training.launch import make_accelerator
from libs.training.state import TrainState, describe
from libs.training.step import TrainStep

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Training configuration (a configs/*.py file).', lock_config=False)
flags.DEFINE_string('workdir', None, 'Output folder (default: workdir/<config name>/default).')
flags.mark_flags_as_required(['config'])


class LossWindow:
    """Per-step values between two log records; stops the run at the first non-finite loss, naming its step."""

    def __init__(self, ckpt_root):
        self.ckpt_root, self.losses, self.grad_norm, self.start = ckpt_root, [], float('nan'), time.time()

    def add(self, step, loss, grad_norm):
        loss = loss.item()
        if not torch.isfinite(torch.tensor(loss)):
            raise FloatingPointError(
                f"training loss became {loss} at step {step}; stopping. The last complete checkpoint in "
                f"{self.ckpt_root} is kept (lower the learning rate or enable gradient clipping).")
        self.losses.append(loss)
        self.grad_norm = float('nan') if grad_norm is None else float(grad_norm)

    def restart(self):
        self.losses, self.start = [], time.time()


class Trainer:
    """A run of `config` in `workdir` on accelerator `acc`; `train()` runs until config.train.n_steps."""

    def __init__(self, config, workdir, acc):
        self.config, self.workdir, self.acc = config, workdir, acc
        self.is_main = acc.is_main_process
        self.ckpt_root = os.path.join(workdir, 'ckpts')
        if self.is_main:
            os.makedirs(self.ckpt_root, exist_ok=True)
            os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
            with open(os.path.join(workdir, 'config.json'), 'w') as f:
                f.write(config.to_json_best_effort(indent=2))
        acc.wait_for_everyone()
        setup_logging(workdir, self.is_main)
        self.data = TrainData(config, acc.device)
        self.state = TrainState(config, acc, self.ckpt_root)
        self.train_step = TrainStep(config, acc, self.state, self.data)
        self.metrics = MetricLog(workdir, config, f'dim_{config.dataset.name}', os.path.basename(os.path.dirname(workdir))) \
            if self.is_main else None
        self.evaluate = Evaluator(config, workdir, self.data, self.metrics)
        self.start_time, self.samples_per_sec = time.time(), 0.0
        logging.info('DiM %s: %s; data %s (%d items), %d process(es), global batch %d x %d accumulation',
                     config.nnet.name, describe(self.state), config.dataset.name, len(self.data.dataset),
                     acc.num_processes, config.train.batch_size, acc.gradient_accumulation_steps)
        logging.info('outputs in %s', os.path.abspath(workdir))

    def _log_fingerprints(self):
        prints = self.acc.gather(self.train_step.data_fingerprint.to(self.acc.device)).tolist()
        if self.is_main:
            self.metrics.log({'step': self.state.step, 'data_fingerprints': prints})

    def _log_window(self, window):
        tc, acc = self.config.train, self.acc
        rate = len(window.losses) * tc.batch_size * acc.gradient_accumulation_steps / (time.time() - window.start)
        record = dict(step=self.state.step, loss=sum(window.losses) / len(window.losses), lr=self.state.lr,
                      grad_norm=window.grad_norm, samples_per_sec=rate)
        self.metrics.log(record)
        self.samples_per_sec = rate
        return record

    def _evaluate(self):
        ema = self.state.ema.module(dst=0)             # gathered from the shards if sharded (every process)
        outputs = {}
        if self.is_main:
            outputs = self.evaluate(ema, self.state.step, dict(
                train_wall_time_s=round(time.time() - self.start_time, 1),
                train_samples_per_sec=round(self.samples_per_sec, 1)))
        self.acc.wait_for_everyone()                    # the main process sampled alone
        return outputs

    def train(self):
        tc, st = self.config.train, self.state
        batches = iter(self.data.loader(self.acc.process_index, self.acc.num_processes,
                                        st.step * self.acc.gradient_accumulation_steps))
        bar = tqdm(total=tc.n_steps, initial=st.step, disable=not self.is_main, dynamic_ncols=True, desc='train')
        window, outputs, first = LossWindow(self.ckpt_root), {}, True
        while st.step < tc.n_steps:
            st.nnet.train()
            loss, grad_norm = self.train_step(batches)
            window.add(st.step, loss, grad_norm)
            bar.update(1)
            if first:                                   # first step of this process
                self._log_fingerprints()
                first = False
            if st.step % tc.log_interval == 0:
                if self.is_main:
                    record = self._log_window(window)
                    bar.set_postfix(loss=f'{record["loss"]:.4f}', lr=f'{record["lr"]:.2e}',
                                    img_s=f'{record["samples_per_sec"]:.1f}')
                window.restart()
            last = st.step == tc.n_steps
            if st.step % tc.save_interval == 0 or last:
                path = st.save(keep=tc.get('keep_ckpts'))
                if path:
                    logging.info('saved checkpoint %s', path)
            if st.step % tc.eval_interval == 0 or last:
                outputs = self._evaluate()
            if st.step % tc.save_interval == 0 or st.step % tc.eval_interval == 0:
                window.start = time.time()
        bar.close()
        record = st.replica_record()
        if self.is_main:
            self.metrics.log({'step': st.step, **record})
        return outputs


def main(_):
    config = FLAGS.config
    check_config(config)                                # before any heavy work
    name = config_name(config_flags.get_config_filename(FLAGS['config']))
    workdir = FLAGS.workdir or os.path.join('workdir', name, 'default')
    acc = make_accelerator(config)                      # refuses launches that cannot work
    os.makedirs(workdir, exist_ok=True)
    trainer = Trainer(config, workdir, acc)
    outputs = trainer.train()
    if trainer.is_main:
        trainer.metrics.close()
        print(f"done: {trainer.state.step} steps. checkpoints: {os.path.abspath(trainer.ckpt_root)}")
        for key, path in outputs.items():
            print(f"  {key}: {os.path.abspath(path)}")
        print(f"  log: {os.path.abspath(trainer.metrics.path)}")
    # Tear the process group down before exit: left to the interpreter's shutdown, its threads can die mid-use
    # and abort a finished run (SIGABRT / SIGBUS seen with 2 gloo processes).
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == '__main__':
    app.run(main)
