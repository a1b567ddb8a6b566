/* Weight-only quantized linear on the CPU: out[M, N] = x[M, K] @ W^T (+ bias), W kept in GGUF's 32-weight blocks
 * (Q4_0, Q4_1, Q8_0) and dequantized on the fly, exactly: every weight the kernel multiplies by is bit-equal to
 * the fp32 value the loader's dequantizer produces (d * q + m with d, m from fp16 and q <= 8 bits is exact in fp32).
 *
 * M=rows, K=in features (a multiple of 32), N=out features, P=ceil(N / 32) column panels, KB=K/32 quant blocks
 *
 * Layout (kernels/quant_linear.py builds it from the GGUF blocks and has the torch twin, `dequantize`):
 *   q4:  quants [P, KB, 32 (k), 16 bytes]: byte j of a k-row holds column j (low nibble) and column j+16 (high)
 *   q8:  quants [P, KB, 32 (k), 32 int8]
 *   scales, mins [P, KB, 32 (column)] fp32 (q8 has no mins); w[n, k] = scales[.] * q + mins[.]
 * Columns past N in the last panel have zero scales and mins, and are never written out.
 *
 * Why this shape: a decode step multiplies a few rows by every weight, so the weight bytes read are the cost;
 * 4.5-bit blocks are 7x fewer bytes than fp32. For each (panel, chunk of 64 k) the kernel dequantizes the
 * 32 columns into an L1 buffer once and runs every row of the call over it with a register-blocked tile; a call of
 * one row skips the buffer (gemv_q4/gemv_q8), with the same weights and multiply-adds in the same order.
 *
 * Batch invariance: out[m, n] is accumulated by one thread, in k order from 0, with one fused multiply-add per
 * k, whatever M is and whichever tile the row falls in; a row's result never depends on the other rows.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "cpu_simd.h"

#define STATUS_BAD_FORMAT 1

#define PANEL 32   /* output columns per panel */
#define QBLOCK 32  /* weights per quant block, along k */
#define KCHUNK 64 /* k per dequantized chunk: 64 x 32 fp32 = 8 KiB in L1 (2-3% faster than 128 at 32 rows, measured) */
#define ROW_BLOCK 64
/* Tiles keep MAX_TILE_ROWS x PANEL/VEC accumulators in registers. */
#if defined(__AVX512F__)
#define MAX_TILE_ROWS 12 /* 24 accumulators + 2 weights + 1 broadcast of 32 zmm */
#elif defined(__AVX__)
#define MAX_TILE_ROWS 3 /* 12 accumulators + 4 weights of 16 ymm (the broadcast comes from memory) */
#else
#define MAX_TILE_ROWS 2 /* 16 accumulators + 8 weights of NEON's 32 registers */
#endif
#define NV (PANEL / VEC)

/* VEC bytes -> VEC int32, zero- or sign-extended. GCC 12 scalarizes __builtin_convertvector for this widening on
 * x86, so the x86 forms are spelled out (one vpmovzxbd); elsewhere (NEON) the generic conversion is fine. */
#if defined(__AVX512F__)
#define WIDEN(src, x512, x256, narrow) x512(_mm_loadu_si128((const __m128i *)(src)))
#elif defined(__AVX2__)
#define WIDEN(src, x512, x256, narrow) x256(_mm_loadl_epi64((const __m128i *)(src)))
#else
typedef uint8_t u8vec __attribute__((vector_size(VEC)));
typedef int8_t i8vec __attribute__((vector_size(VEC)));
#define WIDEN(src, x512, x256, narrow) \
    __builtin_convertvector(({ narrow bytes_; memcpy(&bytes_, (src), sizeof bytes_); bytes_; }), ivec)
#endif
#define WIDEN_BYTES(name, type, narrow, x512, x256)                                                                   \
    static inline ivec name(const type *src) {                                                                        \
        const __auto_type v = WIDEN(src, x512, x256, narrow);                                                         \
        ivec wide;                                                                                                    \
        memcpy(&wide, &v, sizeof wide);                                                                               \
        return wide;                                                                                                  \
    }
WIDEN_BYTES(widen_u8, uint8_t, u8vec, _mm512_cvtepu8_epi32, _mm256_cvtepu8_epi32)
WIDEN_BYTES(widen_i8, int8_t, i8vec, _mm512_cvtepi8_epi32, _mm256_cvtepi8_epi32)

