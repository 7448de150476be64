/* Fused selective scan (Mamba-1) for CPUs: forward, and a backward that recomputes from checkpoints.
 *
 * Plain C11 with GCC/Clang vector extensions, no torch headers: mambakit compiles it on first use with the
 * system compiler (see mambakit/kernels/cpu_scan.py) and calls it through ctypes. Compiled twice: float
 * (8 lanes) and, with -DMK_DOUBLE, double (4 lanes).
 *
 * Semantics: those of mambakit.kernels.reference.selective_scan_ref, per batch b, channel c, state n:
 *     dt_t = softplus(delta_t + bias)          (softplus optional)
 *     x_t  = exp(dt_t A_n) x_{t-1} + dt_t u_t B_{n,t}
 *     y_t  = sum_n x_t C_{n,t} + D u_t,   out_t = y_t silu(z_t)   (z optional)
 *
 * Layout of the work: channels go in blocks of W (one B/C group each); a block's W channels are the lanes
 * of a vector, so B and C (shared by the group) are scalar broadcasts and the N states of the block are N
 * vectors. Time is walked in chunks of K steps; each chunk's (channel, time) inputs are transposed into
 * small time-major tiles first, so the inner loop reads contiguous vectors. A thread takes a range of
 * blocks of one (batch, group) and walks it chunk-major (chunk 0 of every block, then chunk 1, ...), so a
 * chunk of B and C, and of dB and dC in the backward, is reused from cache by all the blocks: on long
 * sequences that is most of the memory traffic. Work is handed to threads through an atomic counter,
 * except where threads share a (batch, group) in the backward: there the ranges go to fixed slots (see
 * the threads section), so that the sums over them, and the gradients, are the same bits on every run.
 *
 * Backward: the forward stores the state at the start of every chunk (b, d, ceil(L/K), N). The backward
 * walks the chunks last to first, recomputes the chunk's K states and decays from its checkpoint into a
 * tile, then runs the adjoint recurrence backwards through the tile. Extra memory: O(b d N L / K) for the
 * checkpoints, plus O(threads K N W) of workspace (and, when threads share a (batch, group), one private
 * dB, dC (and ddt_in) copy per extra slot: O(threads b G (2 N + R) L)). Gradients that sum over channels
 * (B, C, and dt_in when the kernel projects delta) are reduced across lanes W steps at a time; per-channel
 * sums over the batch (A, D, delta_bias, dt_w) are written per batch element and summed at the end in batch
 * order. No two threads ever write the same address.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

#ifdef MK_DOUBLE
typedef double real;
typedef int64_t ireal;
typedef uint64_t ureal;
#define W 4
#else
typedef float real;
typedef int32_t ireal;
typedef uint32_t ureal;
#define W 8
#endif
typedef real vec __attribute__((vector_size(W * sizeof(real))));
typedef ireal ivec __attribute__((vector_size(W * sizeof(real))));
typedef ureal uvec __attribute__((vector_size(W * sizeof(real))));

#include "vmath.h"

#define MK_ABI_VERSION 7

/* The (batch, dim, len) tensors u, delta, z, out and their gradients are read and written through strides
 * (mk_stride: elements between batch elements, channels, time steps; any sign), so channel-major rows,
 * token-major memory (channel stride 1) and time reversed (a pointer to the last step and a negative time
 * stride) all run without a copy. Every other pointer is to a contiguous array of `real` (dt_in: rows of
 * `len`, batch elements dt_in_bstride apart). Optional inputs and unwanted outputs are NULL. Forward and
 * backward take either delta or its projection delta = dt_w @ dt_in (per batch element), computed chunk by
 * chunk and never stored; the backward then either writes ddelta (the caller turns it into dt_w's and
 * dt_in's gradients) or, given ddt_w and ddt_in, projects it back chunk by chunk itself, so that no (batch,
 * dim, len) gradient of delta is stored either. */
typedef struct { int64_t b, c, t; } mk_stride;
enum { S_U, S_DELTA, S_Z, S_OUT, S_DOUT, S_DU, S_DDELTA, S_DZ, S_COUNT };

typedef struct {
    const real *u, *delta;           /* (batch, dim, len) */
    const real *A;                   /* (dim, dstate) */
    const real *B, *C;               /* (batch, groups, dstate, len) */
    const real *D, *delta_bias;      /* (dim,) */
    const real *z;                   /* (batch, dim, len) */
    const real *init;                /* (batch, dim, dstate) */
    real *out;                       /* (batch, dim, len) */
    real *ckpt;                      /* (batch, dim, nchunks, dstate): the state before each chunk */
    real *last;                      /* (batch, dim, dstate) */
    const real *dout, *dlast;        /* backward inputs: (batch, dim, len), (batch, dim, dstate) */
    real *du, *ddelta, *dz;          /* (batch, dim, len) */
    real *dA;                        /* (dim, dstate) */
    real *dB, *dC;                   /* (batch, groups, dstate, len) */
    real *dD, *dbias;                /* (dim,); may be NULL when D / delta_bias are absent */
    real *dinit;                     /* (batch, dim, dstate) */
    const real *dt_w, *dt_in;        /* instead of delta: (dim, dt_rank), (batch, dt_rank, len) */
    real *ddt_w;                     /* backward with dt_w, instead of ddelta: (dim, dt_rank) */
    real *ddt_in;                    /* and (batch, groups, dt_rank, len): each group's channels' share, in the
                                        kernel's time order */
    int64_t batch, dim, len, dstate, groups, chunk;
    int64_t dt_rank, dt_in_bstride;
    mk_stride st[S_COUNT];           /* strides of u, delta, z, out, dout, du, ddelta, dz (see the enum) */
    int32_t softplus, nthreads;
    int32_t accumulate;              /* forward: add the output into out instead of writing it (orders summed) */
} mk_scan_args;

/* ---------------------------------------------------------------------------------------------------- */
/* Per-thread workspace: one aligned allocation carved into tiles.                                      */

typedef struct {
    vec *u, *dt, *dtu, *z, *y, *dy, *dout, *dsp, *dgate, *s, *g;  /* chunk tiles, K entries each */
    vec *A, *A2;                                                  /* N entries each; A2 = A log2(e) */
    vec *Wdt;                                                     /* dt_rank entries: the block's rows of dt_w */
    vec *X;                                                       /* (K + 1) * N recomputed states */
    vec *DA;                                                      /* K * N decays of the chunk */
    int decays_nonpos;                                            /* dt >= 0 and A <= 0: dt A <= 0 */
    vec *carry;                                                   /* what blocks carry between chunks */
    real *Bs, *Cs, *dts, *dBs, *dCs, *ddts;                       /* staged rows of a chunk (stage_chunk) */
    int64_t rs;                                                   /* their row stride */
    void *mem;
} workspace;

/* Threads that live on between calls (the caller, OpenMP's pool) keep their workspace memory. */
static __thread void *kept_mem = NULL;
static __thread size_t kept_bytes = 0;

/* Row stride of the staged chunk rows: K rounded up to whole cache lines, and to an odd number of them, so
 * that consecutive rows start in different cache sets. */
static int64_t staged_stride(int64_t K) {
    const int64_t per_line = 64 / (int64_t)sizeof(real);
    int64_t lines = (K + per_line - 1) / per_line;
    if (lines % 2 == 0) lines++;
    return lines * per_line;
}

static int workspace_alloc(workspace *w, int64_t K, int64_t N, int64_t R, int backward, int64_t ncarry,
                           int keep) {
    const int64_t rs = staged_stride(K), staged_rows = 2 * N + R + (backward ? 2 * N + R : 0);
    int64_t nvec = 11 * K + 2 * N + R + (backward ? (K + 1) * N : 0) + K * N + ncarry + staged_rows * rs / W;
    size_t bytes = (size_t)nvec * sizeof(vec) + 64;
    bytes = (bytes + 63) / 64 * 64;
    if (keep && kept_bytes < bytes) {
        free(kept_mem);
        kept_mem = aligned_alloc(64, bytes);
        kept_bytes = kept_mem ? bytes : 0;
    }
    w->mem = keep ? kept_mem : aligned_alloc(64, bytes);
    if (!w->mem) return -1;
    memset(w->mem, 0, bytes);
    vec *v = (vec *)w->mem;
    vec **tiles[] = {&w->u, &w->dt, &w->dtu, &w->z, &w->y, &w->dy, &w->dout, &w->dsp, &w->dgate, &w->s, &w->g};
    for (size_t i = 0; i < sizeof tiles / sizeof *tiles; i++) { *tiles[i] = v; v += K; }
    vec **states[] = {&w->A, &w->A2};
    for (size_t i = 0; i < sizeof states / sizeof *states; i++) { *states[i] = v; v += N; }
    w->Wdt = v; v += R;
    w->X = v;  v += backward ? (K + 1) * N : 0;
    w->DA = v; v += K * N;
    w->carry = v;   v += ncarry;
    real *r = (real *)v;
    w->rs = rs;
    w->Bs = r;   r += N * rs;
    w->Cs = r;   r += N * rs;
    w->dts = r;  r += R * rs;
    w->dBs = backward ? r : NULL;  r += backward ? N * rs : 0;
    w->dCs = backward ? r : NULL;  r += backward ? N * rs : 0;
    w->ddts = backward ? r : NULL;
    return 0;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Moving data between (channel, time) rows and time-major tiles of W lanes.                            */

#if defined(__AVX__) && !defined(MK_DOUBLE)
/* 8x8 transpose: r[i][j] -> r[j][i]. */
static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20); r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20); r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31); r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31); r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#define MK_TRANSPOSE_BLOCKS 1
static inline void load_block(vec *tile, const real *src, int64_t L) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(src + i * L);
    transpose8(r);
    for (int i = 0; i < 8; i++) tile[i] = (vec)r[i];
}
static inline void store_block(real *dst, const vec *tile, int64_t L) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = (__m256)tile[i];
    transpose8(r);
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(dst + i * L, r[i]);
}
#elif defined(__AVX__) && defined(MK_DOUBLE)
static inline void transpose4(__m256d r[4]) {
    __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
    __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
    r[0] = _mm256_permute2f128_pd(t0, t2, 0x20); r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
    r[2] = _mm256_permute2f128_pd(t0, t2, 0x31); r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}
