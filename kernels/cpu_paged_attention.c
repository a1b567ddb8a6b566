/* Paged decode attention on the CPU, reading K/V pages in place (no gather copy).
 *
 * B=decode sequences, H=query heads, Hkv=KV heads, G=H/Hkv, D=head dim, N=blocks, S=block size, M=max blocks
 *
 * q [B, H, D] float32 (rows q_stride floats apart: a view into the fused qkv projection needs no copy), k/v pages [N, S, Hkv, D] (contiguous; float32, or float16 where the target converts it in
 * hardware), block_tables [B, M] int32, seq_lens [B] int32, tail_masks [B] int64 or NULL (a draft tree's rows:
 * bit i clear hides token seq_lens[b] - 1 - i; kernels/tree_mask.py), out [B, H, D] float32. Token t of sequence b lives at
 * pages[block_tables[b, t / S], t % S]. The math is float32 whatever the pages hold. The torch twin is
 * reference_paged_decode_attention in kernels/paged_attention.py; kernels/cpu_native.py builds and calls this.
 *
 * Three passes per (sequence, KV head), in registers of the target's width (cpu_simd.h): scores, an exact softmax
 * (max, then exp and sum), then the probability-weighted sum of value rows. Heads of 64 that share a KV head go
 * through each pass together, up to as many as fit in registers: every key and value row loaded serves all of
 * them, and their independent sums hide the multiply-add latency. A work item is one sequence with all its KV heads
 * when there are enough sequences to keep `num_threads` threads busy, else one (sequence, KV head). Either way every
 * output is computed by one thread in one fixed order, so a sequence's result never depends on what else is in
 * the batch. Heads larger than MAX_HEAD_DIM, and fp16 pages on a target without F16C, are refused
 * (STATUS_UNSUPPORTED) and take the torch path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"
#include "cpu_simd.h"

#define STATUS_NO_MEMORY 1
#define STATUS_BAD_BLOCK 2
#define STATUS_BAD_LENGTH 4
#define STATUS_UNSUPPORTED 8 /* a head larger than MAX_HEAD_DIM, or fp16 pages without F16C: the caller uses torch */
#define MAX_HEAD_DIM 256
#define MAX_GROUP 4          /* query heads per pass, at most */
#define GROUP_VECTORS 12     /* query vectors one pass keeps in registers: 3 heads of 64 on AVX-512 */

typedef struct {
    const float *q;
    int64_t q_stride;  /* floats between two sequences' query rows */
    const void *k, *v; /* float or uint16_t (fp16) elements */
    const int32_t *block_tables, *seq_lens;
    const int64_t *tail_masks; /* NULL: every row sees all of its seq_lens tokens */
    float *out;
    int64_t N, B, H, Hkv, D, S, M;
    float scale;
    int half;               /* pages hold fp16 */
    int64_t heads_per_item; /* KV heads per work item: all of them (whole rows) or one (more items to share) */
    int status;             /* this thread's STATUS_* bits */
} Job;

/* VEC page elements from element `index` on, as floats. HALF is a constant at every call site. */
static inline __attribute__((always_inline)) fvec load_page(const void *pages, int64_t index, const int HALF) {
    return HALF ? load_half((const uint16_t *)pages + index) : loadv((const float *)pages + index);
}

static inline __attribute__((always_inline)) float page_element(const void *pages, int64_t index, const int HALF) {
    return HALF ? half_to_float(((const uint16_t *)pages)[index]) : ((const float *)pages)[index];
}

/* A pass asks for the next block's rows of its head while it works on this one: a head's rows are a quarter to a
 * third of each page row, a stride the hardware prefetcher follows poorly, so without this the pass waits on
 * memory (measured on 32 sequences x 240 tokens x 30 layers: 0.94 -> 0.69 ms per call in fp32, 0.84 -> 0.47 in
 * fp16; two blocks ahead was no better). */
static inline __attribute__((always_inline)) void prefetch_rows(const void *pages, int64_t first, int64_t S,
                                                                int64_t row, int64_t D, const int HALF) {
    const int64_t element = HALF ? 2 : 4;
    const char *base = (const char *)pages + first * element;
    for (int64_t o = 0; o < S; o++)
        for (int64_t byte = 0; byte < D * element; byte += 64) __builtin_prefetch(base + (o * row) * element + byte);
}

/* KV head h of one sequence, for its query heads g0..g0+GC-1: scores over the sequence's tokens, an exact softmax
 * per head, then the probability-weighted sums of value rows -> out rows g0.. [D each]. D and GC are constants at
 * the call sites for the common shapes, so queries and accumulators live in registers; every sum has a fixed
 * order. `scores` holds GC rows of `padded` floats. */
