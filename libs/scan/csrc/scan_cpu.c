/*
 * Fused CPU selective scan (forward and backward) for DiM.
 *
 *   h_t = exp(dt_t * A) (.) h_{t-1} + (dt_t * u_t) B_t        h_{-1} = 0, state (D, N) per batch
 *   y_t = sum_n C_t[n] h_t[:, n]
 *
 * Layouts (all fp32, C-contiguous): dt, u, y: (Bsz, D, L); A: (D, N); B, C: (Bsz, N, L);
 * last_state: (Bsz, D, N).  The (Bsz, D, L, N) state tensor is never materialised: the forward keeps the states
 * of a block of 16 channels in registers over a K-step segment and, when a backward will follow, saves only the
 * states at the entry of every segment.  The backward walks the segments in reverse, recomputes the K states of a
 * segment into a small cache-resident buffer and runs the reverse recurrence
 *   g_t = C_t gy_t + exp(dt_{t+1} A) (.) g_{t+1}
 * from which every input gradient follows (see scan_backward.inc).
 *
 * Vectorisation: a vector lane is a channel.  The kernel is written once with GCC vector extensions over the
 * hardware's own vector width (scan_simd.inc, scan_kernel.inc) and compiled three times: AVX-512 (16 lanes), AVX2+FMA
 * (8 lanes) and the baseline ISA (4 lanes: SSE2 on x86-64, NEON on aarch64); the best one the CPU supports is chosen
 * at run time (no -march needed).  A 16-channel block is covered by 16 / lanes vectors, and the 16 states of a chunk
 * of N in passes of as many states as the register file holds.  exp(dt*A) is a vector 2^x (reduction + degree-6
 * polynomial + scaling, about 1-2 ulp, IEEE behaviour at the extremes), with a shorter scaling in segments where no
 * dt*A can leave the normal range.  Inputs (channel rows) are transposed to time-major tiles with in-register
 * transposes; B and C are transposed once per call; the next segment's rows are software-prefetched during the
 * current one.  The data layout, and with it the saved states, is the same for every variant.
 *
 * Threads: work units ((batch, channel block) in the forward, (batch, fixed group of channel blocks) in the
 * backward) claimed from an atomic counter by the caller and per-call helper pthreads (see run_pool).  Every unit's
 * arithmetic, and every cross-unit reduction order, is a function of the shapes only, so the results are
 * bit-identical for any thread count.
 *
 * Large fresh outputs and scratch buffers are advised to use transparent huge pages (fewer page faults).
 *
 * No Python or torch headers: loaded with ctypes by libs/scan/cpu.py.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define DIM_SCAN_ABI 1

typedef struct {
    /* inputs */
    const float *dt, *u, *A, *Bm, *Cm;
    const float *gy, *glast, *h0s_in;
    /* outputs */
    float *y, *last, *h0s;
    float *gdt, *gu, *gAp, *PB, *PC;
    float *gBo, *gCo;  /* final (Bsz, N, L) outputs of the reduction */
    float *BTf, *CTf;  /* B, C transposed to (Bsz, L, NP) */
    int64_t Bsz, D, L, N, K;
    int64_t nblk;   /* channel blocks of 16 */
    int64_t nch;    /* chunks of 16 states */
    int64_t NP;     /* nch * 16 */
    int64_t nseg;   /* ceil(L / K) */
    int64_t ngrp;   /* backward channel groups per batch (fixed by the shapes, never by the thread count) */
} Args;

typedef void (*unit_fn)(const Args *, int64_t, float *);

/* ---------------------------------------------------------------- ISA variants of the kernel
 * VW: lanes of one hardware vector; SF, SB: states a forward / backward pass keeps in registers (see scan_kernel.inc,
 * which undefines these parameters again).
 * The baseline variant is SSE2 on x86-64 and NEON on aarch64 (GCC vector extensions only, no intrinsics). */
