/* Paged decode attention on the CPU, reading K/V pages in place (no gather copy).
 *
 * B=decode sequences, H=query heads, Hkv=KV heads, G=H/Hkv, D=head dim, N=blocks, S=block size, M=max blocks
 *
 * q [B, H, D], k/v pages [N, S, Hkv, D] (contiguous float32), block_tables [B, M] int32, seq_lens [B] int32,
 * out [B, H, D]. Token t of sequence b lives at pages[block_tables[b, t / S], t % S]. The torch twin is
 * reference_paged_decode_attention in kernels/paged_attention.py; kernels/cpu_native.py builds and calls this.
 *
 * Three passes per (sequence, query head), in registers of the target's width (cpu_simd.h): scores, an exact
 * softmax (max, then exp and sum), then the probability-weighted sum of value rows. The query heads of one KV head
 * run one after another, so that head's pages are read from DRAM once and from cache after. A work item is one
 * sequence with all its KV heads when there are enough sequences to keep `num_threads` threads busy, else one
 * (sequence, KV head). Either way every output is computed by one thread in one fixed order, so a sequence's
 * result never depends on what else is in the batch. Heads larger than MAX_HEAD_DIM are refused (STATUS_UNSUPPORTED)
 * and take the torch path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_simd.h"

#define STATUS_NO_MEMORY 1
#define STATUS_BAD_BLOCK 2
#define STATUS_BAD_LENGTH 4
#define STATUS_UNSUPPORTED 8 /* a head larger than MAX_HEAD_DIM: the caller uses torch */
#define MAX_HEAD_DIM 256

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

/* One (sequence, KV head h, query head q): scores over the sequence's tokens, an exact softmax, then the
 * probability-weighted sum of value rows -> out [D]. D is a constant at the call sites for the common head sizes,
 * so the query and the accumulator live in registers; the order of every sum is fixed. */
static inline __attribute__((always_inline)) void attend(const int D, const Job *job, const int32_t *table,
                                                         int64_t len, int64_t h, const float *q, float *scores,
                                                         float *out) {
    const int64_t S = job->S, row = job->Hkv * D, nv = D / VEC, tail = D % VEC; /* row: floats per page row */
    fvec query[MAX_HEAD_DIM / VEC], acc[MAX_HEAD_DIM / VEC];
    float query_tail[VEC], acc_tail[VEC];
    for (int64_t c = 0; c < nv; c++) query[c] = loadv(q + c * VEC) * job->scale;
    for (int64_t d = 0; d < tail; d++) query_tail[d] = q[nv * VEC + d] * job->scale;
    /* Token t = j * S + o sits in row o of block table[j]: walking blocks avoids a division per token. */
    for (int64_t j = 0, t = 0; t < len; j++) {
        const float *block = job->k + table[j] * S * row + h * D;
        for (int64_t o = 0; o < S && t < len; o++, t++) {
            const float *key = block + o * row;
            fvec even = splat(0.0f), odd = splat(0.0f); /* two chains: half the multiply-add latency per token */
            for (int64_t c = 0; c < nv; c += 2) {
                even += query[c] * loadv(key + c * VEC);
                if (c + 1 < nv) odd += query[c + 1] * loadv(key + (c + 1) * VEC);
            }
            float dot = hsum(even + odd);
            for (int64_t d = 0; d < tail; d++) dot += query_tail[d] * key[nv * VEC + d];
            scores[t] = dot;
        }
    }
    const int64_t padded = (len + VEC - 1) / VEC * VEC;
    for (int64_t t = len; t < padded; t++) scores[t] = -INFINITY; /* exp() of these is exactly 0 */
    fvec max_lanes = splat(-INFINITY);
    for (int64_t t = 0; t < padded; t += VEC) {
        const fvec x = loadv(scores + t);
        const ivec greater = x > max_lanes;
        max_lanes = (fvec)(((ivec)x & greater) | ((ivec)max_lanes & ~greater));
    }
    float max = max_lanes[0];
    for (int i = 1; i < VEC; i++) max = max_lanes[i] > max ? max_lanes[i] : max;
    fvec sum_lanes = splat(0.0f);
    for (int64_t t = 0; t < padded; t += VEC) {
        const fvec p = exp_nonpositive(loadv(scores + t) - max);
        storev(scores + t, p);
        sum_lanes += p;
    }
    const float inverse = 1.0f / hsum(sum_lanes);
    for (int64_t c = 0; c < nv; c++) acc[c] = splat(0.0f);
    for (int64_t d = 0; d < tail; d++) acc_tail[d] = 0.0f;
    for (int64_t j = 0, t = 0; t < len; j++) {
        const float *block = job->v + table[j] * S * row + h * D;
        for (int64_t o = 0; o < S && t < len; o++, t++) {
            const float *value = block + o * row;
            const fvec p = splat(scores[t]);
            for (int64_t c = 0; c < nv; c++) acc[c] += p * loadv(value + c * VEC);
            for (int64_t d = 0; d < tail; d++) acc_tail[d] += scores[t] * value[nv * VEC + d];
        }
    }
    for (int64_t c = 0; c < nv; c++) storev(out + c * VEC, acc[c] * inverse);
    for (int64_t d = 0; d < tail; d++) out[nv * VEC + d] = acc_tail[d] * inverse;
}

static void run(Job *job) {
    const int64_t G = job->H / job->Hkv, D = job->D, S = job->S;
    const int64_t hp = job->heads_per_item, items_per_seq = job->Hkv / hp;
    int64_t capacity = 0;
    float *scores = NULL; /* [len rounded up to VEC] */
    job->status = 0;
    for (int64_t item = job->first; item < job->last && job->status == 0; item++) {
        const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * hp; /* first KV head */
        const int64_t len = job->seq_lens[b];
        const int32_t *table = job->block_tables + b * job->M;
        if (len > job->M * S) { job->status = STATUS_BAD_LENGTH; break; } /* more blocks than the table has */
        for (int64_t j = 0; j < (len + S - 1) / S; j++) {
            if (table[j] < 0 || table[j] >= job->N) { job->status = STATUS_BAD_BLOCK; break; }
        }
        if (job->status) break;
        if (len + VEC > capacity) {
            free(scores);
            capacity = len + VEC;
            scores = malloc(sizeof(float) * capacity);
            if (!scores) { job->status = STATUS_NO_MEMORY; break; }
        }
        /* Every (KV head, query head) is computed the same way whichever item holds it: batch invariance. */
        for (int64_t h = h0; h < h0 + hp; h++) {
            for (int64_t g = 0; g < G; g++) {
                const int64_t offset = (b * job->H + h * G + g) * D;
                switch (D) {
                    case 64: attend(64, job, table, len, h, job->q + offset, scores, job->out + offset); break;
                    case 128: attend(128, job, table, len, h, job->q + offset, scores, job->out + offset); break;
                    default: attend((int)D, job, table, len, h, job->q + offset, scores, job->out + offset);
                }
            }
        }
    }
    free(scores);
}

/* Returns 0 on success, else STATUS_* bits: no memory (the caller falls back to torch), a block id outside the
 * pool or a length past the table (the caller raises). */
int paged_decode_f32(const float *q, const float *k, const float *v, const int32_t *block_tables,
                     const int32_t *seq_lens, float *out, int64_t N, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                     int64_t S, int64_t M, float scale, int64_t num_threads) {
    if (D > MAX_HEAD_DIM) return STATUS_UNSUPPORTED;
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
