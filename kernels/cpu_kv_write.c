/* Writing a step's K and V rows into their page slots, fp32 rows to fp32 or fp16 pages, in one call.
 *
 * T=tokens written, R=elements per row (KV heads x head dim), N=blocks, S=block size
 *
 * key/value rows sit `key_stride` / `value_stride` floats apart (they are views into the fused qkv projection, so
 * no contiguous copy is made first); slots [T] int64 are block_id * S + offset; pages are [N * S, R]. The torch
 * twin is IdentityCodec.write in workers/kv/codecs.py (index_copy_ per array), which this replaces on the CPU: two
 * index_copy_ calls plus two contiguous copies cost ~70 us a layer at 32 rows, mostly dispatch.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "cpu_simd.h"

#define STATUS_BAD_SLOT 2
#define STATUS_UNSUPPORTED 8 /* fp16 pages without F16C: the caller uses torch */

static void write_row(const float *src, void *pages, int64_t slot, int64_t R, int half) {
    if (!half) {
        memcpy((float *)pages + slot * R, src, sizeof(float) * R);
        return;
    }
    uint16_t *dst = (uint16_t *)pages + slot * R;
    const int64_t vectors = R / VEC * VEC;
    for (int64_t e = 0; e < vectors; e += VEC) store_half(dst + e, loadv(src + e));
    for (int64_t e = vectors; e < R; e++) dst[e] = float_to_half(src[e]);
}

/* Every slot is checked before anything is written, so a bad slot leaves the pages untouched. `half`: the pages
 * hold fp16 (rounded to nearest even). Returns 0, STATUS_BAD_SLOT or STATUS_UNSUPPORTED. */
int kv_write(const float *key, const float *value, int64_t key_stride, int64_t value_stride, const int64_t *slots,
             int64_t T, int64_t R, void *key_pages, void *value_pages, int64_t num_slots, int half) {
    if (half && !HAVE_HALF) return STATUS_UNSUPPORTED;
    for (int64_t t = 0; t < T; t++) {
        if (slots[t] < 0 || slots[t] >= num_slots) return STATUS_BAD_SLOT;
    }
    for (int64_t t = 0; t < T; t++) {
        write_row(key + t * key_stride, key_pages, slots[t], R, half);
        write_row(value + t * value_stride, value_pages, slots[t], R, half);
    }
    return 0;
}

/* Whether this build reads and writes fp16 pages (F16C). */
int native_has_half(void) { return HAVE_HALF; }
