"""A training run: `train(config, workdir, name)` trains until config.train.n_steps, resuming from the newest
complete checkpoint in <workdir>/ckpts.

At every config.train.save_interval steps (and the last step): a checkpoint. Every config.train.fid_interval steps
(default save_interval; 0: never) and at the last step, the score of the EMA network: FID on
config.sample.intermediate_n_samples samples (`fid<N>`; digits: the classifier report's Fréchet distance), kept in
<workdir>/best.json; at the end, the evaluation of eval_ldm_discrete.py (libs.evaluation.evaluate) of the best
checkpoint into <workdir>/eval/<step>.ckpt_nnet_ema. Every config.train.eval_interval steps (and the last), a sample
grid. A step is scored after its checkpoint is committed; a run stopped in between scores it when resumed.
config.compile (default, max-autotune, reduce-overhead) compiles the training network in place
(libs/model/compile.py; one process or DDP; the EMA network used for grids and scores stays eager).

On a cluster (docs/training-on-gpus.md, "Running on a cluster"): the main process holds the workdir's lock
(libs.files.FolderLock) from before anything is written to the end, so a second run on the same workdir stops at
once; a stop signal (config.train.stop_signals) ends the run after the step in progress with a checkpoint of it and
exit code 75 (libs.training.preemption; evaluations due at that step are left to the resumed run); and
config.train.save_every_minutes adds timed checkpoints.
"""
import logging
import os
import time

from tqdm import tqdm

from libs.distributed import broadcast_from_main, raise_if_any_failed
from libs.evaluation.evaluate import run_evaluation
from libs.files import FileChecks, FolderLock, writing
from libs.training.config import check_config, fid_interval
from libs.training.data import TrainData
from libs.training.evaluation import DIGITS_SCORES, FID_OFF_HINT, Evaluator, load_fid_files
from libs.training.history import ScoreHistory
from libs.training.launch import configure_cuda, forward_autocast, make_accelerator
from libs.training.preemption import RESUME_EXIT_CODE, RunControl, StopSignals, StoppedEarly, stop_signal_names
from libs.training.run_logging import MetricLog, setup_logging
from libs.training.state import TrainState, describe
from libs.training.step import StepValues, TrainStep

__all__ = ['Trainer', 'train', 'score_kind']

FINAL_METRICS = ('fid', 'sfid', 'inception_score', 'precision', 'recall', *DIGITS_SCORES)


def score_kind(config):
    """What scores a checkpoint: 'fid', 'digits' (the digits classifier report) or None (fid_interval=0)."""
    if fid_interval(config) == 0:
        return None
    return 'digits' if config.dataset.name == 'digits' else 'fid'


def load_inputs(config, acc, workdir):
    """(TrainData, FID files or None), loaded on every process before anything is written; every missing file is
    reported at once (naming its source), on every process alike."""
    error = data = fid_files = None
    try:
        load = FileChecks()
        data = load(TrainData, config, acc.device, forward_autocast(acc), workdir)
        if score_kind(config) == 'fid':
            fid_files = load_fid_files(config, acc.device, load)
        if load.missing and fid_files is not None and None in fid_files:
            load.missing.append(FID_OFF_HINT)
        load.raise_if_missing()
    except Exception as e:
        error = e
    raise_if_any_failed(error, acc.device)
    return data, fid_files


