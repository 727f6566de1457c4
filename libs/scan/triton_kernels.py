"""Triton kernels of the selective scan (launched by libs/scan/triton_scan.py; design: docs/triton-scan.md).

Layout. A program owns BLOCK_D channels of one sample and one segment of L. A per-(channel, state) value is a
tuple of NW [W, BLOCK_D] tensors, state n = w * NW + k in row w of entry k; Triton lays a [W, BLOCK_D] tensor out
one element per thread (channels on the lanes, and on warps past 32; the W state groups on further warps). So a
thread holds NW states of one channel in registers and runs the recurrence over L itself; sums over states are
adds in the thread, then (W > 1) one regrouping through shared memory (`tiles.group_sums`). Per-channel values
(dt, u, z, the output gradient) are loaded as [BLOCK_D, T] tiles along L, computed on once per (channel, step)
(softplus, SiLU, their derivatives) and split into per-step [BLOCK_D] columns; outputs go back the same way. B
and C come from one packed fp32 copy, a row of 2 N_PAD values per step, split into per-group scalars.
Forward: walks its chunks' T-step blocks, one step per loop iteration (`tiles.fwd_loop`), saving the state
entering each CHUNK-step chunk. Backward: per chunk, last first, the states entering its K = CHUNK / T blocks
(recomputed from the saved one, into the program's scratch), then per block, last first: its T states again,
unrolled, and the adjoint walked back over them; dB and dC summed over the program's channels two steps at a
time (`tiles.channel_sums`).
Buffers (fp32, contiguous, written and read only here):
    BC          (batch, L_bc, 2, N_PAD)        B and C, padded states and the L_bc - L >= T - 1 rows after L zero
                                               (a block's rows are read without clamping to L)
    states      (batch, n_chunks, Di, N_PAD)   state entering each CHUNK-step chunk
    ends, carry (batch, n_seg, Di, N_PAD)      per-segment local results / carried-in values
    dtsum       (batch, n_seg, Di)             sum of the effective dt over each segment
    entries     (programs, K, N_PAD, BLOCK_D)  backward: one program's block entry states, rewritten per chunk
    dBC part    (batch, n_dblocks, L, 2, N_PAD) per-channel-block sums of dB and dC (summed by the caller)
    dA part     (batch, n_seg, N_PAD, Di); dD / dbias parts (batch, n_seg, Di)
Portable Triton only (no inline asm, no libdevice: exp2 and divisions); runs under TRITON_INTERPRET=1.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Sums go through tl.reduce with Triton's own add combiner instead of tl.sum: tl.sum and the other library helpers
# (tl.zeros, tl.cdiv, tl.sigmoid) are @jit functions fixed compiled-or-interpreted when triton is imported, so
# calling them from kernels of the other mode fails; tl.reduce is a builtin, and the interpreter runs this
# combiner as a numpy sum.
_add = tl.standard._sum_combine
# The tile helpers (libs/scan/triton_tiles.py), compiled or interpreted as these kernels: set by the loader,
# libs/scan/triton_scan.py `_kernels`, which loads both files once per mode.
tiles = None


def _jit(fn):
    """triton.jit with the stride arguments (s_*) left unspecialised: a stride of 1 would give the tiles a layout
    that follows the callers' memory layouts; they are chosen once per kernel instead."""
    names = [a for a in fn.__code__.co_varnames[:fn.__code__.co_argcount] if a.startswith('s_')]
    return triton.jit(fn, do_not_specialize=names)


# ------------------------------------------------------------------------------------------------------- forward

