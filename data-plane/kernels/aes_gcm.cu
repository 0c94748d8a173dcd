/*
 * Batch AES-256-GCM for umstore's GPU bulk engine (data-plane/src/bulk/gpu.rs).
 *
 * Compiled at run time with NVRTC when GpuEngine::open() runs, and ALSO, as C,
 * by the host test (data-plane/tests/bulk_gpu.rs with tests/gpu_host/harness.c),
 * which calls the per-thread __device__ functions below in a loop over thread
 * indices and compares the bytes with the CPU engine. So this file is written
 * in the common subset of C99 and CUDA C++: no templates, no references, no
 * void* conversions, no shared memory and no __syncthreads (every thread works
 * alone; the tables are read-only __constant__ data). The CUDA-only parts (the
 * __global__ wrappers, which read blockIdx/threadIdx) are under __CUDACC__.
 *
 * Output format, exactly as DataKey::seal (crypto/envelope.rs) and CpuEngine
 * write it:  [format = 1][nonce: 12][ciphertext: len][tag: 16].
 * GCM with a 96-bit nonce: J0 = nonce || 0x00000001, the keystream of block j
 * is AES_K(nonce || BE32(j + 2)), tag = AES_K(J0) ^ GHASH_H(A, C), H = AES_K(0).
 *
 * Kernels, each one thread per item, launched in this order on one stream:
 *   seal: um_key_setup (per key), um_seal_ctr (per 16-byte block over all
 *         fields), um_seal_tag (per field: header, GHASH, tag)
 *   open: um_key_setup, um_open_tag (per field: length, format, tag check ->
 *         status), um_open_ctr (per block, only of fields whose tag verified)
 * A field that does not open leaves its output range as the host zeroed it.
 *
 * Constant time: AES here is the byte-oriented S-box version, so the S-box
 * lookups are indexed by secret bytes (see docs/bulk.md, "GPU engine"). GHASH
 * is bitwise with masks, without tables.
 */

#ifdef __CUDACC__
#define UM_DEVICE __device__
#define UM_CONSTANT __constant__
#else
#define UM_DEVICE static
#define UM_CONSTANT static const
#endif

typedef unsigned char u8;
typedef unsigned int u32;
typedef unsigned long long u64;

#define UM_FORMAT_V1 1
#define UM_NONCE_LEN 12
#define UM_HEADER_LEN 13
#define UM_TAG_LEN 16
#define UM_SEAL_OVERHEAD 29
/* AES-256: 15 round keys of 16 bytes. */
#define UM_ROUND_KEYS_LEN 240
#define UM_KEY_LEN 32

/* Per-field status of an open, as output.rs's FieldStatus. */
#define UM_OPENED 0
#define UM_TRUNCATED 1
#define UM_UNKNOWN_FORMAT 2
#define UM_AUTHENTICATION 3