class Trainer:
    """A run of `config` (named `name`) in `workdir` on accelerator `acc`; `train()` runs until config.train.n_steps
    or a stop signal. `signals`: an active libs.training.preemption.StopSignals, or None (no graceful stop)."""

    def __init__(self, config, workdir, acc, name='config', signals=None, lock=None):
        self.config, self.workdir, self.acc, self.name = config, workdir, acc, name
        self.is_main = acc.is_main_process
        self.ckpt_root = os.path.join(workdir, 'ckpts')
        self.data, fid_files = load_inputs(config, acc, workdir)
        if lock is not None:                            # after the input checks, before anything is written
            _acquire(lock, acc)
        if self.is_main:
            os.makedirs(self.ckpt_root, exist_ok=True)
            os.makedirs(os.path.join(workdir, 'samples'), exist_ok=True)
            with writing(os.path.join(workdir, 'config.json')), open(os.path.join(workdir, 'config.json'), 'w') as f:
                f.write(config.to_json_best_effort(indent=2))
            self.data.write_class_names(workdir, self.ckpt_root)        # classes.json, for sampling by name
        acc.wait_for_everyone()
        self.control = RunControl(signals, config.train.get('save_every_minutes'), acc.device, self.is_main)
        self.stopped = None                             # (signal name, step, checkpoint path) after a stop
        setup_logging(workdir, self.is_main)
        self.data.log_summary()
        configure_cuda(acc.device)
        self.autocast = forward_autocast(acc)
        self.state = TrainState(config, acc, self.ckpt_root)
        self.train_step = TrainStep(config, acc, self.state, self.data)
        self.metrics = MetricLog(workdir, config, f'dim_{config.dataset.name}',
                                 os.path.basename(os.path.dirname(workdir))) if self.is_main else None
        self.kind = score_kind(config)
        self.evaluator = Evaluator(config, workdir, self.data.autoencoder, acc.process_index, acc.num_processes,
                                   self.autocast, fid_files)
        self.history = None
        if self.kind is not None:
            metric = self.evaluator.fid_name if self.kind == 'fid' else 'frechet_distance_digits'
            self.history = ScoreHistory(workdir, self.ckpt_root, metric, self.is_main)
            self.history.resume(self.state.step)
        self.start_time, self.samples_per_sec, self.postfix = time.time(), 0.0, {}
        logging.info('DiM %s: %s; data %s (%d items), %d process(es), global batch %d x %d accumulation',
                     config.nnet.name, describe(self.state), config.dataset.name, len(self.data.dataset),
                     acc.num_processes, config.train.batch_size, acc.gradient_accumulation_steps)
        logging.info('in-training score: %s', 'none (config.train.fid_interval=0)' if self.kind is None else
                     f'{self.history.metric} every {fid_interval(config)} steps and at the last, in '
                     f'{self.history.path}')
        logging.info('stop signals: %s; timed checkpoints: %s', ', '.join(signals.names) if signals and signals.names
                     else 'none (default actions)', f'every {self.control.period / 60:g} minutes'
                     if self.control.period else 'none')
        logging.info('outputs in %s', os.path.abspath(workdir))

    # ------------------------------------------------------------------------------------------------ schedule
    def _due(self, step, interval):
        return interval > 0 and (step % interval == 0 or step == self.config.train.n_steps)

    def due(self, step):
        """(save, grid, score): what step `step` makes."""
        tc = self.config.train
        return (self._due(step, tc.save_interval), self._due(step, tc.eval_interval),
                self.kind is not None and self._due(step, fid_interval(self.config)))

    # ------------------------------------------------------------------------------------------------ evaluation
    def _log_fingerprints(self):
        prints = self.acc.gather(self.train_step.data_fingerprint.to(self.acc.device)).tolist()
        if self.is_main:
            self.metrics.log({'step': self.state.step, 'data_fingerprints': prints})

    def _score(self, ema, step):
        """({metric: value, ...}, extra outputs) of the EMA network at `step`, on every process."""
        if self.kind == 'fid':
            return self.evaluator.fid(ema, step), {}
        scores, report = self.evaluator.digits_report(ema, step, dict(
            train_wall_time_s=round(time.time() - self.start_time, 1),
            train_samples_per_sec=round(self.samples_per_sec, 1)))
        return scores, {'report': report}

    def _evaluate(self, step, grid, score):
        """The sample grid and / or the score of the EMA network at `step` (every process samples its share)."""
        ema = self.state.ema.module(dst=None)             # gathered from the shards if sharded (every process)
        outputs, scores = {}, {}
        if grid:
            path = self.evaluator.sample_grid(ema, step)
            if self.is_main:
                outputs.update(grid=path, loss_curve=self.evaluator.loss_curve(self.metrics.path))
        if score:
            scores, extra = self._score(ema, step)
            self.history.add(step, scores)
            outputs.update(extra)
            if self.is_main:
                outputs.update(score_curve=self.evaluator.score_curve(self.history), best=self.history.path)
                self.postfix[self.history.metric] = f'{scores[self.history.metric]:.3f}'
        del ema
        if self.is_main:
            images = {'samples': outputs['grid']} if grid else None
            self.metrics.log({'step': step, **scores, **{f'{k}_path': v for k, v in outputs.items()}}, images=images)
            logging.info('step %d: %s', step, ', '.join(f'{k} -> {v}' for k, v in outputs.items()))
        return outputs

    def _catch_up(self):
        """Evaluations of the resumed checkpoint that a stopped run did not make (it stopped between saving the
        checkpoint and evaluating it); they are made from the resumed EMA, which is the checkpoint's."""
        step = self.state.step
        if step == 0:
            return {}
        _, grid, score = self.due(step)
        grid = grid and broadcast_from_main(self.is_main and not os.path.exists(self.evaluator.grid_path(step)))
        score = score and step not in self.history
        if not (grid or score):
            return {}
        logging.info('checkpoint %d was saved but not %s: doing it now', step,
                     ' nor '.join(w for w, due in (('sampled', grid), ('scored', score)) if due))
        return self._evaluate(step, grid, score)

    def _final_evaluation(self):
        """eval_ldm_discrete.py's full evaluation (config.sample.n_samples, sample_steps) of the best checkpoint's
        EMA weights into <workdir>/eval/<step>.ckpt_nnet_ema; skipped if best.json records it done."""
        if self.history is None or self.history.best_step is None:
            return {}
        best = self.history.best_step
        done = self.history.final
        if done is not None and done.get('step') == best and os.path.isfile(done.get('results', '')):
            logging.info('final evaluation of checkpoint %d already done: %s', best, done['results'])
            return {'final_evaluation': done['results']}
        nnet_path = os.path.join(self.state.checkpoint_path(best), 'nnet_ema.pth')
        folder = os.path.join(self.workdir, 'eval', f'{best}.ckpt_nnet_ema')
        logging.info('final evaluation of the best checkpoint (step %d, %s %.4f): %d samples into %s', best,
                     self.history.metric, self.history.best, self.config.sample.n_samples, folder)
        results = run_evaluation(self.acc, self.config, nnet_path, folder, self.config.sample.get('inception_path'),
                                 name=self.name, network_autocast=self.autocast)
        summary = None
        if self.is_main:
            summary = {'step': best, 'results': os.path.abspath(os.path.join(folder, 'results.json')),
                       'n_samples': results['n_samples'], **{k: results[k] for k in FINAL_METRICS if k in results}}
            self.metrics.log({'step': self.state.step, **{f'final_{k}': v for k, v in summary.items()}})
        self.history.set_final(broadcast_from_main(summary))
        return {'final_evaluation': self.history.final['results']}

    # ------------------------------------------------------------------------------------------------ loop
    def _save(self, interim):
        path = self.state.save(interim=interim)
        self.control.saved()
        if path:
            logging.info('saved checkpoint %s%s', path, f' ({interim})' if interim else '')

    def _interim_reason(self, decision, save):
        """Why a checkpoint outside the schedule is due at this step, or None."""
        if save or not (decision.stop or decision.save_for_time):
            return None
        if decision.stop:
            return f'stop signal {decision.signal_name}'
        return f'{self.control.minutes_since_save():.1f} minutes since the last save'

    def train(self):
        tc, st, acc = self.config.train, self.state, self.acc
        decision = self.control.poll(check_point=True)      # a signal during the set-up: stop before any step
        outputs = self._catch_up() if not decision.stop else {}
        decision = self.control.poll(check_point=True)
        start = st.step * acc.gradient_accumulation_steps
        batches = iter(self.data.loader(acc.process_index, acc.num_processes, start))
        bar = tqdm(total=tc.n_steps, initial=st.step, disable=not self.is_main, dynamic_ncols=True, desc='train')
        values, first = StepValues(self.ckpt_root), True
        while st.step < tc.n_steps and not decision.stop:
            st.nnet.train()
            loss, grad_norm = self.train_step(batches)
            values.add(st.step, loss, grad_norm)
            bar.update(1)
            if first:                                   # first step of this process
                self._log_fingerprints()
                first = False
            save, grid, score = self.due(st.step)
            logged = st.step % tc.log_interval == 0
            if logged:
                record = values.record(tc.batch_size * acc.gradient_accumulation_steps)
                self.samples_per_sec = record['samples_per_sec']
                if self.is_main:
                    self.metrics.log({'step': st.step, **record, 'lr': st.lr})
                    self.postfix.update(loss=f'{record["loss"]:.4f}', lr=f'{st.lr:.2e}',
                                        img_s=f'{record["samples_per_sec"]:.1f}')
                    bar.set_postfix(self.postfix)
            decision = self.control.poll(check_point=logged or save or grid or score)
            interim = self._interim_reason(decision, save)
            evaluate = (grid or score) and not decision.stop    # a stopping run leaves them to the resumed one
            if not (save or interim or evaluate):
                continue
            if not logged:
                values.read()                           # a non-finite loss stops the run before any save
            began = time.time()
            if save or interim:
                self._save(interim)
            outputs.update(self._evaluate(st.step, grid, score) if evaluate else {})
            st.prune(tc.get('keep_ckpts'), protect={self.history.best_step} if self.history else ())
            values.exclude_time(time.time() - began)
            if self.is_main:
                bar.set_postfix(self.postfix)
            if not decision.stop:                       # a signal during the save or the evaluation: stop here
                decision = self.control.poll(check_point=True)
        values.read()
        bar.close()
        if decision.stop:
            return self._stop(decision, outputs)
        record = st.replica_record()
        if self.is_main:
            self.metrics.log({'step': st.step, **record})
        if self.control.signals is not None and self.control.signals.names:
            self.control.signals.restore()              # a stop signal ends the (resumable) final evaluation at once
        outputs.update(self._final_evaluation())
        return outputs

    def _stop(self, decision, outputs):
        """After a stop signal: the checkpoint of the step reached is on disk (or there is none at step 0)."""
        step = self.state.step
        path = self.state.checkpoint_path(step) if step else None
        self.stopped = (decision.signal_name, step, path)
        if self.is_main:
            self.metrics.log({'step': step, 'stopped_on_signal': decision.signal_name})
        return outputs


