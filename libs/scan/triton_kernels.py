"""Triton kernels of the selective scan (launched by libs/scan/triton_scan.py, which documents the algorithm).

One program owns (a block of BLOCK_D channels, one sample, one segment of whole chunks); its state
h [BLOCK_D, N_PAD] (fp32) lives in registers and the sequence is walked step by step. Every per-step vector is
loaded, computed and stored as a [BLOCK_D, N_PAD] tile broadcast along the other axis (stride-0 offsets), so it
can share the state's register layout: no layout conversion at each step (seen in sm_90 PTX of triton 3.8; 3.6
lays the forward loop out differently, see FWD_NUM_WARPS in triton_scan.py).
Buffers (fp32, contiguous, written and read only here):
    states      (batch, n_chunks, Di, N)       state entering each chunk
    ends, carry (batch, n_seg, Di, N)          per-segment local results / carried-in values
    dtsum       (batch, n_seg, Di)             sum of the effective dt over each segment
    dB/dC parts (batch, n_dblocks, N, L)       per-channel-block partial sums (reduced by the caller)
    dA part     (batch, n_seg, Di, N); dD/dbias parts (batch, n_seg, Di)
Only portable Triton: no inline asm, no libdevice; runs under TRITON_INTERPRET=1.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)
# Sums go through tl.reduce with Triton's own add combiner instead of tl.sum: tl.sum and the other library helpers
# (tl.zeros, tl.cdiv, tl.sigmoid) are @jit functions fixed compiled-or-interpreted when triton is imported, so
# calling them from kernels of the other mode fails; tl.reduce is a builtin, and the interpreter runs this
# combiner as a numpy sum.
_add = tl.standard._sum_combine
# softplus is written out in each kernel rather than as a @jit helper: the interpreter re-patches triton.language at
# every helper call (milliseconds each, per step). It is log1p(exp(r)) for r <= 20, r above (mamba's threshold);
# log1p(e) without libdevice as log(p) * e / (p - 1), p = 1 + e (Goldberg), exact to a few ulps.


def _jit(fn):
    """triton.jit with the stride arguments (s_*) left unspecialised: a stride of 1 would make Triton lay the
    per-step tiles out along that axis, and the layouts would then differ with the callers' memory layouts
    (costing a shared-memory layout conversion per step); the steps are scalar loads per element anyway."""
    names = [a for a in fn.__code__.co_varnames[:fn.__code__.co_argcount] if a.startswith('s_')]
    return triton.jit(fn, do_not_specialize=names)


@_jit
def scan_fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, out_ptr, last_ptr, states_ptr, carry_ptr,
        L, Di, N, chunk_len, chunks_per_seg,
        s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl,
        s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_ob, s_od, s_ol, s_Ad, s_An,
        HAS_CARRY: tl.constexpr, SAVE_STATES: tl.constexpr, WRITE_OUT: tl.constexpr, HAS_D: tl.constexpr,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr,
        N_PAD: tl.constexpr, UNROLL: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). From `carry` (batch, n_seg, Di, N) (or zero): the state entering each
    chunk_len-step chunk (SAVE_STATES), and out and the last state (WRITE_OUT). The backward re-runs it with
    WRITE_OUT off, the saved states as carry and a shorter chunk_len, to get its finer states."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    n = tl.arange(0, N_PAD)[None, :]
    zero = d * 0 + n * 0
    mask_d = (d < Di) & (n >= 0)
    mask_n = (n < N) & (d >= 0)
    mask_dn = (d < Di) & (n < N)
    state_off = d * N + n
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d < Di, other=0.0).to(tl.float32) + zero
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=d < Di, other=0.0).to(tl.float32) + zero
    u_p, u_o = u_ptr + b * s_ub, d * s_ud + zero
    dt_p, dt_o = dt_ptr + b * s_tb, d * s_td + zero
    z_p, z_o = z_ptr + b * s_zb, d * s_zd + zero
    out_p, out_o = out_ptr + b * s_ob, d * s_od + zero
    B_p, B_o = B_ptr + b * s_Bb, n * s_Bn + zero
    C_p, C_o = C_ptr + b * s_Cb, n * s_Cn + zero

    n_chunks = (L + chunk_len - 1) // chunk_len
    c0 = seg * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    if HAS_CARRY:
        h = tl.load(carry_ptr + (b * n_seg + seg) * Di * N + state_off, mask=mask_dn, other=0.0)
    else:
        h = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    for c in range(c0, c1):
        if SAVE_STATES:
            tl.store(states_ptr + (b * n_chunks + c) * Di * N + state_off, h, mask=mask_dn)
        for t in tl.range(c * chunk_len, tl.minimum(c * chunk_len + chunk_len, L), loop_unroll_factor=UNROLL):
            dt = tl.load(dt_p + (dt_o + t * s_tl), mask=mask_d, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                e = tl.exp(tl.minimum(dt, SOFTPLUS_THRESHOLD))
                p = 1.0 + e
                lp = tl.where(p == 1.0, e, tl.log(p) * (e / tl.maximum(p - 1.0, 1e-30)))
                dt = tl.where(mask_d, tl.where(dt > SOFTPLUS_THRESHOLD, dt, lp), 0.0)
            else:
                dt = tl.where(mask_d, dt, 0.0)
            uu = tl.load(u_p + (u_o + t * s_ul), mask=mask_d, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + (B_o + t * s_Bl), mask=mask_n, other=0.0).to(tl.float32)
            h = tl.exp2(dt * A2) * h + (dt * uu) * Bt
            if WRITE_OUT:
                Ct = tl.load(C_p + (C_o + t * s_Cl), mask=mask_n, other=0.0).to(tl.float32)
                y = tl.reduce(h * Ct, 1, _add)[:, None]
                if HAS_D:
                    y += Dv * uu
                if HAS_Z:
                    zz = tl.load(z_p + (z_o + t * s_zl), mask=mask_d, other=0.0).to(tl.float32)
                    y = y * zz / (1.0 + tl.exp(-zz))
                tl.store(out_p + (out_o + t * s_ol), y, mask=mask_d & (n == 0))
    if WRITE_OUT:
        tl.store(last_ptr + b * Di * N + state_off, h, mask=mask_dn & (seg == n_seg - 1))


@_jit
def scan_fwd_segment_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, bias_ptr, ends_ptr, dtsum_ptr, L, Di, N, chunk_len, chunks_per_seg,
        s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_Bb, s_Bn, s_Bl, s_Ad, s_An,
        HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr,
        UNROLL: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). The segment's end state from a zero start (to `ends`) and its dt sum."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    n = tl.arange(0, N_PAD)[None, :]
    zero = d * 0 + n * 0
    mask_d = (d < Di) & (n >= 0)
    mask_n = (n < N) & (d >= 0)
    mask_dn = (d < Di) & (n < N)
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d < Di, other=0.0).to(tl.float32) + zero
    u_p, u_o = u_ptr + b * s_ub, d * s_ud + zero
    dt_p, dt_o = dt_ptr + b * s_tb, d * s_td + zero
    B_p, B_o = B_ptr + b * s_Bb, n * s_Bn + zero
    t0 = seg * chunks_per_seg * chunk_len
    t1 = tl.minimum(t0 + chunks_per_seg * chunk_len, L)
    h = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    dtsum = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    for t in tl.range(t0, t1, loop_unroll_factor=UNROLL):
        dt = tl.load(dt_p + (dt_o + t * s_tl), mask=mask_d, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            e = tl.exp(tl.minimum(dt, SOFTPLUS_THRESHOLD))
            p = 1.0 + e
            lp = tl.where(p == 1.0, e, tl.log(p) * (e / tl.maximum(p - 1.0, 1e-30)))
            dt = tl.where(mask_d, tl.where(dt > SOFTPLUS_THRESHOLD, dt, lp), 0.0)
        else:
            dt = tl.where(mask_d, dt, 0.0)
        uu = tl.load(u_p + (u_o + t * s_ul), mask=mask_d, other=0.0).to(tl.float32)
        Bt = tl.load(B_p + (B_o + t * s_Bl), mask=mask_n, other=0.0).to(tl.float32)
        h = tl.exp2(dt * A2) * h + (dt * uu) * Bt
        dtsum += dt
    seg_off = (b * n_seg + seg) * Di
    tl.store(ends_ptr + seg_off * N + d * N + n, h, mask=mask_dn)
    tl.store(dtsum_ptr + seg_off + d + zero, dtsum, mask=mask_d & (n == 0))


@_jit
def segment_carry_kernel(ends_ptr, dtsum_ptr, A_ptr, init_ptr, carry_ptr, n_seg, Di, N,
                         s_Ad, s_An, s_ib, s_id, s_in,
                         HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr):
    """Grid (n_dblocks, batch). carry[s] = value entering segment s of v_s = exp(A * dtsum_s) * v_{s-1} + ends_s,
    walked forward from 0 (forward states) or backward from `init` (adjoints, init = grad of the last state)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    n = tl.arange(0, N_PAD)[None, :]
    mask_dn = (d < Di) & (n < N)
    state_off = d * N + n
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    if HAS_INIT:
        v = tl.load(init_ptr + b * s_ib + d * s_id + n * s_in, mask=mask_dn, other=0.0).to(tl.float32)
    else:
        v = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    for k in range(n_seg):
        if REVERSE:
            s = n_seg - 1 - k
        else:
            s = k
        off = (b * n_seg + s) * Di * N + state_off
        tl.store(carry_ptr + off, v, mask=mask_dn)
        dts = tl.load(dtsum_ptr + (b * n_seg + s) * Di + d + n * 0, mask=mask_dn, other=0.0)
        v = tl.exp2(dts * A2) * v + tl.load(ends_ptr + off, mask=mask_dn, other=0.0)