UM_CONSTANT u8 UM_SBOX[256] = {
    0x63, 0x7c, 0x77, 0x7b, 0xf2, 0x6b, 0x6f, 0xc5, 0x30, 0x01, 0x67, 0x2b, 0xfe, 0xd7, 0xab, 0x76,
    0xca, 0x82, 0xc9, 0x7d, 0xfa, 0x59, 0x47, 0xf0, 0xad, 0xd4, 0xa2, 0xaf, 0x9c, 0xa4, 0x72, 0xc0,
    0xb7, 0xfd, 0x93, 0x26, 0x36, 0x3f, 0xf7, 0xcc, 0x34, 0xa5, 0xe5, 0xf1, 0x71, 0xd8, 0x31, 0x15,
    0x04, 0xc7, 0x23, 0xc3, 0x18, 0x96, 0x05, 0x9a, 0x07, 0x12, 0x80, 0xe2, 0xeb, 0x27, 0xb2, 0x75,
    0x09, 0x83, 0x2c, 0x1a, 0x1b, 0x6e, 0x5a, 0xa0, 0x52, 0x3b, 0xd6, 0xb3, 0x29, 0xe3, 0x2f, 0x84,
    0x53, 0xd1, 0x00, 0xed, 0x20, 0xfc, 0xb1, 0x5b, 0x6a, 0xcb, 0xbe, 0x39, 0x4a, 0x4c, 0x58, 0xcf,
    0xd0, 0xef, 0xaa, 0xfb, 0x43, 0x4d, 0x33, 0x85, 0x45, 0xf9, 0x02, 0x7f, 0x50, 0x3c, 0x9f, 0xa8,
    0x51, 0xa3, 0x40, 0x8f, 0x92, 0x9d, 0x38, 0xf5, 0xbc, 0xb6, 0xda, 0x21, 0x10, 0xff, 0xf3, 0xd2,
    0xcd, 0x0c, 0x13, 0xec, 0x5f, 0x97, 0x44, 0x17, 0xc4, 0xa7, 0x7e, 0x3d, 0x64, 0x5d, 0x19, 0x73,
    0x60, 0x81, 0x4f, 0xdc, 0x22, 0x2a, 0x90, 0x88, 0x46, 0xee, 0xb8, 0x14, 0xde, 0x5e, 0x0b, 0xdb,
    0xe0, 0x32, 0x3a, 0x0a, 0x49, 0x06, 0x24, 0x5c, 0xc2, 0xd3, 0xac, 0x62, 0x91, 0x95, 0xe4, 0x79,
    0xe7, 0xc8, 0x37, 0x6d, 0x8d, 0xd5, 0x4e, 0xa9, 0x6c, 0x56, 0xf4, 0xea, 0x65, 0x7a, 0xae, 0x08,
    0xba, 0x78, 0x25, 0x2e, 0x1c, 0xa6, 0xb4, 0xc6, 0xe8, 0xdd, 0x74, 0x1f, 0x4b, 0xbd, 0x8b, 0x8a,
    0x70, 0x3e, 0xb5, 0x66, 0x48, 0x03, 0xf6, 0x0e, 0x61, 0x35, 0x57, 0xb9, 0x86, 0xc1, 0x1d, 0x9e,
    0xe1, 0xf8, 0x98, 0x11, 0x69, 0xd9, 0x8e, 0x94, 0x9b, 0x1e, 0x87, 0xe9, 0xce, 0x55, 0x28, 0xdf,
    0x8c, 0xa1, 0x89, 0x0d, 0xbf, 0xe6, 0x42, 0x68, 0x41, 0x99, 0x2d, 0x0f, 0xb0, 0x54, 0xbb, 0x16,
};

UM_CONSTANT u8 UM_RCON[8] = {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40};

UM_DEVICE u8 um_xtime(u8 x)
{
    return (u8)((x << 1) ^ (((x >> 7) & 1) * 0x1b));
}

/* AES-256 key expansion (FIPS 197, 5.2): 32 key bytes to 240 round-key bytes. */
UM_DEVICE void um_aes256_expand(const u8 *key, u8 *rk)
{
    int i;
    for (i = 0; i < UM_KEY_LEN; i++) {
        rk[i] = key[i];
    }
    for (i = 8; i < 60; i++) {
        u8 t0 = rk[4 * i - 4], t1 = rk[4 * i - 3], t2 = rk[4 * i - 2], t3 = rk[4 * i - 1];
        if (i % 8 == 0) {
            u8 r = t0;
            t0 = (u8)(UM_SBOX[t1] ^ UM_RCON[i / 8]);
            t1 = UM_SBOX[t2];
            t2 = UM_SBOX[t3];
            t3 = UM_SBOX[r];
        } else if (i % 8 == 4) {
            t0 = UM_SBOX[t0];
            t1 = UM_SBOX[t1];
            t2 = UM_SBOX[t2];
            t3 = UM_SBOX[t3];
        }
        rk[4 * i + 0] = (u8)(rk[4 * i - 32] ^ t0);
        rk[4 * i + 1] = (u8)(rk[4 * i - 31] ^ t1);
        rk[4 * i + 2] = (u8)(rk[4 * i - 30] ^ t2);
        rk[4 * i + 3] = (u8)(rk[4 * i - 29] ^ t3);
    }
}

