/* The native kernels' exported entry points, declared once: cpu_decode_layers.c composes them, and every source
 * includes this so the compiler holds each definition to its declaration (kernels/cpu_native.py mirrors these
 * signatures in ctypes). Shapes and semantics are documented at each definition. */
#ifndef TIERSERVE_CPU_KERNELS_H
#define TIERSERVE_CPU_KERNELS_H

#include <stdint.h>

int paged_decode(const float *q, int64_t q_stride, const void *k, const void *v, const int32_t *block_tables,
                 const int32_t *seq_lens, const int64_t *tail_masks, float *out, int64_t N, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                 int64_t S, int64_t M, float scale, int half, int64_t num_threads);

int kv_write(const float *key, const float *value, int64_t key_stride, int64_t value_stride, const int64_t *slots,
             int64_t T, int64_t R, void *key_pages, void *value_pages, int64_t num_slots, int half);

int native_has_half(void);

int quant_linear_f32(int format, int group, const void *quants, const float *scales, const float *mins,
                     const float *bias, const float *x, float *out, int64_t M, int64_t K, int64_t N, int num_threads);

void rms_norm_f32(float *x, const float *residual, const float *weight, float *out, int64_t T, int64_t E, float eps,
                  int num_threads);
void silu_mul_f32(const float *gate_up, float *out, int64_t T, int64_t I, int num_threads);
void rope_f32(float *x, const float *cos, const float *sin, int64_t T, int64_t R, int64_t D, int64_t row_stride,
              int num_threads);
int argmax_rows_f32(const float *x, int64_t *index, int64_t T, int64_t V, int num_threads);

#endif