#define MK_TRANSPOSE_BLOCKS 1
static inline void load_block(vec *tile, const real *src, int64_t L) {
    __m256d r[4];
    for (int i = 0; i < 4; i++) r[i] = _mm256_loadu_pd(src + i * L);
    transpose4(r);
    for (int i = 0; i < 4; i++) tile[i] = (vec)r[i];
}
static inline void store_block(real *dst, const vec *tile, int64_t L) {
    __m256d r[4];
    for (int i = 0; i < 4; i++) r[i] = (__m256d)tile[i];
    transpose4(r);
    for (int i = 0; i < 4; i++) _mm256_storeu_pd(dst + i * L, r[i]);
}
#else
#define MK_TRANSPOSE_BLOCKS 0
#endif

/* tile[t][lane] = src[lane * L + t] for lane < nl, t < len; lanes >= nl are zero. */
static void load_rows(vec *tile, const real *src, int64_t L, int nl, int len) {
    int t0 = 0;
#if MK_TRANSPOSE_BLOCKS
    if (nl == W)
        for (; t0 + W <= len; t0 += W) load_block(tile + t0, src + t0, L);
#endif
    if (t0 == len) return;
    real *d = (real *)tile;
    for (int lane = 0; lane < nl; lane++) {
        const real *s = src + lane * L;
        for (int t = t0; t < len; t++) d[t * W + lane] = s[t];
    }
    for (int lane = nl; lane < W; lane++)
        for (int t = t0; t < len; t++) d[t * W + lane] = 0;
}

static void store_rows(real *dst, const vec *tile, int64_t L, int nl, int len) {
    int t0 = 0;
#if MK_TRANSPOSE_BLOCKS
    if (nl == W)
        for (; t0 + W <= len; t0 += W) store_block(dst + t0, tile + t0, L);
#endif
    const real *s = (const real *)tile;
    for (int lane = 0; lane < nl; lane++) {
        real *d = dst + lane * L;
        for (int t = t0; t < len; t++) d[t] = s[t * W + lane];
    }
}

/* tile[t][lane] = src[lane * cs + t * ts] for lane < nl, t < len; lanes >= nl are zero. Rows (ts = 1) go
 * through 8x8 transposes; token-major memory (cs = 1) is one vector per step, in either time direction. */
static void load_tile(vec *tile, const real *src, int64_t cs, int64_t ts, int nl, int len) {
    if (ts == 1) {
        load_rows(tile, src, cs, nl, len);
    } else if (cs == 1 && nl == W) {
        for (int t = 0; t < len; t++) tile[t] = vload(src + t * ts);
    } else {
        real *d = (real *)tile;
        for (int t = 0; t < len; t++)
            for (int lane = 0; lane < W; lane++) d[t * W + lane] = lane < nl ? src[lane * cs + t * ts] : (real)0;
    }
}

static void store_tile(real *dst, const vec *tile, int64_t cs, int64_t ts, int nl, int len) {
    if (ts == 1) {
        store_rows(dst, tile, cs, nl, len);
    } else if (cs == 1 && nl == W) {
        for (int t = 0; t < len; t++) vstore(dst + t * ts, tile[t]);
    } else {
        const real *s = (const real *)tile;
        for (int t = 0; t < len; t++)
            for (int lane = 0; lane < nl; lane++) dst[lane * cs + t * ts] = s[t * W + lane];
    }
}

/* states[n][lane] <-> rows[(lane * stride) + n] for lane < nl (stride between channels). */
static void load_states(vec *states, const real *rows, int64_t stride, int64_t N, int nl) {
    for (int64_t n = 0; n < N; n++) {
        vec v = vsplat(0);
        if (rows)
            for (int lane = 0; lane < nl; lane++) v[lane] = rows[lane * stride + n];
        states[n] = v;
    }
}

static void store_states(real *rows, const vec *states, int64_t stride, int64_t N, int nl) {
    for (int64_t n = 0; n < N; n++)
        for (int lane = 0; lane < nl; lane++) rows[lane * stride + n] = states[n][lane];
}