/* One AES-256 block: state byte r + 4c is row r, column c (FIPS 197, 3.4). */
UM_DEVICE void um_aes256_encrypt(const u8 *rk, const u8 *in, u8 *out)
{
    u8 s[16];
    u8 t[16];
    int i, round, c;
    for (i = 0; i < 16; i++) {
        s[i] = (u8)(in[i] ^ rk[i]);
    }
    for (round = 1; round <= 14; round++) {
        /* SubBytes and ShiftRows: row r moves left by r columns. */
        for (c = 0; c < 4; c++) {
            t[4 * c + 0] = UM_SBOX[s[4 * c + 0]];
            t[4 * c + 1] = UM_SBOX[s[4 * ((c + 1) % 4) + 1]];
            t[4 * c + 2] = UM_SBOX[s[4 * ((c + 2) % 4) + 2]];
            t[4 * c + 3] = UM_SBOX[s[4 * ((c + 3) % 4) + 3]];
        }
        if (round < 14) {
            /* MixColumns. */
            for (c = 0; c < 4; c++) {
                u8 a0 = t[4 * c], a1 = t[4 * c + 1], a2 = t[4 * c + 2], a3 = t[4 * c + 3];
                u8 all = (u8)(a0 ^ a1 ^ a2 ^ a3);
                t[4 * c + 0] = (u8)(a0 ^ all ^ um_xtime((u8)(a0 ^ a1)));
                t[4 * c + 1] = (u8)(a1 ^ all ^ um_xtime((u8)(a1 ^ a2)));
                t[4 * c + 2] = (u8)(a2 ^ all ^ um_xtime((u8)(a2 ^ a3)));
                t[4 * c + 3] = (u8)(a3 ^ all ^ um_xtime((u8)(a3 ^ a0)));
            }
        }
        for (i = 0; i < 16; i++) {
            s[i] = (u8)(t[i] ^ rk[16 * round + i]);
        }
    }
    for (i = 0; i < 16; i++) {
        out[i] = s[i];
    }
}

UM_DEVICE u64 um_load_be64(const u8 *p)
{
    u64 v = 0;
    int i;
    for (i = 0; i < 8; i++) {
        v = (v << 8) | p[i];
    }
    return v;
}

/* Z = Z * H in GF(2^128) with GCM's bit order (SP 800-38D, 6.3), bit by bit
 * with masks: no table, no branch on secret data. */
UM_DEVICE void um_gf128_mul(u64 *zh, u64 *zl, u64 hh, u64 hl)
{
    u64 xh = *zh, xl = *zl;
    u64 vh = hh, vl = hl;
    u64 rh = 0, rl = 0;
    int i;
    for (i = 0; i < 128; i++) {
        u64 bit = i < 64 ? (xh >> (63 - i)) & 1 : (xl >> (127 - i)) & 1;
        u64 take = (u64)0 - bit;
        u64 reduce = (u64)0 - (vl & 1);
        rh ^= vh & take;
        rl ^= vl & take;
        vl = (vl >> 1) | (vh << 63);
        vh = (vh >> 1) ^ (0xe100000000000000ULL & reduce);
    }
    *zh = rh;
    *zl = rl;
}

/* Folds `len` bytes into the GHASH state, the last block zero-padded. */
UM_DEVICE void um_ghash_update(u64 *yh, u64 *yl, u64 hh, u64 hl, const u8 *p, u32 len)
{
    u64 off;
    for (off = 0; off < len; off += 16) {
        u8 block[16];
        u64 left = len - off;
        int i;
        for (i = 0; i < 16; i++) {
            block[i] = (u64)i < left ? p[off + i] : 0;
        }
        *yh ^= um_load_be64(block);
        *yl ^= um_load_be64(block + 8);
        um_gf128_mul(yh, yl, hh, hl);
    }
}

/* The GCM tag of (aad, ct) under round keys `rk`, hash key `h`, `nonce`. */
UM_DEVICE void um_gcm_tag(const u8 *rk, const u8 *h, const u8 *nonce, const u8 *aad,
                          u32 aad_len, const u8 *ct, u32 ct_len, u8 *tag)
{
    u64 hh = um_load_be64(h), hl = um_load_be64(h + 8);
    u64 yh = 0, yl = 0;
    u8 j0[16];
    u8 ek[16];
    int i;
    um_ghash_update(&yh, &yl, hh, hl, aad, aad_len);
    um_ghash_update(&yh, &yl, hh, hl, ct, ct_len);
    yh ^= (u64)aad_len * 8;
    yl ^= (u64)ct_len * 8;
    um_gf128_mul(&yh, &yl, hh, hl);
    for (i = 0; i < UM_NONCE_LEN; i++) {
        j0[i] = nonce[i];
    }
    j0[12] = 0;
    j0[13] = 0;
    j0[14] = 0;
    j0[15] = 1;
    um_aes256_encrypt(rk, j0, ek);
    for (i = 0; i < 8; i++) {
        tag[i] = (u8)(ek[i] ^ (u8)(yh >> (56 - 8 * i)));
        tag[8 + i] = (u8)(ek[8 + i] ^ (u8)(yl >> (56 - 8 * i)));
    }
}

