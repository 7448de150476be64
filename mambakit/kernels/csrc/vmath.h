/* Vector math for the fused CPU selective scan: exp, log, softplus, sigmoid on GCC/Clang vector types.
 *
 * Included by selective_scan_cpu.c after it has defined `real`, `vec`, `ivec`, `uvec` and `W` (lanes):
 * float x 8 lanes, or double x 4 lanes (with -DMK_DOUBLE). Written with vector extensions rather than
 * intrinsics so the same source compiles to AVX2 here, to SSE/NEON pairs elsewhere.
 *
 * exp and 2^x: range reduction to x = n ln2 + r (|r| <= ln2/2), a polynomial for e^r, and 2^n built in the
 * exponent bits. float: 2^x with a fitted degree-6 polynomial (max relative error 1e-7 measured against
 * float64 over the reduced range), exp(x) = 2^(x log2 e). double: Cody-Waite reduction and the Taylor series
 * to degree 13 (truncation < 4e-18 relative on |r| <= 0.347). Inputs are clamped so that n stays in the
 * normal exponent range: below the clamp the result is a tiny normal number instead of a subnormal or 0,
 * and a huge argument gives a large finite number instead of inf. NaN propagates.
 *
 * The source must be compiled without -ffast-math / -fassociative-math: reassociation would fold the
 * two-step range reduction and lose the low bits of r.
 */
#ifndef MK_VMATH_H
#define MK_VMATH_H

static inline vec vsplat(real s) { return (vec){0} + s; }

/* Lane select: m is all-ones (true) or all-zeros per lane, as produced by vector comparisons. */
static inline vec vsel(ivec m, vec a, vec b) { return (vec)((m & (ivec)a) | (~m & (ivec)b)); }

/* min/max that return x where x is NaN, so NaN propagates through the clamps below. */
#if defined(__AVX__) && !defined(MK_DOUBLE)
static inline vec vclamp(vec x, real lo, real hi) {
    return (vec)_mm256_max_ps(_mm256_set1_ps(lo), _mm256_min_ps(_mm256_set1_ps(hi), (__m256)x));
}
#elif defined(__AVX__) && defined(MK_DOUBLE)
static inline vec vclamp(vec x, real lo, real hi) {
    return (vec)_mm256_max_pd(_mm256_set1_pd(lo), _mm256_min_pd(_mm256_set1_pd(hi), (__m256d)x));
}
#else
static inline vec vclamp(vec x, real lo, real hi) {
    x = vsel(x > hi, vsplat(hi), x);
    return vsel(x < lo, vsplat(lo), x);
}
#endif

/* max(x, lo) that returns x where x is NaN. */
#if defined(__AVX__) && !defined(MK_DOUBLE)
static inline vec vmax_lo(vec x, real lo) { return (vec)_mm256_max_ps(_mm256_set1_ps(lo), (__m256)x); }
#elif defined(__AVX__) && defined(MK_DOUBLE)
static inline vec vmax_lo(vec x, real lo) { return (vec)_mm256_max_pd(_mm256_set1_pd(lo), (__m256d)x); }
#else
static inline vec vmax_lo(vec x, real lo) { return vsel(x < lo, vsplat(lo), x); }
#endif