static vec load_lanes(const real *p, int nl, real fill) {
    vec v = vsplat(fill);
    if (p)
        for (int lane = 0; lane < nl; lane++) v[lane] = p[lane];
    return v;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Blocks, chunks and the per-chunk steps shared by forward and backward.                               */

typedef struct {
    int64_t b, g, c0;  /* batch element, group, first channel */
    int nl;            /* live lanes (channels) in this block */
} block;

static int64_t blocks_per_group(const mk_scan_args *a) { return (a->dim / a->groups + W - 1) / W; }

/* Block j of group g of batch element b. */
static block make_block(const mk_scan_args *a, int64_t b, int64_t g, int64_t j) {
    int64_t per_group = a->dim / a->groups;
    int64_t first = j * W;
    block k = {b, g, g * per_group + first, (int)(per_group - first < W ? per_group - first : W)};
    return k;
}

/* A for the block's lanes, and A log2(e): the decays are computed as 2^(dt A log2 e). A is (dim, dstate), so
 * the block's rows are a tile like the (channel, time) ones. */
static void load_A(const mk_scan_args *a, workspace *w, block k) {
    load_rows(w->A, a->A + k.c0 * a->dstate, a->dstate, k.nl, (int)a->dstate);
    /* softplus makes dt >= 0 (or NaN); with the block's A <= 0 every decay argument is <= 0 */
    int nonpos = a->softplus != 0;
    for (int64_t n = 0; n < a->dstate; n++) {
        w->A2[n] = w->A[n] * (real)1.4426950408889634074;
        for (int lane = 0; lane < W; lane++) nonpos &= w->A2[n][lane] <= 0;
    }
    w->decays_nonpos = nonpos;
}

/* Steps t0 .. t0 + len - 1 of block k of the strided tensor `which` into / from a tile. */
static inline void load_view(const mk_scan_args *a, int which, const real *p, vec *tile, block k, int64_t t0,
                             int len) {
    const mk_stride s = a->st[which];
    load_tile(tile, p + k.b * s.b + k.c0 * s.c + t0 * s.t, s.c, s.t, k.nl, len);
}

static inline void store_view(const mk_scan_args *a, int which, real *p, const vec *tile, block k, int64_t t0,
                              int len) {
    const mk_stride s = a->st[which];
    store_tile(p + k.b * s.b + k.c0 * s.c + t0 * s.t, tile, s.c, s.t, k.nl, len);
}

/* The chunk's delta tile from its projection: delta[t] = sum_r dt_w[c, r] dt_in[r, t] for the block's
 * channels c. dt_in's rows (staged) are shared by every block of the batch element, so they come from cache; this
 * replaces writing and reading back a (batch, dim, len) delta (a memory-bound GEMM with dt_rank columns). */
static void project_delta(const mk_scan_args *a, workspace *w, block k, int len) {
    const int64_t R = a->dt_rank;
    load_rows(w->Wdt, a->dt_w + k.c0 * R, R, k.nl, (int)R);
    /* Four steps at a time with the sums in registers (a pass per r over the tile would be bound by its
     * stores); each step still sums over r in order. */
    int t = 0;
    for (; t + 4 <= len; t += 4) {
        vec s0 = vsplat(0), s1 = vsplat(0), s2 = vsplat(0), s3 = vsplat(0);
        const real *col = w->dts + t;
        for (int64_t r = 0; r < R; r++, col += w->rs) {
            const vec wr = w->Wdt[r];
            s0 += wr * col[0];
            s1 += wr * col[1];
            s2 += wr * col[2];
            s3 += wr * col[3];
        }
        w->dt[t] = s0;
        w->dt[t + 1] = s1;
        w->dt[t + 2] = s2;
        w->dt[t + 3] = s3;
    }
    for (; t < len; t++) {
        vec s0 = vsplat(0);
        for (int64_t r = 0; r < R; r++) s0 += w->Wdt[r] * w->dts[r * w->rs + t];
        w->dt[t] = s0;
    }
}

/* dt[t .. t + n - 1] = softplus(dt), and with want_dsp d softplus / d input into dsp. */
static inline __attribute__((always_inline)) void softplus_steps(workspace *w, int t, const int n, int want_dsp) {
    vec *raw = w->dt + t;
    if (want_dsp) {
        vec sig[4], dt[4];
        vsoftplus_n(dt, sig, raw, n);
        for (int j = 0; j < n; j++) {
            w->dsp[t + j] = vsel(raw[j] > 20.0f, vsplat(1.0f), sig[j]);
            raw[j] = dt[j];
        }
    } else {
        vsoftplus_n(raw, NULL, raw, n);
    }
}

/* Loads the chunk's u and delta tiles and turns delta into dt = softplus(delta + bias) (softplus optional)
 * and dt * u; with want_dsp also d softplus / d input (1 above torch's threshold 20, like torch). */
static void load_steps(const mk_scan_args *a, workspace *w, block k, int64_t t0, int len, int want_dsp) {
    const vec bias = load_lanes(a->delta_bias ? a->delta_bias + k.c0 : NULL, k.nl, 0);
    load_view(a, S_U, a->u, w->u, k, t0, len);
    if (a->dt_w)
        project_delta(a, w, k, len);
    else
        load_view(a, S_DELTA, a->delta, w->dt, k, t0, len);
    for (int t = 0; t < len; t++) w->dt[t] += bias;
    if (a->softplus) {                                   /* four steps at a time (see vmath.h) */
        int t = 0;
        for (; t + 4 <= len; t += 4) softplus_steps(w, t, 4, want_dsp);
        for (; t < len; t++) softplus_steps(w, t, 1, want_dsp);
    }
    for (int t = 0; t < len; t++) w->dtu[t] = w->dt[t] * w->u[t];
}

/* The rows every block of a (batch, group) reads in a chunk (B, C and dt_in; steps t0 .. t0 + len - 1) are
 * copied into the workspace at row stride w->rs before the blocks run. Read in place at row stride len, the
 * rows fall into a few cache sets whenever len * sizeof(real) is close to a multiple of 4 KiB (Vim: len 4097
 * at 1024 px, 1025 at 512 px) and can evict each other before the next block reads them: in a standalone C
 * timing with the rows in their own page-aligned allocations, the recurrence ran 3x slower at len 4097 than
 * at len 4129. The backward's dB and dC rows of the chunk are likewise summed in the workspace and added to
 * the output once per chunk. */
static void stage_rows(real *dst, int64_t ds, const real *src, int64_t ss, int64_t rows, int len) {
    for (int64_t r = 0; r < rows; r++) memcpy(dst + r * ds, src + r * ss, (size_t)len * sizeof(real));
}

static void stage_chunk(const mk_scan_args *a, workspace *w, int64_t b, int64_t g, int64_t t0, int len) {
    const int64_t L = a->len, N = a->dstate, bg = b * a->groups + g;
    stage_rows(w->Bs, w->rs, a->B + bg * N * L + t0, L, N, len);
    stage_rows(w->Cs, w->rs, a->C + bg * N * L + t0, L, N, len);
    if (a->dt_w) stage_rows(w->dts, w->rs, a->dt_in + b * a->dt_in_bstride + t0, L, a->dt_rank, len);
}

/* ---------------------------------------------------------------------------------------------------- */
/* Forward.                                                                                             */

/* The chunk's decays DA[t][n] = 2^(dt_t A_n log2 e). They do not depend on the states, so they get a pass
 * of their own that runs at the exp's throughput, and the recurrence after it keeps its states in
 * registers (recur_group). Against exps interleaved with the recurrence: forward 8-27% and forward+backward
 * 1-17% faster at the Vim-Ti layer and a 20k-token bag on 2 AVX2 cores (benchmarks/README.md); the exps are
 * still about half of the forward's time. */
static inline __attribute__((always_inline)) void decays_pass(workspace *w, int64_t N, int len, const int nonpos) {
    const vec *A2 = w->A2;
    for (int t = 0; t < len; t++) {
        const vec dt = w->dt[t];
        vec *da = w->DA + t * N;
        int64_t n = 0;
        for (; n + 4 <= N; n += 4) {
            vec arg[4] = {dt * A2[n], dt * A2[n + 1], dt * A2[n + 2], dt * A2[n + 3]};
            if (nonpos) vexp2_nonpos_n(da + n, arg, 4);
            else vexp2_n(da + n, arg, 4);
        }
        for (; n < N; n++) da[n] = vexp2(dt * A2[n]);
    }
}

/* Every Mamba layer has A = -exp(A_log) <= 0 and softplus on, so the variant without the upper clamp runs. */
static void chunk_decays(workspace *w, int64_t N, int len) {
    if (w->decays_nonpos) decays_pass(w, N, len, 1);
    else decays_pass(w, N, len, 0);
}

/* The recurrence for states n0 .. n0 + G - 1 through the chunk (G <= 8 is a compile-time constant at each
 * call), the states in registers: x_t = DA_t x_{t-1} + dt_t u_t B_t, from the states xin before the chunk;
 * xout (if not NULL) receives those after it. With X: X[t + 1][n] = x_t[n] (the backward's recomputation);
 * with_y: w->y[t] += sum over the group of x_t[n] C_n,t. */
static inline __attribute__((always_inline)) void recur_group(workspace *w, const vec *xin, vec *xout,
                                                              const real *Bc, const real *Cc, int64_t L,
                                                              int64_t N, int len, int64_t n0, const int G,
                                                              vec *X, const int with_y) {
    vec h[8];
#pragma GCC unroll 8
    for (int j = 0; j < G; j++) h[j] = xin[n0 + j];
    const real *Bn = Bc + n0 * L, *Cn = Cc + n0 * L;
    for (int t = 0; t < len; t++) {
        const vec dtu = w->dtu[t];
        const vec *da = w->DA + t * N + n0;
        vec y0 = vsplat(0), y1 = vsplat(0);
#pragma GCC unroll 8
        for (int j = 0; j < G; j++) {
            h[j] = da[j] * h[j] + dtu * Bn[j * L + t];
            if (X) X[(t + 1) * N + n0 + j] = h[j];
            if (with_y) {                               /* two accumulators halve the dependency chain */
                if (j & 1) y1 += h[j] * Cn[j * L + t];
                else y0 += h[j] * Cn[j * L + t];
            }
        }
        if (with_y) w->y[t] += y0 + y1;
    }
    if (xout)
#pragma GCC unroll 8
        for (int j = 0; j < G; j++) xout[n0 + j] = h[j];
}

/* recur_group over all N states, eight at a time. */
static inline __attribute__((always_inline)) void recur_chunk(workspace *w, const vec *xin, vec *xout,
                                                              const real *Bc, const real *Cc, int64_t L,
                                                              int64_t N, int len, vec *X, const int with_y) {
    for (int64_t n0 = 0; n0 < N; n0 += 8) {
        switch (N - n0 < 8 ? (int)(N - n0) : 8) {
#define MK_GROUP(G) case G: recur_group(w, xin, xout, Bc, Cc, L, N, len, n0, G, X, with_y); break;
            MK_GROUP(1) MK_GROUP(2) MK_GROUP(3) MK_GROUP(4) MK_GROUP(5) MK_GROUP(6) MK_GROUP(7) MK_GROUP(8)
#undef MK_GROUP
        }
    }
}

/* y[t .. t + n - 1] *= silu(z). */
static inline __attribute__((always_inline)) void gate_steps(workspace *w, int t, const int n) {
    vec sig[4];
    vsigmoid_n(sig, w->z + t, n);
    for (int j = 0; j < n; j++) w->y[t + j] = w->y[t + j] * (w->z[t + j] * sig[j]);
}

/* Chunk c of block k, continuing from the block's state xs (N vectors, updated); the chunk is staged. */
static void forward_chunk(const mk_scan_args *a, workspace *w, block k, int64_t c, vec *xs) {
    const int64_t L = a->len, N = a->dstate, K = a->chunk, nchunks = (L + K - 1) / K;
    const int64_t t0 = c * K, row0 = k.b * a->dim + k.c0;
    const int len = (int)(L - t0 < K ? L - t0 : K);
    if (a->ckpt) store_states(a->ckpt + (row0 * nchunks + c) * N, xs, nchunks * N, N, k.nl);
    load_A(a, w, k);
    load_steps(a, w, k, t0, len, 0);
    if (a->z) load_view(a, S_Z, a->z, w->z, k, t0, len);
    const vec Dv = load_lanes(a->D ? a->D + k.c0 : NULL, k.nl, 0);
    for (int t = 0; t < len; t++) w->y[t] = Dv * w->u[t];
    chunk_decays(w, N, len);
    recur_chunk(w, xs, xs, w->Bs, w->Cs, w->rs, N, len, NULL, 1);
    if (a->z) {                                          /* the gate, four steps at a time (see vmath.h) */
        int t = 0;
        for (; t + 4 <= len; t += 4) gate_steps(w, t, 4);
        for (; t < len; t++) gate_steps(w, t, 1);
    }
    if (a->accumulate) {                                 /* the u tile is free now */
        load_view(a, S_OUT, a->out, w->u, k, t0, len);
        for (int t = 0; t < len; t++) w->y[t] = w->u[t] + w->y[t];
    }
    store_view(a, S_OUT, a->out, w->y, k, t0, len);
}

/* Blocks j0 .. j1 - 1 of (batch b, group g), chunk by chunk across the blocks, so each chunk of B and C is
 * staged once and read from cache by all of them. */
static void forward_blocks(const mk_scan_args *a, workspace *w, int64_t b, int64_t g, int64_t j0, int64_t j1) {
    const int64_t L = a->len, N = a->dstate, K = a->chunk, nchunks = (L + K - 1) / K;
    for (int64_t j = j0; j < j1; j++) {
        block k = make_block(a, b, g, j);
        load_states(w->carry + (j - j0) * N, a->init ? a->init + (b * a->dim + k.c0) * N : NULL, N, N, k.nl);
    }
    for (int64_t c = 0; c < nchunks; c++) {
        stage_chunk(a, w, b, g, c * K, (int)(L - c * K < K ? L - c * K : K));
        for (int64_t j = j0; j < j1; j++) forward_chunk(a, w, make_block(a, b, g, j), c, w->carry + (j - j0) * N);
    }
    if (a->last)
        for (int64_t j = j0; j < j1; j++) {
            block k = make_block(a, b, g, j);
            store_states(a->last + (b * a->dim + k.c0) * N, w->carry + (j - j0) * N, N, N, k.nl);
        }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Backward.                                                                                            */

/* Per-channel gradients summed over the batch are first written per batch element. */
typedef struct {
    real *dA, *dD, *dbias;           /* (batch, dim, dstate), (batch, dim), (batch, dim) */
    real *ddt_w;                     /* (batch, dim, dt_rank) when the kernel projects ddelta back */
} partials;

/* Whether the backward projects ddelta back onto dt_w and dt_in itself (rather than writing ddelta). */
static int projects_back(const mk_scan_args *a) { return a->dt_w && a->ddt_w && a->ddt_in; }

/* What a block carries from chunk to chunk in the backward: [dLoss/dx (N) | dLoss/dA (N) | dD | dbias] and,
 * projecting back, its channels' dt_w gradient (dt_rank vectors). */
static int64_t carry_bwd(const mk_scan_args *a) { return 2 * a->dstate + 2 + (projects_back(a) ? a->dt_rank : 0); }


/* dst[i] += sum of the lanes of p[i], i < W. */
static inline void reduce_lanes_add(real *dst, const vec p[W]) {
#if defined(__AVX__) && !defined(MK_DOUBLE)
    __m256 s01 = _mm256_hadd_ps((__m256)p[0], (__m256)p[1]);
    __m256 s23 = _mm256_hadd_ps((__m256)p[2], (__m256)p[3]);
    __m256 s45 = _mm256_hadd_ps((__m256)p[4], (__m256)p[5]);
    __m256 s67 = _mm256_hadd_ps((__m256)p[6], (__m256)p[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23);             /* [sums of low halves | sums of high halves] */
    __m256 s4567 = _mm256_hadd_ps(s45, s67);
    __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20);
    __m256 hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
    _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), _mm256_add_ps(lo, hi)));