#define SFX _generic
#define ISA_AVX512 0
#define VW 4
#define SF 8
#define SB 4
#include "scan_kernel.inc"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,bmi,bmi2,f16c")
#define SFX _avx2
#define ISA_AVX512 0
#define VW 8
#define SF 8
#define SB 8
#include "scan_kernel.inc"
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,bmi,bmi2,f16c")
#include <immintrin.h>
#define SFX _avx512
#define ISA_AVX512 1
#define VW 16
#define SF 16
#define SB 16
#include "scan_kernel.inc"
#pragma GCC pop_options
#else
#define HAVE_X86_VARIANTS 0
#endif

/* ---------------------------------------------------------------- dispatch */
enum { ISA_AUTO = 0, ISA_GENERIC = 1, ISA_AVX2 = 2, ISA_AVX512_ = 3 };
static int g_forced_isa = ISA_AUTO;

static int cpu_best_isa(void) {
#if HAVE_X86_VARIANTS
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw"))
        return ISA_AVX512_;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
    return ISA_GENERIC;
}

static int active_isa(void) {
    int best = cpu_best_isa();
    if (g_forced_isa != ISA_AUTO && g_forced_isa <= best) return g_forced_isa;
    return best;
}

static unit_fn pick_fwd(void) {
    switch (active_isa()) {
#if HAVE_X86_VARIANTS
    case ISA_AVX512_: return fwd_unit_avx512;
    case ISA_AVX2: return fwd_unit_avx2;
#endif
    default: return fwd_unit_generic;
    }
}

static unit_fn pick_bc(void) {
    switch (active_isa()) {
#if HAVE_X86_VARIANTS
    case ISA_AVX512_: return bc_unit_avx512;
    case ISA_AVX2: return bc_unit_avx2;
#endif
    default: return bc_unit_generic;
    }
}

static unit_fn pick_bwd(void) {
    switch (active_isa()) {
#if HAVE_X86_VARIANTS
    case ISA_AVX512_: return bwd_unit_avx512;
    case ISA_AVX2: return bwd_unit_avx2;
#endif
    default: return bwd_unit_generic;
    }
}

/* ---------------------------------------------------------------- threads
 * Work units are claimed from an atomic counter by the calling thread and by nthreads-1 detached pthreads created
 * per call.  The caller waits only for units that were claimed: a helper that has not been scheduled yet when the
 * work runs out (an oversubscribed machine, or torch's OpenMP workers still spin-waiting after a torch op) is simply
 * not waited for, so a call is never slower than on one thread plus the thread start-up.  The pool lives on the heap
 * and the last thread out frees it.
 * Alternatively (DIM_SCAN_CPU_THREADING=openmp) the units run on torch's own OpenMP team through the GOMP_parallel
 * entry point libs/scan/cpu.py hands over; measured faster for small calls on an idle machine, but every parallel
 * region ends in a team barrier that costs a scheduler time slice when the machine is oversubscribed. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
static gomp_parallel_fn g_gomp_parallel = NULL;

typedef struct {
    const Args *a;
    unit_fn fn;
    int64_t nunits;
    size_t scratch_floats;
    int64_t next;   /* atomic: next unit to claim */
    int64_t done;   /* atomic: units finished */
    int refs;       /* atomic: threads (caller included) still holding the pool */
    pthread_mutex_t mu;
    pthread_cond_t cv;
} Pool;

static void pool_release(Pool *P) {
    if (__atomic_sub_fetch(&P->refs, 1, __ATOMIC_ACQ_REL) == 0) {
        pthread_mutex_destroy(&P->mu);
        pthread_cond_destroy(&P->cv);
        free(P);
    }
}

/* Claims and runs units until none is left; s = scratch (allocated here when NULL and needed). */
static void pool_drain(Pool *P, float *s) {
    int own = 0;
    for (;;) {
        if (__atomic_load_n(&P->next, __ATOMIC_RELAXED) >= P->nunits) break;
        if (!s && P->scratch_floats) {
            s = (float *)aligned_alloc(64, (P->scratch_floats * sizeof(float) + 63) & ~(size_t)63);
            if (!s) break; /* leave the work to the others (the caller always has scratch) */
            own = 1;
        }
        int64_t u = __atomic_fetch_add(&P->next, 1, __ATOMIC_RELAXED);
        if (u >= P->nunits) break;
        P->fn(P->a, u, s);
        if (__atomic_add_fetch(&P->done, 1, __ATOMIC_ACQ_REL) == P->nunits) {
            pthread_mutex_lock(&P->mu);
            pthread_cond_broadcast(&P->cv);
            pthread_mutex_unlock(&P->mu);
        }
    }
    if (own) free(s);
}

