/* Paged decode attention on the CPU, reading K/V pages in place (no gather copy).
 *
 * B=decode sequences, H=query heads, Hkv=KV heads, G=H/Hkv, D=head dim, N=blocks, S=block size, M=max blocks
 *
 * q [B, H, D], k/v pages [N, S, Hkv, D] (contiguous float32), block_tables [B, M] int32, seq_lens [B] int32,
 * out [B, H, D]. Token t of sequence b lives at pages[block_tables[b, t / S], t % S]. The torch twin is
 * reference_paged_decode_attention in kernels/paged_attention.py; kernels/cpu_native.py builds and calls this.
 *
 * Three passes per work item: scores (each page row is read once for all the query heads that use it), an exact
 * softmax (max, then exp and sum), then the probability-weighted sum of value rows. An item is one sequence with
 * all its KV heads (a token's page row is contiguous) when there are enough sequences to keep `num_threads`
 * threads busy, else one (sequence, KV head). Either way every output is computed by one thread in one fixed
 * order, so a sequence's result never depends on what else is in the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define STATUS_NO_MEMORY 1
#define STATUS_BAD_BLOCK 2
#define STATUS_BAD_LENGTH 4

typedef struct {
    const float *q, *k, *v;
    const int32_t *block_tables, *seq_lens;
    float *out;
    int64_t N, B, H, Hkv, D, S, M;
    float scale;
    int64_t heads_per_item; /* KV heads per work item: all of them (whole rows) or one (more items to share) */
    int64_t first, last;    /* this worker's items: item i = sequence i / items_per_seq, heads from there */
    int status;
} Job;

/* e^x for x <= 0 (scores minus their max), vectorizable: Cody-Waite range reduction to r in [-ln2/2, ln2/2] and
 * Cephes' degree-6 polynomial (about 1 ulp; libm's expf would not vectorize without -ffast-math). Below -87 the
 * result is clamped to ~2^-125: a probability that small adds nothing next to the max's 1. */
static inline float exp_nonpositive(float x) {
    const int underflow = !(x >= -87.0f); /* also NaN: the float-to-int below would be undefined */
    x = underflow ? -87.0f : x;
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return underflow ? 0.0f : p * scale.f; /* 0, not a subnormal that would slow every later multiply */
}

static void run(Job *job) {
    const int64_t G = job->H / job->Hkv, D = job->D, S = job->S, Hkv = job->Hkv;
    const int64_t hp = job->heads_per_item, items_per_seq = Hkv / hp, QH = hp * G; /* query heads per item */
    int64_t capacity = 0;
    float *scores = NULL; /* [QH, len] */
    float *query = malloc(sizeof(float) * QH * D);
    float *acc = malloc(sizeof(float) * QH * D);
    job->status = (query && acc) ? 0 : STATUS_NO_MEMORY;
    for (int64_t item = job->first; item < job->last && job->status == 0; item++) {
        const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * hp; /* first KV head */
        const int64_t len = job->seq_lens[b];
        const int32_t *table = job->block_tables + b * job->M;
        if (len > job->M * S) { job->status = STATUS_BAD_LENGTH; break; } /* more blocks than the table has */
        for (int64_t j = 0; j < (len + S - 1) / S; j++) {
            if (table[j] < 0 || table[j] >= job->N) { job->status = STATUS_BAD_BLOCK; break; }
        }
        if (job->status) break;
        if (len * QH > capacity) {
            free(scores);
            capacity = len * QH;
            scores = malloc(sizeof(float) * capacity);
            if (!scores) { job->status = STATUS_NO_MEMORY; break; }
        }
        const float *q = job->q + (b * job->H + h0 * G) * D; /* the item's query heads are adjacent */
        for (int64_t i = 0; i < QH * D; i++) query[i] = q[i] * job->scale;
        /* Token t's heads h0.. of one page row are contiguous: read once, scored by all QH query heads. */
        for (int64_t t = 0; t < len; t++) {
            const float *key = job->k + ((table[t / S] * S + t % S) * Hkv + h0) * D;
            for (int64_t qh = 0; qh < QH; qh++) {
                const float *qv = query + qh * D, *kv = key + (qh / G) * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qv[d] * kv[d];
                scores[qh * len + t] = dot;
            }
        }
        for (int64_t qh = 0; qh < QH; qh++) {
            float *s = scores + qh * len;
            float max = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : max)
            for (int64_t t = 0; t < len; t++) max = s[t] > max ? s[t] : max;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < len; t++) { s[t] = exp_nonpositive(s[t] - max); sum += s[t]; }
            const float inverse = 1.0f / sum;
#pragma omp simd
            for (int64_t t = 0; t < len; t++) s[t] *= inverse;
        }
        for (int64_t i = 0; i < QH * D; i++) acc[i] = 0.0f;
        for (int64_t t = 0; t < len; t++) {
            const float *value = job->v + ((table[t / S] * S + t % S) * Hkv + h0) * D;
            for (int64_t qh = 0; qh < QH; qh++) {
                const float p = scores[qh * len + t], *vv = value + (qh / G) * D;
                float *a = acc + qh * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) a[d] += p * vv[d];
            }
        }
        float *out = job->out + (b * job->H + h0 * G) * D;
        for (int64_t i = 0; i < QH * D; i++) out[i] = acc[i];
    }
    free(scores);
    free(query);
    free(acc);
}

/* Returns 0 on success, else STATUS_* bits: no memory (the caller falls back to torch), a block id outside the
 * pool or a length past the table (the caller raises). */
int paged_decode_f32(const float *q, const float *k, const float *v, const int32_t *block_tables,
                     const int32_t *seq_lens, float *out, int64_t N, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                     int64_t S, int64_t M, float scale, int64_t num_threads) {
    int64_t work = 0; /* multiply-adds of the score pass; the value pass does as many */
    for (int64_t b = 0; b < B; b++) work += seq_lens[b];
    work *= H * D;
    if (work < (1 << 20)) num_threads = 1; /* below ~0.1 ms of work a parallel region costs more than it saves */
    /* Whole page rows per item when there are enough sequences to share; one KV head per item otherwise. */
    const int64_t heads_per_item = B >= 2 * num_threads ? Hkv : 1;
    const int64_t items = B * (Hkv / heads_per_item);
    if (num_threads > items) num_threads = items;
    if (num_threads < 1) num_threads = 1;
    int status = 0;
    /* OpenMP from the process's libgomp: loaded into a torch process, this is torch's own thread pool (same
     * soname), so the kernel's threads are torch's intra-op threads, never extra ones competing with them. */
#pragma omp parallel for num_threads(num_threads) schedule(static, 1) reduction(| : status)
    for (int64_t worker = 0; worker < num_threads; worker++) {
        Job job = {q, k, v, block_tables, seq_lens, out, N, B, H, Hkv, D, S, M, scale, heads_per_item,
                   items * worker / num_threads, items * (worker + 1) / num_threads, 0};
        run(&job);
        status |= job.status;
    }
    return status;
}
