/*
 * Command-line driver of the scan kernel, for checking a build the test machine cannot load (a cross-compiled one run
 * under an emulator such as qemu-user; tests/test_scan_cpu.py does this for aarch64):
 *
 *     scan_cpu_check IN OUT
 *
 * IN:  int64 Bsz, D, L, N, K, nthreads, nexp; then float32 dt, u (Bsz, D, L), A (D, N), B, C (Bsz, N, L),
 *      gy (Bsz, D, L), glast (Bsz, D, N), x (nexp), all little-endian and C-contiguous.
 * OUT: int32 active ISA (dim_scan_active_isa); then float32 y (Bsz, D, L), last (Bsz, D, N), gdt, gu (Bsz, D, L),
 *      gA (D, N), gB, gC (Bsz, N, L) of dim_scan_fwd / dim_scan_bwd, and exp(x) of dim_scan_exp (nexp).
 * Exit status 0, or 1 with a message on stderr.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int dim_scan_active_isa(void);
int64_t dim_scan_h0s_numel(int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K);
void dim_scan_exp(const float *x, float *y, int64_t n);
int dim_scan_fwd(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm, float *y, float *last,
                 float *h0s, int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K, int nthreads);
int dim_scan_bwd(const float *dt, const float *u, const float *A, const float *Bm, const float *Cm, const float *h0s,
                 const float *gy, const float *glast, float *gdt, float *gu, float *gA, float *gB, float *gC,
                 int64_t Bsz, int64_t D, int64_t L, int64_t N, int64_t K, int nthreads);

static int fail(const char *what) {
    fprintf(stderr, "scan_cpu_check: %s\n", what);
    return 1;
}

/* n floats read from f into a new buffer (NULL on a short read or no memory; n may be 0) */
static float *read_floats(FILE *f, int64_t n) {
    float *p = (float *)malloc((size_t)(n > 0 ? n : 1) * sizeof(float));
    if (p && n > 0 && fread(p, sizeof(float), (size_t)n, f) != (size_t)n) {
        free(p);
        return NULL;
    }
    return p;
}

int main(int argc, char **argv) {
    if (argc != 3) return fail("usage: scan_cpu_check IN OUT");
    FILE *in = fopen(argv[1], "rb");
    if (!in) return fail("cannot open IN");
    int64_t h[7];
    if (fread(h, sizeof(int64_t), 7, in) != 7) return fail("IN: short header");
    const int64_t Bsz = h[0], D = h[1], L = h[2], N = h[3], K = h[4], nexp = h[6];
    const int nthreads = (int)h[5];
    if (Bsz <= 0 || D <= 0 || L <= 0 || N <= 0 || K <= 0 || nthreads <= 0 || nexp < 0) return fail("IN: bad sizes");
    const int64_t ndl = Bsz * D * L, nnl = Bsz * N * L, ndn = Bsz * D * N;
    float *dt = read_floats(in, ndl), *u = read_floats(in, ndl), *A = read_floats(in, D * N);
    float *B = read_floats(in, nnl), *C = read_floats(in, nnl), *gy = read_floats(in, ndl);
    float *glast = read_floats(in, ndn), *x = read_floats(in, nexp);
    fclose(in);
    if (!dt || !u || !A || !B || !C || !gy || !glast || !x) return fail("IN: short data or out of memory");

    float *y = malloc((size_t)ndl * 4), *last = malloc((size_t)ndn * 4);
    float *h0s = malloc((size_t)dim_scan_h0s_numel(Bsz, D, L, N, K) * 4);
    float *gdt = malloc((size_t)ndl * 4), *gu = malloc((size_t)ndl * 4), *gA = malloc((size_t)(D * N) * 4);
    float *gB = malloc((size_t)nnl * 4), *gC = malloc((size_t)nnl * 4), *ex = malloc((size_t)(nexp > 0 ? nexp : 1) * 4);
    if (!y || !last || !h0s || !gdt || !gu || !gA || !gB || !gC || !ex) return fail("out of memory");
    if (dim_scan_fwd(dt, u, A, B, C, y, last, h0s, Bsz, D, L, N, K, nthreads) != 0) return fail("dim_scan_fwd failed");
    if (dim_scan_bwd(dt, u, A, B, C, h0s, gy, glast, gdt, gu, gA, gB, gC, Bsz, D, L, N, K, nthreads) != 0)
        return fail("dim_scan_bwd failed");
    dim_scan_exp(x, ex, nexp);

    FILE *out = fopen(argv[2], "wb");
    if (!out) return fail("cannot open OUT");
    const int32_t isa = dim_scan_active_isa();
    int ok = fwrite(&isa, sizeof isa, 1, out) == 1;
    const float *res[] = {y, last, gdt, gu, gA, gB, gC, ex};
    const int64_t len[] = {ndl, ndn, ndl, ndl, D * N, nnl, nnl, nexp};
    for (int i = 0; i < 8; i++) ok = ok && fwrite(res[i], sizeof(float), (size_t)len[i], out) == (size_t)len[i];
    if (fclose(out) != 0 || !ok) return fail("cannot write OUT");
    return 0;
}