@_jit
def scan_bwd_segment_kernel(
        g_ptr, dt_ptr, A_ptr, C_ptr, z_ptr, bias_ptr, nus_ptr, dtsum_ptr, L, Di, N, chunk_len, chunks_per_seg,
        s_gb, s_gd, s_gl, s_tb, s_td, s_tl, s_zb, s_zd, s_zl, s_Cb, s_Cn, s_Cl, s_Ad, s_An,
        HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, UNROLL: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). The adjoint flowing out of the segment's first step, a_first * lambda_first,
    with nothing coming in from the right (to `nus`), and the segment's dt sum. Needs no forward state."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    n = tl.arange(0, N_PAD)[None, :]
    zero = d * 0 + n * 0
    mask_d = (d < Di) & (n >= 0)
    mask_n = (n < N) & (d >= 0)
    mask_dn = (d < Di) & (n < N)
    A2 = tl.load(A_ptr + d * s_Ad + n * s_An, mask=mask_dn, other=0.0).to(tl.float32) * LOG2E
    bias = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d < Di, other=0.0).to(tl.float32) + zero
    g_p, g_o = g_ptr + b * s_gb, d * s_gd + zero
    dt_p, dt_o = dt_ptr + b * s_tb, d * s_td + zero
    z_p, z_o = z_ptr + b * s_zb, d * s_zd + zero
    C_p, C_o = C_ptr + b * s_Cb, n * s_Cn + zero
    t0 = seg * chunks_per_seg * chunk_len
    t1 = tl.minimum(t0 + chunks_per_seg * chunk_len, L)
    nu = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    dtsum = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    for k in tl.range(0, t1 - t0, loop_unroll_factor=UNROLL):
        t = t1 - 1 - k
        dt = tl.load(dt_p + (dt_o + t * s_tl), mask=mask_d, other=0.0).to(tl.float32) + bias
        if SOFTPLUS:
            e = tl.exp(tl.minimum(dt, SOFTPLUS_THRESHOLD))
            p = 1.0 + e
            lp = tl.where(p == 1.0, e, tl.log(p) * (e / tl.maximum(p - 1.0, 1e-30)))
            dt = tl.where(mask_d, tl.where(dt > SOFTPLUS_THRESHOLD, dt, lp), 0.0)
        else:
            dt = tl.where(mask_d, dt, 0.0)
        g = tl.load(g_p + (g_o + t * s_gl), mask=mask_d, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_p + (z_o + t * s_zl), mask=mask_d, other=0.0).to(tl.float32)
            g = g * zz / (1.0 + tl.exp(-zz))
        Ct = tl.load(C_p + (C_o + t * s_Cl), mask=mask_n, other=0.0).to(tl.float32)
        nu = tl.exp2(dt * A2) * (nu + g * Ct)
        dtsum += dt
    seg_off = (b * n_seg + seg) * Di
    tl.store(nus_ptr + seg_off * N + d * N + n, nu, mask=mask_dn)
    tl.store(dtsum_ptr + seg_off + d + zero, dtsum, mask=mask_d & (n == 0))


