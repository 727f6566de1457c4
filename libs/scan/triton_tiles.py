"""Tile helpers of the Triton scan's kernels (libs/scan/triton_kernels.py): the layout moves, loads and stores,
softplus and the gate, and the forward's steps.

Loaded next to the kernels by libs/scan/triton_scan.py (`_kernels`), compiled or interpreted as they are. Layout
vocabulary (the kernels' docstring has the full picture): a per-(channel, state) value is a tuple of NW [W, BLOCK_D]
tensors, one element per thread; a per-channel value per step is a [BLOCK_D] column, split from a [BLOCK_D, T]
tile along L. `split_last` / `join_last` move between a tensor's last axis and a tuple: on a GPU each is one
regrouping through shared memory when the axis is spread over threads, free when it is in registers.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
# Sums go through tl.reduce with Triton's own add combiner instead of tl.sum: tl.sum and the other library helpers
# (tl.zeros, tl.cdiv, tl.sigmoid) are @jit functions fixed compiled-or-interpreted when triton is imported, so
# calling them from kernels of the other mode fails; tl.reduce is a builtin, and the interpreter runs this
# combiner as a numpy sum.
_add = tl.standard._sum_combine


# -------------------------------------------------------------------------------------------------- layout moves

@triton.jit
def split_last(x, SHAPE: tl.constexpr, WIDTH: tl.constexpr, LOG_WIDTH: tl.constexpr):
    """x [*SHAPE, WIDTH] -> tuple of WIDTH tensors [*SHAPE], element k of the last axis in entry k."""
    leaves = (x,)
    for lvl in tl.static_range(LOG_WIDTH):
        nxt = ()
        for k in tl.static_range(len(leaves)):
            even, odd = tl.split(tl.reshape(leaves[k], SHAPE + (WIDTH >> (lvl + 1), 2)))
            nxt = nxt + (even, odd)
        leaves = nxt
    # the leaves come in breadth-first order of even/odd splits: interleave back to the natural order
    groups = ()
    for k in tl.static_range(len(leaves)):
        groups = groups + ((tl.reshape(leaves[k], SHAPE),),)
    for lvl in tl.static_range(LOG_WIDTH):
        nxt = ()
        for g in tl.static_range(len(groups) // 2):
            merged = ()
            for k in tl.static_range(len(groups[2 * g])):
                merged = merged + (groups[2 * g][k], groups[2 * g + 1][k])
            nxt = nxt + (merged,)
        groups = nxt
    return groups[0]


@triton.jit
def join_last(xs, SHAPE: tl.constexpr, LOG_WIDTH: tl.constexpr):
    """Inverse of split_last: a tuple of 2**LOG_WIDTH tensors [*SHAPE] -> [*SHAPE, 2**LOG_WIDTH]."""
    parts = ()
    for k in tl.static_range(len(xs)):
        parts = parts + (tl.reshape(xs[k], SHAPE + (1,)),)
    for lvl in tl.static_range(LOG_WIDTH):
        nxt = ()
        for k in tl.static_range(len(parts) // 2):
            nxt = nxt + (tl.reshape(tl.join(parts[k], parts[k + len(parts) // 2]), SHAPE + (2 << lvl,)),)
        parts = nxt
    return parts[0]


@triton.jit
def step_columns(tiles, BLOCK_D: tl.constexpr, T: tl.constexpr, LOG_T: tl.constexpr, LOG_Q: tl.constexpr):
    """2**LOG_Q [BLOCK_D, T] tiles -> their T * 2**LOG_Q columns [BLOCK_D] (column q of step i at i * 2**LOG_Q + q),
    one regrouping for all."""
    x = tl.reshape(join_last(tiles, (BLOCK_D, T), LOG_Q), [BLOCK_D, T << LOG_Q])
    return split_last(x, (BLOCK_D,), T << LOG_Q, LOG_T + LOG_Q)


@triton.jit
def group_sums(xs, W: tl.constexpr, BLOCK_D: tl.constexpr, LOG_W: tl.constexpr, LOG_V: tl.constexpr):
    """Sum over the W state groups of 2**LOG_V [W, BLOCK_D] tensors -> [BLOCK_D, 2**LOG_V], regrouped (one pass
    through shared memory) so that each thread adds the W groups of a value in registers."""
    x = tl.permute(join_last(xs, (W, BLOCK_D), LOG_V), (1, 2, 0))                      # [BLOCK_D, V, W]
    parts = split_last(x, (BLOCK_D, 1 << LOG_V), W, LOG_W)
    acc = parts[0]
    for q in tl.static_range(1, W):
        acc += parts[q]
    return acc


@triton.jit
def channel_sums(prods, W: tl.constexpr, BLOCK_D: tl.constexpr, LOG_V: tl.constexpr, RED: tl.constexpr,
                 LOG_RED: tl.constexpr):
    """Sum over the BLOCK_D channels of 2**LOG_V [W, BLOCK_D] tensors -> [W, 2**LOG_V]. Regrouped (one pass through
    shared memory) so that each thread adds RED channels of a value in registers, the high channel bits (those on
    warps among them), then the rest with lane shuffles."""
    V: tl.constexpr = 1 << LOG_V
    x = join_last(prods, (W, BLOCK_D), LOG_V)                                          # [W, BLOCK_D, V]
    x = tl.permute(tl.reshape(x, [W, RED, BLOCK_D // RED, V]), (0, 3, 2, 1))           # [W, V, low d, high d]
    parts = split_last(x, (W, V, BLOCK_D // RED), RED, LOG_RED)
    acc = parts[0]
    for q in tl.static_range(1, RED):
        acc += parts[q]
    return tl.reduce(acc, 2, _add)


@triton.jit
def scaled(xs, factor):
    out = ()
    for k in tl.static_range(len(xs)):
        out = out + (xs[k] * factor,)
    return out


@triton.jit
def zero_state(W: tl.constexpr, NW: tl.constexpr, BLOCK_D: tl.constexpr):
    out = ()
    for k in tl.static_range(NW):
        out = out + (tl.full([W, BLOCK_D], 0.0, tl.float32),)
    return out


# ---------------------------------------------------------------------------------------------- loads and stores

@triton.jit
def load_tile(ptr, s_d, s_l, d, t, mask):
    """[BLOCK_D, T] fp32 tile of a (channel, step) tensor at channels d, steps t."""
    return tl.load(ptr + d[:, None] * s_d + t[None, :] * s_l, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def bc_rows(row_ptr, W: tl.constexpr, NW: tl.constexpr, LOG_NW: tl.constexpr, AGAIN: tl.constexpr = False):
    """The B and C values of one step, per state group: (B_k, C_k) tuples of NW [W, 1] tensors. AGAIN: a second
    read of the row, with another L2 eviction hint so that the compiler does not merge it with the first (whose
    values would then stay in registers in between)."""
    off = tl.arange(0, W)[:, None] * NW + tl.arange(0, NW)[None, :]
    policy: tl.constexpr = "evict_last" if AGAIN else ""
    bs = split_last(tl.load(row_ptr + off, eviction_policy=policy), (W,), NW, LOG_NW)
    cs = split_last(tl.load(row_ptr + (W * NW) + off, eviction_policy=policy), (W,), NW, LOG_NW)
    b_out = ()
    c_out = ()
    for k in tl.static_range(NW):
        b_out = b_out + (bs[k][:, None],)
        c_out = c_out + (cs[k][:, None],)
    return b_out, c_out


@triton.jit
def load_state(ptr, d, Di, N, W: tl.constexpr, NW: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (Di, N)-major fp32 block at ptr (row stride N) -> tuple of NW [W, BLOCK_D] (zero past Di and N).
    One load per state: a joined [W, BLOCK_D, NW] tile would be wider to store but would be converted to and
    from the state layout."""
    dd = d[None, :]
    out = ()
    for k in tl.static_range(NW):
        n = tl.arange(0, W)[:, None] * NW + k
        out = out + (tl.load(ptr + dd * N + n, mask=(dd < Di) & (n < N), other=0.0),)
    return out