/* XORs the keystream of CTR block `block` (counter block + 2) into n <= 16 bytes. */
UM_DEVICE void um_ctr_block(const u8 *rk, const u8 *nonce, u32 block, const u8 *in, u8 *out,
                            u32 n)
{
    u8 ctr[16];
    u8 ks[16];
    u32 c = block + 2;
    u32 i;
    for (i = 0; i < UM_NONCE_LEN; i++) {
        ctr[i] = nonce[i];
    }
    ctr[12] = (u8)(c >> 24);
    ctr[13] = (u8)(c >> 16);
    ctr[14] = (u8)(c >> 8);
    ctr[15] = (u8)c;
    um_aes256_encrypt(rk, ctr, ks);
    for (i = 0; i < n; i++) {
        out[i] = (u8)(in[i] ^ ks[i]);
    }
}

/* The field of global CTR block t: the i with blk_off[i] <= t < blk_off[i + 1]
 * (fields with no block are skipped; blk_off[n_fields] > t). */
UM_DEVICE u32 um_field_of_block(u32 t, const u32 *blk_off, u32 n_fields)
{
    u32 lo = 0, hi = n_fields;
    while (hi - lo > 1) {
        u32 mid = lo + (hi - lo) / 2;
        if (blk_off[mid] <= t) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* Thread k: round keys and H of key k. */
UM_DEVICE void um_key_setup(u32 k, const u8 *keys, u8 *round_keys, u8 *hkeys)
{
    u8 zero[16];
    u8 *rk = round_keys + (u64)k * UM_ROUND_KEYS_LEN;
    int i;
    for (i = 0; i < 16; i++) {
        zero[i] = 0;
    }
    um_aes256_expand(keys + (u64)k * UM_KEY_LEN, rk);
    um_aes256_encrypt(rk, zero, hkeys + (u64)k * 16);
}

/* Thread t: CTR block t of the batch; the plaintext's block to the sealed
 * field's ciphertext. */
UM_DEVICE void um_seal_ctr(u32 t, u32 n_fields, const u32 *blk_off, const u32 *key_of,
                           const u8 *round_keys, const u8 *nonces, const u8 *pt,
                           const u32 *pt_off, u8 *out, const u32 *out_off)
{
    u32 i = um_field_of_block(t, blk_off, n_fields);
    u32 block = t - blk_off[i];
    u32 len = pt_off[i + 1] - pt_off[i];
    u32 at = block * 16;
    u32 n = len - at < 16 ? len - at : 16;
    um_ctr_block(round_keys + (u64)key_of[i] * UM_ROUND_KEYS_LEN, nonces + (u64)i * UM_NONCE_LEN,
                 block, pt + pt_off[i] + at, out + out_off[i] + UM_HEADER_LEN + at, n);
}

/* Thread i: field i's header and tag, after um_seal_ctr wrote its ciphertext. */
UM_DEVICE void um_seal_tag(u32 i, const u32 *key_of, const u8 *round_keys, const u8 *hkeys,
                           const u8 *nonces, const u8 *aad, const u32 *aad_off,
                           const u32 *pt_off, u8 *out, const u32 *out_off)
{
    u8 *field = out + out_off[i];
    u32 len = pt_off[i + 1] - pt_off[i];
    const u8 *nonce = nonces + (u64)i * UM_NONCE_LEN;
    u32 k = key_of[i];
    int j;
    field[0] = UM_FORMAT_V1;
    for (j = 0; j < UM_NONCE_LEN; j++) {
        field[1 + j] = nonce[j];
    }
    um_gcm_tag(round_keys + (u64)k * UM_ROUND_KEYS_LEN, hkeys + (u64)k * 16, nonce,
               aad + aad_off[i], aad_off[i + 1] - aad_off[i], field + UM_HEADER_LEN, len,
               field + UM_HEADER_LEN + len);
}

/* Thread i: whether sealed field i opens (length, format, then its tag,
 * compared without an early exit). */
UM_DEVICE void um_open_tag(u32 i, const u32 *key_of, const u8 *round_keys, const u8 *hkeys,
                           const u8 *aad, const u32 *aad_off, const u8 *sealed,
                           const u32 *sealed_off, u8 *status)
{
    const u8 *field = sealed + sealed_off[i];
    u32 len = sealed_off[i + 1] - sealed_off[i];
    u32 ct_len;
    u32 k = key_of[i];
    u8 tag[16];
    u8 diff = 0;
    int j;
    if (len < UM_SEAL_OVERHEAD) {
        status[i] = UM_TRUNCATED;
        return;
    }
    if (field[0] != UM_FORMAT_V1) {
        status[i] = UM_UNKNOWN_FORMAT;
        return;
    }
    ct_len = len - UM_SEAL_OVERHEAD;
    um_gcm_tag(round_keys + (u64)k * UM_ROUND_KEYS_LEN, hkeys + (u64)k * 16, field + 1,
               aad + aad_off[i], aad_off[i + 1] - aad_off[i], field + UM_HEADER_LEN, ct_len, tag);
    for (j = 0; j < UM_TAG_LEN; j++) {
        diff |= (u8)(tag[j] ^ field[UM_HEADER_LEN + ct_len + j]);
    }
    status[i] = diff == 0 ? UM_OPENED : UM_AUTHENTICATION;
}

/* Thread t: CTR block t of the batch, decrypted only if its field's tag
 * verified (um_open_tag ran first). */
UM_DEVICE void um_open_ctr(u32 t, u32 n_fields, const u32 *blk_off, const u32 *key_of,
                           const u8 *round_keys, const u8 *sealed, const u32 *sealed_off,
                           const u8 *status, u8 *out, const u32 *pt_off)
{
    u32 i = um_field_of_block(t, blk_off, n_fields);
    u32 block = t - blk_off[i];
    u32 len = pt_off[i + 1] - pt_off[i];
    u32 at = block * 16;
    u32 n = len - at < 16 ? len - at : 16;
    const u8 *field = sealed + sealed_off[i];
    if (status[i] != UM_OPENED) {
        return;
    }
    um_ctr_block(round_keys + (u64)key_of[i] * UM_ROUND_KEYS_LEN, field + 1, block,
                 field + UM_HEADER_LEN + at, out + pt_off[i] + at, n);
}

#ifdef __CUDACC__
/* Thin launch wrappers: thread index, bound check, the per-thread function. */

#define UM_THREAD_INDEX (blockIdx.x * blockDim.x + threadIdx.x)

extern "C" __global__ void um_key_setup_kernel(u32 n_keys, const u8 *keys, u8 *round_keys,
                                               u8 *hkeys)
{
    u32 t = UM_THREAD_INDEX;
    if (t < n_keys) {
        um_key_setup(t, keys, round_keys, hkeys);
    }
}

extern "C" __global__ void um_seal_ctr_kernel(u32 n_blocks, u32 n_fields, const u32 *blk_off,
                                              const u32 *key_of, const u8 *round_keys,
                                              const u8 *nonces, const u8 *pt, const u32 *pt_off,
                                              u8 *out, const u32 *out_off)
{
    u32 t = UM_THREAD_INDEX;
    if (t < n_blocks) {
        um_seal_ctr(t, n_fields, blk_off, key_of, round_keys, nonces, pt, pt_off, out, out_off);
    }
}

extern "C" __global__ void um_seal_tag_kernel(u32 n_fields, const u32 *key_of,
                                              const u8 *round_keys, const u8 *hkeys,
                                              const u8 *nonces, const u8 *aad,
                                              const u32 *aad_off, const u32 *pt_off, u8 *out,
                                              const u32 *out_off)
{
    u32 t = UM_THREAD_INDEX;
    if (t < n_fields) {
        um_seal_tag(t, key_of, round_keys, hkeys, nonces, aad, aad_off, pt_off, out, out_off);
    }
}

extern "C" __global__ void um_open_tag_kernel(u32 n_fields, const u32 *key_of,
                                              const u8 *round_keys, const u8 *hkeys,
                                              const u8 *aad, const u32 *aad_off,
                                              const u8 *sealed, const u32 *sealed_off,
                                              u8 *status)
{
    u32 t = UM_THREAD_INDEX;
    if (t < n_fields) {
        um_open_tag(t, key_of, round_keys, hkeys, aad, aad_off, sealed, sealed_off, status);
    }
}

extern "C" __global__ void um_open_ctr_kernel(u32 n_blocks, u32 n_fields, const u32 *blk_off,
                                              const u32 *key_of, const u8 *round_keys,
                                              const u8 *sealed, const u32 *sealed_off,
                                              const u8 *status, u8 *out, const u32 *pt_off)
{
    u32 t = UM_THREAD_INDEX;
    if (t < n_blocks) {
        um_open_ctr(t, n_fields, blk_off, key_of, round_keys, sealed, sealed_off, status, out,
                    pt_off);
    }
}
#endif
