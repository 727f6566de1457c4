"""The Mamba (v1) mixer of every DiM block, with the official parameter names.

    x, z = in_proj(u)                                (B, Di, L) each, Di = expand * D
    x = silu(causal depthwise conv1d(x))             kernel d_conv
    dt, B, C = x_proj(x)                             ranks R = ceil(D / 16), N, N
    y = selective_scan(x, dt_proj.weight @ dt^T, -exp(A_log), B, C, D, z, dt_proj.bias, softplus)
    out = out_proj(y)
dt and x reach the scan as contiguous (B, Di, L) tensors, so no kernel copies them; z stays a channel-last
view of in_proj's output (copying it to unit stride would round silu(z) differently on CPU). In training
only in_proj's output is kept for backward: the conv, dt and the scan are recomputed from it, as mamba's
fused `mamba_inner_fn` does. The scan and the conv use the CUDA kernels when available (libs/scan/).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from libs.scan import causal_conv1d, selective_scan

__all__ = ['MambaMixer']


class MambaMixer(nn.Module):
    """(B, L, D) -> (B, L, D). Parameters: in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj."""

    def __init__(self, d_model, d_state=16, d_conv=3, expand=2,
                 dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self):
        """Mamba's init: dt_proj so that softplus(bias) is log-uniform in [dt_min, dt_max]; A = -(1..N); D = 1."""
        dt_min, dt_max, floor = self.dt_range
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj.bias) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=floor)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))     # inverse softplus
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
        self.D.fill_(1.0)

    def forward(self, u, recompute=True):
        """u (B, L, D) -> (B, L, D). recompute: keep only xz for backward (when grad is enabled)."""
        xz = self.in_proj(u)                                            # (B, L, 2Di)
        if recompute and torch.is_grad_enabled():
            y = checkpoint(self.gated_scan, xz, use_reentrant=False, preserve_rng_state=False)
        else:
            y = self.gated_scan(xz)
        return self.out_proj(y.transpose(1, 2))

    def gated_scan(self, xz):
        """xz (B, L, 2Di) -> (scan(conv(x)) + D*conv(x)) * silu(z), (B, Di, L)."""
        x, z = xz.transpose(1, 2).chunk(2, dim=1)                       # (B, Di, L) channel-last views
        x = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias, activation='silu')
        dt, B, C = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2).contiguous()   # (B, Di, L); bias: in the scan
        return selective_scan(x, dt, -torch.exp(self.A_log.float()), B.transpose(1, 2), C.transpose(1, 2),
                              self.D.float(), z, delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
