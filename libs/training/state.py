"""The state of a training run (network, optimiser, LR schedule, EMA, step, generators), saved and resumed by every
process.

Checkpoint layout, `<workdir>/ckpts/<step>.ckpt/` (the released layout plus rng.pth):
    nnet.pth, nnet_ema.pth   full fp32 state_dicts, official keys (assembled from the shards when sharded)
    lr_scheduler.pth, step.pth, rng.pth (every process's generator states)
    optimizer.pth            unsharded: the AdamW state_dict; sharded (FSDP, ZeRO-2): a manifest
                             {'sharded_by', 'world_size', 'shards'} naming the per-process files
    optimizer.rank<r>.pth    sharded only: process r's optimizer shard, written by process r
    interim.pth              only in a checkpoint saved outside the schedule (stop signal, save_every_minutes)
Writers are spread over the processes (nnet.pth: 0, nnet_ema.pth: 1, the unsharded optimizer.pth: 2) so that no
process waits long for another at the barrier that precedes the atomic rename (libs.training.checkpoint).

Before writing, the size of every process's files is summed and compared with the free space of the checkpoint
folder (one filesystem, shared by every process of a multi-node run); a write that fails anyway on any process
removes the staging folder and raises on every process, naming the file and the OS error.
Earlier checkpoints are never touched by a failed save.

Resume: every process opens the newest checkpoint it can read, memory-mapped (only its own optimizer shard), the
processes agree on the newest step all of them can read, and each takes its parts. A checkpoint of another launch
(sharded differently, another process count) stops the run with a message instead of restarting from step 0.
"""
import logging
import os
import shutil

import torch
import torch.distributed as dist
from accelerate.utils import set_seed

from libs.distributed import all_gather_object, failed_ranks, is_distributed, raise_if_any_failed
from libs.files import check_free_space, remove_path
from libs.model.build import get_nnet
from libs.model.compile import compile_in_place
from libs.model.memory_estimate import choose_recompute
from libs.training.checkpoint import (FILES, INTERIM_FILE, CheckpointError, checkpoint_bytes, commit, is_interim,
                                     latest_resumable, list_checkpoints, load_checkpoint, read_file,
                                     remove_stale_staging, staging_dir, staging_path, write_files)
from libs.training.ema import EMA, make_ema
from libs.training.launch import sharding_kind, trains_in_bf16
from libs.training.optimizer import load_optimizer_state, make_lr_scheduler, make_optimizer, optimizer_state
from libs.training.rng import RunRNG
from libs.training.sharding import ParamLayout, replica_record

__all__ = ['TrainState', 'shard_file']

log = logging.getLogger(__name__)


def shard_file(rank):
    return f'optimizer.rank{rank}.pth'