static inline __attribute__((always_inline)) void attend(const int D, const int GC, const int HALF, const Job *job,
                                                         const int32_t *table, int64_t len, int64_t tail_mask,
                                                         int64_t h, const float *q, float *scores, int64_t padded,
                                                         float *out) {
    const int64_t S = job->S, row = job->Hkv * D, nv = D / VEC, tail = D % VEC; /* row: elements per page row */
    fvec query[MAX_GROUP][MAX_HEAD_DIM / VEC], acc[MAX_GROUP][MAX_HEAD_DIM / VEC];
    float query_tail[MAX_GROUP][VEC], acc_tail[MAX_GROUP][VEC];
    for (int g = 0; g < GC; g++) {
        for (int64_t c = 0; c < nv; c++) query[g][c] = loadv(q + g * D + c * VEC) * job->scale;
        for (int64_t d = 0; d < tail; d++) query_tail[g][d] = q[g * D + nv * VEC + d] * job->scale;
    }
    const int64_t num_blocks = (len + S - 1) / S;
    /* Token t = j * S + o sits in row o of block table[j]: walking blocks avoids a division per token. */
    for (int64_t j = 0, t = 0; t < len; j++) {
        const int64_t block = (int64_t)table[j] * S * row + h * D;
        if (j + 1 < num_blocks) prefetch_rows(job->k, (int64_t)table[j + 1] * S * row + h * D, S, row, D, HALF);
        for (int64_t o = 0; o < S && t < len; o++, t++) {
            const int64_t key = block + o * row;
            fvec even[MAX_GROUP], odd[MAX_GROUP]; /* two chains per head: half the multiply-add latency */
            for (int g = 0; g < GC; g++) even[g] = odd[g] = splat(0.0f);
            for (int64_t c = 0; c < nv; c += 2) {
                const fvec k0 = load_page(job->k, key + c * VEC, HALF);
                for (int g = 0; g < GC; g++) even[g] += query[g][c] * k0;
                if (c + 1 < nv) {
                    const fvec k1 = load_page(job->k, key + (c + 1) * VEC, HALF);
                    for (int g = 0; g < GC; g++) odd[g] += query[g][c + 1] * k1;
                }
            }
            for (int g = 0; g < GC; g++) {
                float dot = hsum(even[g] + odd[g]);
                for (int64_t d = 0; d < tail; d++)
                    dot += query_tail[g][d] * page_element(job->k, key + nv * VEC + d, HALF);
                scores[g * padded + t] = dot;
            }
        }
    }
    float inverse[MAX_GROUP];
    for (int g = 0; g < GC; g++) {
        float *head_scores = scores + g * padded;
        for (int64_t t = len; t < padded; t++) head_scores[t] = -INFINITY; /* exp() of these is exactly 0 */
        if (tail_mask != -1) /* a tree row: its cousins among the last 64 tokens are hidden (bit 0, itself, is set) */
            for (int64_t i = 0; i < 64 && i < len; i++)
                if (!((tail_mask >> i) & 1)) head_scores[len - 1 - i] = -INFINITY;
        fvec max_lanes = splat(-INFINITY);
        for (int64_t t = 0; t < padded; t += VEC) {
            const fvec x = loadv(head_scores + t);
            const ivec greater = x > max_lanes;
            max_lanes = (fvec)(((ivec)x & greater) | ((ivec)max_lanes & ~greater));
        }
        float max = max_lanes[0];
        for (int i = 1; i < VEC; i++) max = max_lanes[i] > max ? max_lanes[i] : max;
        fvec sum_lanes = splat(0.0f);
        for (int64_t t = 0; t < padded; t += VEC) {
            const fvec p = exp_nonpositive(loadv(head_scores + t) - max);
            storev(head_scores + t, p);
            sum_lanes += p;
        }
        inverse[g] = 1.0f / hsum(sum_lanes);
        for (int64_t c = 0; c < nv; c++) acc[g][c] = splat(0.0f);
        for (int64_t d = 0; d < tail; d++) acc_tail[g][d] = 0.0f;
    }
    for (int64_t j = 0, t = 0; t < len; j++) {
        const int64_t block = (int64_t)table[j] * S * row + h * D;
        if (j + 1 < num_blocks) prefetch_rows(job->v, (int64_t)table[j + 1] * S * row + h * D, S, row, D, HALF);
        for (int64_t o = 0; o < S && t < len; o++, t++) {
            const int64_t value = block + o * row;
            fvec p[MAX_GROUP];
            for (int g = 0; g < GC; g++) p[g] = splat(scores[g * padded + t]);
            for (int64_t c = 0; c < nv; c++) {
                const fvec v = load_page(job->v, value + c * VEC, HALF);
                for (int g = 0; g < GC; g++) acc[g][c] += p[g] * v;
            }
            for (int64_t d = 0; d < tail; d++) {
                const float v = page_element(job->v, value + nv * VEC + d, HALF);
                for (int g = 0; g < GC; g++) acc_tail[g][d] += scores[g * padded + t] * v;
            }
        }
    }
    for (int g = 0; g < GC; g++) {
        for (int64_t c = 0; c < nv; c++) storev(out + g * D + c * VEC, acc[g][c] * inverse[g]);
        for (int64_t d = 0; d < tail; d++) out[g * D + nv * VEC + d] = acc_tail[g][d] * inverse[g];
    }
}

