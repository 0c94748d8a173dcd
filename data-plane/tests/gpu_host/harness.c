/*
 * Runs the GPU engine's kernels (data-plane/kernels/aes_gcm.cu) on the CPU:
 * the file is compiled as C and each kernel is a loop over its thread
 * indices calling the same per-thread __device__ function, in the order
 * gpu.rs launches them. Used by data-plane/tests/bulk_gpu.rs.
 *
 * Input on stdin, integers as little-endian u32:
 *   op (1 = seal, 2 = open)
 *   n_keys, then n_keys keys of 32 bytes
 *   n, then n key indices
 *   n + 1 AAD offsets, then the AAD bytes
 *   n + 1 data offsets, then the data bytes (plaintexts or sealed fields)
 *   seal only: n nonces of 12 bytes
 * Output on stdout:
 *   seal: the sealed fields end to end (field i is 29 bytes longer)
 *   open: n status bytes (0 opened, 1 truncated, 2 unknown format,
 *         3 authentication), then the plaintexts end to end (field i is
 *         max(len - 29, 0) bytes; a failed field's are zeros)
 */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "aes_gcm.cu"

static void die(const char *what)
{
    fprintf(stderr, "gpu_host harness: %s\n", what);
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

static u32 *take_u32s(size_t n)
{
    u32 *v = malloc((n ? n : 1) * sizeof(u32));
    size_t i;
    if (!v) {
        die("out of memory");
    }
    for (i = 0; i < n; i++) {
        v[i] = take_u32();
    }
    return v;
}

static void *zalloc(size_t len)
{
    void *p = calloc(len ? len : 1, 1);
    if (!p) {
        die("out of memory");
    }
    return p;
}

static void write_out(const u8 *p, size_t len)
{
    if (len && fwrite(p, 1, len, stdout) != len) {
        die("write failed");
    }
}

/* CTR block offsets of fields of `lens[i]` bytes. */
static u32 *block_offsets(const u32 *lens, u32 n)
{
    u32 *off = malloc(((size_t)n + 1) * sizeof(u32));
    u32 i;
    if (!off) {
        die("out of memory");
    }
    off[0] = 0;
    for (i = 0; i < n; i++) {
        off[i + 1] = off[i] + (lens[i] + 15) / 16;
    }
    return off;
}

int main(void)
{
    u32 op, n_keys, n, i, t;
    const u8 *keys, *aad, *data;
    u32 *key_of, *aad_off, *data_off, *lens, *blk_off;
    u8 *round_keys, *hkeys;

    read_all();
    op = take_u32();
    n_keys = take_u32();
    keys = take((size_t)n_keys * UM_KEY_LEN);
    n = take_u32();
    key_of = take_u32s(n);
    aad_off = take_u32s((size_t)n + 1);
    aad = take(aad_off[n]);
    data_off = take_u32s((size_t)n + 1);
    data = take(data_off[n]);

    round_keys = zalloc((size_t)n_keys * UM_ROUND_KEYS_LEN);
    hkeys = zalloc((size_t)n_keys * 16);
    for (t = 0; t < n_keys; t++) {
        um_key_setup(t, keys, round_keys, hkeys);
    }

    lens = zalloc(((size_t)n + 1) * sizeof(u32));
    if (op == 1) {
        const u8 *nonces = take((size_t)n * UM_NONCE_LEN);
        u32 *out_off = malloc(((size_t)n + 1) * sizeof(u32));
        u8 *out;
        if (!out_off) {
            die("out of memory");
        }
        for (i = 0; i <= n; i++) {
            out_off[i] = data_off[i] + i * UM_SEAL_OVERHEAD;
        }
        for (i = 0; i < n; i++) {
            lens[i] = data_off[i + 1] - data_off[i];
        }
        blk_off = block_offsets(lens, n);
        out = zalloc(out_off[n]);
        for (t = 0; t < blk_off[n]; t++) {
            um_seal_ctr(t, n, blk_off, key_of, round_keys, nonces, data, data_off, out, out_off);
        }
        for (t = 0; t < n; t++) {
            um_seal_tag(t, key_of, round_keys, hkeys, nonces, aad, aad_off, data_off, out,
                        out_off);
        }
        write_out(out, out_off[n]);
    } else if (op == 2) {
        u32 *pt_off = malloc(((size_t)n + 1) * sizeof(u32));
        u8 *status = zalloc(n);
        u8 *out;
        if (!pt_off) {
            die("out of memory");
        }
        pt_off[0] = 0;
        for (i = 0; i < n; i++) {
            u32 len = data_off[i + 1] - data_off[i];
            lens[i] = len > UM_SEAL_OVERHEAD ? len - UM_SEAL_OVERHEAD : 0;
            pt_off[i + 1] = pt_off[i] + lens[i];
        }
        blk_off = block_offsets(lens, n);
        out = zalloc(pt_off[n]);
        for (t = 0; t < n; t++) {
            um_open_tag(t, key_of, round_keys, hkeys, aad, aad_off, data, data_off, status);
        }
        for (t = 0; t < blk_off[n]; t++) {
            um_open_ctr(t, n, blk_off, key_of, round_keys, data, data_off, status, out, pt_off);
        }
        write_out(status, n);
        write_out(out, pt_off[n]);
    } else {
        die("unknown op");
    }
    if (fflush(stdout) != 0) {
        die("write failed");
    }
    return 0;
}