def _acquire(lock, acc):
    """The workdir's lock, taken by the main process (every process raises if it is held elsewhere)."""
    error = None
    if acc.is_main_process:
        try:
            lock.acquire()
        except Exception as e:
            error = e
    raise_if_any_failed(error, acc.device)


def _stop_message(trainer):
    signal_name, step, path = trainer.stopped
    where = f'checkpoint {path}' if path else 'no checkpoint (stopped before the first step)'
    return (f"stopped on {signal_name} at step {step} of {trainer.config.train.n_steps}: {where}. Run the same command "
            f"again to resume (exit code {RESUME_EXIT_CODE}: stopped early, resume me)")


def _report(trainer, outputs):
    """Main process: where the outputs went, or how the run stopped and how to resume it."""
    if not trainer.is_main:
        return
    trainer.metrics.close()
    if trainer.stopped:
        logging.warning('%s', _stop_message(trainer))
        return
    print(f"done: {trainer.state.step} steps. checkpoints: {os.path.abspath(trainer.ckpt_root)}")
    for key, path in outputs.items():
        print(f"  {key}: {os.path.abspath(path)}")
    print(f"  log: {os.path.abspath(trainer.metrics.path)}")


def train(config, workdir, name='config'):
    """Check `config`, build the launch's Accelerator and train in `workdir` until config.train.n_steps; prints where
    the outputs went (main process). Every process calls it. Raises StoppedEarly (a SystemExit with code 75) after
    a stop signal, once the checkpoint of the step reached is written."""
    check_config(config)                                # before any heavy work
    acc = make_accelerator(config)                      # refuses launches that cannot work
    lock = FolderLock(workdir, 'training run')          # the main process holds it from before the first write
    try:
        with StopSignals(stop_signal_names(config)) as signals:
            trainer = Trainer(config, workdir, acc, name, signals, lock)  # checks every input file, then writes
            outputs = trainer.train()
            _report(trainer, outputs)
            # Tear the process group down before exit: left to the interpreter's shutdown, its threads can die
            # mid-use and abort a finished run (SIGABRT / SIGBUS seen with 2 gloo processes).
            acc.wait_for_everyone()
            acc.end_training()
    finally:
        lock.release()
    if trainer.stopped:
        raise StoppedEarly(_stop_message(trainer))
    return outputs
