/* Weight-only quantized linear on the CPU: out[M, N] = x[M, K] @ W^T (+ bias), W kept as 4- or 8-bit integers with
 * an fp32 scale (and min) per group of 32 or 16 weights along k, as GGUF's blocks hold them (Q4_0, Q4_1, Q4_K -> q4;
 * Q8_0, Q5_0, Q6_K -> q8; kernels/quant_linear.py maps them), dequantized on the fly, exactly: every weight the
 * kernel multiplies by is bit-equal to the fp32 value the loader's dequantizer produces (scale * q is exact in fp32
 * for each of those types, and the one rounding of + min is the one numpy makes).
 *
 * M=rows, K=in features (a multiple of 32), N=out features, P=ceil(N / 32) column panels, G=group (32 or 16),
 * KG=K/G scale groups
 *
 * Layout (kernels/quant_linear.py builds it from the GGUF blocks and has the torch twin, `dequantize`):
 *   q4:  quants [P, K, 16 bytes]: byte j of a k-row holds column j (low nibble) and column j+16 (high)
 *   q8:  quants [P, K, 32 int8]
 *   scales, mins [P, KG, 32 (column)] fp32 (mins: required for q4, optional for q8); w[n, k] = scale * q (+ min)
 * Columns past N in the last panel have zero scales and mins, and are never written out.
 *
 * Why this shape: a decode step multiplies a few rows by every weight, so the weight bytes read are the cost;
 * 4-bit quants with per-32 scales and mins are 5x fewer bytes than fp32. For each (panel, chunk of 64 k) the
 * kernel dequantizes the 32 columns into an L1 buffer once and runs every row of the call over it with a
 * register-blocked tile; a call of one row skips the buffer (gemv), with the same weights and multiply-adds in the
 * same order.
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

/* k-row `row` of one panel, its 32 columns dequantized into registers: w = q * d (+ m), d and m the row's group's
 * scales and mins. The one place weights are made: the one-row path and the tiled path both call it, so a row's
 * result cannot depend on which of them ran. q * d is exact for every GGUF type mapped here (kernels/quant_linear.py),
 * so contracting q * d + m to one fused multiply-add rounds once, as numpy's two steps do. */
static inline __attribute__((always_inline)) void dequant_row(const int format, const int has_mins, const void *row,
                                                              const float *d, const float *m, fvec w[NV]) {
    if (format == 4) {
        const uint8_t *src = row;
        for (int j = 0; j < PANEL / 2; j += VEC) { /* byte j: column j (low nibble), column j + 16 (high) */
            const ivec wide = widen_u8(src + j);
            w[j / VEC] = __builtin_convertvector(wide & 15, fvec) * loadv(d + j) + loadv(m + j);
            w[(16 + j) / VEC] = __builtin_convertvector(wide >> 4, fvec) * loadv(d + 16 + j) + loadv(m + 16 + j);
        }
    } else {
        const int8_t *src = row;
        for (int j = 0; j < PANEL; j += VEC) {
            const fvec q = __builtin_convertvector(widen_i8(src + j), fvec);
            w[j / VEC] = has_mins ? q * loadv(d + j) + loadv(m + j) : q * loadv(d + j);
        }
    }
}

/* One panel's weights: its k-rows [K, 16 or 32 bytes], scales and mins [K / group, 32]. */
typedef struct {
    const uint8_t *quants;
    const float *scales, *mins;
} Panel;

/* One row (a single decode stream): acc [32] = x [K] @ the panel's weights, each weight dequantized in registers
 * and used at once, never stored (the tiled path writes and rereads an L1 buffer, which for one row costs more
 * than the multiply). The weights, the multiply-adds and their order are the tile's, so the result is the one the
 * row would get in any batch. */
static inline __attribute__((always_inline)) void gemv(const int format, const int group, const int has_mins,
                                                       Panel panel, int64_t K, const float *x, float *acc) {
    const int row_bytes = format == 4 ? PANEL / 2 : PANEL;
    fvec a[NV];
    for (int v = 0; v < NV; v++) a[v] = splat(0.0f);
    for (int64_t g = 0; g < K / group; g++) {
        const float *d = panel.scales + g * PANEL, *m = has_mins ? panel.mins + g * PANEL : NULL;
        for (int k = 0; k < group; k++) {
            const int64_t row = g * group + k;
            fvec w[NV];
            dequant_row(format, has_mins, panel.quants + row * row_bytes, d, m, w);
            const float xv = x[row];
            for (int v = 0; v < NV; v++) a[v] += w[v] * xv;
        }
    }
    for (int v = 0; v < NV; v++) storev(acc + v * VEC, a[v]);
}