#elif defined(__AVX__) && defined(MK_DOUBLE)
    __m256d s01 = _mm256_hadd_pd((__m256d)p[0], (__m256d)p[1]);
    __m256d s23 = _mm256_hadd_pd((__m256d)p[2], (__m256d)p[3]);
    __m256d lo = _mm256_permute2f128_pd(s01, s23, 0x20);
    __m256d hi = _mm256_permute2f128_pd(s01, s23, 0x31);
    _mm256_storeu_pd(dst, _mm256_add_pd(_mm256_loadu_pd(dst), _mm256_add_pd(lo, hi)));
#else
    for (int i = 0; i < W; i++) {
        real s = 0;
        for (int lane = 0; lane < W; lane++) s += p[i][lane];
        dst[i] += s;
    }
#endif
}

/* rows[n * L + t] += sum over lanes of P[(t + 1) * N + n] * Q[t] for n < N, t < len: dB (P = adjoint states,
 * Q = dt u) and dC (P = states, Q = dy) of one chunk, W steps at a time (the P rows of W steps are
 * contiguous, so the walk over n stays in L1). */
static void lane_dots(real *rows, int64_t L, const vec *P, int64_t N, const vec *Q, int len) {
    int t = 0;
    for (; t + W <= len; t += W) {
        const vec *Pt = P + (t + 1) * N;
        for (int64_t n = 0; n < N; n++) {
            vec p[W];
            for (int j = 0; j < W; j++) p[j] = Pt[j * N + n] * Q[t + j];
            reduce_lanes_add(rows + n * L + t, p);
        }
    }
    for (; t < len; t++)
        for (int64_t n = 0; n < N; n++) {
            vec p = P[(t + 1) * N + n] * Q[t];
            real s = 0;
            for (int lane = 0; lane < W; lane++) s += p[lane];
            rows[n * L + t] += s;
        }
}

/* ddt_in's staged rows: rows[r * rs + t] += sum over the block's channels of dt_w[c, r] ddt[t] (Wdt holds the
 * block's rows of dt_w, as load_steps left it for this chunk, zero in lanes past the block's channels). */
static void project_back_in(real *rows, int64_t rs, const vec *Wdt, int64_t R, const vec *ddt, int len) {
    int t = 0;
    for (; t + W <= len; t += W)
        for (int64_t r = 0; r < R; r++) {
            vec p[W];
            for (int j = 0; j < W; j++) p[j] = Wdt[r] * ddt[t + j];
            reduce_lanes_add(rows + r * rs + t, p);
        }
    for (; t < len; t++)
        for (int64_t r = 0; r < R; r++) {
            const vec p = Wdt[r] * ddt[t];
            real s = 0;
            for (int lane = 0; lane < W; lane++) s += p[lane];
            rows[r * rs + t] += s;
        }
}

/* The block's dt_w gradient: dW[r] += sum over the chunk's steps of ddt[t] dt_in[r, t] (staged rows), four
 * steps at a time into separate sums, added in a fixed order. */
static void project_back_w(vec *dW, const vec *ddt, const real *rows, int64_t rs, int64_t R, int len) {
    for (int64_t r = 0; r < R; r++) {
        const real *row = rows + r * rs;
        vec s0 = vsplat(0), s1 = vsplat(0), s2 = vsplat(0), s3 = vsplat(0);
        int t = 0;
        for (; t + 4 <= len; t += 4) {
            s0 += ddt[t] * row[t];
            s1 += ddt[t + 1] * row[t + 1];
            s2 += ddt[t + 2] * row[t + 2];
            s3 += ddt[t + 3] * row[t + 3];
        }
        for (; t < len; t++) s0 += ddt[t] * row[t];
        dW[r] += (s0 + s1) + (s2 + s3);
    }
}

/* Recompute the chunk's decays DA[t] and states X[t + 1] (X[0] is the checkpoint); with_y: also the pre-gate
 * output sum_n x C + D u into w->y (needed for dz). */
static inline __attribute__((always_inline)) void recompute_chunk(workspace *w, const real *Bc, const real *Cc,
                                                                  int64_t L, int64_t N, int len, vec Dv,
                                                                  const int with_y) {
    if (with_y)
        for (int t = 0; t < len; t++) w->y[t] = Dv * w->u[t];
    chunk_decays(w, N, len);
    recur_chunk(w, w->X, NULL, Bc, Cc, L, N, len, w->X, with_y);
}

/* The adjoint recurrence for states n0 .. n0 + r - 1, last step first, with their adjoints dx and dA sums
 * in registers (r is a compile-time constant at each call; dx, dAs point at the block's carried values).
 * Overwrites X[t + 1][n] with dLoss/dx_t[n] (X[t + 1] is not needed any more) and adds this group's terms of
 * s_t = sum_n dLoss/dx_t[n] B_n,t and g_t = sum_n dLoss/d(dt A_n) A_n into w->s, w->g. */
static inline __attribute__((always_inline)) void reverse_group(workspace *w, vec *dxs, vec *dAs_, const real *Bc,
                                                                const real *Cc, int64_t L, int64_t N, int len,
                                                                int64_t n0, const int r) {
    vec dx[4], dAs[4], A[4];
    for (int j = 0; j < r; j++) {
        dx[j] = dxs[n0 + j];
        dAs[j] = dAs_[n0 + j];
        A[j] = w->A[n0 + j];
    }
    const real *Bn = Bc + n0 * L, *Cn = Cc + n0 * L;
    for (int t = len - 1; t >= 0; t--) {
        const vec dy = w->dy[t], dt = w->dt[t];
        vec *adj = w->X + (t + 1) * N + n0;
        const vec *xp = w->X + t * N + n0, *da = w->DA + t * N + n0;
        vec s = vsplat(0), g = vsplat(0);
        for (int j = 0; j < r; j++) {
            vec dxt = dx[j] + dy * Cn[j * L + t];        /* dLoss/dx_t: from later steps and from y_t */
            adj[j] = dxt;
            s += dxt * Bn[j * L + t];
            vec q = dxt * xp[j] * da[j];                 /* dLoss/d(dt A_n) */
            g += q * A[j];
            dAs[j] += q * dt;
            dx[j] = dxt * da[j];                         /* dLoss/dx_{t-1} through the decay */
        }
        w->s[t] += s;
        w->g[t] += g;
    }
    for (int j = 0; j < r; j++) {
        dxs[n0 + j] = dx[j];
        dAs_[n0 + j] = dAs[j];
    }
}

/* Chunk c of block k: carry (see carry_bwd) of the block, updated; adds the chunk's dB, dC (and, projecting
 * back, dt_in's gradient) into the staged rows w->dBs, w->dCs (w->ddts) (the chunk is staged). */
static void backward_chunk(const mk_scan_args *a, workspace *w, block k, int64_t c, vec *carry) {
    const int64_t L = a->len, N = a->dstate, K = a->chunk, nchunks = (L + K - 1) / K;
    const int64_t t0 = c * K, row0 = k.b * a->dim + k.c0;
    const int len = (int)(L - t0 < K ? L - t0 : K), nl = k.nl;
    vec *dx = carry, *dAs = carry + N, *dD = carry + 2 * N, *dbias = carry + 2 * N + 1;
    load_A(a, w, k);
    load_steps(a, w, k, t0, len, 1);
    const vec Dv = load_lanes(a->D ? a->D + k.c0 : NULL, nl, 0);
    load_view(a, S_DOUT, a->dout, w->dout, k, t0, len);
    if (a->z) load_view(a, S_Z, a->z, w->z, k, t0, len);
    for (int t = 0; t < len; t++) {
        if (a->z) {
            vec z = w->z[t], sig = vsigmoid(z);
            w->dgate[t] = sig * (1.0f + z * (1.0f - sig));
            w->dy[t] = w->dout[t] * (z * sig);
        } else {
            w->dy[t] = w->dout[t];
        }
        w->s[t] = vsplat(0);
        w->g[t] = vsplat(0);
    }

    load_states(w->X, a->ckpt + (row0 * nchunks + c) * N, nchunks * N, N, nl);
    const int64_t rs = w->rs;
    if (a->z) recompute_chunk(w, w->Bs, w->Cs, rs, N, len, Dv, 1);
    else recompute_chunk(w, w->Bs, w->Cs, rs, N, len, Dv, 0);

    /* dC[n, t] = sum over the block's channels of dy_t x_t[n] (before X is overwritten). */
    lane_dots(w->dCs, rs, w->X, N, w->dy, len);

    int64_t n0 = 0;
    for (; n0 + 4 <= N; n0 += 4) reverse_group(w, dx, dAs, w->Bs, w->Cs, rs, N, len, n0, 4);
    for (; n0 < N; n0++) reverse_group(w, dx, dAs, w->Bs, w->Cs, rs, N, len, n0, 1);

    /* dB[n, t] = sum over the block's channels of dLoss/dx_t[n] dt_t u_t. */
    lane_dots(w->dBs, rs, w->X, N, w->dtu, len);

    for (int t = 0; t < len; t++) {
        const vec s = w->s[t], u = w->u[t], dy = w->dy[t];
        vec ddt = w->g[t] + s * u;
        if (a->z) w->z[t] = w->dout[t] * w->y[t] * w->dgate[t];   /* dz (tile reused) */
        w->y[t] = s * w->dt[t] + Dv * dy;                        /* du (tile reused) */
        *dD += dy * u;
        if (a->softplus) ddt = ddt * w->dsp[t];
        *dbias += ddt;
        w->dt[t] = ddt;                                          /* ddelta (tile reused) */
    }
    store_view(a, S_DU, a->du, w->y, k, t0, len);
    if (projects_back(a)) {
        project_back_in(w->ddts, rs, w->Wdt, a->dt_rank, w->dt, len);
        project_back_w(carry + 2 * N + 2, w->dt, w->dts, rs, a->dt_rank, len);
    }
    if (a->ddelta) store_view(a, S_DDELTA, a->ddelta, w->dt, k, t0, len);
    if (a->z) store_view(a, S_DZ, a->dz, w->z, k, t0, len);
}

