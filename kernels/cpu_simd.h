/* SIMD vocabulary shared by the native CPU kernels: GNU C vector types as wide as the target's registers (the
 * library is built with -march=native on the machine that runs it), so one source serves AVX-512, AVX2 and NEON.
 *
 * VEC = floats per register.
 */
#ifndef TIERSERVE_CPU_SIMD_H
#define TIERSERVE_CPU_SIMD_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define VEC 16
#elif defined(__AVX__)
#define VEC 8
#else
#define VEC 4
#endif

typedef float fvec __attribute__((vector_size(VEC * 4)));
typedef int32_t ivec __attribute__((vector_size(VEC * 4)));

static inline fvec loadv(const float *src) {
    fvec v;
    memcpy(&v, src, sizeof v);
    return v;
}

static inline void storev(float *dst, fvec v) { memcpy(dst, &v, sizeof v); }

static inline fvec splat(float x) { return (fvec){} + x; }

/* Sum of the lanes, as a fixed tree (the same order every call). */
static inline float hsum(fvec v) {
#if defined(__AVX512F__)
    __m512 wide;
    memcpy(&wide, &v, sizeof wide);
    /* the upper 256 bits through a double cast: plain AVX-512F (extractf32x8 would need AVX512DQ) */
    const __m256 upper = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide), 1));
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(wide), upper);
#elif defined(__AVX__)
    __m256 half;
    memcpy(&half, &v, sizeof half);
#endif
#if defined(__AVX__)
    __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
    quarter = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
    quarter = _mm_add_ss(quarter, _mm_movehdup_ps(quarter));
    return _mm_cvtss_f32(quarter);
#else
    float lanes[VEC];
    memcpy(lanes, &v, sizeof lanes);
    for (int width = VEC / 2; width >= 1; width /= 2)
        for (int i = 0; i < width; i++) lanes[i] += lanes[i + width];
    return lanes[0];
#endif
}

/* e^x for x <= 0 (scores minus their max), lane-wise: Cody-Waite range reduction to r in [-ln2/2, ln2/2] and
 * Cephes' degree-6 polynomial (about 1 ulp). Below -87, and for NaN, the result is exactly 0 (not a subnormal that
 * would slow every later multiply). */
static inline fvec exp_nonpositive(fvec x) {
    const ivec keep = x >= splat(-87.0f); /* all-ones lanes; false for NaN too */
    x = (fvec)(((ivec)x & keep) | ((ivec)splat(-87.0f) & ~keep));
    const fvec y = x * 1.44269504088896341f + 0.5f;
    ivec n = __builtin_convertvector(y, ivec); /* truncates toward 0; y <= 0.5, so step down where y < trunc */
    n += (ivec)(__builtin_convertvector(n, fvec) > y);
    const fvec nf = __builtin_convertvector(n, fvec);
    const fvec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    fvec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const fvec scale = (fvec)((n + 127) << 23);
    return (fvec)((ivec)(p * scale) & keep);
}

#endif
