/*
 * Runs the GPU aggregation's kernels (data-plane/kernels/aggregate.cu) on the
 * CPU: the file is compiled as C and each kernel is emulated block by block
 * and thread by thread over the grid it is given, a barrier being the end of
 * a loop over the block's threads, as gpu_aggregate.rs launches them. Used by
 * data-plane/tests/bulk_gpu_aggregate.rs.
 *
 * Input on stdin, little-endian:
 *   u32 kernel (1 = um_aggregate_shared_kernel, 2 = um_aggregate_global_kernel)
 *   u32 blocks, u32 threads per block
 *   u32 rows, u32 n_dims, u32 groups
 *   n_dims u32 strides
 *   n_dims * rows u16 codes
 *   3 * rows i16 values
 *   3 * rows u8 presence flags
 * Output on stdout: groups * UM_AGG_WORDS u64, little-endian.
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aggregate.cu"

static void die(const char *what)
{
    fprintf(stderr, "aggregate harness: %s\n", what);
    exit(2);
}

static unsigned char *input;
static size_t input_len, input_at;

static void read_all(void)
{
    size_t cap = 1 << 20;
    input = malloc(cap);
    if (!input) {
        die("out of memory");
    }
    for (;;) {
        size_t got;
        if (input_len == cap) {
            cap *= 2;
            input = realloc(input, cap);
            if (!input) {
                die("out of memory");
            }
        }
        got = fread(input + input_len, 1, cap - input_len, stdin);
        if (got == 0) {
            break;
        }
        input_len += got;
    }
}

static const u8 *take(size_t len)
{
    const u8 *p = input + input_at;
    if (input_len - input_at < len) {
        die("input ends early");
    }
    input_at += len;
    return p;
}

static u32 take_u32(void)
{
    const u8 *p = take(4);
    return (u32)p[0] | (u32)p[1] << 8 | (u32)p[2] << 16 | (u32)p[3] << 24;
}

static void *zalloc(size_t len)
{
    void *p = calloc(len ? len : 1, 1);
    if (!p) {
        die("out of memory");
    }
    return p;
}

int main(void)
{
    u32 kernel, blocks, threads, rows, n_dims, groups, words, b, t;
    u32 *strides;
    u16 *codes;
    i16 *values;
    const u8 *present, *p;
    u64 *out;
    size_t i, n;
    unsigned char le[8];

    read_all();
    kernel = take_u32();
    blocks = take_u32();
    threads = take_u32();
    rows = take_u32();
    n_dims = take_u32();
    groups = take_u32();
    if (blocks == 0 || threads == 0 || groups == 0) {
        die("a grid and a table of at least one");
    }
    strides = zalloc((size_t)n_dims * sizeof(u32));
    for (i = 0; i < n_dims; i++) {
        strides[i] = take_u32();
    }
    n = (size_t)n_dims * rows;
    codes = zalloc(n * sizeof(u16));
    p = take(n * 2);
    for (i = 0; i < n; i++) {
        codes[i] = (u16)(p[2 * i] | p[2 * i + 1] << 8);
    }
    n = (size_t)UM_AGG_MEASURES * rows;
    values = zalloc(n * sizeof(i16));
    p = take(n * 2);
    for (i = 0; i < n; i++) {
        values[i] = (i16)(u16)(p[2 * i] | p[2 * i + 1] << 8);
    }
    present = take(n);
    if (input_at != input_len) {
        die("input longer than its header says");
    }

    words = groups * UM_AGG_WORDS;
    out = zalloc((size_t)words * sizeof(u64));
    if (kernel == 1) {
        /* Each block: its table zeroed, __syncthreads, every thread's rows
         * into it, __syncthreads, the table added into out. */
        u64 *table = zalloc((size_t)words * sizeof(u64));
        for (b = 0; b < blocks; b++) {
            for (t = 0; t < threads; t++) {
                um_agg_zero(t, threads, table, words);
            }
            for (t = 0; t < threads; t++) {
                um_agg_rows(b * threads + t, blocks * threads, rows, n_dims, codes, strides,
                            values, present, table);
            }
            for (t = 0; t < threads; t++) {
                um_agg_flush(t, threads, table, out, words);
            }
        }
        free(table);
    } else if (kernel == 2) {
        for (t = 0; t < blocks * threads; t++) {
            um_agg_rows(t, blocks * threads, rows, n_dims, codes, strides, values, present, out);
        }
    } else {
        die("unknown kernel");
    }

    for (i = 0; i < words; i++) {
        u64 w = out[i];
        for (b = 0; b < 8; b++) {
            le[b] = (unsigned char)(w >> (8 * b));
        }
        if (fwrite(le, 1, 8, stdout) != 8) {
            die("write failed");
        }
    }
    if (fflush(stdout) != 0) {
        die("write failed");
    }
    return 0;
}