/* One k-chunk of one panel -> wbuf [kc, 32] fp32. kb0 = first quant block of the chunk. */
static void dequant_q4(const uint8_t *quants, const float *scales, const float *mins, int64_t KB, int64_t p,
                       int64_t kb0, int64_t num_blocks, float *wbuf) {
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t block = p * KB + kb0 + b;
        const float *d = scales + block * PANEL, *m = mins + block * PANEL;
        const uint8_t *src = quants + block * (QBLOCK * PANEL / 2);
        float *dst = wbuf + b * QBLOCK * PANEL;
        for (int k = 0; k < QBLOCK; k++) {
            for (int j = 0; j < PANEL / 2; j += VEC) { /* byte j: column j (low nibble), column j + 16 (high) */
                const ivec wide = widen_u8(src + k * (PANEL / 2) + j);
                const fvec low = __builtin_convertvector(wide & 15, fvec);
                const fvec high = __builtin_convertvector(wide >> 4, fvec);
                storev(dst + k * PANEL + j, low * loadv(d + j) + loadv(m + j));
                storev(dst + k * PANEL + 16 + j, high * loadv(d + 16 + j) + loadv(m + 16 + j));
            }
        }
    }
}

static void dequant_q8(const int8_t *quants, const float *scales, int64_t KB, int64_t p, int64_t kb0,
                       int64_t num_blocks, float *wbuf) {
    for (int64_t b = 0; b < num_blocks; b++) {
        const int64_t block = p * KB + kb0 + b;
        const float *d = scales + block * PANEL;
        const int8_t *src = quants + block * (QBLOCK * PANEL);
        float *dst = wbuf + b * QBLOCK * PANEL;
        for (int k = 0; k < QBLOCK; k++) {
            for (int j = 0; j < PANEL; j += VEC)
                storev(dst + k * PANEL + j, __builtin_convertvector(widen_i8(src + k * PANEL + j), fvec) * loadv(d + j));
        }
    }
}

/* One row (a single decode stream): acc [32] = x [K] @ the panel's weights, each weight dequantized in registers
 * and used at once, never stored (the tiled path writes and rereads an L1 buffer, which for one row costs more
 * than the multiply). The weights, the multiply-adds and their order are the tile's, so the result is the one the
 * row would get in any batch. */
static void gemv_q4(const uint8_t *quants, const float *scales, const float *mins, int64_t KB, int64_t p,
                    const float *x, float *acc) {
    fvec a[NV];
    for (int v = 0; v < NV; v++) a[v] = splat(0.0f);
    for (int64_t kb = 0; kb < KB; kb++) {
        const int64_t block = p * KB + kb;
        const float *d = scales + block * PANEL, *m = mins + block * PANEL;
        const uint8_t *src = quants + block * (QBLOCK * PANEL / 2);
        for (int k = 0; k < QBLOCK; k++) {
            const float xv = x[kb * QBLOCK + k];
            for (int j = 0; j < PANEL / 2; j += VEC) {
                const ivec wide = widen_u8(src + k * (PANEL / 2) + j);
                const fvec low = __builtin_convertvector(wide & 15, fvec) * loadv(d + j) + loadv(m + j);
                const fvec high = __builtin_convertvector(wide >> 4, fvec) * loadv(d + 16 + j) + loadv(m + 16 + j);
                a[j / VEC] += low * xv;
                a[(16 + j) / VEC] += high * xv;
            }
        }
    }
    for (int v = 0; v < NV; v++) storev(acc + v * VEC, a[v]);
}

static void gemv_q8(const int8_t *quants, const float *scales, int64_t KB, int64_t p, const float *x, float *acc) {
    fvec a[NV];
    for (int v = 0; v < NV; v++) a[v] = splat(0.0f);
    for (int64_t kb = 0; kb < KB; kb++) {
        const int64_t block = p * KB + kb;
        const float *d = scales + block * PANEL;
        const int8_t *src = quants + block * (QBLOCK * PANEL);
        for (int k = 0; k < QBLOCK; k++) {
            const float xv = x[kb * QBLOCK + k];
            for (int j = 0; j < PANEL; j += VEC)
                a[j / VEC] += __builtin_convertvector(widen_i8(src + k * PANEL + j), fvec) * loadv(d + j) * xv;
        }
    }
    for (int v = 0; v < NV; v++) storev(acc + v * VEC, a[v]);
}

