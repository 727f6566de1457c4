"""Training memory of DiM: bytes saved for backward (measured, and by design) and a per-GPU estimate per config.

Saved per token by one DiMBlock when it recomputes (the default whenever grad is enabled), with e the bytes of a
matmul operand (2 under bf16 autocast, 4 in fp32), D the width, Di = expand * D:
    4 D     the fp32 stream u, from which RMSNorm + adaLN are recomputed
    e D     the in_proj input (the modulated norm output)
    2 e Di  xz, from which the conv, dt and the scan are recomputed
    e Di    the out_proj input (the gated scan output)
    e D     the out_proj output, for the gradient of (1 + gate)
    2 e D   long-skip consumers only: the inputs of the skip linears
plus 16 D bytes per sample (shift/scale/gate and 1 + gate, fp32). With `gradient_checkpointing` a block keeps only its
fp32 input (4 D per token). Outside the blocks, per image token: the two smoothers' inputs, the output norm's input and
proj_out_2's input, (4 + 3e) D, plus the patch-embed input.

A block that does not recompute (`DiM.recompute = False`) keeps every intermediate: KEPT_EXTRA_PER_D more bytes per
token per unit of width (measured, benchmarks/activation_memory.py: 81 D in fp32, 65 D under bf16 autocast, with the
C scan kernel; the scan backends keep different chunk states, so this is an estimate). `choose_recompute` decides
config.recompute = 'auto' from these figures and the device's memory.
"""
import contextlib
import logging
import math

import torch

__all__ = ['SavedBytes', 'block_bytes_per_token', 'block_bytes_per_sample', 'head_bytes_per_image_token',
           'sequence_length', 'config_memory_estimate', 'choose_recompute', 'RECOMPUTE_MODES', 'GPU_BYTES',
           'OFFICIAL_GPUS']

log = logging.getLogger(__name__)

GPU_BYTES = 80e9          # the card the defaults are sized for (A100/H100 80 GB)
USABLE_FRACTION = 0.9     # the rest: CUDA context, allocator fragmentation, cuBLAS workspaces
OFFICIAL_GPUS = 8         # the official runs: 8 GPUs, train.batch_size global
# Backward of one block materialises a working set on top of what is saved, in fp32 tensors of width Di per token:
# peak-RSS slope over batch of a 3-layer H-width DiM on CPU under bf16 autocast, minus its saved bytes
# (benchmarks/activation_memory.py --peak): 9.8 with per-block recompute, 13-15 under whole-block checkpointing (the
# recomputed block keeps its full set while its backward runs).
WORKING_SET_DI_TENSORS = 10
WORKING_SET_DI_TENSORS_CHECKPOINTED = 15
KEPT_EXTRA_PER_D = {4: 81, 2: 65}      # bytes per token per layer per unit of width a non-recomputing block adds
RECOMPUTE_MODES = ('auto', 'on', 'off')
CPU_USABLE_FRACTION = 0.5              # of the memory available at start: the rest for data, the OS, other jobs


