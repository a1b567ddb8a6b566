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

/* fp16 storage (KV pages): HAVE_HALF where the target converts in hardware (F16C: every AVX2/AVX-512 x86 target).
 * Loads widen exactly; stores round to nearest even, as torch's .to(torch.float16) does. Without F16C the callers
 * refuse fp16 pages before touching them (their torch paths run), so the stubs below are never called. */
#if defined(__F16C__)
#define HAVE_HALF 1
static inline fvec load_half(const uint16_t *src) {
#if VEC == 16
    __m256i bits;
    memcpy(&bits, src, sizeof bits);
    const __m512 wide = _mm512_cvtph_ps(bits);
#elif VEC == 8
    __m128i bits;
    memcpy(&bits, src, sizeof bits);
    const __m256 wide = _mm256_cvtph_ps(bits);
#else
    const __m128 wide = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)src));
#endif
    fvec v;
    memcpy(&v, &wide, sizeof v);
    return v;
}

static inline void store_half(uint16_t *dst, fvec v) {
#if VEC == 16
    __m512 wide;
    memcpy(&wide, &v, sizeof wide);
    const __m256i bits = _mm512_cvtps_ph(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif VEC == 8
    __m256 wide;
    memcpy(&wide, &v, sizeof wide);
    const __m128i bits = _mm256_cvtps_ph(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    __m128 wide;
    memcpy(&wide, &v, sizeof wide);
    const __m128i bits = _mm_cvtps_ph(wide, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    memcpy(dst, &bits, VEC * sizeof(uint16_t));
}

static inline float half_to_float(uint16_t bits) { return _cvtsh_ss(bits); }

static inline uint16_t float_to_half(float x) {
    return (uint16_t)_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
#define HAVE_HALF 0
static inline fvec load_half(const uint16_t *src) { return splat((float)*src * 0.0f); }
static inline void store_half(uint16_t *dst, fvec v) { (void)dst, (void)v; }
static inline float half_to_float(uint16_t bits) { return (float)bits * 0.0f; }
static inline uint16_t float_to_half(float x) { return (uint16_t)(x * 0.0f); }
#endif

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
