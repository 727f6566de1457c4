"""The accelerate launch: the Accelerator built for a config, and launches that cannot work refused at start-up.

Refused, each with a message that says how to launch instead:
- a launcher world size (WORLD_SIZE, set by torchrun / accelerate launch) that differs from accelerate's process
  count: the processes would each train alone and write the same workdir (e.g. CPU workers started through
  `--multi_gpu` without ACCELERATE_USE_CPU=1);
- an FSDP or DeepSpeed launch that accelerate turned into another mode (it does so silently on CPU processes);
- fp16 (its loss-scaler state is not checkpointed: a resumed run would not continue the same run);
- launch settings that contradict the config (gradient accumulation, DeepSpeed batch sizes and clipping) and
  DeepSpeed / FSDP set-ups the checkpoint code does not handle (ZeRO stage other than 2, offloading, FSDP1 without
  `use_orig_params`).
Under DeepSpeed the per-GPU micro-batch, gradient accumulation and clipping are set from the config.

On CUDA the training also turns on what the official training runs with (`configure_cuda`): TF32 matmuls and
convolutions (Ampere and newer) and cudnn.benchmark. CPU runs are left as they are.
"""
import contextlib
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from libs.training.config import check_batch_split

__all__ = ['LaunchError', 'make_accelerator', 'check_launch', 'check_compile', 'configure_cuda', 'forward_autocast', 'trains_in_bf16',
           'sharding_kind']

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """The launch cannot run this training correctly."""


CPU_HINT = ("On CPU processes launch with ACCELERATE_USE_CPU=1 set in the environment: "
            "ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N train_ldm_discrete.py ... "
            "(or --config_file configs/accelerate/cpu_2proc.yaml; accelerate does not pass a yaml's `use_cpu` on to "
            "the torchrun workers). On GPUs check that every process sees a GPU (torch.cuda.is_available()).")


def _env_flag(name):
    return os.environ.get(name, 'false').lower() in ('1', 'true', 'yes')


def check_launch(acc):
    """Raise LaunchError if accelerate's processes are not the launcher's, or the requested mode was dropped."""
    launched = int(os.environ.get('WORLD_SIZE', '1'))
    if launched != acc.num_processes:
        raise LaunchError(
            f"the launcher started {launched} processes (WORLD_SIZE={launched}) but accelerate runs "
            f"{acc.num_processes} ({acc.distributed_type.value}): each process would train alone and all would "
            f"write the same workdir. {CPU_HINT}")
    for flag, kind in (('ACCELERATE_USE_FSDP', DistributedType.FSDP), ('ACCELERATE_USE_DEEPSPEED', DistributedType.DEEPSPEED)):
        if _env_flag(flag) and acc.distributed_type != kind:
            raise LaunchError(
                f"the launch asks for {kind.value} ({flag}=true) but accelerate runs {acc.distributed_type.value}: "
                "accelerate enables FSDP and DeepSpeed only for GPU processes. Launch on GPUs, or use plain DDP on CPU "
                "(configs/accelerate/cpu_2proc.yaml).")
    if acc.mixed_precision == 'fp16' or _deepspeed_precision(acc) == 'fp16':
        raise LaunchError("mixed precision fp16 is not supported (its loss-scaler state is not checkpointed, so a "
                          "resumed run would differ); launch with --mixed_precision bf16 or no")


def check_compile(config, acc):
    """config.compile works on the replicated launches (one process, DDP); the sharded ones refuse it."""
    mode = config.get('compile', 'none')
    if mode != 'none' and sharding_kind(acc) != 'replicated':
        raise LaunchError(f"config.compile={mode!r} has not been tested under {sharding_kind(acc)} (FSDP and DeepSpeed "
                          "wrap the network's forward): use --config.compile=none with this launch, or plain DDP")


def sharding_kind(acc):
    """'replicated' (one process, DDP), 'fsdp1', 'fsdp2' or 'zero2': how parameters and optimizer state are laid out."""
    if acc.distributed_type == DistributedType.FSDP:
        return f'fsdp{acc.state.fsdp_plugin.fsdp_version}'
    if acc.distributed_type == DistributedType.DEEPSPEED:
        return 'zero2'
    return 'replicated'


def _deepspeed_precision(acc):
    if acc.distributed_type != DistributedType.DEEPSPEED:
        return None
    ds = acc.state.deepspeed_plugin.deepspeed_config
    if ds.get('fp16', {}).get('enabled') in (True, 'true'):
        return 'fp16'
    return 'bf16' if ds.get('bf16', {}).get('enabled') in (True, 'true') else 'no'


def _set_or_check(ds, key, value, what):
    current = ds.get(key, 'auto')
    if current == 'auto':
        ds[key] = value
    elif current != value:
        raise LaunchError(f"the DeepSpeed config has {key}={current!r} but {what} gives {value!r}; "
                          f"set it to 'auto' (filled from the config) or to {value!r}")