@triton.jit
def store_state(ptr, h, d, Di, N, W: tl.constexpr, NW: tl.constexpr, BLOCK_D: tl.constexpr, ok=True):
    dd = d[None, :]
    for k in tl.static_range(NW):
        n = tl.arange(0, W)[:, None] * NW + k
        tl.store(ptr + dd * N + n, h[k], mask=(dd < Di) & (n < N) & ok)


@triton.jit
def store_entry(p, h, W: tl.constexpr, NW: tl.constexpr, BLOCK_D: tl.constexpr):
    off = tl.arange(0, W)[:, None] * (NW * BLOCK_D) + tl.arange(0, BLOCK_D)[None, :]
    for k in tl.static_range(NW):
        tl.store(p + off + k * BLOCK_D, h[k])


@triton.jit
def load_entry(p, W: tl.constexpr, NW: tl.constexpr, BLOCK_D: tl.constexpr):
    off = tl.arange(0, W)[:, None] * (NW * BLOCK_D) + tl.arange(0, BLOCK_D)[None, :]
    out = ()
    for k in tl.static_range(NW):
        out = out + (tl.load(p + off + k * BLOCK_D),)
    return out


# ---------------------------------------------------------------------------------------------- per-channel math

@triton.jit
def softplus_dt(r, valid):
    """(dt, w) with dt = softplus(r) = max(r, 0) + log1p(w), w = exp(-|r|), where `valid`, else 0.
    log1p(w) = 2 atanh(s), s = w / (2 + w) <= 1/3, by its series to s**13 (relative error < 1e-8): accurate
    for tiny w where log(1 + w) would round; for r > 20 it equals r in fp32 (mamba's threshold)."""
    w = tl.exp2(-tl.abs(r) * LOG2E)
    s = w / (2.0 + w)
    s2 = s * s
    q = ((((((1.0 / 13.0) * s2 + 1.0 / 11.0) * s2 + 1.0 / 9.0) * s2 + 1.0 / 7.0) * s2 + 1.0 / 5.0) * s2
         + 1.0 / 3.0) * s2 + 1.0
    return tl.where(valid, tl.maximum(r, 0.0) + 2.0 * s * q, 0.0), w