@_jit
def scan_bwd_kernel(
        g_ptr, u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, states_ptr, init_ptr,
        du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
        L, Di, N, chunks_per_seg,
        s_gb, s_gd, s_gl, s_ub, s_ud, s_ul, s_tb, s_td, s_tl, s_zb, s_zd, s_zl,
        s_Bb, s_Bn, s_Bl, s_Cb, s_Cn, s_Cl, s_Ad, s_An, s_ib, s_id, s_in,
        s_dub, s_dud, s_dul, s_dtb, s_dtd, s_dtl, s_dzb, s_dzd, s_dzl,
        INIT: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
        SOFTPLUS: tl.constexpr, BLOCK_D: tl.constexpr, N_PAD: tl.constexpr, T: tl.constexpr):
    """Grid (n_dblocks, batch, n_seg). Walks the segment's chunks backwards: recomputes the chunk's T states from
    its saved entry state (kept unrolled in registers), then runs the adjoint recurrence over them.
    INIT: 0 nothing enters from the right, 1 `init` is the last state's gradient (strided, batch-major),
    2 `init` is the per-segment carry (batch, n_seg, Di, N)."""
    pid_d = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    seg = tl.program_id(2)
    n_seg = tl.num_programs(2)
    n_dblocks = tl.num_programs(0)
    d = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D))[:, None]
    n = tl.arange(0, N_PAD)[None, :]
    zero = d * 0 + n * 0
    mask_d = (d < Di) & (n >= 0)
    mask_n = (n < N) & (d >= 0)
    mask_dn = (d < Di) & (n < N)
    first_n = mask_d & (n == 0)
    first_d = mask_n & (d == pid_d * BLOCK_D)
    state_off = d * N + n
    A = tl.load(A_ptr + d * s_Ad + n * s_An, mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    bias = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d, mask=d < Di, other=0.0).to(tl.float32) + zero
    if HAS_D:
        Dv = tl.load(D_ptr + d, mask=d < Di, other=0.0).to(tl.float32) + zero
    # scalar per-sample base pointers + int32 offset tiles (fewer registers than 64-bit pointer tiles)
    g_p, g_o = g_ptr + b * s_gb, d * s_gd + zero
    u_p, u_o = u_ptr + b * s_ub, d * s_ud + zero
    dt_p, dt_o = dt_ptr + b * s_tb, d * s_td + zero
    z_p, z_o = z_ptr + b * s_zb, d * s_zd + zero
    du_p, du_o = du_ptr + b * s_dub, d * s_dud + zero
    ddt_p, ddt_o = ddt_ptr + b * s_dtb, d * s_dtd + zero
    dz_p, dz_o = dz_ptr + b * s_dzb, d * s_dzd + zero
    B_p, B_o = B_ptr + b * s_Bb, n * s_Bn + zero
    C_p, C_o = C_ptr + b * s_Cb, n * s_Cn + zero
    dBC_o = n * L + zero
    dB_p = dB_ptr + (b * n_dblocks + pid_d) * N * L
    dC_p = dC_ptr + (b * n_dblocks + pid_d) * N * L

    n_chunks = (L + T - 1) // T
    c0 = seg * chunks_per_seg
    c1 = tl.minimum(c0 + chunks_per_seg, n_chunks)
    seg_off = (b * n_seg + seg) * Di
    if INIT == 1:
        nu = tl.load(init_ptr + b * s_ib + d * s_id + n * s_in, mask=mask_dn, other=0.0).to(tl.float32)
    elif INIT == 2:
        nu = tl.load(init_ptr + seg_off * N + state_off, mask=mask_dn, other=0.0)
    else:
        nu = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    dA_acc = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    dD_acc = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    dbias_acc = tl.full([BLOCK_D, N_PAD], 0.0, tl.float32)
    for cc in range(c1 - c0):
        c = c1 - 1 - cc
        h = tl.load(states_ptr + (b * n_chunks + c) * Di * N + state_off, mask=mask_dn, other=0.0)
        hs = (h,)
        for i in tl.static_range(T):
            t = c * T + i
            md = mask_d & (t < L)
            dt = tl.load(dt_p + (dt_o + t * s_tl), mask=md, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                e = tl.exp(tl.minimum(dt, SOFTPLUS_THRESHOLD))
                p = 1.0 + e
                lp = tl.where(p == 1.0, e, tl.log(p) * (e / tl.maximum(p - 1.0, 1e-30)))
                dt = tl.where(md, tl.where(dt > SOFTPLUS_THRESHOLD, dt, lp), 0.0)
            else:
                dt = tl.where(md, dt, 0.0)
            uu = tl.load(u_p + (u_o + t * s_ul), mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + (B_o + t * s_Bl), mask=mask_n & (t < L), other=0.0).to(tl.float32)
            h = tl.exp2(dt * A2) * h + (dt * uu) * Bt
            hs = hs + (h,)
        # keeps the compiler from carrying every step's loads from the recomputation into the walk below
        tl.debug_barrier()
        for j in tl.static_range(T):
            t = c * T + (T - 1 - j)
            md = mask_d & (t < L)
            mn = mask_n & (t < L)
            r = tl.load(dt_p + (dt_o + t * s_tl), mask=md, other=0.0).to(tl.float32) + bias
            if SOFTPLUS:
                e = tl.exp(tl.minimum(r, SOFTPLUS_THRESHOLD))
                p = 1.0 + e
                lp = tl.where(p == 1.0, e, tl.log(p) * (e / tl.maximum(p - 1.0, 1e-30)))
                dt = tl.where(md, tl.where(r > SOFTPLUS_THRESHOLD, r, lp), 0.0)
            else:
                dt = tl.where(md, r, 0.0)
            uu = tl.load(u_p + (u_o + t * s_ul), mask=md, other=0.0).to(tl.float32)
            g = tl.load(g_p + (g_o + t * s_gl), mask=md, other=0.0).to(tl.float32)
            Bt = tl.load(B_p + (B_o + t * s_Bl), mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_p + (C_o + t * s_Cl), mask=mn, other=0.0).to(tl.float32)
            h_t = hs[T - j]
            h_prev = hs[T - 1 - j]
            if HAS_Z:
                zz = tl.load(z_p + (z_o + t * s_zl), mask=md, other=0.0).to(tl.float32)
                y = tl.reduce(h_t * Ct, 1, _add)[:, None]
                if HAS_D:
                    y += Dv * uu
                sig = 1.0 / (1.0 + tl.exp(-zz))
                tl.store(dz_p + (dz_o + t * s_dzl), g * y * sig * (1.0 + zz * (1.0 - sig)), mask=first_n & (t < L))
                g = g * zz * sig
            lam = nu + g * Ct
            a = tl.exp2(dt * A2)
            # dB_t, dC_t: sums over the channel block, as one reduction (a cross-warp one when warps split D)
            dB_t, dC_t = tl.split(tl.reduce(tl.join(lam * (dt * uu), g * h_t), 0, _add))
            tl.store(dB_p + (dBC_o + t), dB_t[None, :], mask=first_d & (t < L))
            tl.store(dC_p + (dBC_o + t), dC_t[None, :], mask=first_d & (t < L))
            dx = tl.reduce(lam * Bt, 1, _add)[:, None]
            term = lam * a * h_prev  # dloss / dlog(a_t) = lambda_t a_t h_{t-1}
            ddt = tl.reduce(term * A, 1, _add)[:, None] + dx * uu
            dA_acc += term * dt
            du = dx * dt
            if HAS_D:
                du += g * Dv
                dD_acc += g * uu
            tl.store(du_p + (du_o + t * s_dul), du, mask=first_n & (t < L))
            if SOFTPLUS:
                ddt = ddt * tl.where(r > SOFTPLUS_THRESHOLD, 1.0, 1.0 / (1.0 + tl.exp(-r)))
            ddt = tl.where(md, ddt, 0.0)
            dbias_acc += ddt
            tl.store(ddt_p + (ddt_o + t * s_dtl), ddt, mask=first_n & (t < L))
            nu = a * lam
    tl.store(dA_ptr + seg_off * N + state_off, dA_acc, mask=mask_dn)
    if HAS_D:
        tl.store(dD_ptr + seg_off + d + zero, dD_acc, mask=first_n)
    if HAS_BIAS:
        tl.store(dbias_ptr + seg_off + d + zero, dbias_acc, mask=first_n)