/* rows[n * L + t] += staged[n * rs + t] for n < N, t < len. */
static void add_staged(real *rows, int64_t L, const real *staged, int64_t rs, int64_t N, int len) {
    for (int64_t n = 0; n < N; n++)
        for (int t = 0; t < len; t++) rows[n * L + t] += staged[n * rs + t];
}

/* Blocks j0 .. j1 - 1 of (batch b, group g), last chunk first, chunk by chunk across the blocks (the staged
 * B, C and dB, dC rows of a chunk stay in cache for all of them); dB, dC are added into dB_acc, dC_acc. */
static void backward_blocks(const mk_scan_args *a, workspace *w, int64_t b, int64_t g, int64_t j0, int64_t j1,
                            real *dB_acc, real *dC_acc, real *dI_acc, partials part) {
    const int64_t L = a->len, N = a->dstate, K = a->chunk, nchunks = (L + K - 1) / K, bg = b * a->groups + g;
    const int64_t nc = carry_bwd(a), R = a->dt_rank, back = projects_back(a);
    for (int64_t j = j0; j < j1; j++) {
        block k = make_block(a, b, g, j);
        vec *carry = w->carry + (j - j0) * nc;
        load_states(carry, a->dlast ? a->dlast + (b * a->dim + k.c0) * N : NULL, N, N, k.nl);
        for (int64_t i = N; i < nc; i++) carry[i] = vsplat(0);
    }
    for (int64_t c = nchunks - 1; c >= 0; c--) {
        const int64_t t0 = c * K;
        const int len = (int)(L - t0 < K ? L - t0 : K);
        stage_chunk(a, w, b, g, t0, len);
        memset(w->dBs, 0, (size_t)(N * w->rs) * sizeof(real));
        memset(w->dCs, 0, (size_t)(N * w->rs) * sizeof(real));
        if (back) memset(w->ddts, 0, (size_t)(R * w->rs) * sizeof(real));
        for (int64_t j = j0; j < j1; j++)
            backward_chunk(a, w, make_block(a, b, g, j), c, w->carry + (j - j0) * nc);
        add_staged(dB_acc + bg * N * L + t0, L, w->dBs, w->rs, N, len);
        add_staged(dC_acc + bg * N * L + t0, L, w->dCs, w->rs, N, len);
        if (back) add_staged(dI_acc + bg * R * L + t0, L, w->ddts, w->rs, R, len);
    }
    for (int64_t j = j0; j < j1; j++) {
        block k = make_block(a, b, g, j);
        const int64_t row0 = b * a->dim + k.c0;
        const vec *carry = w->carry + (j - j0) * nc;
        if (back)
            for (int lane = 0; lane < k.nl; lane++)
                for (int64_t r = 0; r < R; r++) part.ddt_w[(row0 + lane) * R + r] = carry[2 * N + 2 + r][lane];
        if (a->dinit) store_states(a->dinit + row0 * N, carry, N, N, k.nl);
        store_states(part.dA + row0 * N, carry + N, N, N, k.nl);
        for (int lane = 0; lane < k.nl; lane++) {
            part.dD[row0 + lane] = carry[2 * N][lane];
            part.dbias[row0 + lane] = carry[2 * N + 1][lane];
        }
    }
}

/* ---------------------------------------------------------------------------------------------------- */
/* Threads: work is claimed through an atomic counter; thread 0 is the caller.                          */
/*                                                                                                      */
/* An item is a range of blocks of one (batch, group) unit. With enough units to keep every thread busy  */
/* an item is a whole unit; otherwise each unit is split into `ranges` ranges. A thread walks its item   */
/* chunk-major over sub-ranges of at most MAX_SUB blocks (bounding what it carries between chunks).     */
/* The backward's dB and dC sum over the channels of a unit: with whole units per item a thread adds     */
/* straight into the output; with split units the items are dealt out to `nslots` slots in a fixed way  */
/* (slot s runs items s, s + nslots, ... in that order), slot 0 adds into the output and slot s > 0    */
/* into its own zeroed copy, and the copies are added in slot order at the end: the sums do not depend  */
/* on which thread got there first, so the gradients are the same bits on every run with the same      */
/* thread count. (Claiming those items through the counter made dB, dC differ at rounding level from    */
/* run to run.) Thread t runs slot t; a slot whose thread did not start, or could not allocate its      */
/* workspace, is run afterwards by the caller. No two threads ever write the same address.             */

#define MAX_SUB 64

typedef struct {
    const mk_scan_args *a;
    int backward;
    int64_t ranges;                  /* ranges per unit */
    int64_t nitems;
    int64_t next;
    real *acc;                       /* split units: (nslots - 1) copies of dB, dC and ddt_in */
    partials part;
    int nslots;                      /* > 0: items dealt out to this many slots (split backward) */
    unsigned char done[256];         /* slots finished */
} job;

typedef struct {
    job *j;
    int tid;
} worker_arg;

static int64_t ranges_per_unit(const mk_scan_args *a, int nthreads) {
    const int64_t units = a->batch * a->groups, bpg = blocks_per_group(a);
    if (nthreads <= 1 || units >= 4 * (int64_t)nthreads) return 1;
    const int64_t r = (4 * (int64_t)nthreads + units - 1) / units;
    return r < bpg ? r : bpg;
}

/* A split backward's private copy per extra slot: dB, dC and, projecting back, ddt_in. */
static int64_t slot_copy_size(const mk_scan_args *a) {
    return a->batch * a->groups * (2 * a->dstate + (projects_back(a) ? a->dt_rank : 0)) * a->len;
}

static void run_item(job *j, workspace *w, int64_t item, int slot) {
    const mk_scan_args *a = j->a;
    const int64_t unit = item / j->ranges, r = item % j->ranges, bpg = blocks_per_group(a);
    const int64_t b = unit / a->groups, g = unit % a->groups;
    const int64_t first = r * bpg / j->ranges, end = (r + 1) * bpg / j->ranges;
    real *dB = a->dB, *dC = a->dC, *dI = a->ddt_in;
    if (j->backward && j->ranges == 1) {          /* this item owns the unit's dB, dC (ddt_in) slices */
        const int64_t NL = a->dstate * a->len, RL = a->dt_rank * a->len;
        memset(a->dB + unit * NL, 0, NL * sizeof(real));
        memset(a->dC + unit * NL, 0, NL * sizeof(real));
        if (projects_back(a)) memset(a->ddt_in + unit * RL, 0, RL * sizeof(real));
    } else if (j->backward && slot > 0) {
        const int64_t size = a->batch * a->groups * a->dstate * a->len;
        dB = j->acc + (int64_t)(slot - 1) * slot_copy_size(a);
        dC = dB + size;
        dI = dC + size;
    }
    for (int64_t j0 = first; j0 < end; j0 += MAX_SUB) {
        const int64_t j1 = j0 + MAX_SUB < end ? j0 + MAX_SUB : end;
        if (j->backward) backward_blocks(a, w, b, g, j0, j1, dB, dC, dI, j->part);
        else forward_blocks(a, w, b, g, j0, j1);
    }
}

/* Threads run either on the OpenMP pool torch already uses (GOMP_parallel, handed over by the loader:
 * mk_use_openmp) or, where there is none, on pthreads started for the call. Sharing torch's pool matters
 * on few cores: after each torch op its workers spin-wait for a while, and threads of our own would have
 * to share the cores with them. */
typedef void (*gomp_parallel_fn)(void (*)(void *), void *, unsigned, unsigned);
typedef int (*omp_thread_num_fn)(void);
static gomp_parallel_fn gomp_parallel = NULL;
static omp_thread_num_fn omp_thread_num = NULL;

static int alloc_for(job *j, workspace *w, int keep) {
    const int64_t carry = j->backward ? carry_bwd(j->a) : j->a->dstate;
    return workspace_alloc(w, j->a->chunk, j->a->dstate, j->a->dt_w ? j->a->dt_rank : 0, j->backward,
                           MAX_SUB * carry, keep);
}

static void run_slot(job *j, workspace *w, int slot) {
    for (int64_t item = slot; item < j->nitems; item += j->nslots) run_item(j, w, item, slot);
    j->done[slot] = 1;
}