@triton.jit
def gate_tiles(g_ptr, z_ptr, s_gd, s_gl, s_zd, s_zl, d, t, m2, HAS_Z: tl.constexpr):
    """(gout, g, dsilu(z)): the output gradient, the gradient reaching scan(u) + D u (gout * silu(z)), and
    silu's derivative (1 without z)."""
    gout = load_tile(g_ptr, s_gd, s_gl, d, t, m2)
    if HAS_Z:
        zz = load_tile(z_ptr, s_zd, s_zl, d, t, m2)
        sz = 1.0 / (1.0 + tl.exp2(-zz * LOG2E))
        return gout, gout * zz * sz, sz * (1.0 + zz * (1.0 - sz))
    return gout, gout, gout * 0.0 + 1.0


# ------------------------------------------------------------------------------------------------- forward steps

@triton.jit
def fwd_steps(h, A2, cols, BC_p, t0, L, W: tl.constexpr, NW: tl.constexpr, LOG_NW: tl.constexpr,
              T: tl.constexpr, WITH_Y: tl.constexpr):
    """T steps of h <- exp(dt A) h + dt u B from step t0 (cols: dt of step i at 2 i, dt u at 2 i + 1); with
    WITH_Y the per-group partial sums y_t = sum_k C h (a tuple of T [W, BLOCK_D]). Unrolled: for the backward's
    states; the forward walks its steps in a loop (`fwd_loop`)."""
    ys = ()
    for i in tl.static_range(T):
        Bk, Ck = bc_rows(BC_p + (t0 + i) * (2 * W * NW), W, NW, LOG_NW)
        dt = cols[2 * i][None, :]
        dtu = cols[2 * i + 1][None, :]
        hn = ()
        for k in tl.static_range(NW):
            hn = hn + (tl.exp2(dt * A2[k]) * h[k] + dtu * Bk[k],)
        h = hn
        if WITH_Y:
            y = h[0] * Ck[0]
            for k in tl.static_range(1, NW):
                y += h[k] * Ck[k]
            ys = ys + (y,)
    return h, ys


@triton.jit
def fwd_loop(h, A2, cols, BC_p, t0, L, W: tl.constexpr, NW: tl.constexpr, LOG_NW: tl.constexpr,
             BLOCK_D: tl.constexpr, T: tl.constexpr, LOG_T: tl.constexpr, WITH_Y: tl.constexpr):
    """fwd_steps as a loop over the T steps (a step's columns picked by selects): the compiler cannot hoist later
    steps' exponentials and loads above earlier steps, so the registers stay those of one step. With WITH_Y,
    y: [BLOCK_D, T] (sum over the state groups)."""
    y_cols = ()
    for q in tl.static_range(T):
        y_cols = y_cols + (tl.full([BLOCK_D], 0.0, tl.float32),)
    for i in range(tl.minimum(T, L - t0)):         # a run-time trip count: not unrolled
        dt = cols[0]
        dtu = cols[1]
        for q in tl.static_range(1, T):
            dt = tl.where(i == q, cols[2 * q], dt)
            dtu = tl.where(i == q, cols[2 * q + 1], dtu)
        Bk, Ck = bc_rows(BC_p + (t0 + i) * (2 * W * NW), W, NW, LOG_NW)
        hn = ()
        for k in tl.static_range(NW):
            hn = hn + (tl.exp2(dt[None, :] * A2[k]) * h[k] + dtu[None, :] * Bk[k],)
        h = hn
        if WITH_Y:
            y = h[0] * Ck[0]
            for k in tl.static_range(1, NW):
                y += h[k] * Ck[k]
            y = tl.reduce(y, 0, _add)
            yn = ()
            for q in tl.static_range(T):
                yn = yn + (tl.where(i == q, y, y_cols[q]),)
            y_cols = yn
    return h, join_last(y_cols, (BLOCK_D,), LOG_T)