static void *pool_thread(void *p) {
    pool_drain((Pool *)p, NULL);
    pool_release((Pool *)p);
    return NULL;
}

static void omp_body(void *p) { pool_drain((Pool *)p, NULL); }

/* Runs fn over units [0, nunits) on up to nthreads threads (the caller is one of them).  Units are independent, so
   which thread runs which unit does not change any result.  Returns 0, or -1 when out of memory. */
static int run_pool(const Args *a, unit_fn fn, int64_t nunits, size_t scratch_floats, int nthreads) {
    if (nunits <= 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (nthreads > nunits) nthreads = (int)nunits;
    if (nthreads > 256) nthreads = 256;
    float *s = NULL;
    if (scratch_floats) {
        s = (float *)aligned_alloc(64, (scratch_floats * sizeof(float) + 63) & ~(size_t)63);
        if (!s) return -1;
    }
    Pool *P = (Pool *)calloc(1, sizeof(Pool));
    if (!P) {
        free(s);
        return -1;
    }
    P->a = a;
    P->fn = fn;
    P->nunits = nunits;
    P->scratch_floats = scratch_floats;
    P->refs = 1;
    pthread_mutex_init(&P->mu, NULL);
    pthread_cond_init(&P->cv, NULL);
    if (nthreads > 1 && g_gomp_parallel) {
        g_gomp_parallel(omp_body, P, (unsigned)nthreads, 0);
    } else if (nthreads > 1) {
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        for (int i = 1; i < nthreads; i++) {
            pthread_t tid;
            __atomic_add_fetch(&P->refs, 1, __ATOMIC_ACQ_REL);
            if (pthread_create(&tid, &attr, pool_thread, P) != 0) __atomic_sub_fetch(&P->refs, 1, __ATOMIC_ACQ_REL);
        }
        pthread_attr_destroy(&attr);
    }
    pool_drain(P, s); /* the caller works too, and finishes whatever nobody else claimed */
    pthread_mutex_lock(&P->mu);
    while (__atomic_load_n(&P->done, __ATOMIC_ACQUIRE) < nunits) pthread_cond_wait(&P->cv, &P->mu);
    pthread_mutex_unlock(&P->mu);
    free(s);
    pool_release(P);
    return 0;
}

/* ---------------------------------------------------------------- helpers */
/* Ask for transparent huge pages on a large buffer that has not been touched yet (fresh outputs: torch.empty, our own
   buffers).  Faulting in 2 MiB pages instead of 4 KiB ones saves about a third of the time of a large call.  Purely
   advisory: a failure (other OS, THP disabled) changes nothing. */
static void advise_huge(void *p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (!p || bytes < 2 * huge) return;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1), hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (hi > lo) (void)madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p;
    (void)bytes;
#endif
}

/* malloc for large scratch: 2 MiB aligned (huge pages) when large, 64 B otherwise. */
static void *big_alloc(size_t bytes) {
    const size_t huge = (size_t)2 << 20;
    if (bytes >= 2 * huge) {
        void *p = aligned_alloc(huge, (bytes + huge - 1) & ~(huge - 1));
        advise_huge(p, bytes);
        return p;
    }
    return aligned_alloc(64, (bytes + 63) & ~(size_t)63);
}

