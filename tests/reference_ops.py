"""Plain, loop-based reference operations used by several tests (written from the spec, not optimised)."""
import torch
import torch.nn.functional as F


def sequential_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """mamba_ssm `selective_scan_ref` semantics with a Python loop over L. Returns (out, last_state)."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D[:, None]
    if z is not None:
        y = y * F.silu(z)
    return y, h


def scan_inputs(batch, d_inner, d_state, L, dtype=torch.float32, dt_scale='normal', seed=0):
    """Random scan inputs; dt_scale 'normal' (Mamba init, dt 1e-3..1e-1) or 'large' (dt about 2-3)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    u, z = r(batch, d_inner, L), r(batch, d_inner, L)
    delta = r(batch, d_inner, L) * 0.5
    A = -torch.exp(torch.rand(d_inner, d_state, generator=g, dtype=dtype) * 2.7)
    B, C = r(batch, d_state, L), r(batch, d_state, L)
    D = r(d_inner)
    if dt_scale == 'normal':
        dt = torch.exp(torch.rand(d_inner, generator=g, dtype=dtype) * 4.6 - 6.9)
        delta_bias = dt + torch.log(-torch.expm1(-dt))
    else:
        delta_bias = 2.5 + 0.3 * r(d_inner)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def max_rel_err(a, b):
    """max |a - b| relative to max |b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ------------------------------------------------------------------------------------------------
# A DiM forward written directly from the description of the network (docs/architecture.md), reading only a state dict. It keeps the
# stream in canonical (row-major) order and gathers/scatters around each mixer, builds the padded
# grid and the scan orders with explicit loops, and scans sequentially.
# ------------------------------------------------------------------------------------------------

def sincos(t, dim):
    half = dim // 2
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rms(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * weight


def mixer_reference(sd, prefix, x):
    """Mamba v1 mixer from its state dict entries: (B, L, D) -> (B, L, D)."""
    W = lambda k: sd[prefix + k]
    Di, N = W('A_log').shape
    R = W('dt_proj.weight').shape[1]
    xz = x @ W('in_proj.weight').t()
    xs, z = xz[..., :Di], xz[..., Di:]
    K = W('conv1d.weight').shape[-1]
    xp = F.pad(xs, (0, 0, K - 1, 0))
    conv = sum(W('conv1d.weight')[:, 0, k] * xp[:, k:k + xs.shape[1]] for k in range(K)) + W('conv1d.bias')
    xs = F.silu(conv)
    dbc = xs @ W('x_proj.weight').t()
    dt = F.softplus(dbc[..., :R] @ W('dt_proj.weight').t() + W('dt_proj.bias'))
    Bm, Cm = dbc[..., R:R + N], dbc[..., R + N:]
    y, _ = sequential_scan(xs.transpose(1, 2), dt.transpose(1, 2), -torch.exp(W('A_log')),
                           Bm.transpose(1, 2), Cm.transpose(1, 2), W('D'))
    y = y.transpose(1, 2) * F.silu(z)
    return y @ W('out_proj.weight').t()


def dim_reference(sd, x, t, y, num_layers, pad_layout, skip_tune=None, P=3):
    B, Cin, H, Wd = x.shape
    p = sd['pos_embed.proj.weight'].shape[-1]
    D = sd['label_emb.weight'].shape[1]
    h, w = H // p, Wd // p
    tok = F.conv2d(x, sd['pos_embed.proj.weight'], sd['pos_embed.proj.bias'], stride=p).flatten(2).transpose(1, 2)
    tau, kappa = sincos(t, D), sd['label_emb.weight'][y]
    e = F.silu(sincos(t, 256) @ sd['adaln_single.emb.timestep_embedder.linear_1.weight'].t()
               + sd['adaln_single.emb.timestep_embedder.linear_1.bias'])
    e = e @ sd['adaln_single.emb.timestep_embedder.linear_2.weight'].t() + sd['adaln_single.emb.timestep_embedder.linear_2.bias']
    c = e + sd['adaln_single.emb.class_embedder.embedding_table.weight'][y]
    mod = (F.silu(c) @ sd['adaln_single.linear.weight'].t() + sd['adaln_single.linear.bias']).view(B, 3, D)

    table = sd['additional_embed']
    s = int(round((table.shape[1] - 2) ** 0.5))
    grid_table = table[:, 2:]
    if (s, s) != (h, w):
        g = grid_table.reshape(1, s, s, D).permute(0, 3, 1, 2)
        grid_table = F.interpolate(g, size=(h, w), mode='bilinear', align_corners=False).flatten(2).transpose(1, 2)
    seq = torch.cat([tau[:, None], kappa[:, None], tok], 1) + torch.cat([table[:, :2], grid_table], 1)
    img = seq[:, 2:].transpose(1, 2).reshape(B, D, h, w)
    img = F.conv2d(img, sd['a4m_adapter.first_smoother.weight'], sd['a4m_adapter.first_smoother.bias'],
                   padding=1, groups=D).flatten(2).transpose(1, 2)
    pad = sd['a4m_adapter.pad_token'][0].t()                 # (P, D)
    cells, count = [], 0
    for i in range(h + P):
        for j in range(w + P):
            if i < h and j < w:
                cells.append(img[:, i * w + j])
            else:
                k = (j - w if i < h else i - h) if pad_layout == 'lateral' else count % P
                cells.append(pad[k].expand(B, D))
                count += 1
    u = torch.cat([seq[:, :2], sd['a4m_adapter.pad_token_dec_split'].expand(B, -1, -1), torch.stack(cells, 1)], 1)

    # per-layer orders of the padded grid
    Hp, Wp = h + P, w + P
    def order(pat):
        o = ([i * Wp + j for i in range(Hp) for j in range(Wp)] if pat in (0, -2)
             else [i * Wp + j for j in range(Wp) for i in range(Hp)])
        o = o[::-1] if pat < 0 else o
        return torch.tensor(list(range(2 + P)) + [2 + P + k for k in o])
    cycle, mid = [0, -2, 1, -1], 1 + (num_layers - 1) // 2
    pats = [0] + [cycle[(l) % 4] for l in range(1, mid)] + [cycle[(2 * mid - 2 - l) % 4] for l in range(mid, num_layers)]
    pats[-1] = 0
    consumers = list(range(mid, num_layers))
    skips = []
    for l in range(num_layers):
        pre = f'transformer_blocks.{l}.'
        if l in consumers:
            sk = skips.pop()
            if skip_tune is not None:
                top, bottom, tt = skip_tune
                top_now = bottom + (top - bottom) * tt
                sk = sk * ((l - consumers[0]) / (consumers[-1] - consumers[0]) * (top_now - bottom) + bottom)
            if pre + 'skip_linear.weight' in sd:
                u = torch.cat([u, sk], -1) @ sd[pre + 'skip_linear.weight'].t() + sd[pre + 'skip_linear.bias']
            else:
                u = (u @ sd[pre + 'skip_linear.0.weight'].t() + sd[pre + 'skip_linear.0.bias']
                     + sk @ sd[pre + 'skip_linear.1.weight'].t() + sd[pre + 'skip_linear.1.bias'])
        shift, scale, gate = (sd[pre + 'scale_shift_table'] + mod).unbind(1)
        n = rms(u, sd[pre + 'norm1.norm.weight']) * (1 + scale[:, None]) + shift[:, None]
        o = order(pats[l])
        out = torch.empty_like(u)
        out[:, o] = mixer_reference(sd, pre + 'attn1.', n[:, o])
        u = u + (1 + gate[:, None]) * out
        if 1 <= l < mid:
            skips.append(u)

    grid = u[:, 2 + P:].reshape(B, Hp, Wp, D)[:, :h, :w].reshape(B, h * w, D)
    img = grid.transpose(1, 2).reshape(B, D, h, w)
    img = F.conv2d(img, sd['a4m_adapter.last_smoother.weight'], sd['a4m_adapter.last_smoother.bias'],
                   padding=1, groups=D).flatten(2).transpose(1, 2)
    shift, scale = (F.silu(tau + kappa) @ sd['proj_out_1.weight'].t() + sd['proj_out_1.bias']).chunk(2, 1)
    o = rms(img, sd['norm_out.norm.weight']) * (1 + scale[:, None]) + shift[:, None]
    o = o @ sd['proj_out_2.weight'].t() + sd['proj_out_2.bias']
    C = o.shape[-1] // (p * p)
    o = o.view(B, h, w, p, p, C)
    return torch.einsum('nhwpqc->nchpwq', o).reshape(B, C, h * p, w * p)