@_jit
def scan_fwd_kernel(
        u_ptr, dt_ptr, A_ptr, BC_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, states_ptr, carry_ptr,
        L, L_bc, Di, N, chunk_len, chunks_per_seg,
        s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
        HAS_CARRY: tl.constexpr, SAVE_STATES: tl.constexpr, ENDS_ONLY: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
        W: tl.constexpr, NW: tl.constexpr, LOG_NW: tl.constexpr, T: tl.constexpr, LOG_T: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). From `carry` (batch, n_seg, Di, N_PAD) (or zero) over the segment's
    chunks: out, the last state, and the state entering each chunk (SAVE_STATES). ENDS_ONLY: instead, the
    segment's end state from a zero start (to `last_ptr` = ends (batch, n_seg, Di, N_PAD)) and its dt sum (to
    `out_ptr` = dtsum (batch, n_seg, Di)), for the carry pass."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    N_PAD: tl.constexpr = W * NW
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < Di
    steps = tl.arange(0, T)
    A2 = tiles.scaled(tiles.load_state(A_ptr, d, Di, N, W, NW, BLOCK_D), LOG2E)
    bias = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    seg_off = (b * n_seg + seg) * Di
    if HAS_CARRY:
        h = tiles.load_state(carry_ptr + seg_off * N_PAD, d, Di, N_PAD, W, NW, BLOCK_D)
    else:
        h = tiles.zero_state(W, NW, BLOCK_D)
    BC_p = BC_ptr + b * L_bc * (2 * N_PAD)
    dtsum = tl.full([BLOCK_D], 0.0, tl.float32)
    n_chunks = (L + chunk_len - 1) // chunk_len
    c0 = seg * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    for c in range(c0, c1):
        if SAVE_STATES:
            tiles.store_state(states_ptr + (b * n_chunks + c) * Di * N_PAD, h, d, Di, N_PAD, W, NW, BLOCK_D)
        for t0 in range(c * chunk_len, tl.minimum(c * chunk_len + chunk_len, L), T):
            t = t0 + steps
            m2 = md[:, None] & (t < L)[None, :]
            r = tiles.load_tile(dt_ptr + b * s_tb, s_td, s_tl, d, t, m2) + bias[:, None]
            if SOFTPLUS:
                dt, _w = tiles.softplus_dt(r, m2)
            else:
                dt = tl.where(m2, r, 0.0)
            uu = tiles.load_tile(u_ptr + b * s_ub, s_ud, s_ul, d, t, m2)
            cols = tiles.step_columns((dt, dt * uu), BLOCK_D, T, LOG_T, 1)
            h, y = tiles.fwd_loop(h, A2, cols, BC_p, t0, L, W, NW, LOG_NW, BLOCK_D, T, LOG_T, not ENDS_ONLY)
            if ENDS_ONLY:
                dtsum += tl.reduce(dt, 1, _add)
            else:
                if HAS_D:
                    y += Dv[:, None] * uu
                if HAS_Z:
                    zz = tiles.load_tile(z_ptr + b * s_zb, s_zd, s_zl, d, t, m2)
                    y = y * zz / (1.0 + tl.exp2(-zz * LOG2E))
                tl.store(out_ptr + b * s_ob + d[:, None] * s_od + t[None, :] * s_ol, y, mask=m2)
    if ENDS_ONLY:
        tiles.store_state(last_ptr + seg_off * N_PAD, h, d, Di, N_PAD, W, NW, BLOCK_D)
        tl.store(out_ptr + seg_off + d, dtsum, mask=md)
    else:
        tiles.store_state(last_ptr + b * Di * N, h, d, Di, N, W, NW, BLOCK_D, seg == n_seg - 1)