static inline vec vload(const real *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(real *p, vec v) { memcpy(p, &v, sizeof v); }

#ifdef MK_DOUBLE

static inline vec vexp(vec x) {
    const real hi = 709.0, lo = -708.3;                  /* n = round(x / ln2) stays in [-1022, 1023] */
    const real magic = 6755399441055744.0;               /* 1.5 * 2^52: adding it rounds to an integer */
    x = vclamp(x, lo, hi);
    vec t = x * 1.4426950408889634074 + magic;
    vec n = t - magic;
    vec r = x - n * 6.93145751953125E-1;                 /* ln2 split: high part exact in n * C1 */
    r = r - n * 1.42860682030941723212E-6;
    vec p = vsplat(1.0 / 6227020800.0);                  /* 1/13! ... 1/1!: Taylor, Horner form */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uvec e = ((uvec)t + 1023u) << 52;                    /* low bits of t hold n; the rest shifts out */
    return p * (vec)e;
}

/* 2^x: the scan's decays are computed as 2^(dt * A log2 e) with A log2 e precomputed, which saves the
 * multiply and the two-step reduction of exp. f = x - n is exact; e^(f ln2) by the same Taylor series. */
static inline vec vexp2(vec x) {
    const real magic = 6755399441055744.0;
    x = vclamp(x, -1021.0, 1023.0);
    vec t = x + magic;
    vec f = x - (t - magic);
    vec r = f * 6.9314718055994530942E-1;
    vec p = vsplat(1.0 / 6227020800.0);
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    uvec e = ((uvec)t + 1023u) << 52;
    return p * (vec)e;
}

/* Elementwise functions evaluated once per (time, channel), not per state: libm per lane is fine here. */
static inline vec vsoftplus(vec x) {
    vec y;
    for (int i = 0; i < W; i++) y[i] = x[i] > 20.0 ? x[i] : log1p(exp(x[i]));
    return y;
}

#else /* float */

/* The float functions come in an n-wide form (n a compile-time constant at each call, <= 4) that evaluates n
 * independent vectors with the steps interleaved, statement by statement. Each is a 30-80-cycle dependency
 * chain, and the out-of-order core's FP scheduler only overlaps a few chains that sit far apart in the
 * instruction stream: one vector at a time, exp runs at about half and softplus at about a third of the
 * throughput of the interleaved forms (mk_vexp / mk_vsoftplus against chunk_decays on an AVX2 core). The
 * arithmetic per lane is the same either way, so the results are identical. */
#define MK_EACH(n) _Pragma("GCC unroll 4") for (int j = 0; j < (n); j++)

/* 2^x for x already clamped to [-125, 126] (or NaN): round to n, f = x - n (exact) in [-1/2, 1/2],
 * 2^f = 1 + f q(f) with q a degree-5 polynomial fitted for minimax relative error (truncation 2e-9; ~1.7 ulp
 * after float rounding), and n added to the exponent of 2^f (in [0.70, 1.42], a normal number). With AVX the
 * rounding is vroundps and n comes from vcvttps2dq: about 12% faster in the scan's decays than the
 * add-and-subtract-1.5*2^23 trick (three dependent adds), with the same n and f and so the same bits. A NaN
 * stays NaN either way (its n is 0x80000000 or NaN's bits, whose low 9 bits are 0: shifted by 23, 0). */
static inline __attribute__((always_inline)) void vexp2_clamped_n(vec *y, const vec *xc, const int n) {
    vec f[4], q[4];
    uvec shift[4];
#if defined(__AVX__)
    MK_EACH(n) {
        __m256 r = _mm256_round_ps((__m256)xc[j], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        f[j] = xc[j] - (vec)r;
        shift[j] = (uvec)_mm256_cvttps_epi32(r) << 23;
    }
#else
    const real magic = 12582912.0f;                      /* 1.5 * 2^23: adding it rounds to an integer */
    MK_EACH(n) {
        vec t = xc[j] + magic;                           /* t's low bits hold n */
        f[j] = xc[j] - (t - magic);
        shift[j] = (uvec)t << 23;
    }
#endif
    MK_EACH(n) q[j] = f[j] * 1.5353360504377633e-4f + 1.3398875016719103e-3f;
    MK_EACH(n) q[j] = q[j] * f[j] + 9.6184369176626205e-3f;
    MK_EACH(n) q[j] = q[j] * f[j] + 5.5503323674201965e-2f;
    MK_EACH(n) q[j] = q[j] * f[j] + 2.4022647738456726e-1f;
    MK_EACH(n) q[j] = q[j] * f[j] + 6.9314718246459961e-1f;
    MK_EACH(n) y[j] = (vec)((uvec)(q[j] * f[j] + 1.0f) + shift[j]);
}

/* 2^x. The clamp keeps 2^n normal: below -125 the result is 2^-125 instead of a subnormal or 0, above 126 it
 * is 2^126. The scan computes its decays as 2^(dt * A log2 e) with A log2 e precomputed, which saves a
 * multiply and exp's two-step reduction. */
static inline __attribute__((always_inline)) void vexp2_n(vec *y, const vec *x, const int n) {
    vec xc[4];
    MK_EACH(n) xc[j] = vclamp(x[j], -125.0f, 126.0f);
    vexp2_clamped_n(y, xc, n);
}

/* 2^x for x <= 0 (or NaN), e.g. the decays dt * A with dt >= 0 and A <= 0: the same bits as vexp2_n, whose
 * upper clamp is a no-op there, without it (one operation of fourteen, ~6% of the decays pass). */
static inline __attribute__((always_inline)) void vexp2_nonpos_n(vec *y, const vec *x, const int n) {
    vec xc[4];
    MK_EACH(n) xc[j] = vmax_lo(x[j], -125.0f);
    vexp2_clamped_n(y, xc, n);
}

/* exp(x) with Cody-Waite reduction (x - n ln2 in two exact-ish steps) and Cephes' minimax polynomial, ~1 ulp
 * for all x: used for the elementwise functions, where x is an input rather than a rounded product. */
static inline __attribute__((always_inline)) void vexp_n(vec *y, const vec *x_in, const int n) {
    const real magic = 12582912.0f;
    vec x[4], t[4], nn[4], r[4], p[4];
    MK_EACH(n) x[j] = vclamp(x_in[j], -87.0f, 88.0f);   /* n = round(x / ln2) stays in [-126, 127] */
    MK_EACH(n) t[j] = x[j] * 1.44269504088896341f + magic;
    MK_EACH(n) nn[j] = t[j] - magic;
    MK_EACH(n) r[j] = x[j] - nn[j] * 0.693359375f;      /* ln2 split: n * 0.693359375 is exact */
    MK_EACH(n) r[j] = r[j] - nn[j] * -2.12194440e-4f;
    MK_EACH(n) p[j] = vsplat(1.9875691500E-4f) * r[j] + 1.3981999507E-3f;
    MK_EACH(n) p[j] = p[j] * r[j] + 8.3334519073E-3f;
    MK_EACH(n) p[j] = p[j] * r[j] + 4.1665795894E-2f;
    MK_EACH(n) p[j] = p[j] * r[j] + 1.6666665459E-1f;
    MK_EACH(n) p[j] = p[j] * r[j] + 5.0000001201E-1f;
    MK_EACH(n) y[j] = (p[j] * (r[j] * r[j]) + r[j] + 1.0f) * (vec)(((uvec)t[j] + 127u) << 23);
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), and x itself above 20 (torch's threshold). With v = exp(-|x|)
 * in (0, 1], log1p(v) = 2 atanh(s), s = v / (2 + v) in (0, 1/3], and atanh(s) = s (1 + s^2 q(s^2)) with q
 * a degree-3 polynomial fitted for minimax relative error (4.5e-9 truncation). No log, one division.
 * With `sigmoid`, also its derivative sigmoid(x) = (x > 0 ? 1 : v) / (1 + v) from the same v: the backward
 * needs both, and a second exp for the sigmoid cost as much as the rest of the softplus. */
static inline __attribute__((always_inline)) void vsoftplus_n(vec *y, vec *sigmoid, const vec *x, const int n) {
    vec v[4], s[4], s2[4], q[4];
    MK_EACH(n) v[j] = -(vec)((uvec)x[j] & 0x7fffffffu);
    vexp_n(v, v, n);
    MK_EACH(n) s[j] = v[j] / (2.0f + v[j]);
    MK_EACH(n) s2[j] = s[j] * s[j];
    MK_EACH(n) q[j] = vsplat(0.14006003737449646f) * s2[j] + 0.14000900089740753f;
    MK_EACH(n) q[j] = q[j] * s2[j] + 0.2001076340675354f;
    MK_EACH(n) q[j] = q[j] * s2[j] + 0.3333320915699005f;
    if (sigmoid) {
        MK_EACH(n) sigmoid[j] = vsel(x[j] > 0.0f, vsplat(1.0f), v[j]) / (1.0f + v[j]);
    }
    MK_EACH(n) {
        vec two_s = s[j] + s[j];
        vec pos = vsel(x[j] > 0.0f, x[j], vsplat(0.0f));
        y[j] = vsel(x[j] > 20.0f, x[j], pos + (two_s * (q[j] * s2[j]) + two_s));
    }
}

static inline __attribute__((always_inline)) void vsigmoid_n(vec *y, const vec *x, const int n) {
    vec e[4];
    MK_EACH(n) e[j] = -x[j];
    vexp_n(e, e, n);
    MK_EACH(n) y[j] = 1.0f / (1.0f + e[j]);
}

#undef MK_EACH

#endif

/* One-vector forms, and the n-wide forms of the double build (which has no interleaved code of its own). */
#ifdef MK_DOUBLE
static inline vec vsigmoid(vec x) { return 1.0f / (1.0f + vexp(-x)); }
static inline vec vsoftplus_sigmoid(vec x, vec *sigmoid) {
    *sigmoid = vsigmoid(x);
    return vsoftplus(x);
}
static inline void vexp2_n(vec *y, const vec *x, const int n) {
    for (int j = 0; j < n; j++) y[j] = vexp2(x[j]);
}
static inline void vexp2_nonpos_n(vec *y, const vec *x, const int n) { vexp2_n(y, x, n); }
static inline void vsoftplus_n(vec *y, vec *sigmoid, const vec *x, const int n) {
    for (int j = 0; j < n; j++) {
        if (sigmoid) y[j] = vsoftplus_sigmoid(x[j], sigmoid + j);
        else y[j] = vsoftplus(x[j]);
    }
}
static inline void vsigmoid_n(vec *y, const vec *x, const int n) {
    for (int j = 0; j < n; j++) y[j] = vsigmoid(x[j]);
}
#else
static inline vec vexp2(vec x) { vec y; vexp2_n(&y, &x, 1); return y; }
static inline vec vexp(vec x) { vec y; vexp_n(&y, &x, 1); return y; }
static inline vec vsigmoid(vec x) { vec y; vsigmoid_n(&y, &x, 1); return y; }
static inline vec vsoftplus(vec x) { vec y; vsoftplus_n(&y, NULL, &x, 1); return y; }
static inline vec vsoftplus_sigmoid(vec x, vec *sigmoid) { vec y; vsoftplus_n(&y, sigmoid, &x, 1); return y; }
#endif

#endif