class TrainState:
    """Builds the run's state for `config` on accelerator `acc`, from the newest checkpoint in `ckpt_root` if any."""

    def __init__(self, config, acc, ckpt_root):
        self.config, self.acc, self.ckpt_root = config, acc, ckpt_root
        self.kind, self.rank, self.world = sharding_kind(acc), acc.process_index, acc.num_processes
        self.token = all_gather_object(os.urandom(4).hex())[0]        # names this run's staging folders
        self.step, states = latest_resumable(ckpt_root, self._open, agree=lambda s: min(all_gather_object(s)))

        set_seed(config.seed)                       # the initial weights, identical on every process
        self.nnet_config = config.nnet.to_dict()
        self.nnet_config.pop('pretrained_path', None)
        model = get_nnet(**(self.nnet_config if states is not None else config.nnet.to_dict()))
        model.gradient_checkpointing = bool(config.get('gradient_checkpointing', False))
        model.recompute = choose_recompute(config, acc.device, self.world, self.kind != 'replicated',
                                           trains_in_bf16(acc))
        full_shapes = {n: p.shape for n, p in model.named_parameters()}
        if set(model.state_dict()) != set(full_shapes):
            raise RuntimeError('the network has buffers; the EMA and checkpoint code handles parameters only')
        self.n_params = sum(s.numel() for s in full_shapes.values())
        if states is not None:
            model.load_state_dict(states['nnet.pth'])
        model.to(acc.device)                        # before the optimizer, which chooses its kernel by device
        optimizer = make_optimizer(model.parameters(), **config.optimizer)
        self.lr_scheduler = make_lr_scheduler(optimizer, **config.lr_scheduler)
        self.rng = RunRNG(config.seed, self.rank, acc.device)
        if states is not None:
            self.lr_scheduler.load_state_dict(states['lr_scheduler.pth'])
            self.rng.restore(states['rng.pth'], self.world, self.step)
        ema_module = make_ema(model) if self.kind == 'replicated' else None
        compile_in_place(model, config.get('compile', 'none'))      # the training forward; the EMA stays eager
        self.nnet, self.optimizer = acc.prepare(model, optimizer)
        self.layout = ParamLayout(self.kind, self.nnet, acc.unwrap_model(self.nnet), full_shapes, self.rank, self.world)
        self.ema = EMA(self.layout, module=ema_module, build_model=lambda: get_nnet(**self.nnet_config))
        if states is not None:
            self.ema.load_full_state_dict(states['nnet_ema.pth'])
            load_optimizer_state(self.kind, self.optimizer, states['optimizer_local'], self.rank, self.world)
            log.info('resumed from %s/%d.ckpt', ckpt_root, self.step)
        del states

    # ------------------------------------------------------------------------------------------------ resume
    def _open(self, path):
        """What this process needs from one checkpoint folder (memory-mapped); DamagedCheckpoint to skip it."""
        states = load_checkpoint(path, FILES)
        opt = states['optimizer.pth']
        manifest = opt if isinstance(opt, dict) and 'sharded_by' in opt else None
        if manifest is None and self.kind != 'replicated':
            raise CheckpointError(f"{path} was saved by an unsharded run (its optimizer.pth is one full state); "
                                  f"this launch shards it ({self.kind}): resume with the launch that wrote it")
        if manifest is not None and (manifest['sharded_by'], manifest['world_size']) != (self.kind, self.world):
            raise CheckpointError(
                f"{path} was saved by a {manifest['sharded_by']} run over {manifest['world_size']} processes, this "
                f"launch is {self.kind} over {self.world}: its sharded optimizer state fits only the launch that "
                "wrote it (same launch config and process count)")
        states['optimizer_local'] = read_file(path, shard_file(self.rank)) if manifest else opt
        return states

    # ------------------------------------------------------------------------------------------------ save
    def _writers(self):
        W = self.world
        writers = {'nnet.pth': 0, 'nnet_ema.pth': 1 % W, 'lr_scheduler.pth': 0, 'step.pth': 0, 'rng.pth': 0,
                   'optimizer.pth': 0 if self.layout.sharded else 2 % W}
        return writers

    def check_finite(self):
        """Raise FloatingPointError on every process if a weight or EMA value of any process is not finite
        (collective). One device-to-host read."""
        local = [t for t in (*self.layout.local_tensors(), *self.ema.tensors) if t.numel()]
        flag = torch.stack([torch.isfinite(t).all() for t in local]).all().to(torch.int32).view(1) if local else \
            torch.ones(1, dtype=torch.int32, device=self.layout.device)
        if is_distributed():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if not flag.item():
            raise FloatingPointError(
                f"the weights or their EMA hold non-finite values after step {self.step} (its loss and the earlier "
                f"ones were finite); stopping without saving checkpoint {self.step}. The last complete checkpoint in "
                f"{self.ckpt_root} is kept (lower the learning rate or enable gradient clipping).")

    def save(self, interim=None):
        """Write checkpoint `step` (every process calls it) after checking the weights are finite and that it fits
        the free space; returns its path on process 0, None elsewhere. `interim`: why a checkpoint outside the save
        schedule is made (recorded in interim.pth; `prune` removes it once a newer one exists). Old checkpoints are
        removed by `prune`. A failed write raises on every process (see the module docstring)."""
        self.check_finite()
        if self.rank == 0:
            for name in remove_stale_staging(self.ckpt_root, self.token):
                log.info('removed %s/%s, left by an interrupted save', self.ckpt_root, name)
        writers = self._writers()
        files = {}
        nnet_state = self.layout.gather_full(self.layout.local_tensors(), dst=writers['nnet.pth'])
        ema_state = self.ema.full_state_dict(dst=writers['nnet_ema.pth'])
        rng_states = all_gather_object(self.rng.state())
        if self.layout.sharded:
            files[shard_file(self.rank)] = optimizer_state(self.kind, self.optimizer)
            optimizer_file = {'sharded_by': self.kind, 'world_size': self.world,
                              'shards': [shard_file(r) for r in range(self.world)]}
        else:
            optimizer_file = optimizer_state(self.kind, self.optimizer) if self.rank == writers['optimizer.pth'] else None
        everything = {'nnet.pth': nnet_state, 'nnet_ema.pth': ema_state, 'optimizer.pth': optimizer_file,
                      'lr_scheduler.pth': self.lr_scheduler.state_dict(), 'step.pth': self.step,
                      'rng.pth': RunRNG.file_state(rng_states, self.rng.device_type)}
        files.update({name: obj for name, obj in everything.items() if writers[name] == self.rank})
        if interim and self.rank == 0:
            files[INTERIM_FILE] = {'reason': interim}
        need = sum(all_gather_object(checkpoint_bytes(files)))
        self._write(files, need)
        del nnet_state, ema_state, everything, files
        path, error = None, None
        if self.rank == 0:
            shards = [shard_file(r) for r in range(self.world)] if self.layout.sharded else []
            try:
                path = commit(self.ckpt_root, self.step, self.token, expect=shards)
            except OSError as e:
                remove_path(staging_path(self.ckpt_root, self.step, self.token))
                error = self._not_saved(e)
        raise_if_any_failed(error, self.layout.device)
        return path

    def _write(self, files, need):
        """Every process writes its `files` into the staging folder after the free-space check of the whole
        checkpoint (`need` bytes); then, collectively, all go on or all raise, process 0 removing the staging
        folder."""
        error = None
        try:
            check_free_space(self.ckpt_root, need, f'checkpoint {self.step} (all its files)')
            write_files(staging_dir(self.ckpt_root, self.step, self.token), files)
        except OSError as e:
            error = e
        failed = failed_ranks(error, self.layout.device)   # also the barrier before the rename
        if not failed:
            return
        if self.rank == 0:
            remove_path(staging_path(self.ckpt_root, self.step, self.token))
        if error is not None:
            raise self._not_saved(error)
        raise RuntimeError(f"checkpoint {self.step} not saved: process(es) {failed} could not write their files "
                           "(their error is in their log); nothing of it is left on disk, the earlier checkpoints are "
                           "untouched")

    def _not_saved(self, error):
        """`error` (an OSError of the save) with what became of the checkpoints."""
        kept = [s for s, _ in list_checkpoints(self.ckpt_root)]
        return type(error)(error.errno, f"checkpoint {self.step} not saved: {error}. Nothing of it is left on "
                                        f"disk; the earlier checkpoints in {self.ckpt_root} ({kept or 'none'}) are "
                                        "untouched")

    def prune(self, keep, protect=()):
        """Process 0: remove the interim checkpoints (made by a stop signal or save_every_minutes) older than the
        newest checkpoint, and all but the newest `keep` of the others (None: keep all), sparing the steps in
        `protect` (the best-FID checkpoint, evaluated at the end)."""
        if self.rank != 0:
            return
        ckpts = list_checkpoints(self.ckpt_root)
        scheduled = [c for c in ckpts if not is_interim(c[1])]
        doomed = [c for c in ckpts[:-1] if c not in scheduled] + (scheduled[:-keep] if keep is not None else [])
        for step, path in doomed:
            if step not in protect:
                shutil.rmtree(path, ignore_errors=True)

    def checkpoint_path(self, step):
        return os.path.join(self.ckpt_root, f'{step}.ckpt')

    # ------------------------------------------------------------------------------------------------ checks
    def replica_record(self):
        """The cross-process consistency check (libs.training.sharding.replica_record) as a log record."""
        return replica_record(self.layout, self.step, self.lr_scheduler.get_last_lr()[0])

    @property
    def lr(self):
        return self.lr_scheduler.get_last_lr()[0]


def describe(state):
    """One line for the start-up log: parameter count (of the full model) and how it is laid out."""
    layout = state.layout
    if not layout.sharded:
        return f'{state.n_params / 1e6:.2f}M parameters'
    return (f'{state.n_params / 1e6:.2f}M parameters, {state.kind}: this process holds '
            f'{layout.local_numel / 1e6:.2f}M of the fp32 weights, EMA and optimizer state')