/* k-rows k0 .. k0 + kc - 1 of one panel -> wbuf [kc, 32] fp32 (k0 and kc are multiples of the group). */
static inline __attribute__((always_inline)) void dequant_chunk(const int format, const int group, const int has_mins,
                                                                Panel panel, int64_t k0, int64_t kc, float *wbuf) {
    const int row_bytes = format == 4 ? PANEL / 2 : PANEL;
    for (int64_t g = k0 / group; g < (k0 + kc) / group; g++) {
        const float *d = panel.scales + g * PANEL, *m = has_mins ? panel.mins + g * PANEL : NULL;
        for (int k = 0; k < group; k++) {
            const int64_t row = g * group + k;
            fvec w[NV];
            dequant_row(format, has_mins, panel.quants + row * row_bytes, d, m, w);
            for (int v = 0; v < NV; v++) storev(wbuf + (row - k0) * PANEL + v * VEC, w[v]);
        }
    }
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

typedef struct {
    const uint8_t *quants;
    const float *scales, *mins, *bias, *x;
    float *out;
    int64_t M, K, N;
} Call;

/* out[:, the panel's columns] for every row of the call. */
static inline __attribute__((always_inline)) void run_panel(const int format, const int group, const int has_mins,
                                                            const Call *call, int64_t p) {
    const int64_t M = call->M, K = call->K, N = call->N, KG = K / group;
    const Panel panel = {call->quants + p * K * (format == 4 ? PANEL / 2 : PANEL), call->scales + p * KG * PANEL,
                         has_mins ? call->mins + p * KG * PANEL : NULL};
    float wbuf[KCHUNK * PANEL] __attribute__((aligned(64)));
    float acc[ROW_BLOCK * PANEL] __attribute__((aligned(64)));
    const int64_t columns = N - p * PANEL < PANEL ? N - p * PANEL : PANEL;
    for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
        const int64_t block_rows = M - m0 < ROW_BLOCK ? M - m0 : ROW_BLOCK;
        if (M == 1) /* one row: no L1 buffer (same weights, same multiply-adds in the same order) */
            gemv(format, group, has_mins, panel, K, call->x, acc);
        else
            memset(acc, 0, sizeof(float) * block_rows * PANEL);
        for (int64_t k0 = 0; k0 < K && M > 1; k0 += KCHUNK) {
            const int64_t kc = K - k0 < KCHUNK ? K - k0 : KCHUNK;
            dequant_chunk(format, group, has_mins, panel, k0, kc, wbuf);
            for (int64_t r0 = 0; r0 < block_rows; r0 += MAX_TILE_ROWS) {
                const int rows = block_rows - r0 < MAX_TILE_ROWS ? (int)(block_rows - r0) : MAX_TILE_ROWS;
                tile_rows(rows, call->x + (m0 + r0) * K + k0, K, wbuf, kc, acc + r0 * PANEL);
            }
        }
        for (int64_t r = 0; r < block_rows; r++) {
            float *dst = call->out + (m0 + r) * N + p * PANEL;
            for (int64_t c = 0; c < columns; c++)
                dst[c] = acc[r * PANEL + c] + (call->bias ? call->bias[p * PANEL + c] : 0.0f);
        }
    }
}

/* One compiled panel loop per format, group and mins (constants inside, so the inner loops are fixed). */
typedef void (*PanelFn)(const Call *, int64_t);
#define PANEL_VARIANT(F, G, MINS) \
    static void panel_q##F##_g##G##_m##MINS(const Call *call, int64_t p) { run_panel(F, G, MINS, call, p); }
PANEL_VARIANT(4, 32, 1) PANEL_VARIANT(4, 16, 1)
PANEL_VARIANT(8, 32, 0) PANEL_VARIANT(8, 32, 1) PANEL_VARIANT(8, 16, 0) PANEL_VARIANT(8, 16, 1)

/* format: 4 = q4 (nibbles; mins required), 8 = q8 (int8; mins optional). group: weights along k per scale (and
 * min), 32 or 16. bias may be NULL. Returns 0 or a STATUS_*. */
int quant_linear_f32(int format, int group, const void *quants, const float *scales, const float *mins,
                     const float *bias, const float *x, float *out, int64_t M, int64_t K, int64_t N, int num_threads) {
    if ((format != 4 && format != 8) || (group != 32 && group != 16) || K % QBLOCK != 0 ||
        (format == 4 && mins == NULL))
        return STATUS_BAD_FORMAT;
    PanelFn fn;
    if (format == 4)
        fn = group == 32 ? panel_q4_g32_m1 : panel_q4_g16_m1;
    else if (group == 32)
        fn = mins ? panel_q8_g32_m1 : panel_q8_g32_m0;
    else
        fn = mins ? panel_q8_g16_m1 : panel_q8_g16_m0;
    const Call call = {quants, scales, mins, bias, x, out, M, K, N};
    const int64_t P = (N + PANEL - 1) / PANEL;
    /* Panels are handed out as threads free up, a few at a time (~0.25M multiply-adds a grab, so the shared
     * counter costs nothing): a fixed split waits at the end for the slower core, and on a shared machine one
     * core is often slower. A panel's result does not depend on which thread computes it. */
    if (num_threads < 1) num_threads = 1;
    int64_t chunk = (1 << 18) / (M * K * PANEL > 0 ? M * K * PANEL : 1);
    const int64_t even_share = (P + num_threads - 1) / num_threads;
    chunk = chunk > even_share ? even_share : chunk;
    chunk = chunk < 1 ? 1 : chunk;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, chunk)
    for (int64_t p = 0; p < P; p++) fn(&call, p);
    return 0;
}