static void work(job *j, int tid, int keep) {
    workspace w;
    if (j->nslots > 0 && tid >= j->nslots) return;
    if (alloc_for(j, &w, keep)) return;
    if (j->nslots > 0) {
        run_slot(j, &w, tid);
    } else {
        for (;;) {
            int64_t item = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
            if (item >= j->nitems) break;
            run_item(j, &w, item, tid);
        }
    }
    if (!keep) free(w.mem);
}

/* Slots that no thread ran (fewer threads than asked for, or a workspace that could not be allocated),
 * run by the caller; 0, or 1 if one is still left (no memory). */
static int finish_slots(job *j) {
    workspace w;
    int allocated = 0;
    for (int s = 0; s < j->nslots; s++) {
        if (j->done[s]) continue;
        if (!allocated && alloc_for(j, &w, 1)) return 1;
        allocated = 1;
        run_slot(j, &w, s);
    }
    return 0;
}

static void *pthread_body(void *p) {
    worker_arg *wa = (worker_arg *)p;
    work(wa->j, wa->tid, 0);
    return NULL;
}

static void openmp_body(void *p) { work((job *)p, omp_thread_num(), 1); }

/* Runs the job on up to `nthreads` threads; returns 0, or 1 if work was left undone (no memory). */
static int run_threads(job *j, int nthreads) {
    if (gomp_parallel && nthreads > 1) {
        gomp_parallel(openmp_body, j, (unsigned)nthreads, 0);
    } else {
        pthread_t threads[256];
        worker_arg args[256];
        int started = 0;
        for (int i = 1; i < nthreads; i++) {
            args[i] = (worker_arg){j, i};
            if (pthread_create(&threads[i], NULL, pthread_body, &args[i]) != 0) break;
            started = i;
        }
        work(j, 0, 1);
        for (int i = 1; i <= started; i++) pthread_join(threads[i], NULL);
    }
    if (j->nslots > 0) return finish_slots(j);
    /* A claimed item is always finished; items are left only if every thread failed to allocate. */
    return j->next < j->nitems ? 1 : 0;
}

/* Threads worth starting for a call: at most one per item and one per MIN_WORK state updates (about
 * 0.1 ms of work for one core), so that small calls (decoding, gradcheck) do not pay thread wake-ups. */
#define MIN_WORK ((int64_t)1 << 17)

static int clamp_threads(const mk_scan_args *a, int64_t want, int64_t items) {
    const int64_t work = a->batch * a->dim * a->len * a->dstate;
    if (want > work / MIN_WORK) want = work / MIN_WORK;
    if (want > items) want = items;
    if (want > 256) want = 256;
    return want < 1 ? 1 : (int)want;
}

static int check_args(const mk_scan_args *a) {
    return a->groups < 1 || a->dim % a->groups || a->chunk < 1 || a->nthreads < 1 || a->batch < 0 ||
           a->len < 0 || a->dstate < 1;
}

static int run_forward(const mk_scan_args *a) {
    if (check_args(a)) return 2;
    const int64_t units = a->batch * a->groups;
    const int nthreads = clamp_threads(a, a->nthreads, units * blocks_per_group(a));
    job j = {a, 0, ranges_per_unit(a, nthreads), 0, 0, NULL, {NULL, NULL, NULL, NULL}, 0, {0}};
    j.nitems = units * j.ranges;
    return run_threads(&j, clamp_threads(a, nthreads, j.nitems));
}