def _configure_deepspeed(acc, config):
    ds = acc.state.deepspeed_plugin.deepspeed_config
    zero = ds.get('zero_optimization', {})
    if zero.get('stage') != 2:
        raise LaunchError(f"DeepSpeed ZeRO stage {zero.get('stage')} is not supported: use stage 2 "
                          "(configs/accelerate/deepspeed_zero2.yaml), or FSDP to shard the parameters too")
    for part in ('offload_optimizer', 'offload_param'):
        if (zero.get(part) or {}).get('device', 'none') not in ('none', None):
            raise LaunchError(f"DeepSpeed {part} is not supported (set {part}_device: none)")
    if zero.get('elastic_checkpoint'):
        raise LaunchError("DeepSpeed elastic_checkpoint is not supported: each process saves its own optimizer shard")
    for section in ('optimizer', 'scheduler'):
        if section in ds:
            raise LaunchError(f"remove the '{section}' section from the DeepSpeed config: the training script builds "
                              "them from config.optimizer / config.lr_scheduler")
    GA, B = int(config.get('gradient_accumulation_steps', 1)), int(config.train.batch_size)
    _set_or_check(ds, 'gradient_accumulation_steps', GA, 'config.gradient_accumulation_steps')
    _set_or_check(ds, 'train_micro_batch_size_per_gpu', B // acc.num_processes,
                  f'config.train.batch_size={B} / {acc.num_processes} processes')
    _set_or_check(ds, 'train_batch_size', B * GA, f'config.train.batch_size x {GA} accumulation steps')
    clip = float(config.get('max_grad_norm') or 0.0)
    if ds.get('gradient_clipping', 'auto') == 'auto':
        ds['gradient_clipping'] = clip
    elif float(ds['gradient_clipping']) != clip:
        raise LaunchError(f"the DeepSpeed config has gradient_clipping={ds['gradient_clipping']} but "
                          f"config.max_grad_norm={config.get('max_grad_norm')}; make them equal")


def _check_fsdp(acc):
    plugin = acc.state.fsdp_plugin
    if plugin.fsdp_version == 1:
        if not plugin.use_orig_params:
            raise LaunchError("FSDP1 needs fsdp_use_orig_params: true (the EMA and checkpoints follow the original "
                              "parameters)")
        if getattr(plugin.cpu_offload, 'offload_params', False):
            raise LaunchError("FSDP parameter offloading is not supported (set fsdp_offload_params: false)")
    elif type(plugin.cpu_offload).__name__ == 'CPUOffloadPolicy':
        raise LaunchError("FSDP2 CPU offloading is not supported (set fsdp_offload_params: false)")


def make_accelerator(config):
    """The Accelerator for `config` (validated by libs.training.config first); raises LaunchError for bad launches."""
    GA = int(config.get('gradient_accumulation_steps', 1))
    acc = Accelerator(gradient_accumulation_steps=GA)
    check_launch(acc)
    check_compile(config, acc)
    check_batch_split(config, acc.num_processes)
    if acc.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(acc, config)
    elif acc.distributed_type == DistributedType.FSDP:
        _check_fsdp(acc)
    if acc.gradient_accumulation_steps != GA:
        raise LaunchError(f"the launch sets gradient accumulation to {acc.gradient_accumulation_steps} "
                          f"(ACCELERATE_GRADIENT_ACCUMULATION_STEPS or the DeepSpeed config) but "
                          f"config.gradient_accumulation_steps={GA}; make them equal")
    return acc


def configure_cuda(device):
    """On a CUDA device: TF32 for fp32 matmuls and cuDNN convolutions (used by Ampere and newer; NVIDIA_TF32_OVERRIDE=0
    in the environment turns it off) and cudnn.benchmark (the fastest convolution algorithms for the fixed training
    shapes), as the official training. Nothing elsewhere. Code that needs true fp32 (the FID Inception,
    libs.evaluation.fid.full_fp32) turns TF32 off around itself."""
    device = torch.device(device)
    if device.type != 'cuda':
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    major, minor = torch.cuda.get_device_capability(device)
    log.info('CUDA %s (compute capability %d.%d): TF32 matmuls and convolutions %s, cudnn.benchmark on',
             torch.cuda.get_device_name(device), major, minor,
             'on' if major >= 8 else 'allowed (no TF32 before Ampere)')


def trains_in_bf16(acc):
    """Whether the launch trains in bf16 (--mixed_precision bf16, or a DeepSpeed config with bf16 enabled)."""
    return _deepspeed_precision(acc) == 'bf16' or acc.mixed_precision == 'bf16'


def forward_autocast(acc):
    """Context for the network's forward: bf16 autocast when the launch trains in bf16, else nothing.

    accelerate wraps a prepared model's forward in autocast for DDP and FSDP1, but not under DeepSpeed (which casts
    the weights to bf16) nor, in accelerate 1.15, under FSDP2 (whose mixed-precision policy computes with bf16
    weights): there the fp32 tensors the network makes inside its forward meet bf16 Linear weights. Nested inside
    accelerate's own autocast it changes nothing.
    """
    if trains_in_bf16(acc):
        return lambda: torch.autocast(device_type=acc.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