static void fill_geometry(Args *a, int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K) {
    a->Bsz = Bsz; a->D = D; a->L = L; a->N = N;
    a->K = K;
    a->nblk = (D + 15) / 16;
    a->nch = (N + 15) / 16;
    a->NP = a->nch * 16;
    a->nseg = (L + K - 1) / K;
    /* Backward groups per batch: about 32 units in all, and at least 4 channel blocks per group where D allows, so
       that the per-group partial sums of dB and dC (Bsz * ngrp * L * NP floats each) stay small.  A function of
       the shapes only: the thread count never changes the summation order. */
    int64_t want = (32 + Bsz - 1) / Bsz;
    int64_t cap = a->nblk / 4;
    if (want > cap) want = cap;
    a->ngrp = want < 1 ? 1 : want;
}

static size_t fwd_scratch_floats(const Args *a) {
    return (size_t)(3 * a->K * 16 + 2 * a->nch * 256);
}

static size_t bwd_scratch_floats(const Args *a) {
    return (size_t)(6 * a->K * 16 + (2 * a->K + 1) * 256 + 5 * a->nch * 256 + 2 * 256);
}

/* Allocates and fills a->BTf, a->CTf (B and C transposed); returns 0 or -1. */
static int transpose_bc(Args *a, int nthreads) {
    size_t n = (size_t)(a->Bsz * a->L * a->NP);
    a->BTf = (float *)big_alloc(n * sizeof(float));
    a->CTf = (float *)big_alloc(n * sizeof(float));
    if (!a->BTf || !a->CTf) return -1;
    return run_pool(a, pick_bc(), a->Bsz * ((a->L + 255) / 256), 0, nthreads);
}

/* ---------------------------------------------------------------- exported API */
int dim_scan_abi_version(void) { return DIM_SCAN_ABI; }

/* 0 auto, 1 generic, 2 avx2, 3 avx512 (a request above what the CPU supports falls back to the best supported). */
void dim_scan_force_isa(int isa) { g_forced_isa = isa; }

/* Use this OpenMP runtime's GOMP_parallel for the worker threads (NULL: our own pthreads). */
void dim_scan_set_gomp_parallel(void *fn) { g_gomp_parallel = (gomp_parallel_fn)fn; }

/* 1 when an OpenMP runtime's threads are used, 0 for pthreads. */
int dim_scan_uses_openmp(void) { return g_gomp_parallel != NULL; }

/* 1 generic, 2 avx2, 3 avx512: the variant the next call will use. */
int dim_scan_active_isa(void) { return active_isa(); }

/* y = exp(x) computed exactly as the kernel computes exp(dt * A) (x = dt * A), with the active ISA variant. */
void dim_scan_exp(const float *x, float *y, int64_t n) {
    switch (active_isa()) {
#if HAVE_X86_VARIANTS
    case ISA_AVX512_: exp_array_avx512(x, y, n); return;
    case ISA_AVX2: exp_array_avx2(x, y, n); return;
#endif
    default: exp_array_generic(x, y, n); return;
    }
}

/* Number of floats of the saved segment-entry states for these shapes: Bsz * nblk * nch * nseg * 256. */
int64_t dim_scan_h0s_numel(int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K) {
    if (Bsz <= 0 || D <= 0 || L <= 0 || N <= 0 || K <= 0) return 0;
    Args a;
    fill_geometry(&a, Bsz, D, L, N, K);
    return Bsz * a.nblk * a.nch * a.nseg * 256;
}

/* Forward.  last (Bsz, D, N) and h0s (dim_scan_h0s_numel floats) may be NULL.  Returns 0 or a negative error. */
int dim_scan_fwd(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm,
                 float *y, float *last, float *h0s,
                 int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K, int nthreads) {
    if (Bsz <= 0 || D <= 0 || N <= 0 || K <= 0 || L < 0) return -2;
    if (L == 0) {
        if (last) memset(last, 0, (size_t)(Bsz * D * N) * sizeof(float));
        return 0;
    }
    Args a;
    memset(&a, 0, sizeof a);
    fill_geometry(&a, Bsz, D, L, N, K);
    a.dt = dt; a.u = u; a.A = A; a.Bm = Bm; a.Cm = Cm;
    a.y = y; a.last = last; a.h0s = h0s;
    advise_huge(y, (size_t)(Bsz * D * L) * sizeof(float));
    if (h0s) advise_huge(h0s, (size_t)dim_scan_h0s_numel(Bsz, D, L, N, K) * sizeof(float));
    int rc = transpose_bc(&a, nthreads);
    if (rc == 0) rc = run_pool(&a, pick_fwd(), Bsz * a.nblk, fwd_scratch_floats(&a), nthreads);
    free(a.BTf);
    free(a.CTf);
    return rc;
}

