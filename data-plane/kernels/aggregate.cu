/*
 * Grouped counts and sums for umstore's GPU aggregation
 * (data-plane/src/bulk/gpu_aggregate.rs, what `bulk stats --engine gpu` runs).
 *
 * Compiled at run time with NVRTC when GpuAggregator::open() runs, and ALSO,
 * as C, by the host test (data-plane/tests/bulk_gpu_aggregate.rs with
 * tests/gpu_host/aggregate_harness.c), which runs the per-thread __device__
 * functions below as loops over blocks and threads, phase by phase where the
 * kernel has a barrier, and compares the groups with CpuAggregator's. So this
 * file is written in the common subset of C99 and CUDA C++, as aes_gcm.cu is:
 * the atomics, the barrier and the thread indices are behind macros, and the
 * __global__ wrappers are under __CUDACC__.
 *
 * Input, columnar, n rows:
 *   codes    n_dims columns of n u16 codes, one column after the other
 *            (code 0 is NULL, code c > 0 the c-th value of the dimension)
 *   strides  n_dims u32: the weight of each dimension's code in the group
 *            index (mixed radix over the dictionary sizes + 1, the first
 *            dimension the most significant, as CpuAggregator's dense slot)
 *   values   3 columns of n i16 (income_lakh, household_size,
 *            overall_risk_centi), one after the other
 *   present  3 columns of n u8: 1 where the row has the measure, else 0 (the
 *            value is then ignored)
 * Output: per group index g, UM_AGG_WORDS u64 at out[g * UM_AGG_WORDS]:
 *   users, then per measure n (rows with it) and total (the sum of its values,
 *   added as two's complement u64, so it reads back as the signed i64 sum).
 *   The host zeroes `out` before the launch.
 *
 * Two kernels, one thread per row over a grid-stride loop:
 *   um_aggregate_shared_kernel  each block adds into its own table in shared
 *                               memory (few groups: UM_AGG_WORDS * 8 bytes
 *                               each), then adds the non-zero words of its
 *                               table into `out` with global atomics
 *   um_aggregate_global_kernel  every row adds into `out` with global atomics
 *                               (more groups than shared memory holds)
 * Integer atomics commute, so the result does not depend on the order the
 * rows are added in, nor on the grid.
 */

#ifdef __CUDACC__
#define UM_DEVICE __device__
#define UM_ATOMIC_ADD(p, v) atomicAdd((p), (v))
#else
#define UM_DEVICE static
/* The host harness runs one thread at a time: a plain add is atomic there. */
#define UM_ATOMIC_ADD(p, v) (*(p) += (v))
#endif

typedef unsigned char u8;
typedef unsigned short u16;
typedef short i16;
typedef unsigned int u32;
typedef unsigned long long u64;

/* Accumulator words per group: users, then (n, total) for each of 3 measures. */
#define UM_AGG_WORDS 7
#define UM_AGG_MEASURES 3

/* The group index of row i. */
UM_DEVICE u32 um_agg_group(u32 i, u32 n_rows, u32 n_dims, const u16 *codes, const u32 *strides)
{
    u32 group = 0;
    u32 d;
    for (d = 0; d < n_dims; d++) {
        group += (u32)codes[(u64)d * n_rows + i] * strides[d];
    }
    return group;
}

/* Row i added into `table` (shared or global). */
UM_DEVICE void um_agg_row(u32 i, u32 n_rows, u32 n_dims, const u16 *codes, const u32 *strides,
                          const i16 *values, const u8 *present, u64 *table)
{
    u64 *acc = table + (u64)um_agg_group(i, n_rows, n_dims, codes, strides) * UM_AGG_WORDS;
    u32 m;
    UM_ATOMIC_ADD(acc, (u64)1);
    for (m = 0; m < UM_AGG_MEASURES; m++) {
        u64 at = (u64)m * n_rows + i;
        if (present[at]) {
            UM_ATOMIC_ADD(acc + 1 + 2 * m, (u64)1);
            /* Sign-extended, then reduced mod 2^64: two's complement. */
            UM_ATOMIC_ADD(acc + 2 + 2 * m, (u64)(long long)values[at]);
        }
    }
}

/* Thread `first` of `step` in the grid: rows first, first + step, ... */
UM_DEVICE void um_agg_rows(u32 first, u32 step, u32 n_rows, u32 n_dims, const u16 *codes,
                           const u32 *strides, const i16 *values, const u8 *present, u64 *table)
{
    u32 i;
    for (i = first; i < n_rows; i += step) {
        um_agg_row(i, n_rows, n_dims, codes, strides, values, present, table);
        if (n_rows - i <= step) {
            break; /* i + step would wrap past u32 */
        }
    }
}

/* Thread `lane` of `lanes` in a block: its share of the block's table zeroed. */
UM_DEVICE void um_agg_zero(u32 lane, u32 lanes, u64 *table, u32 words)
{
    u32 k;
    for (k = lane; k < words; k += lanes) {
        table[k] = 0;
    }
}

/* Thread `lane` of `lanes` in a block: its share of the block's table added
 * into the output (words still 0 are skipped: most groups are absent from
 * most blocks). */
UM_DEVICE void um_agg_flush(u32 lane, u32 lanes, const u64 *table, u64 *out, u32 words)
{
    u32 k;
    for (k = lane; k < words; k += lanes) {
        if (table[k] != 0) {
            UM_ATOMIC_ADD(out + k, table[k]);
        }
    }
}

#ifdef __CUDACC__
/* Launch wrappers: thread indices, barriers, the per-thread functions. */

extern "C" __global__ void um_aggregate_shared_kernel(u32 n_rows, u32 n_dims, const u16 *codes,
                                                      const u32 *strides, const i16 *values,
                                                      const u8 *present, u32 n_groups,
                                                      u64 *out)
{
    /* n_groups * UM_AGG_WORDS words, sized by the launch's shared memory. */
    extern __shared__ u64 um_agg_table[];
    u32 words = n_groups * UM_AGG_WORDS;
    um_agg_zero(threadIdx.x, blockDim.x, um_agg_table, words);
    __syncthreads();
    um_agg_rows(blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x, n_rows, n_dims,
                codes, strides, values, present, um_agg_table);
    __syncthreads();
    um_agg_flush(threadIdx.x, blockDim.x, um_agg_table, out, words);
}

extern "C" __global__ void um_aggregate_global_kernel(u32 n_rows, u32 n_dims, const u16 *codes,
                                                      const u32 *strides, const i16 *values,
                                                      const u8 *present, u64 *out)
{
    um_agg_rows(blockIdx.x * blockDim.x + threadIdx.x, gridDim.x * blockDim.x, n_rows, n_dims,
                codes, strides, values, present, out);
}
#endif
