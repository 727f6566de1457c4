"""DiM backbone: a U-shaped stack of Mamba blocks over a padded 2-D token grid.

Module names, parameter shapes and state_dict order are those of the official `Mamba2DModel`
checkpoints (`nnet_ema.pth`). The residual stream is kept in fp32; under autocast only the linear
layers run in low precision. docs/architecture.md describes the network section by section.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .mixer import MambaMixer
from .scan_order import layer_patterns, sequence_layout, skip_layers

__all__ = ['DiM', 'timestep_sincos', 'interpolate_pos_table']

N_EXTRA = 2          # time token, class token
SKIP_TUNE_T = 1e-3   # the official code feeds ones_like(t) / 1000 to skip-tune, not t / 1000


#################################################################################
#                          Embeddings and normalisation                         #
#################################################################################

def timestep_sincos(t, dim, max_period=10000):
    """(B,) timesteps on the 0-1000 scale -> (B, dim) fp32 [cos | sin] features."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def interpolate_pos_table(table, h, w):
    """(1, X + s*s, D) table -> (1, X + h*w, D): bilinear resize of the s x s grid part, extras kept."""
    extras, grid = table[:, :N_EXTRA], table[:, N_EXTRA:]
    s = math.isqrt(grid.shape[1])
    if s * s != grid.shape[1]:
        raise ValueError(f"positional table has {grid.shape[1]} grid rows, not a square number")
    if (s, s) == (h, w):
        return table
    grid = grid.reshape(1, s, s, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode='bilinear', align_corners=False)
    return torch.cat([extras, grid.flatten(2).transpose(1, 2)], dim=1)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in fp32."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()


class ModulatedRMSNorm(nn.Module):
    """norm(x) * (1 + scale) + shift; shift, scale (B, D) broadcast over tokens.

    recompute (with grad enabled): backward keeps x and recomputes the fp32 intermediates.
    """

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim)

    def forward(self, x, shift, scale, recompute=True):
        if recompute and torch.is_grad_enabled():
            return checkpoint(self.modulate, x, shift, scale, use_reentrant=False, preserve_rng_state=False)
        return self.modulate(x, shift, scale)

    def modulate(self, x, shift, scale):
        return self.norm(x) * (1 + scale[:, None].float()) + shift[:, None].float()


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, H/p * W/p, D), tokens row-major."""

    def __init__(self, in_channels, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t):
        return self.linear_2(F.silu(self.linear_1(timestep_sincos(t, self.freq_dim))))


class ClassEmbedder(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)   # row K: the null class

    def forward(self, y):
        return self.embedding_table(y)


class _Embeddings(nn.Module):
    def __init__(self, num_classes, dim):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)
        self.class_embedder = ClassEmbedder(num_classes, dim)


class AdaLNSingle(nn.Module):
    """PixArt-style adaLN-single: (t, y) -> (B, 3, D) shift/scale/gate shared by all blocks."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.emb = _Embeddings(num_classes, dim)
        self.linear = nn.Linear(dim, 3 * dim)

    def forward(self, t, y):
        c = self.emb.timestep_embedder(t) + self.emb.class_embedder(y)
        return self.linear(F.silu(c)).unflatten(1, (3, -1))


class SequenceAdapter(nn.Module):
    """Depthwise 3x3 smoothers before and after the blocks, and the learned pad tokens."""

    def __init__(self, dim, pad_len):
        super().__init__()
        self.pad_token_dec_split = nn.Parameter(torch.randn(1, pad_len, dim) * 0.02)  # separators
        self.pad_token = nn.Parameter(torch.randn(1, dim, pad_len) * 0.02)            # grid pads, channel-first
        self.first_smoother = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.last_smoother = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    @staticmethod
    def smooth(conv, tokens, h, w):
        """(B, h*w, D) -> (B, h*w, D) through a depthwise conv on the (h, w) grid."""
        grid = tokens.transpose(1, 2).unflatten(2, (h, w))
        return conv(grid).flatten(2).transpose(1, 2)


#################################################################################
#                                   DiM block                                   #
#################################################################################