@_jit
def segment_carry_kernel(ends_ptr, dtsum_ptr, A_ptr, init_ptr, carry_ptr, n_seg, Di, N,
                         s_ib, s_id, s_in,
                         HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr,
                         NW: tl.constexpr, LOG_NW: tl.constexpr):
    """Grid (n_dblocks, batch). carry[s] = value entering segment s of v_s = exp(A * dtsum_s) * v_{s-1} + ends_s,
    walked forward from 0 (forward states) or backward from `init` (adjoints, init = grad of the last state,
    (batch, Di, N) with strides s_i*)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    N_PAD: tl.constexpr = W * NW
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    A2 = tiles.scaled(tiles.load_state(A_ptr, d, Di, N, W, NW, BLOCK_D), LOG2E)
    if HAS_INIT:
        n = tl.arange(0, W)[:, None, None] * NW + tl.arange(0, NW)[None, None, :]
        dd = d[None, :, None]
        v = tl.load(init_ptr + b * s_ib + dd * s_id + n * s_in, mask=(dd < Di) & (n < N), other=0.0)
        v = tiles.split_last(v.to(tl.float32), (W, BLOCK_D), NW, LOG_NW)
    else:
        v = tiles.zero_state(W, NW, BLOCK_D)
    for i in range(n_seg):
        if REVERSE:
            s = n_seg - 1 - i
        else:
            s = i
        off = (b * n_seg + s) * Di
        tiles.store_state(carry_ptr + off * N_PAD, v, d, Di, N_PAD, W, NW, BLOCK_D)
        dts = tl.load(dtsum_ptr + off + d, mask=d < Di, other=0.0)[None, :]
        ends = tiles.load_state(ends_ptr + off * N_PAD, d, Di, N_PAD, W, NW, BLOCK_D)
        vn = ()
        for k in tl.static_range(NW):
            vn = vn + (tl.exp2(dts * A2[k]) * v[k] + ends[k],)
        v = vn


# ------------------------------------------------------------------------------------------------------ backward

@_jit
def scan_bwd_segment_kernel(
        g_ptr, dt_ptr, A_ptr, BC_ptr, z_ptr, bias_ptr, nus_ptr, dtsum_ptr, L, L_bc, Di, N, chunk_len, chunks_per_seg,
        s_gb, s_gd, s_gl, s_tb, s_td, s_tl, s_zb, s_zd, s_zl,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
        W: tl.constexpr, NW: tl.constexpr, LOG_NW: tl.constexpr, T: tl.constexpr, LOG_T: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). The adjoint flowing out of the segment's first step, a_first * lambda_first,
    with nothing coming in from the right (to `nus` (batch, n_seg, Di, N_PAD)), and the segment's dt sum.
    Needs no forward state: nu <- exp(dt A) (nu + g C) walked backwards."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    N_PAD: tl.constexpr = W * NW
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < Di
    steps = tl.arange(0, T)
    A2 = tiles.scaled(tiles.load_state(A_ptr, d, Di, N, W, NW, BLOCK_D), LOG2E)
    bias = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    BC_p = BC_ptr + b * L_bc * (2 * N_PAD)
    t0 = seg * chunks_per_seg * chunk_len
    t1 = tl.minimum(t0 + chunks_per_seg * chunk_len, L)
    n_blocks = (t1 - t0 + T - 1) // T
    nu = tiles.zero_state(W, NW, BLOCK_D)
    dtsum = tl.full([BLOCK_D], 0.0, tl.float32)
    for jb in range(n_blocks):
        tb = t0 + (n_blocks - 1 - jb) * T
        t = tb + steps
        m2 = md[:, None] & (t < t1)[None, :]
        r = tiles.load_tile(dt_ptr + b * s_tb, s_td, s_tl, d, t, m2) + bias[:, None]
        if SOFTPLUS:
            dt, _w = tiles.softplus_dt(r, m2)
        else:
            dt = tl.where(m2, r, 0.0)
        _gout, g, _ds = tiles.gate_tiles(g_ptr + b * s_gb, z_ptr + b * s_zb, s_gd, s_gl, s_zd, s_zl, d, t, m2, HAS_Z)
        dtsum += tl.reduce(dt, 1, _add)
        dtc = tiles.split_last(dt, (BLOCK_D,), T, LOG_T)
        gc = tiles.split_last(g, (BLOCK_D,), T, LOG_T)
        for j in tl.static_range(T):
            Bk, Ck = tiles.bc_rows(BC_p + (tb + T - 1 - j) * (2 * N_PAD), W, NW, LOG_NW)
            dtj = dtc[T - 1 - j][None, :]
            gj = gc[T - 1 - j][None, :]
            nun = ()
            for k in tl.static_range(NW):
                nun = nun + (tl.exp2(dtj * A2[k]) * (nu[k] + gj * Ck[k]),)
            nu = nun
    seg_off = (b * n_seg + seg) * Di
    tiles.store_state(nus_ptr + seg_off * N_PAD, nu, d, Di, N_PAD, W, NW, BLOCK_D)
    tl.store(dtsum_ptr + seg_off + d, dtsum, mask=md)


@triton.jit
def block_entries(h, A2, bias, dt_ptr, u_ptr, s_td, s_tl, s_ud, s_ul, BC_p, d, t_start, L, Di, entries_p,
                  SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, NW: tl.constexpr,
                  LOG_NW: tl.constexpr, T: tl.constexpr, LOG_T: tl.constexpr, K: tl.constexpr):
    """From h entering step t_start, the states entering the K T-step blocks from there, to the program's own
    scratch `entries_p` (K, N_PAD, BLOCK_D): each thread writes and later reads back only its own values."""
    for s in tl.static_range(K):
        tiles.store_entry(entries_p + s * (W * NW * BLOCK_D), h, W, NW, BLOCK_D)
        if s < K - 1:
            t = t_start + s * T + tl.arange(0, T)
            m2 = (d < Di)[:, None] & (t < L)[None, :]
            r = tiles.load_tile(dt_ptr, s_td, s_tl, d, t, m2) + bias[:, None]
            if SOFTPLUS:
                dt, _w = tiles.softplus_dt(r, m2)
            else:
                dt = tl.where(m2, r, 0.0)
            cols = tiles.step_columns((dt, dt * tiles.load_tile(u_ptr, s_ud, s_ul, d, t, m2)), BLOCK_D, T, LOG_T, 1)
            h, _ys = tiles.fwd_steps(h, A2, cols, BC_p, t_start + s * T, L, W, NW, LOG_NW, T, False)


@_jit
def scan_bwd_kernel(
        g_ptr, u_ptr, dt_ptr, A_ptr, BC_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, init_ptr,
        du_ptr, ddt_ptr, dz_ptr, dBC_ptr, dA_ptr, dD_ptr, dbias_ptr, entries_ptr,
        L, L_bc, Di, N, chunks_per_seg,
        s_gb, s_gd, s_gl, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_ib, s_id, s_in,
        s_dub, s_dud, s_dul, s_dtb, s_dtd, s_dtl, s_dzb, s_dzd, s_dzl,
        INIT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, W: tl.constexpr, NW: tl.constexpr, LOG_NW: tl.constexpr,
        T: tl.constexpr, LOG_T: tl.constexpr, CHUNK: tl.constexpr, RED: tl.constexpr, LOG_RED: tl.constexpr,
        LOG_W: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). Walks the segment's chunks backwards. Per chunk: from its saved entry state,
    the state entering each of its T-step blocks (registers); per block, backwards: its T states again (the
    stack), then the adjoint lambda_t = C_t g_t + exp(dt_{t+1} A) lambda_{t+1} over them, and every gradient.
    INIT: 0 nothing enters from the right, 1 `init` is the last state's gradient (batch, Di, N), strided,
    2 `init` is the per-segment carry (batch, n_seg, Di, N_PAD)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    n_dblocks = tl.num_programs(0)
    N_PAD: tl.constexpr = W * NW
    K: tl.constexpr = CHUNK // T
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = d < Di
    steps = tl.arange(0, T)
    A2 = tiles.scaled(tiles.load_state(A_ptr, d, Di, N, W, NW, BLOCK_D), LOG2E)
    bias = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=md, other=0.0).to(tl.float32)
    Dv = tl.full([BLOCK_D], 0.0, tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=md, other=0.0).to(tl.float32)
    seg_off = (b * n_seg + seg) * Di
    if INIT == 1:
        n = tl.arange(0, W)[:, None, None] * NW + tl.arange(0, NW)[None, None, :]
        dd = d[None, :, None]
        nu = tl.load(init_ptr + b * s_ib + dd * s_id + n * s_in, mask=(dd < Di) & (n < N), other=0.0)
        nu = tiles.split_last(nu.to(tl.float32), (W, BLOCK_D), NW, LOG_NW)
    elif INIT == 2:
        nu = tiles.load_state(init_ptr + seg_off * N_PAD, d, Di, N_PAD, W, NW, BLOCK_D)
    else:
        nu = tiles.zero_state(W, NW, BLOCK_D)
    dA = tiles.zero_state(W, NW, BLOCK_D)
    dD_acc = tl.full([BLOCK_D], 0.0, tl.float32)
    dbias_acc = tl.full([BLOCK_D], 0.0, tl.float32)
    BC_p = BC_ptr + b * L_bc * (2 * N_PAD)
    dBC_p = dBC_ptr + (b * n_dblocks + pid_d) * L * (2 * N_PAD)
    entries_p = entries_ptr + ((b * n_dblocks + pid_d) * n_seg + seg) * (K * N_PAD * BLOCK_D)
    wq = tl.arange(0, W)[:, None]
    q = tl.arange(0, 2 * NW)[None, :]
    dBC_off = (q // NW) * N_PAD + wq * NW + q % NW                   # [W, 2 NW]: (B | C, state w * NW + k)
    q2 = tl.arange(0, 4 * NW)[None, :]                              # two steps: the earlier one first
    dBC_pair = q2 // (2 * NW)
    dBC_off2 = (q2 // NW % 2) * N_PAD + wq * NW + q2 % NW
    n_chunks = (L + CHUNK - 1) // CHUNK
    c0 = seg * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    for cc in range(c1 - c0):
        c = c1 - 1 - cc
        h = tiles.load_state(states_ptr + (b * n_chunks + c) * Di * N_PAD, d, Di, N_PAD, W, NW, BLOCK_D)
        block_entries(h, A2, bias, dt_ptr + b * s_tb, u_ptr + b * s_ub, s_td, s_tl, s_ud, s_ul, BC_p, d, c * CHUNK, L,
                      Di, entries_p, SOFTPLUS, BLOCK_D, W, NW, LOG_NW, T, LOG_T, K)
        n_blocks = tl.minimum(K, (L - c * CHUNK + T - 1) // T)
        for sr in range(n_blocks):          # a loop, not unrolled: one block's code, one block's registers
            blk = n_blocks - 1 - sr
            t0 = c * CHUNK + blk * T
            t = t0 + steps
            m2 = md[:, None] & (t < L)[None, :]
            r = tiles.load_tile(dt_ptr + b * s_tb, s_td, s_tl, d, t, m2) + bias[:, None]
            if SOFTPLUS:
                dt, w = tiles.softplus_dt(r, m2)
            else:
                dt = tl.where(m2, r, 0.0)
            uu = tiles.load_tile(u_ptr + b * s_ub, s_ud, s_ul, d, t, m2)
            gout, g, dsilu = tiles.gate_tiles(g_ptr + b * s_gb, z_ptr + b * s_zb, s_gd, s_gl, s_zd, s_zl, d, t, m2,
                                        HAS_Z)
            cols = tiles.step_columns((dt, dt * uu), BLOCK_D, T, LOG_T, 1)             # dt, dt u per step
            gc = tiles.split_last(g, (BLOCK_D,), T, LOG_T)
            h = tiles.load_entry(entries_p + blk * (N_PAD * BLOCK_D), W, NW, BLOCK_D)
            hs = ()
            for i in tl.static_range(T):
                Bk, Ck = tiles.bc_rows(BC_p + (t0 + i) * (2 * N_PAD), W, NW, LOG_NW)
                hn = ()
                for k in tl.static_range(NW):
                    hn = hn + (tl.exp2(cols[2 * i][None, :] * A2[k]) * h[k] + cols[2 * i + 1][None, :] * Bk[k],)
                h = hn
                hs = hs + (h,)
            outs = ()       # per step: sum_k lambda B, sum_k A lambda exp(dt A) h_{t-1}, sum_k C h (twice)
            prods = ()      # per step: lambda dt u (dB), g h (dC) per state
            for j in tl.static_range(T):
                Bk, Ck = tiles.bc_rows(BC_p + (t0 + T - 1 - j) * (2 * N_PAD), W, NW, LOG_NW, True)
                dtj = cols[2 * (T - 1 - j)][None, :]
                dtuj = cols[2 * (T - 1 - j) + 1][None, :]
                gj = gc[T - 1 - j][None, :]
                hj = hs[T - 1 - j]
                dx = tl.full([W, BLOCK_D], 0.0, tl.float32)
                dds = tl.full([W, BLOCK_D], 0.0, tl.float32)
                ys = tl.full([W, BLOCK_D], 0.0, tl.float32)
                dBs = ()
                dCs = ()
                nun = ()
                dAn = ()
                for k in tl.static_range(NW):
                    lam = nu[k] + gj * Ck[k]
                    term = lam * (hj[k] - dtuj * Bk[k])           # lambda_t exp(dt_t A) h_{t-1}
                    dx += lam * Bk[k]
                    dds += term * A2[k]
                    ys += hj[k] * Ck[k]
                    dAn = dAn + (dA[k] + term * dtj,)
                    # exp(dt A) again, written as another expression (dt A + 0, the same value) so that the compiler
                    # recomputes it rather than keeping the states' recomputation's values in T * NW registers
                    nun = nun + (tl.exp2(tl.fma(dtj, A2[k], 0.0)) * lam,)
                    dBs = dBs + (lam * dtuj,)
                    dCs = dCs + (gj * hj[k],)
                nu = nun
                dA = dAn
                outs = (dx, dds, ys, ys) + outs
                if T == 1:
                    sums = tiles.channel_sums(dBs + dCs, W, BLOCK_D, LOG_NW + 1, RED, LOG_RED)    # [W, 2 NW]
                    tl.store(dBC_p + t0 * (2 * N_PAD) + dBC_off, sums, mask=(t0 < L) & (wq >= 0))
                elif j % 2 == 0:
                    later = dBs + dCs
                else:       # two steps' sums at once: half the fixed cost of a pass through shared memory
                    sums = tiles.channel_sums(dBs + dCs + later, W, BLOCK_D, LOG_NW + 2, RED, LOG_RED)  # [W, 4 NW]
                    tj = t0 + T - 1 - j + dBC_pair
                    tl.store(dBC_p + tj * (2 * N_PAD) + dBC_off2, sums, mask=(tj < L) & (wq >= 0))
            red = tiles.group_sums(outs, W, BLOCK_D, LOG_W, LOG_T + 2)                          # [BLOCK_D, 4 T]
            dx, dds, ys, _pad = tiles.split_last(tl.reshape(red, [BLOCK_D, T, 4]), (BLOCK_D, T), 4, 2)
            ddt = dds * LN2 + dx * uu
            if SOFTPLUS:
                ddt = ddt * tl.where(r >= 0.0, 1.0, w) / (1.0 + w)
            ddt = tl.where(m2, ddt, 0.0)
            dbias_acc += tl.reduce(ddt, 1, _add)
            dD_acc += tl.reduce(g * uu, 1, _add)
            tl.store(du_ptr + b * s_dub + d[:, None] * s_dud + t[None, :] * s_dul, dx * dt + Dv[:, None] * g,
                     mask=m2)
            tl.store(ddt_ptr + b * s_dtb + d[:, None] * s_dtd + t[None, :] * s_dtl, ddt, mask=m2)
            if HAS_Z:
                tl.store(dz_ptr + b * s_dzb + d[:, None] * s_dzd + t[None, :] * s_dzl,
                         gout * (ys + Dv[:, None] * uu) * dsilu, mask=m2)
    for k in tl.static_range(NW):     # (N_PAD, Di)-major: offsets formed here, not kept from the start
        tl.store(dA_ptr + seg_off * N_PAD + (tl.arange(0, W)[:, None] * NW + k) * Di + d[None, :], dA[k],
                 mask=(d < Di)[None, :])
    if HAS_D:
        tl.store(dD_ptr + seg_off + d, dD_acc, mask=md)
    if HAS_BIAS:
        tl.store(dbias_ptr + seg_off + d, dbias_acc, mask=md)
