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

static inline void vexp2_4(vec y[4], const vec x[4]) {
    for (int j = 0; j < 4; j++) y[j] = vexp2(x[j]);
}

/* Elementwise functions evaluated once per (time, channel), not per state: libm per lane is fine here. */
static inline vec vsoftplus(vec x) {
    vec y;
    for (int i = 0; i < W; i++) y[i] = x[i] > 20.0 ? x[i] : log1p(exp(x[i]));
    return y;
}

#else /* float */

/* 2^x: round to n, f = x - n (exact) in [-1/2, 1/2], 2^f = 1 + f q(f) with q a degree-5 polynomial fitted
 * for minimax relative error (truncation 2e-9; ~1.7 ulp after float rounding). The clamp keeps 2^n normal:
 * below -125 the result is 2^-125 instead of a subnormal or 0. The scan computes its decays as
 * 2^(dt * A log2 e) with A log2 e precomputed, which saves a multiply and exp's two-step reduction. */
static inline vec vexp2(vec x) {
    const real magic = 12582912.0f;                      /* 1.5 * 2^23: adding it rounds to an integer */
    x = vclamp(x, -125.0f, 126.0f);
    vec t = x + magic;
    vec f = x - (t - magic);
    vec q = vsplat(1.5353360504377633e-4f);
    q = q * f + 1.3398875016719103e-3f;
    q = q * f + 9.6184369176626205e-3f;
    q = q * f + 5.5503323674201965e-2f;
    q = q * f + 2.4022647738456726e-1f;
    q = q * f + 6.9314718246459961e-1f;
    vec p = q * f + 1.0f;                                /* 2^f in [0.70, 1.42]: a normal number */
    return (vec)((uvec)p + ((uvec)t << 23));             /* add n to its exponent; t's low bits hold n */
}

/* vexp2 of 4 vectors with the steps interleaved: one exp is a ~40-cycle dependency chain, and the
 * out-of-order window only overlaps a few of them unless independent work sits close in the stream. */
static inline void vexp2_4(vec y[4], const vec x[4]) {
    const real magic = 12582912.0f;
    vec t[4], f[4], q[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) {
        vec xc = vclamp(x[j], -125.0f, 126.0f);
        t[j] = xc + magic;
        f[j] = xc - (t[j] - magic);
    }
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) q[j] = f[j] * 1.5353360504377633e-4f + 1.3398875016719103e-3f;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) q[j] = q[j] * f[j] + 9.6184369176626205e-3f;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) q[j] = q[j] * f[j] + 5.5503323674201965e-2f;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) q[j] = q[j] * f[j] + 2.4022647738456726e-1f;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) q[j] = q[j] * f[j] + 6.9314718246459961e-1f;
#pragma GCC unroll 4
    for (int j = 0; j < 4; j++) y[j] = (vec)((uvec)(q[j] * f[j] + 1.0f) + ((uvec)t[j] << 23));
}

/* exp(x) with Cody-Waite reduction (x - n ln2 in two exact-ish steps) and Cephes' minimax polynomial, ~1 ulp
 * for all x: used for the elementwise functions, where x is an input rather than a rounded product. */
static inline vec vexp(vec x) {
    const real magic = 12582912.0f;
    x = vclamp(x, -87.0f, 88.0f);                        /* n = round(x / ln2) stays in [-126, 127] */
    vec t = x * 1.44269504088896341f + magic;
    vec n = t - magic;
    vec r = x - n * 0.693359375f;                        /* ln2 split: n * 0.693359375 is exact */
    r = r - n * -2.12194440e-4f;
    vec p = vsplat(1.9875691500E-4f);
    p = p * r + 1.3981999507E-3f;
    p = p * r + 8.3334519073E-3f;
    p = p * r + 4.1665795894E-2f;
    p = p * r + 1.6666665459E-1f;
    p = p * r + 5.0000001201E-1f;
    vec y = p * (r * r) + r + 1.0f;
    uvec e = ((uvec)t + 127u) << 23;
    return y * (vec)e;
}

/* softplus(x) = max(x, 0) + log1p(exp(-|x|)), and x itself above 20 (torch's threshold). With v = exp(-|x|)
 * in (0, 1], log1p(v) = 2 atanh(s), s = v / (2 + v) in (0, 1/3], and atanh(s) = s (1 + s^2 q(s^2)) with q
 * a degree-3 polynomial fitted for minimax relative error (4.5e-9 truncation). No log, one division.
 * Also its derivative sigmoid(x) = (x > 0 ? 1 : v) / (1 + v) from the same v: the backward needs both, and
 * a second exp for the sigmoid cost as much as the rest of the softplus. */
static inline vec vsoftplus_sigmoid(vec x, vec *sigmoid) {
    vec ax = (vec)((uvec)x & 0x7fffffffu);
    vec v = vexp(-ax);
    vec s = v / (2.0f + v);
    vec s2 = s * s;
    vec q = vsplat(0.14006003737449646f);
    q = q * s2 + 0.14000900089740753f;
    q = q * s2 + 0.2001076340675354f;
    q = q * s2 + 0.3333320915699005f;
    vec two_s = s + s;
    vec pos = vsel(x > 0.0f, x, vsplat(0.0f));
    *sigmoid = vsel(x > 0.0f, vsplat(1.0f), v) / (1.0f + v);
    return vsel(x > 20.0f, x, pos + (two_s * (q * s2) + two_s));
}

static inline vec vsoftplus(vec x) {
    vec unused;
    return vsoftplus_sigmoid(x, &unused);                /* inlined: the sigmoid's work is dropped */
}

#endif

static inline vec vsigmoid(vec x) { return 1.0f / (1.0f + vexp(-x)); }

#ifdef MK_DOUBLE
static inline vec vsoftplus_sigmoid(vec x, vec *sigmoid) {
    *sigmoid = vsigmoid(x);
    return vsoftplus(x);
}
#endif

#endif