class DiMBlock(nn.Module):
    """[long-skip merge] -> re-order to this layer's scan -> RMSNorm + adaLN -> Mamba -> u + (1+gate)*out."""

    def __init__(self, dim, d_state, d_conv, expand, skip):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim ** 0.5)
        self.norm1 = ModulatedRMSNorm(dim)
        self.attn1 = MambaMixer(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        if not skip:
            self.skip_linear = None
        elif dim <= 512:
            self.skip_linear = nn.Linear(2 * dim, dim)                     # on cat([u, skip])
        else:
            self.skip_linear = nn.ModuleList([nn.Linear(dim, dim), nn.Linear(dim, dim)])

    def merge_skip(self, u, skip):
        if isinstance(self.skip_linear, nn.ModuleList):
            return self.skip_linear[0](u) + self.skip_linear[1](skip)
        return self.skip_linear(torch.cat([u, skip], dim=-1))

    def forward(self, u, mod, skip=None, gather=None, recompute=True):
        """u (B, L, D) fp32 in the previous layer's order; mod (B, 3, D); gather (L,) or None.

        recompute (with grad enabled): backward keeps u, not the fp32 norm intermediates, and only xz
        inside the mixer (libs/model/memory_estimate.py); False under a whole-block checkpoint.
        """
        if skip is not None:
            u = self.merge_skip(u, skip).float()
        if gather is not None:
            u = u.index_select(1, gather)
        shift, scale, gate = (self.scale_shift_table + mod).unbind(1)
        out = self.attn1(self.norm1(u, shift, scale, recompute=recompute), recompute=recompute)
        return u + (1 + gate[:, None].float()) * out          # fp32 math; a bf16 out is kept as it is


#################################################################################
#                                 DiM backbone                                  #
#################################################################################

class DiM(nn.Module):
    """eps = DiM(x (B, C, H, W), timesteps (B,) on the 0-1000 scale, y (B,) in [0, K]) -> (B, C, H, W).

    width/depth: D and number of blocks; table_grid: side of the learned positional table (tokens);
    pad_layout: 'lateral' (256 checkpoints) or 'rho_pad' (512 and upsample checkpoints);
    skip_tune: None or (top, bottom, schedule) rescaling of the long skips, schedule 'official'|'timestep'.

    Two attributes trade compute for activation memory in training (neither changes a number):
    `recompute` (default True): each block keeps only its input stream and in_proj's output for backward and
    recomputes its norm, conv, dt and scan there (docs/architecture.md §12); False keeps every intermediate.
    `gradient_checkpointing` (default False): each block keeps only its input and reruns whole in backward.
    """

    def __init__(self, width, depth, in_channels, patch_size, num_classes, table_grid,
                 d_state=16, d_conv=3, expand=2, encoder_start=1, pad_layout='lateral', skip_tune=None):
        super().__init__()
        if depth % 2 != 1 or (depth - encoder_start) % 2 != 0 or not 0 <= encoder_start < depth:
            raise ValueError(f"num_layers must be odd and num_layers - encoder_start_blk_id even, "
                             f"got num_layers={depth}, encoder_start_blk_id={encoder_start}")
        self.width, self.depth, self.in_channels = width, depth, in_channels
        self.patch_size, self.num_classes, self.pad_len = patch_size, num_classes, d_conv
        self.pad_layout = pad_layout
        self.patterns = layer_patterns(depth, encoder_start)
        sources, consumers = skip_layers(depth, encoder_start)
        self.skip_sources, self.skip_consumers = frozenset(sources), frozenset(consumers)
        self.skip_tune = skip_tune
        if skip_tune is not None and len(consumers) < 2:
            raise ValueError('is_skip_tune needs at least two long-skip layers')
        self.gradient_checkpointing = False
        self.recompute = True

        # Registration order = the official state_dict order.
        self.additional_embed = nn.Parameter(torch.zeros(1, N_EXTRA + table_grid ** 2, width))
        self.pos_embed = PatchEmbed(in_channels, width, patch_size)
        self.transformer_blocks = nn.ModuleList([
            DiMBlock(width, d_state, d_conv, expand, skip=l in self.skip_consumers) for l in range(depth)])
        self.norm_out = ModulatedRMSNorm(width)
        self.adaln_single = AdaLNSingle(num_classes, width)
        self.label_emb = nn.Embedding(num_classes + 1, width)
        self.a4m_adapter = SequenceAdapter(width, d_conv)
        self.proj_out_2 = nn.Linear(width, patch_size * patch_size * in_channels)
        self.proj_out_1 = nn.Linear(width, 2 * width)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        """The official init (docs/architecture.md §10); no zero-init of the output layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.transformer_blocks:
            block.attn1.reset_ssm_parameters()              # restores dt_proj.bias
            nn.init.kaiming_uniform_(block.attn1.out_proj.weight, a=math.sqrt(5))
            block.attn1.out_proj.weight /= math.sqrt(self.depth)
        embedder = self.adaln_single.emb.timestep_embedder
        nn.init.normal_(embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.linear_2.weight, std=0.02)

    def skip_weights(self, t):
        """{layer: (B, 1, 1) factor on its skip input} for skip-tune, else {}."""
        if self.skip_tune is None:
            return {}
        top, bottom, schedule = self.skip_tune
        tt = torch.full_like(t, SKIP_TUNE_T) if schedule == 'official' else t / 1000
        top_now = (bottom + (top - bottom) * tt.float()).view(-1, 1, 1)
        lo, hi = min(self.skip_consumers), max(self.skip_consumers)
        return {l: (l - lo) * 1.0 / (hi - lo) * (top_now - bottom) + bottom for l in self.skip_consumers}

    def _check_inputs(self, x, timesteps, y):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"H and W must be divisible by the patch size {p}, got {H}x{W}")
        timesteps = torch.as_tensor(timesteps, dtype=torch.float32, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(B)
        if timesteps.shape != (B,):
            raise ValueError(f"timesteps must be (B,) = ({B},) or a scalar, got {tuple(timesteps.shape)}")
        if y is None:
            y = torch.full((B,), self.num_classes, dtype=torch.long, device=x.device)
        elif y.shape != (B,):
            raise ValueError(f"y must be (B,) = ({B},), got {tuple(y.shape)}")
        return timesteps.float(), y.long(), H // p, W // p

    def forward(self, x, timesteps, y=None):
        timesteps, y, h, w = self._check_inputs(x, timesteps, y)
        B, D, P = x.shape[0], self.width, self.pad_len
        layout = sequence_layout(h, w, P, N_EXTRA, self.pad_layout, self.patterns, str(x.device))

        # Conditioning: adaLN-single for the blocks; raw time/class tokens at the sequence head.
        mod = self.adaln_single(timesteps, y)
        t_tok = timestep_sincos(timesteps, D)
        c_tok = self.label_emb(y)

        tokens = torch.cat([t_tok[:, None], c_tok[:, None].float(), self.pos_embed(x).float()], dim=1)
        tokens = tokens + interpolate_pos_table(self.additional_embed, h, w).float()
        extras, image = tokens[:, :N_EXTRA], tokens[:, N_EXTRA:]
        image = SequenceAdapter.smooth(self.a4m_adapter.first_smoother, image, h, w).float()
        pads = self.a4m_adapter.pad_token.transpose(1, 2).float().expand(B, -1, -1)
        grid = torch.cat([image, pads], dim=1).index_select(1, layout.grid_source)
        separators = self.a4m_adapter.pad_token_dec_split.float().expand(B, -1, -1)
        u = torch.cat([extras, separators, grid], dim=1)                       # (B, L, D) fp32

        skip_w = self.skip_weights(timesteps)
        skips = []
        for l, block in enumerate(self.transformer_blocks):
            skip = None
            if l in self.skip_consumers:
                skip = skips.pop()
                if l in skip_w:
                    skip = skip * skip_w[l]
            args = (u, mod, skip, layout.layer_gather[l])
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                u = checkpoint(block, *args, recompute=False, use_reentrant=False)
            else:
                u = block(*args, recompute=self.recompute)
            if l in self.skip_sources:
                skips.append(u)

        # Back to an image: the grid is row-major again after the last layer.
        image = u[:, N_EXTRA + P:].index_select(1, layout.image_positions)
        image = SequenceAdapter.smooth(self.a4m_adapter.last_smoother, image, h, w).float()
        shift, scale = self.proj_out_1(F.silu(t_tok + c_tok.float())).chunk(2, dim=1)
        out = self.proj_out_2(self.norm_out(image, shift, scale, recompute=self.recompute))   # (B, h*w, p*p*C)
        p, C = self.patch_size, self.in_channels
        out = out.float().view(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(B, C, h * p, w * p)