/* Final reductions, deterministic: gB[b, n, l] = sum over groups g, in order, of PB[b, g, l, n]; same for gC. */
static void reduce_unit(const Args *a, int64_t unit, float *s) {
    (void)s;
    const int64_t L = a->L, N = a->N, NP = a->NP, G = a->ngrp;
    const int64_t TL = 256;
    int64_t nlt = (L + TL - 1) / TL;
    int64_t b = unit / nlt, l0 = (unit % nlt) * TL;
    int64_t l1 = l0 + TL < L ? l0 + TL : L;
    for (int which = 0; which < 2; which++) {
        const float *P = which ? a->PC : a->PB;
        float *out = which ? a->gCo : a->gBo;
        for (int64_t n = 0; n < N; n++) {
            float *o = out + (b * N + n) * L;
            for (int64_t l = l0; l < l1; l++) {
                float acc = 0.f;
                for (int64_t g = 0; g < G; g++) acc += P[((b * G + g) * L + l) * NP + n];
                o[l] = acc;
            }
        }
    }
}

/* Backward.  gy (Bsz, D, L) and glast (Bsz, D, N) may be NULL (zero).  h0s must come from dim_scan_fwd with the same
   shapes and K.  Outputs: gdt, gu (Bsz, D, L); gA (D, N); gB, gC (Bsz, N, L); all are fully overwritten.
   Returns 0 or a negative error (-1: out of memory). */
int dim_scan_bwd(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm,
                 const float *h0s, const float *gy, const float *glast,
                 float *gdt, float *gu, float *gA, float *gB, float *gC,
                 int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K, int nthreads) {
    if (Bsz <= 0 || D <= 0 || N <= 0 || K <= 0 || L < 0) return -2;
    if (L == 0) {
        memset(gA, 0, (size_t)(D * N) * sizeof(float));
        return 0;
    }
    Args a;
    memset(&a, 0, sizeof a);
    fill_geometry(&a, Bsz, D, L, N, K);
    a.dt = dt; a.u = u; a.A = A; a.Bm = Bm; a.Cm = Cm;
    a.gy = gy; a.glast = glast; a.h0s_in = h0s;
    a.gdt = gdt; a.gu = gu;
    size_t pbn = (size_t)(Bsz * a.ngrp * L * a.NP);
    a.PB = (float *)big_alloc(pbn * sizeof(float));
    a.PC = (float *)big_alloc(pbn * sizeof(float));
    a.gAp = (float *)malloc((size_t)(Bsz * D * N) * sizeof(float));
    advise_huge(gdt, (size_t)(Bsz * D * L) * sizeof(float));
    advise_huge(gu, (size_t)(Bsz * D * L) * sizeof(float));
    int rc = -1;
    if (a.PB && a.PC && a.gAp) rc = transpose_bc(&a, nthreads);
    if (rc == 0) {
        rc = run_pool(&a, pick_bwd(), Bsz * a.ngrp, bwd_scratch_floats(&a), nthreads);
        if (rc == 0) {
            a.gBo = gB;
            a.gCo = gC;
            int64_t nlt = (L + 255) / 256;
            rc = run_pool(&a, reduce_unit, Bsz * nlt, 0, nthreads);
            /* gA[d, n] = sum over batches in order */
            for (int64_t i = 0; i < D * N; i++) {
                float acc = 0.f;
                for (int64_t b = 0; b < Bsz; b++) acc += a.gAp[b * D * N + i];
                gA[i] = acc;
            }
        }
    }
    free(a.PB);
    free(a.PC);
    free(a.gAp);
    free(a.BTf);
    free(a.CTf);
    return rc;
}
