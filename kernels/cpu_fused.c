/* Fused row-wise ops of the decoder on the CPU: one pass over a row instead of 3-8 torch ops, each of which costs
 * ~10 us of dispatch and threading on a decode step's tiny tensors (a 32-stream step ran ~600 of them).
 *
 * T=rows (tokens), E=row width, I=intermediate size, R=rotated heads per row, D=head dim, F=D/2, V=vocab
 *
 * The torch twins are in kernels/fused_ops.py; kernels/cpu_native.py builds this file with the others.
 * Every op is row-wise with a fixed order inside a row: a row's result never depends on the other rows.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_kernels.h"
#include "cpu_simd.h"

#define PARALLEL_MIN_ELEMENTS (1 << 16) /* below this a parallel region costs more than it saves */

/* out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight (HF's order: normalize, then scale). With residual != NULL,
 * x[t] += residual[t] first, in place (the decoder's residual stream), and the sum is what is normalized. */
void rms_norm_f32(float *x, const float *residual, const float *weight, float *out, int64_t T, int64_t E, float eps,
                  int num_threads) {
    if (T * E < PARALLEL_MIN_ELEMENTS) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        float *row = x + t * E;
        const int64_t vectors = E / VEC * VEC;
        if (residual) {
            const float *add = residual + t * E;
            for (int64_t e = 0; e < vectors; e += VEC) storev(row + e, loadv(row + e) + loadv(add + e));
            for (int64_t e = vectors; e < E; e++) row[e] += add[e];
        }
        fvec squares = splat(0.0f);
        for (int64_t e = 0; e < vectors; e += VEC) {
            const fvec v = loadv(row + e);
            squares += v * v;
        }
        float sum = hsum(squares);
        for (int64_t e = vectors; e < E; e++) sum += row[e] * row[e];
        const float inverse = 1.0f / sqrtf(sum / (float)E + eps);
        float *dst = out + t * E;
        for (int64_t e = 0; e < vectors; e += VEC) storev(dst + e, loadv(row + e) * inverse * loadv(weight + e));
        for (int64_t e = vectors; e < E; e++) dst[e] = row[e] * inverse * weight[e];
    }
}

/* silu(g) = g * sigmoid(g), with e^{-|g|} only (never overflows): sigmoid = 1 / (1 + e) for g >= 0, e / (1 + e)
 * below. */
static inline fvec silu(fvec g) {
    const ivec negative = g < splat(0.0f);
    const fvec magnitude = (fvec)((ivec)g & 0x7fffffff); /* clear the sign bit */
    const fvec e = exp_nonpositive(-magnitude);
    const fvec numerator = (fvec)(((ivec)e & negative) | ((ivec)splat(1.0f) & ~negative));
    return g * (numerator / (1.0f + e));
}

/* gate_up [T, 2I] (gate, then up) -> out [T, I] = silu(gate) * up. */
void silu_mul_f32(const float *gate_up, float *out, int64_t T, int64_t I, int num_threads) {
    if (T * I < PARALLEL_MIN_ELEMENTS) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *gate = gate_up + t * 2 * I, *up = gate + I;
        float *dst = out + t * I;
        const int64_t vectors = I / VEC * VEC;
        for (int64_t i = 0; i < vectors; i += VEC) storev(dst + i, silu(loadv(gate + i)) * loadv(up + i));
        for (int64_t i = vectors; i < I; i++) {
            fvec lane = splat(0.0f);
            lane[0] = gate[i];
            dst[i] = silu(lane)[0] * up[i];
        }
    }
}

/* Rotary embedding, rotate_half layout, in place: x [T, R, D] with row stride `row_stride` floats (the q and k of a
 * fused qkv row), cos/sin [T, F]. Halves pair up: (x1, x2) -> (x1 c - x2 s, x2 c + x1 s). */
void rope_f32(float *x, const float *cos, const float *sin, int64_t T, int64_t R, int64_t D, int64_t row_stride,
              int num_threads) {
    const int64_t F = D / 2, vectors = F / VEC * VEC;
    if (T * R * D < PARALLEL_MIN_ELEMENTS) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos + t * F, *s = sin + t * F;
        for (int64_t r = 0; r < R; r++) {
            float *x1 = x + t * row_stride + r * D, *x2 = x1 + F;
            for (int64_t f = 0; f < vectors; f += VEC) {
                const fvec a = loadv(x1 + f), b = loadv(x2 + f), cv = loadv(c + f), sv = loadv(s + f);
                storev(x1 + f, a * cv - b * sv);
                storev(x2 + f, b * cv + a * sv);
            }
            for (int64_t f = vectors; f < F; f++) {
                const float a = x1[f], b = x2[f];
                x1[f] = a * c[f] - b * s[f];
                x2[f] = b * c[f] + a * s[f];
            }
        }
    }
}

/* index [T] = the first index of each row's maximum (torch.argmax's answer). Returns 1 if a row holds a NaN (torch
 * then answers, NaN being its maximum), else 0. */
int argmax_rows_f32(const float *x, int64_t *index, int64_t T, int64_t V, int num_threads) {
    int status = 0;
    if (T * V < PARALLEL_MIN_ELEMENTS) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : status)
    for (int64_t t = 0; t < T; t++) {
        const float *row = x + t * V;
        const int64_t vectors = V / VEC * VEC;
        fvec max_lanes = splat(-INFINITY);
        ivec nan_lanes = (ivec){};
        for (int64_t v = 0; v < vectors; v += VEC) {
            const fvec value = loadv(row + v);
            const ivec greater = value > max_lanes;
            max_lanes = (fvec)(((ivec)value & greater) | ((ivec)max_lanes & ~greater));
            nan_lanes |= value != value;
        }
        float max = -INFINITY;
        int has_nan = 0;
        for (int i = 0; i < VEC; i++) {
            max = max_lanes[i] > max ? max_lanes[i] : max;
            has_nan |= nan_lanes[i] != 0;
        }
        for (int64_t v = vectors; v < V; v++) {
            max = row[v] > max ? row[v] : max;
            has_nan |= row[v] != row[v];
        }
        int64_t first = 0;
        while (first < V && row[first] != max) first++; /* the max is there: the scan stops on it */
        index[t] = first < V ? first : 0;
        status |= has_nan;
    }
    return status;
}
