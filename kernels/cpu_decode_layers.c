/* A decode step's decoder layers, all of them, in one native call: the same kernels in the same order as the
 * module path (workers/model/llama.py with block-quantized linears and the fused row ops), minus the Python between
 * them. That Python was ~20% of a 32-stream step on 2 cores (measured with perf: main thread outside the kernels),
 * and the other core spins idle through it.
 *
 * T=decode rows, E=hidden size, H=query heads, Hkv=KV heads, D=head dim, I=intermediate size, Q=(H + 2 Hkv) D,
 * S=block size, M=max blocks per sequence
 *
 * Per layer, as DecoderLayer.forward:
 *   normed = rms_norm(hidden)                        input_layernorm
 *   qkv = normed @ Wqkv (+ bias); rope on q and k    Attention.project, in place on the qkv rows
 *   K/V rows -> their page slots                     IdentityCodec.write
 *   attn = paged decode attention (q read in qkv)     IdentityCodec.decode_attention
 *   proj = attn @ Wo; hidden += proj; normed = rms_norm(hidden)
 *   act = silu(normed @ Wgate) * (normed @ Wup); hidden += act @ Wdown
 * Every kernel is the one the module path calls, with the same thread count, so the result is bit-identical
 * (tests/reference/test_native_decode.py). workers/model/native_decode.py checks when this path applies.
 */
#include <stddef.h>
#include <stdint.h>

#include "cpu_kernels.h"

typedef struct {
    int32_t format, group; /* 4 = q4, 8 = q8; weights per scale, 32 or 16 (quant_linear_f32) */
    const void *quants;
    const float *scales, *mins, *bias; /* mins: q4, optional for q8; bias may be NULL */
    int64_t in_features, out_features;
} QuantWeight;

typedef struct {
    const float *input_norm, *post_norm; /* [E] */
    QuantWeight qkv, o, gate_up, down;
    void *key_pages, *value_pages; /* [N, S, Hkv, D], fp32 or fp16 (`half`) */
} DecodeLayer;

typedef struct {
    int64_t T, E, H, Hkv, D, I, num_slots, S, M;
    float eps, scale;
    int32_t half, num_threads;
    const float *cos, *sin;      /* [T, D / 2] */
    const int64_t *slots;        /* [T] block_id * S + offset */
    const int32_t *block_tables; /* [T, M] */
    const int32_t *seq_lens;     /* [T] */
    const int64_t *tail_masks;   /* [T] or NULL: a draft tree's rows (kernels/tree_mask.py) */
    /* the caller's scratch rows */
    float *normed;  /* [T, E] */
    float *qkv;     /* [T, Q] */
    float *attn;    /* [T, H D] */
    float *proj;    /* [T, E] */
    float *gate_up; /* [T, 2 I] */
    float *act;     /* [T, I] */
} DecodeStep;

static int linear(const QuantWeight *w, const float *x, float *out, int64_t T, int num_threads) {
    return quant_linear_f32(w->format, w->group, w->quants, w->scales, w->mins, w->bias, x, out, T,
                            w->in_features, w->out_features, num_threads);
}

/* hidden [T, E] is the residual stream, updated in place. Returns 0, or the first failing kernel's status with the
 * layer in the upper bits ((layer + 1) << 8 | status), nothing after it run. */
int decode_layers(float *hidden, const DecodeLayer *layers, int64_t num_layers, const DecodeStep *step) {
    const int64_t T = step->T, E = step->E, H = step->H, Hkv = step->Hkv, D = step->D, I = step->I;
    const int64_t Q = (H + 2 * Hkv) * D;
    const int threads = step->num_threads;
    for (int64_t index = 0; index < num_layers; index++) {
        const DecodeLayer *layer = layers + index;
        const int fail = (int)((index + 1) << 8);
        int status;
        rms_norm_f32(hidden, NULL, layer->input_norm, step->normed, T, E, step->eps, threads);
        if ((status = linear(&layer->qkv, step->normed, step->qkv, T, threads))) return fail | status;
        rope_f32(step->qkv, step->cos, step->sin, T, H + Hkv, D, Q, threads);
        status = kv_write(step->qkv + H * D, step->qkv + (H + Hkv) * D, Q, Q, step->slots, T, Hkv * D,
                          layer->key_pages, layer->value_pages, step->num_slots, step->half);
        if (status) return fail | status;
        status = paged_decode(step->qkv, Q, layer->key_pages, layer->value_pages, step->block_tables,
                              step->seq_lens, step->tail_masks, step->attn, step->num_slots / step->S, T, H, Hkv, D, step->S, step->M,
                              step->scale, step->half, threads);
        if (status) return fail | status;
        if ((status = linear(&layer->o, step->attn, step->proj, T, threads))) return fail | status;
        rms_norm_f32(hidden, step->proj, layer->post_norm, step->normed, T, E, step->eps, threads);
        if ((status = linear(&layer->gate_up, step->normed, step->gate_up, T, threads))) return fail | status;
        silu_mul_f32(step->gate_up, step->act, T, I, threads);
        if ((status = linear(&layer->down, step->act, step->proj, T, threads))) return fail | status;
        for (int64_t e = 0; e < T * E; e++) hidden[e] += step->proj[e];
    }
    return 0;
}