static int run_backward(const mk_scan_args *a) {
    if (check_args(a)) return 2;
    const int64_t b = a->batch, d = a->dim, N = a->dstate;
    const int64_t size = b * a->groups * N * a->len;
    int nthreads = clamp_threads(a, a->nthreads, b * a->groups * blocks_per_group(a));
    job j = {a, 1, ranges_per_unit(a, nthreads), 0, 0, NULL, {NULL, NULL, NULL, NULL}, 0, {0}};
    j.nitems = b * a->groups * j.ranges;
    nthreads = clamp_threads(a, nthreads, j.nitems);
    const int64_t R = projects_back(a) ? a->dt_rank : 0, isize = b * a->groups * R * a->len;
    real *part = malloc((size_t)(b * d * (N + 2 + R)) * sizeof(real) + 1);
    if (!part) return 1;
    j.part = (partials){part, part + b * d * N, part + b * d * N + b * d, part + b * d * (N + 2)};
    if (j.ranges > 1) {
        memset(a->dB, 0, (size_t)size * sizeof(real));
        memset(a->dC, 0, (size_t)size * sizeof(real));
        if (R) memset(a->ddt_in, 0, (size_t)isize * sizeof(real));
        if (nthreads > 1) {
            j.acc = calloc((size_t)((nthreads - 1) * slot_copy_size(a)) + 1, sizeof(real));
            if (!j.acc) nthreads = 1;                    /* no room for copies: run on one thread */
        }
        j.nslots = nthreads;
    }
    int rc = run_threads(&j, nthreads);
    if (j.acc) {
        for (int t = 0; t < j.nslots - 1; t++) {          /* in slot order */
            const real *src = j.acc + (int64_t)t * slot_copy_size(a);
            for (int64_t i = 0; i < size; i++) a->dB[i] += src[i];
            for (int64_t i = 0; i < size; i++) a->dC[i] += src[size + i];
            for (int64_t i = 0; i < isize; i++) a->ddt_in[i] += src[2 * size + i];
        }
        free(j.acc);
    }
    /* Sum the per-batch partials (in batch order, so the result does not depend on the threads). */
    for (int64_t i = 0; i < d * N; i++) {
        real s = 0;
        for (int64_t bb = 0; bb < b; bb++) s += j.part.dA[bb * d * N + i];
        a->dA[i] = s;
    }
    for (int64_t c = 0; c < d; c++) {
        real sD = 0, sb = 0;
        for (int64_t bb = 0; bb < b; bb++) {
            sD += j.part.dD[bb * d + c];
            sb += j.part.dbias[bb * d + c];
        }
        if (a->dD) a->dD[c] = sD;
        if (a->dbias) a->dbias[c] = sb;
    }
    for (int64_t i = 0; i < d * R; i++) {
        real s = 0;
        for (int64_t bb = 0; bb < b; bb++) s += j.part.ddt_w[bb * d * R + i];
        a->ddt_w[i] = s;
    }
    free(part);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------- */
/* Exported API (ctypes).                                                                               */

int mk_abi_version(void) { return MK_ABI_VERSION * 100 + (int)sizeof(real); }
int64_t mk_lanes(void) { return W; }
int64_t mk_args_size(void) { return (int64_t)sizeof(mk_scan_args); }

/* Use this OpenMP runtime's GOMP_parallel and omp_get_thread_num (both NULL: pthreads). */
void mk_use_openmp(void *parallel, void *thread_num) {
    gomp_parallel = parallel && thread_num ? (gomp_parallel_fn)parallel : NULL;
    omp_thread_num = gomp_parallel ? (omp_thread_num_fn)thread_num : NULL;
}

int mk_threading(void) { return gomp_parallel != NULL; }

/* delta, or what to project it from. */
static int has_delta(const mk_scan_args *a) { return a->delta || (a->dt_w && a->dt_in && a->dt_rank > 0); }

int mk_scan_fwd(const mk_scan_args *a) {
    if (!has_delta(a)) return 3;
    return run_forward(a);
}

int mk_scan_bwd(const mk_scan_args *a) {
    if (!has_delta(a) || !a->dout || !a->ckpt || !a->du || !(a->ddelta || projects_back(a)) || !a->dA ||
        !a->dB || !a->dC || (a->z && !a->dz))
        return 3;
    return run_backward(a);
}

/* y[i] = f(x[i]) for all i < n, the tail through a zero-padded vector so every element takes the vector code. */
#define MK_MAP(f, x, y, n)                                                                                   \
    do {                                                                                                     \
        int64_t i_ = 0;                                                                                      \
        for (; i_ + W <= (n); i_ += W) vstore((y) + i_, f(vload((x) + i_)));                                 \
        if (i_ < (n)) {                                                                                      \
            real in_[W] = {0}, out_[W];                                                                      \
            memcpy(in_, (x) + i_, (size_t)((n) - i_) * sizeof(real));                                        \
            vstore(out_, f(vload(in_)));                                                                     \
            memcpy((y) + i_, out_, (size_t)((n) - i_) * sizeof(real));                                       \
        }                                                                                                    \
    } while (0)

static inline vec scan_decay_exp(vec x) { return vexp2(x * (real)1.4426950408889634074); }

/* The exp the scan runs for its decays (2^(x log2 e)), over n elements `reps` times: its throughput. */
void mk_vexp_bench(const real *x, real *y, int64_t n, int64_t reps) {
    for (int64_t r = 0; r < reps; r++) {
        MK_MAP(scan_decay_exp, x, y, n);
        __asm__ volatile("" ::: "memory");   /* keep every repetition */
    }
}

/* The vector functions over arrays, for the accuracy tests of vmath.h. */
void mk_vexp(const real *x, real *y, int64_t n) { MK_MAP(vexp, x, y, n); }
void mk_vexp_decay(const real *x, real *y, int64_t n) { MK_MAP(scan_decay_exp, x, y, n); }
void mk_vsoftplus(const real *x, real *y, int64_t n) { MK_MAP(vsoftplus, x, y, n); }

/* ---------------------------------------------------------------------------------------------------- */
/* Causal depthwise conv1d with an optional SiLU: the conv of a Mamba branch (mamba_ssm's               */
/* causal_conv1d_fn), per batch b and channel c:                                                         */
/*     pre_t = bias + sum_k w_k x_{t-(K-1)+k}   (x_s = 0 for s < 0),     out_t = silu(pre_t) or pre_t    */
/* Forward and backward each read their inputs once: the backward recomputes pre_t rather than keeping  */
/* it, so autograd holds x alone between the passes. A thread takes blocks of channels and walks the    */
/* batch inside, so a channel's weight and bias gradients are summed by one thread in batch order (the  */
/* result does not depend on the threads). Rows (time stride 1) run W steps per vector; windows that    */
/* cross the start or the end of the row are read through a zero-padded copy. Other layouts (token-     */
/* major memory, time reversed through a negative stride) run W channels per vector, step by step.      */

typedef struct {
    const real *x, *w, *bias;        /* x (batch, dim, len); w (dim, K); bias (dim) or NULL */
    real *out;                       /* forward output (batch, dim, len) */
    const real *dout;                /* backward input (batch, dim, len) */
    real *dx, *dw, *dbias;           /* (batch, dim, len), (dim, K), (dim) or NULL */
    int64_t batch, dim, len, K;
    mk_stride sx, sout, sdout, sdx;  /* strides of x, out, dout, dx (as the scan's) */
    int32_t silu, nthreads;
} mk_conv_args;

/* x[s0 .. s0+W) with zeros outside [0, L). */
static inline vec conv_window(const real *x, int64_t s0, int64_t L) {
    if (s0 >= 0 && s0 + W <= L) return vload(x + s0);
    real buf[W];
    for (int i = 0; i < W; i++) buf[i] = (s0 + i >= 0 && s0 + i < L) ? x[s0 + i] : (real)0;
    return vload(buf);
}

static inline void store_part(real *dst, vec v, int64_t n) {
    if (n >= W) { vstore(dst, v); return; }
    real buf[W];
    vstore(buf, v);
    memcpy(dst, buf, (size_t)n * sizeof(real));
}

/* A row behind K-1 zeros and before 2W zeros: xp[t + k] = x[t - (K-1) + k] for every block start t < L, so
 * each tap of a block is one plain vector load, also at the start and the end of short rows. */
#define CONV_PAD(L, K) ((L) + (K) + 2 * W)
static inline void pad_row(real *xp, const real *x, int64_t L, int64_t K) {
    memset(xp, 0, (size_t)(K - 1) * sizeof(real));
    memcpy(xp + K - 1, x, (size_t)L * sizeof(real));
    memset(xp + K - 1 + L, 0, (size_t)(2 * W) * sizeof(real));
}

static void conv_channel_fwd(const mk_conv_args *a, int64_t c, real *xp) {
    const int64_t L = a->len, K = a->K;
    const real *w = a->w + c * K;
    const real bias = a->bias ? a->bias[c] : (real)0;
    for (int64_t b = 0; b < a->batch; b++) {
        pad_row(xp, a->x + b * a->sx.b + c * a->sx.c, L, K);
        real *out = a->out + b * a->sout.b + c * a->sout.c;
        for (int64_t t = 0; t < L; t += W) {
            vec pre = vsplat(bias);
            for (int64_t k = 0; k < K; k++) pre += w[k] * vload(xp + t + k);
            store_part(out + t, a->silu ? pre * vsigmoid(pre) : pre, L - t);
        }
    }
}

#define CONV_SUM_BLOCK (64 * W)

/* xp: this thread's padded row; g: its buffer of CONV_PAD(len, K) reals (dL/dpre of one row, zero past len). */
static void conv_channel_bwd(const mk_conv_args *a, int64_t c, real *xp, real *g) {
    const int64_t L = a->len, K = a->K;
    const real *w = a->w + c * K;
    const real bias = a->bias ? a->bias[c] : (real)0;
    vec dw_acc[K], db_acc = vsplat(0);
    for (int64_t k = 0; k < K; k++) dw_acc[k] = vsplat(0);
    for (int64_t b = 0; b < a->batch; b++) {
        pad_row(xp, a->x + b * a->sx.b + c * a->sx.c, L, K);
        const real *dout = a->dout + b * a->sdout.b + c * a->sdout.c;
        real *dx = a->dx + b * a->sdx.b + c * a->sdx.c;
        /* Weight and bias gradients: summed per block of CONV_SUM_BLOCK steps, then the blocks summed, so
         * float32 rounding grows with the block count rather than with the length. */
        vec dw_blk[K], db_blk = vsplat(0);
        for (int64_t k = 0; k < K; k++) dw_blk[k] = vsplat(0);
        for (int64_t t = 0; t < L; t += W) {     /* dL/dpre, and the weight and bias gradients */
            if (t % CONV_SUM_BLOCK == 0 && t) {
                db_acc += db_blk;
                db_blk = vsplat(0);
                for (int64_t k = 0; k < K; k++) { dw_acc[k] += dw_blk[k]; dw_blk[k] = vsplat(0); }
            }
            vec xs[K];
            vec pre = vsplat(bias);
            for (int64_t k = 0; k < K; k++) {
                xs[k] = vload(xp + t + k);
                pre += w[k] * xs[k];
            }
            vec gv = conv_window(dout, t, L);     /* zero past the end: those lanes add nothing */
            if (a->silu) {
                vec s = vsigmoid(pre);
                gv *= s * (1 + pre * (1 - s));
            }
            store_part(g + t, gv, W);             /* g has room past len; rewritten to zero below */
            db_blk += gv;
            for (int64_t k = 0; k < K; k++) dw_blk[k] += gv * xs[k];
        }
        db_acc += db_blk;
        for (int64_t k = 0; k < K; k++) dw_acc[k] += dw_blk[k];
        memset(g + L, 0, (size_t)(K + W) * sizeof(real));
        for (int64_t s = 0; s < L; s += W) {     /* dx_s = sum_k w_k g_{s+(K-1)-k} */
            vec acc = vsplat(0);
            for (int64_t k = 0; k < K; k++) acc += w[k] * vload(g + s + (K - 1) - k);
            store_part(dx + s, acc, L - s);
        }
    }
    for (int64_t k = 0; k < K; k++) {
        real s = 0, lanes[W];
        vstore(lanes, dw_acc[k]);
        for (int i = 0; i < W; i++) s += lanes[i];
        a->dw[c * K + k] = s;
    }
    if (a->dbias) {
        real s = 0, lanes[W];
        vstore(lanes, db_acc);
        for (int i = 0; i < W; i++) s += lanes[i];
        a->dbias[c] = s;
    }
}


/* The channel-blocked form, for every layout but rows: the channels of a block are the lanes of a vector
 * and time advances step by step through the strides, the last K inputs in a sliding window. Work items are
 * (batch element, span of CONV_SPAN steps) with all channels inside, so a thread walks token-major memory
 * row by row (per channel block over the whole length, each step would touch a new page: TLB misses at a
 * few thousand steps), items never write the same cache line, and each span of the backward sums its own
 * weight and bias gradients, added up in span order at the end. */
#define CONV_SPAN 256
#define MAX_CONV_K 16                        /* cpu_conv.MAX_KERNEL_SIZE */

static inline vec lanes_at(const real *p, int64_t cs, int nl) {
    if (cs == 1 && nl == W) return vload(p);
    vec v = vsplat(0);
    for (int lane = 0; lane < nl; lane++) v[lane] = p[lane * cs];
    return v;
}

static inline void lanes_to(real *p, int64_t cs, int nl, vec v) {
    if (cs == 1 && nl == W) { vstore(p, v); return; }
    for (int lane = 0; lane < nl; lane++) p[lane * cs] = v[lane];
}

/* win[1 .. K-1] = x at steps t0-K+1 .. t0-1 (zero before the start): the window before step t0. */
static inline void conv_window_at(vec *win, const real *x, int64_t cs, int64_t ts, int nl, int64_t t0, int K) {
    for (int k = 1; k < K; k++) {
        const int64_t t = t0 - K + k;
        win[k] = t >= 0 ? lanes_at(x + t * ts, cs, nl) : vsplat(0);
    }
}

/* Steps t0 .. t1-1 of one block (K and silu compile-time constants at each call, see conv_span_fwd), so the
 * window lives in registers. */
/* Steps t .. t + n - 1 of conv_steps_fwd, the window `win` slid along; the silu of the n steps together
 * (interleaved, see vmath.h). */
static inline __attribute__((always_inline)) void conv_block(const real *x, int64_t xc, int64_t xt, real *out,
                                                             int64_t oc, int64_t ot, int nl, int64_t t, vec *win,
                                                             const vec *w, vec bias, const int K, const int silu,
                                                             int fast, const int n) {
    vec pre[4], y[4];
    for (int j = 0; j < n; j++) {
        for (int k = 0; k + 1 < K; k++) win[k] = win[k + 1];
        win[K - 1] = fast ? vload(x + (t + j) * xt) : lanes_at(x + (t + j) * xt, xc, nl);
        pre[j] = bias;
        for (int k = 0; k < K; k++) pre[j] += w[k] * win[k];
    }
    if (silu) {
        vsigmoid_n(y, pre, n);
        for (int j = 0; j < n; j++) y[j] = pre[j] * y[j];
    } else {
        for (int j = 0; j < n; j++) y[j] = pre[j];
    }
    for (int j = 0; j < n; j++) {
        if (fast) vstore(out + (t + j) * ot, y[j]);
        else lanes_to(out + (t + j) * ot, oc, nl, y[j]);
    }
}

static inline __attribute__((always_inline)) void conv_steps_fwd(const real *x, int64_t xc, int64_t xt, real *out,
                                                                 int64_t oc, int64_t ot, int nl, int64_t t0,
                                                                 int64_t t1, const vec *w, vec bias, const int K,
                                                                 const int silu) {
    vec win[MAX_CONV_K];
    conv_window_at(win, x, xc, xt, nl, t0, K);
    const int fast = nl == W && xc == 1 && oc == 1;
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) conv_block(x, xc, xt, out, oc, ot, nl, t, win, w, bias, K, silu, fast, 4);
    for (; t < t1; t++) conv_block(x, xc, xt, out, oc, ot, nl, t, win, w, bias, K, silu, fast, 1);
}