class SavedBytes(contextlib.AbstractContextManager):
    """`with SavedBytes(model) as saved: out = model(...)`: saved.bytes = bytes of the distinct storages that autograd
    saves for backward inside the `with` (the module's parameters excluded; their autocast copies included)."""

    def __init__(self, module=None):
        self._exclude = {p.untyped_storage().data_ptr() for p in module.parameters()} if module is not None else set()
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self):
        return sum(self._storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def block_bytes_per_token(width, expand=2, operand_bytes=2, skip=False):
    """Bytes one recomputing DiMBlock saves per token (module docstring); operand_bytes 2 (bf16) or 4 (fp32)."""
    if operand_bytes not in (2, 4):
        raise ValueError(f"operand_bytes must be 2 (bf16 autocast) or 4 (fp32), got {operand_bytes}")
    D, Di, e = width, expand * width, operand_bytes
    return 4 * D + e * D + 2 * e * Di + e * Di + e * D + (2 * e * D if skip else 0)


def block_bytes_per_sample(width):
    """Per-sample bytes of one block: the (3, D) shift/scale/gate and the (1, D) 1 + gate, fp32."""
    return 16 * width


def head_bytes_per_image_token(width, operand_bytes=2, patch_values=16):
    """Bytes saved outside the blocks per image token: smoothers, output norm, proj_out_2, patch embed."""
    return (4 + 3 * operand_bytes) * width + operand_bytes * patch_values


def sequence_length(h, w, d_conv=3, extra_tokens=2):
    """Tokens a block sees for an h x w token grid: extras, separators and the padded grid."""
    return extra_tokens + d_conv + (h + d_conv) * (w + d_conv)


def _nnet_shape(config):
    from .build import build_nnet
    kwargs = {k: v for k, v in config.nnet.to_dict().items() if k != 'pretrained_path'}
    with torch.device('meta'):
        model = build_nnet(**kwargs)
    return model, sum(p.numel() for p in model.parameters())


def config_memory_estimate(config, gpus=OFFICIAL_GPUS, operand_bytes=2):
    """Per-GPU training memory (bytes) of a config at its per-GPU batch, under bf16 autocast (operand_bytes 2) or
    in fp32 (4).

    Model state per GPU, P parameters: replicated (DDP) = fp32 weights, grads, DDP's gradient buckets, AdamW's two
    moments, the fp32 EMA copy and the autocast bf16 weight copies = 26 P; sharded over `gpus` (ZeRO-2 /
    FSDP SHARD_GRAD_OP) = weights 4 P + bf16 copies 2 P + (grads 4 P + AdamW 8 P + EMA 4 P) / gpus (the EMA is kept
    shard-locally, libs/training/ema.py).
    Activations = blocks + head (module docstring) + one block's backward working set; `activations_kept` the same
    when the blocks do not recompute (DiM.recompute = False). A config needs
    `gradient_checkpointing` when its activations do not fit next to the replicated state: the configs' default
    must work with a plain DDP launch (a sharded launch may have room without it; `fits_sharded` says).
    """
    model, n_params = _nnet_shape(config)
    batch = config.train.batch_size // gpus if gpus > 1 else config.train.batch_size
    if batch < 1:
        raise ValueError(f"train.batch_size={config.train.batch_size} is smaller than gpus={gpus}")
    _, H, W = config.z_shape
    p = model.patch_size
    h, w = H // p, W // p
    L = sequence_length(h, w, model.pad_len)
    D, blocks = model.width, model.transformer_blocks
    expand = blocks[0].attn1.d_inner // D
    per_token = sum(block_bytes_per_token(D, expand, operand_bytes, skip=b.skip_linear is not None) for b in blocks)
    per_sample = len(blocks) * block_bytes_per_sample(D) + h * w * head_bytes_per_image_token(
        D, operand_bytes, p * p * model.in_channels)
    di_tensor = 4 * expand * D * L
    activations = batch * (L * per_token + per_sample + WORKING_SET_DI_TENSORS * di_tensor)
    kept = activations + batch * L * len(blocks) * KEPT_EXTRA_PER_D[operand_bytes] * D
    checkpointed = batch * (L * 4 * D * len(blocks) + per_sample + WORKING_SET_DI_TENSORS_CHECKPOINTED * di_tensor)
    replicated, sharded = 26 * n_params, (6 + 16 / gpus) * n_params
    usable = USABLE_FRACTION * GPU_BYTES
    return dict(
        width=D, depth=len(blocks), tokens=L, batch_per_gpu=batch, parameters=n_params,
        bytes_per_token_per_layer=math.ceil(per_token / len(blocks)),
        activations=activations, activations_kept=kept, activations_checkpointed=checkpointed,
        state_replicated=replicated, state_sharded=int(sharded),
        fits_replicated=activations + replicated <= usable, fits_sharded=activations + sharded <= usable,
        fits_checkpointed=checkpointed + replicated <= usable,
        needs_checkpointing=activations + replicated > usable,
    )


def _device_memory(device):
    """Bytes a training process may use on `device`: the card's memory (CUDA), else the memory available now."""
    device = torch.device(device)
    if device.type == 'cuda':
        return USABLE_FRACTION * torch.cuda.get_device_properties(device).total_memory
    import psutil
    return CPU_USABLE_FRACTION * psutil.virtual_memory().available


def choose_recompute(config, device, processes=1, sharded=False, bf16=False):
    """Whether the training network recomputes in backward (DiM.recompute), from config.recompute:
    'on', 'off', or 'auto' (the default): keep every intermediate when the estimate of this process's activations
    without recompute and its model state fits the device's memory, recompute otherwise. Logs the choice with its
    figures. The choice changes no number, only memory and speed."""
    mode = config.get('recompute', 'auto')
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"config.recompute={mode!r}; expected one of {', '.join(map(repr, RECOMPUTE_MODES))}")
    if mode != 'auto':
        log.info('activations: recompute %s (config.recompute=%r)', mode, mode)
        return mode == 'on'
    est = config_memory_estimate(config, processes, operand_bytes=2 if bf16 else 4)
    state = est['state_sharded'] if sharded else est['state_replicated']
    need, have = est['activations_kept'] + state, _device_memory(device)
    recompute = need > have
    log.info('activations: %s (config.recompute=auto: about %.2f GB of activations and state without recompute, '
             '%.2f GB usable on %s)', 'recompute in backward' if recompute else 'keep every intermediate', need / 1e9,
             have / 1e9, torch.device(device).type)
    return recompute