/* acc [rows, 32] += x [rows, kc] (row stride ldx) @ wbuf [kc, 32]. `rows` is a constant at every call site, so
 * the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile(const int rows, const float *x, int64_t ldx,
                                                       const float *wbuf, int64_t kc, float *acc) {
    fvec a[MAX_TILE_ROWS][NV];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++) a[i][v] = loadv(acc + i * PANEL + v * VEC);
    for (int64_t k = 0; k < kc; k++) {
        fvec w[NV];
        for (int v = 0; v < NV; v++) w[v] = loadv(wbuf + k * PANEL + v * VEC);
        for (int i = 0; i < rows; i++) {
            const float xv = x[i * ldx + k];
            /* contracted to one fused multiply-add where the target has one (GNU C's default -ffp-contract=fast) */
            for (int v = 0; v < NV; v++) a[i][v] += w[v] * xv;
        }
    }
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < NV; v++) storev(acc + i * PANEL + v * VEC, a[i][v]);
}

#define TILE_CASE(R) \
    case R: tile(R, x, ldx, wbuf, kc, acc); break;

static void tile_rows(int rows, const float *x, int64_t ldx, const float *wbuf, int64_t kc, float *acc) {
    switch (rows) {
        TILE_CASE(1) TILE_CASE(2)
#if MAX_TILE_ROWS >= 3
        TILE_CASE(3)
#endif
#if MAX_TILE_ROWS >= 12
        TILE_CASE(4) TILE_CASE(5) TILE_CASE(6) TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10)
        TILE_CASE(11) TILE_CASE(12)
#endif
        default: break;
    }
}

/* format: 4 = q4 (nibbles, scales and mins), 8 = q8 (int8, scales). bias may be NULL. Returns 0 or a STATUS_*. */
int quant_linear_f32(int format, const void *quants, const float *scales, const float *mins, const float *bias,
                     const float *x, float *out, int64_t M, int64_t K, int64_t N, int num_threads) {
    if ((format != 4 && format != 8) || K % QBLOCK != 0 || (format == 4 && mins == NULL))
        return STATUS_BAD_FORMAT;
    const int64_t KB = K / QBLOCK, P = (N + PANEL - 1) / PANEL;
    /* Panels are handed out as threads free up, a few at a time (~0.25M multiply-adds a grab, so the shared
     * counter costs nothing): a fixed split waits at the end for the slower core, and on a shared machine one
     * core is often slower. A panel's result does not depend on which thread computes it. */
    if (num_threads < 1) num_threads = 1;
    int64_t chunk = (1 << 18) / (M * K * PANEL > 0 ? M * K * PANEL : 1);
    const int64_t even_share = (P + num_threads - 1) / num_threads;
    chunk = chunk > even_share ? even_share : chunk;
    chunk = chunk < 1 ? 1 : chunk;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, chunk)
    for (int64_t p = 0; p < P; p++) {
        float wbuf[KCHUNK * PANEL] __attribute__((aligned(64)));
        float acc[ROW_BLOCK * PANEL] __attribute__((aligned(64)));
        const int64_t columns = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
        for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
            const int64_t block_rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
            if (M == 1) { /* one row: no L1 buffer (same weights, same multiply-adds in the same order) */
                if (format == 4)
                    gemv_q4(quants, scales, mins, KB, p, x, acc);
                else
                    gemv_q8(quants, scales, KB, p, x, acc);
            } else {
                memset(acc, 0, sizeof(float) * block_rows * PANEL);
            }
            for (int64_t kb0 = 0; kb0 < KB && M > 1; kb0 += KCHUNK / QBLOCK) {
                const int64_t num_blocks = KB - kb0 < KCHUNK / QBLOCK ? KB - kb0 : KCHUNK / QBLOCK;
                if (format == 4)
                    dequant_q4(quants, scales, mins, KB, p, kb0, num_blocks, wbuf);
                else
                    dequant_q8(quants, scales, KB, p, kb0, num_blocks, wbuf);
                const int64_t kc = num_blocks * QBLOCK;
                for (int64_t r0 = 0; r0 < block_rows; r0 += MAX_TILE_ROWS) {
                    const int rows = block_rows - r0 < MAX_TILE_ROWS ? (int)(block_rows - r0) : MAX_TILE_ROWS;
                    tile_rows(rows, x + (m0 + r0) * K + kb0 * QBLOCK, K, wbuf, kc, acc + r0 * PANEL);
                }
            }
            for (int64_t r = 0; r < block_rows; r++) {
                float *dst = out + (m0 + r) * N + p * PANEL;
                for (int64_t c = 0; c < columns; c++)
                    dst[c] = acc[r * PANEL + c] + (bias ? bias[p * PANEL + c] : 0.0f);
            }
        }
    }
    return 0;
}