static void conv_span_fwd(const mk_conv_args *a, int64_t b, int64_t t0, int64_t t1) {
    const int64_t K = a->K;
    for (int64_t c0 = 0; c0 < a->dim; c0 += W) {
        const int nl = (int)(a->dim - c0 < W ? a->dim - c0 : W);
        vec w[MAX_CONV_K];
        for (int64_t k = 0; k < K; k++) w[k] = lanes_at(a->w + c0 * K + k, K, nl);
        const vec bias = a->bias ? lanes_at(a->bias + c0, 1, nl) : vsplat(0);
        const real *x = a->x + b * a->sx.b + c0 * a->sx.c;
        real *out = a->out + b * a->sout.b + c0 * a->sout.c;
#define MK_STEPS(KK, S) conv_steps_fwd(x, a->sx.c, a->sx.t, out, a->sout.c, a->sout.t, nl, t0, t1, w, bias, KK, S)
        switch (K * 2 + (a->silu != 0)) {
            case 4: MK_STEPS(2, 0); break;
            case 5: MK_STEPS(2, 1); break;
            case 6: MK_STEPS(3, 0); break;
            case 7: MK_STEPS(3, 1); break;
            case 8: MK_STEPS(4, 0); break;
            case 9: MK_STEPS(4, 1); break;
            default: if (a->silu) MK_STEPS((int)K, 1); else MK_STEPS((int)K, 0);
        }
#undef MK_STEPS
    }
}

/* dL/dpre over steps t0 .. t2-1 into g, the weight and bias gradients of steps t0 .. t1-1 (t1 <= t2) into
 * part[c * (K+1) + k] and part[c * (K+1) + K], and dx over t0 .. t1-1 (g past t2 counts as zero: t2 is
 * min(t1 + K - 1, len)). */
static void conv_span_bwd(const mk_conv_args *a, int64_t b, int64_t t0, int64_t t1, vec *g, real *part) {
    const int64_t L = a->len, K = a->K, t2 = t1 + K - 1 < L ? t1 + K - 1 : L;
    for (int64_t c0 = 0; c0 < a->dim; c0 += W) {
        const int nl = (int)(a->dim - c0 < W ? a->dim - c0 : W);
        vec w[MAX_CONV_K], win[MAX_CONV_K], dw[MAX_CONV_K], db = vsplat(0);
        for (int64_t k = 0; k < K; k++) {
            w[k] = lanes_at(a->w + c0 * K + k, K, nl);
            dw[k] = vsplat(0);
        }
        const vec bias = a->bias ? lanes_at(a->bias + c0, 1, nl) : vsplat(0);
        const real *x = a->x + b * a->sx.b + c0 * a->sx.c;
        const real *dout = a->dout + b * a->sdout.b + c0 * a->sdout.c;
        real *dx = a->dx + b * a->sdx.b + c0 * a->sdx.c;
        conv_window_at(win, x, a->sx.c, a->sx.t, nl, t0, (int)K);
        for (int64_t t = t0; t < t2; t++) {
            for (int64_t k = 0; k + 1 < K; k++) win[k] = win[k + 1];
            win[K - 1] = lanes_at(x + t * a->sx.t, a->sx.c, nl);
            vec gv = lanes_at(dout + t * a->sdout.t, a->sdout.c, nl);
            if (a->silu) {
                vec pre = bias;
                for (int64_t k = 0; k < K; k++) pre += w[k] * win[k];
                vec s = vsigmoid(pre);
                gv *= s * (1 + pre * (1 - s));
            }
            g[t - t0] = gv;
            if (t < t1) {
                db += gv;
                for (int64_t k = 0; k < K; k++) dw[k] += gv * win[k];
            }
        }
        for (int64_t t = t2; t < t1 + K; t++) g[t - t0] = vsplat(0);
        for (int64_t s = t0; s < t1; s++) {     /* dx_s = sum_k w_k g_{s+(K-1)-k} */
            vec acc = vsplat(0);
            for (int64_t k = 0; k < K; k++) acc += w[k] * g[s - t0 + (K - 1) - k];
            lanes_to(dx + s * a->sdx.t, a->sdx.c, nl, acc);
        }
        for (int lane = 0; lane < nl; lane++) {
            real *p = part + (c0 + lane) * (K + 1);
            for (int64_t k = 0; k < K; k++) p[k] = dw[k][lane];
            p[K] = db[lane];
        }
    }
}

/* Rows when every tensor the pass touches has time stride 1, else channel blocks. */
static int conv_rows(const mk_conv_args *a, int backward) {
    return a->sx.t == 1 && (backward ? a->sdout.t == 1 && a->sdx.t == 1 : a->sout.t == 1);
}

typedef struct {
    const mk_conv_args *a;
    int backward, rows;
    int64_t per, nitems, next;       /* rows: channels per item; spans: items are (batch, span) */
    real *part;                      /* spans, backward: (nitems, dim, K + 1) gradient sums */
} conv_job;

static void conv_work(conv_job *j) {
    const mk_conv_args *a = j->a;
    real *xp = NULL, *g = NULL;
    vec *gv = NULL;
    if (j->rows) {
        const size_t row = (size_t)CONV_PAD(a->len, a->K);
        xp = calloc(row * (j->backward ? 2 : 1), sizeof(real));
        if (!xp) return;                         /* the other threads take the items; see run_conv */
        g = j->backward ? xp + row : NULL;
    } else if (j->backward) {
        gv = aligned_alloc(64, ((size_t)(CONV_SPAN + a->K) * sizeof(vec) + 63) / 64 * 64);
        if (!gv) return;
    }
    const int64_t spans = (a->len + CONV_SPAN - 1) / CONV_SPAN;
    for (;;) {
        int64_t item = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (item >= j->nitems) break;
        if (j->rows) {
            const int64_t c1 = (item + 1) * j->per < a->dim ? (item + 1) * j->per : a->dim;
            for (int64_t c = item * j->per; c < c1; c++) {
                if (j->backward) conv_channel_bwd(a, c, xp, g);
                else conv_channel_fwd(a, c, xp);
            }
        } else {
            const int64_t b = item / spans, t0 = item % spans * CONV_SPAN;
            const int64_t t1 = t0 + CONV_SPAN < a->len ? t0 + CONV_SPAN : a->len;
            if (j->backward) conv_span_bwd(a, b, t0, t1, gv, j->part + item * a->dim * (a->K + 1));
            else conv_span_fwd(a, b, t0, t1);
        }
    }
    free(xp);
    free(gv);
}

static void conv_openmp_body(void *p) { conv_work((conv_job *)p); }
static void *conv_pthread_body(void *p) { conv_work((conv_job *)p); return NULL; }

/* At least MIN_WORK multiply-adds per item (rows) or per thread, so that small calls stay on one thread. */
static int run_conv(const mk_conv_args *a, int backward) {
    if (a->batch < 0 || a->dim < 0 || a->len < 0 || a->K < 1 || a->K > MAX_CONV_K || a->nthreads < 1) return 2;
    if (a->batch == 0 || a->len == 0 || a->dim == 0) {   /* nothing to convolve (empty tensors have NULL data) */
        if (backward && a->dw) memset(a->dw, 0, (size_t)(a->dim * a->K) * sizeof(real));
        if (backward && a->dbias) memset(a->dbias, 0, (size_t)a->dim * sizeof(real));
        return 0;
    }
    if (backward && (!a->dout || !a->dx || !a->dw)) return 3;
    if (!backward && !a->out) return 3;
    conv_job j = {a, backward, conv_rows(a, backward), 0, 0, 0, NULL};
    int64_t nthreads = a->nthreads;
    if (j.rows) {
        j.per = MIN_WORK / (a->batch * a->len * a->K) + 1;
        j.nitems = (a->dim + j.per - 1) / j.per;
    } else {
        j.nitems = a->batch * ((a->len + CONV_SPAN - 1) / CONV_SPAN);
        const int64_t work = a->batch * a->dim * a->len * a->K / MIN_WORK;
        if (nthreads > work) nthreads = work;
        if (backward) {
            j.part = malloc((size_t)(j.nitems * a->dim * (a->K + 1)) * sizeof(real));
            if (!j.part) return 1;
        }
    }
    if (nthreads > j.nitems) nthreads = j.nitems;
    if (nthreads > 256) nthreads = 256;
    if (nthreads < 1) nthreads = 1;
    if (gomp_parallel && nthreads > 1) {
        gomp_parallel(conv_openmp_body, &j, (unsigned)nthreads, 0);
    } else {
        pthread_t threads[256];
        int started = 0;
        for (int i = 1; i < nthreads; i++) {
            if (pthread_create(&threads[i], NULL, conv_pthread_body, &j) != 0) break;
            started = i;
        }
        conv_work(&j);
        for (int i = 1; i <= started; i++) pthread_join(threads[i], NULL);
    }
    const int rc = j.next < j.nitems ? 1 : 0;
    if (j.part && !rc) {                         /* the spans' sums, in span order: independent of the threads */
        const int64_t K = a->K;
        for (int64_t c = 0; c < a->dim; c++) {
            real sw[MAX_CONV_K + 1] = {0};
            for (int64_t i = 0; i < j.nitems; i++) {
                const real *p = j.part + (i * a->dim + c) * (K + 1);
                for (int64_t k = 0; k <= K; k++) sw[k] += p[k];
            }
            for (int64_t k = 0; k < K; k++) a->dw[c * K + k] = sw[k];
            if (a->dbias) a->dbias[c] = sw[K];
        }
    }
    free(j.part);
    return rc;
}

int64_t mk_conv_args_size(void) { return (int64_t)sizeof(mk_conv_args); }
int mk_conv_fwd(const mk_conv_args *a) { return run_conv(a, 0); }
int mk_conv_bwd(const mk_conv_args *a) { return run_conv(a, 1); }