/* attend() with D, GC and HALF as constants for the shapes that matter: heads of 64 (up to 3 a pass, AVX-512) and
 * of 128 (one a pass on every target: 8+ vectors each). Other shapes take the generic body, D read at run time,
 * one head at a time. Only these instances are built: each costs compile time (24 took 8 s to compile, these 10
 * take 2.5 s). */
#define ATTEND(DIM, GC, HALF) attend(DIM, GC, HALF, job, table, len, tail_mask, h, q, scores, padded, out)

static void attend_group(const Job *job, int64_t group_size, const int32_t *table, int64_t len, int64_t tail_mask,
                         int64_t h, const float *q, float *scores, int64_t padded, float *out) {
    const int D = (int)job->D, half = job->half;
    if (D == 64 && group_size == 1) { if (half) ATTEND(64, 1, 1); else ATTEND(64, 1, 0); }
    else if (D == 64 && group_size == 2) { if (half) ATTEND(64, 2, 1); else ATTEND(64, 2, 0); }
    else if (D == 64 && group_size == 3) { if (half) ATTEND(64, 3, 1); else ATTEND(64, 3, 0); }
    else if (D == 128 && group_size == 1) { if (half) ATTEND(128, 1, 1); else ATTEND(128, 1, 0); }
    else {
        /* one head at a time: the same sums in the same order as a grouped pass would make */
        for (int64_t g = 0; g < group_size; g++, q += D, out += D) {
            if (half) ATTEND(D, 1, 1); else ATTEND(D, 1, 0);
        }
    }
}

/* One work item: sequence item / items_per_seq, heads_per_item KV heads from there. `scores` grows as needed. */
static void run_item(Job *job, int64_t item, float **scores, int64_t *capacity) {
    const int64_t G = job->H / job->Hkv, D = job->D, S = job->S;
    const int64_t hp = job->heads_per_item, items_per_seq = job->Hkv / hp;
    /* Query heads per pass: as many as keep GROUP_VECTORS query vectors, split into near-equal passes. */
    int64_t fit = D / VEC ? GROUP_VECTORS / (D / VEC) : MAX_GROUP;
    fit = fit < 1 ? 1 : fit > MAX_GROUP ? MAX_GROUP : fit;
    const int64_t passes = (G + fit - 1) / fit;
    const int64_t b = item / items_per_seq, h0 = (item % items_per_seq) * hp; /* first KV head */
    const int64_t len = job->seq_lens[b];
    const int64_t tail_mask = job->tail_masks ? job->tail_masks[b] : -1;
    const int32_t *table = job->block_tables + b * job->M;
    if (len > job->M * S) { job->status |= STATUS_BAD_LENGTH; return; } /* more blocks than the table has */
    for (int64_t j = 0; j < (len + S - 1) / S; j++) {
        if (table[j] < 0 || table[j] >= job->N) { job->status |= STATUS_BAD_BLOCK; return; }
    }
    const int64_t padded = (len + VEC - 1) / VEC * VEC;
    if (MAX_GROUP * padded > *capacity) {
        free(*scores);
        *capacity = MAX_GROUP * padded;
        *scores = malloc(sizeof(float) * *capacity);
        if (!*scores) { *capacity = 0; job->status |= STATUS_NO_MEMORY; return; }
    }
    /* Every (KV head, query head) is computed the same way whichever item holds it: batch invariance. */
    for (int64_t h = h0; h < h0 + hp; h++) {
        for (int64_t pass = 0; pass < passes; pass++) {
            const int64_t g0 = G * pass / passes, g1 = G * (pass + 1) / passes;
            const int64_t head = (h * G + g0) * D;
            attend_group(job, g1 - g0, table, len, tail_mask, h, job->q + b * job->q_stride + head, *scores, padded,
                         job->out + b * job->H * D + head);
        }
    }
}

/* Returns 0 on success, else STATUS_* bits: no memory or unsupported (the caller falls back to torch), a block id
 * outside the pool or a length past the table (the caller raises). `half`: the pages hold fp16. */
int paged_decode(const float *q, int64_t q_stride, const void *k, const void *v, const int32_t *block_tables,
                 const int32_t *seq_lens, const int64_t *tail_masks, float *out, int64_t N, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                 int64_t S, int64_t M, float scale, int half, int64_t num_threads) {
    if (D > MAX_HEAD_DIM || (half && !HAVE_HALF)) return STATUS_UNSUPPORTED;
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
     * soname), so the kernel's threads are torch's intra-op threads, never extra ones competing with them. Items
     * are handed out as threads free up: sequences differ in length, and on a shared machine one core is often
     * slower than the other. An item's result does not depend on which thread computes it. */
#pragma omp parallel num_threads(num_threads) reduction(| : status)
    {
        Job job = {q, q_stride, k, v, block_tables, seq_lens, tail_masks, out, N, B, H, Hkv, D, S, M, scale, half,
                   heads_per_item, 0};
        float *scores = NULL; /* [group size][len rounded up to VEC], this thread's */
        int64_t capacity = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (job.status == 0) run_item(&job, item, &scores, &capacity);
        }
        free(scores);
        status |= job.status;
    }
    return status;
}
