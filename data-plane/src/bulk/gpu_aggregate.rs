//! Grouped counts and sums on a CUDA GPU: [`GpuAggregator`], what
//! `bulk stats --engine gpu` groups with (docs/bulk.md, "`bulk stats`").
//!
//! The kernels are CUDA C in `data-plane/kernels/aggregate.cu`, compiled with
//! NVRTC when the aggregator opens, as the GPU engine's are (`gpu.rs`: the
//! same device, library probes, panic guard and compile helper). The host
//! lays the [`Columns`] out flat ([`KernelInput`]): the dimension codes column
//! after column with a stride per dimension, so a row's group index is
//! `sum(code_d * stride_d)`, the mixed-radix slot of `CpuAggregator`'s dense
//! table; the measures as `i16` values with a `u8` presence flag each (not
//! `Option<i16>`'s layout, which Rust does not promise). One kernel adds
//! every row into a table of 7 `u64` per group (users, then `n` and `total`
//! per measure) in shared memory per block when the table fits there, else
//! straight into the output with global atomics; the sums are two's
//! complement, so they read back as the signed totals. Key spaces past
//! [`GPU_DENSE_GROUPS`] go to [`CpuAggregator`] (its hash map), with a log
//! line saying so. Either way the partials are `CpuAggregator`'s, value for
//! value (tests/bulk_gpu_aggregate.rs checks the kernels compiled as C on
//! every machine, and this type on a GPU where there is one).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

use super::aggregate::{AggregateError, Aggregator, Columns, CpuAggregator};
use super::gpu::{compile_source, driver, open_guarded, panic_message, Device, GpuOpenError};
use crate::stats::{Partial, Sum};

/// The kernels' CUDA C source, compiled with NVRTC at [`GpuAggregator::open`].
pub const KERNEL_SOURCE: &str = include_str!("../../kernels/aggregate.cu");
/// The name NVRTC reports the source under in its log.
const KERNEL_FILE: &str = "aggregate.cu";

/// `u64` accumulators per group: users, then `n` and `total` of
/// `income_lakh`, `household_size` and `overall_risk_centi`.
pub const GROUP_WORDS: usize = 7;

/// The largest key space (every combination of codes, NULL included) the
/// GPU aggregates, in a dense table of [`GROUP_WORDS`] words per group (3.5
/// MiB at most); past it, [`CpuAggregator`]'s hash map of the keys present.
/// The same limit as `CpuAggregator`'s dense table.
pub const GPU_DENSE_GROUPS: usize = 1 << 16;

/// Groups whose table fits in one block's shared memory: 768 × 56 bytes =
/// 42 KiB, under the 48 KiB a block gets without opting in to more.
pub const SHARED_GROUPS: usize = 768;

/// Threads per CUDA block.
pub const THREADS_PER_BLOCK: u32 = 256;

/// Blocks per streaming multiprocessor the grid is sized to; every thread
/// loops over the rows with the grid's stride, so fewer blocks means fewer
/// shared tables to add up at the end.
const BLOCKS_PER_SM: u32 = 4;

/// Which of the two kernels of `aggregate.cu` a [`KernelInput`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelKind {
    /// `um_aggregate_shared_kernel`: a table per block in shared memory,
    /// added into the output at the end (at most [`SHARED_GROUPS`] groups).
    Shared,
    /// `um_aggregate_global_kernel`: every row straight into the output with
    /// global atomics.
    Global,
}

/// A grid for a [`KernelInput`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Launch {
    /// The kernel.
    pub kernel: KernelKind,
    /// Blocks in the grid.
    pub blocks: u32,
    /// Threads per block.
    pub threads: u32,
    /// Bytes of dynamic shared memory per block (the table; 0 for
    /// [`KernelKind::Global`]).
    pub shared_bytes: u32,
}

/// The columns as the kernels read them, built on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelInput {
    /// Rows.
    pub rows: u32,
    /// The dense key space: every combination of codes, NULL included (at
    /// least 1: no dimension is one group).
    pub groups: u32,
    /// Per dimension, the weight of its code in a row's group index (the
    /// first dimension the most significant, as `CpuAggregator`'s slots).
    pub strides: Vec<u32>,
    /// The dimensions' codes, `rows` per dimension, one column after the other.
    pub codes: Vec<u16>,
    /// `income_lakh`, `household_size`, `overall_risk_centi`, `rows` each, one
    /// column after the other; 0 where the row has no value.
    pub values: Vec<i16>,
    /// 1 where the row has the value in `values`, else 0.
    pub present: Vec<u8>,
}

/// What [`KernelInput::prepare`] makes of some columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prepared {
    /// The input of the kernels.
    Kernel(KernelInput),
    /// Columns the kernels do not take, grouped on the CPU instead (the same
    /// partials), and why.
    OnCpu {
        /// Why, for the log.
        reason: String,
    },
}

impl KernelInput {
    /// Checks `columns` as `CpuAggregator` does (at most
    /// [`super::aggregate::KEY_DIMENSIONS`] dimensions, every column as long as the rows) and
    /// lays them out for the kernels, or says why they are left to the CPU:
    /// a key space past [`GPU_DENSE_GROUPS`], or more rows than a `u32`
    /// counts.
    pub fn prepare(columns: &Columns) -> Result<Prepared, AggregateError> {
        columns.check()?;
        let rows = columns.len();
        let Ok(rows32) = u32::try_from(rows) else {
            return Ok(Prepared::OnCpu {
                reason: format!("{rows} rows are more than one GPU launch counts (u32)"),
            });
        };
        let mut strides = vec![0u32; columns.dimensions.len()];
        let mut groups = 1usize;
        for (stride, d) in strides.iter_mut().zip(&columns.dimensions).rev() {
            // Below GPU_DENSE_GROUPS (checked on the previous turn), so a u32.
            *stride = groups as u32;
            groups = match groups.checked_mul(d.values.len() + 1) {
                Some(g) if g <= GPU_DENSE_GROUPS => g,
                _ => {
                    let sizes: Vec<String> = columns
                        .dimensions
                        .iter()
                        .map(|d| format!("{} ({})", d.name, d.values.len() + 1))
                        .collect();
                    return Ok(Prepared::OnCpu {
                        reason: format!(
                            "the key space of {} is past the GPU's dense table of \
                             {GPU_DENSE_GROUPS} groups",
                            sizes.join(" x ")
                        ),
                    });
                }
            };
        }
        // A code past its dictionary would index past the table on the
        // device: refused here, before anything is copied.
        for d in &columns.dimensions {
            if let Some(code) = d
                .codes
                .iter()
                .copied()
                .find(|c| usize::from(*c) > d.values.len())
            {
                return Err(AggregateError::CodeOutOfRange {
                    dimension: d.name.clone(),
                    code,
                    values: d.values.len(),
                });
            }
        }
        let codes = columns
            .dimensions
            .iter()
            .flat_map(|d| d.codes.iter().copied())
            .collect();
        let measures = [
            &columns.income_lakh,
            &columns.household_size,
            &columns.overall_risk_centi,
        ];
        let values = measures
            .iter()
            .flat_map(|m| m.iter().map(|v| v.unwrap_or(0)))
            .collect();
        let present = measures
            .iter()
            .flat_map(|m| m.iter().map(|v| u8::from(v.is_some())))
            .collect();
        Ok(Prepared::Kernel(KernelInput {
            rows: rows32,
            // At most GPU_DENSE_GROUPS, checked above.
            groups: groups as u32,
            strides,
            codes,
            values,
            present,
        }))
    }

    /// The kernel and grid for a device of `multiprocessors` SMs: the shared
    /// table when the groups fit, a grid of up to [`BLOCKS_PER_SM`] blocks
    /// per SM and no more blocks than the rows need.
    pub fn launch(&self, multiprocessors: usize) -> Launch {
        let sms = u32::try_from(multiprocessors).unwrap_or(u32::MAX).max(1);
        let blocks = self
            .rows
            .div_ceil(THREADS_PER_BLOCK)
            .clamp(1, sms.saturating_mul(BLOCKS_PER_SM));
        let (kernel, shared_bytes) = if self.groups as usize <= SHARED_GROUPS {
            // At most 768 × 56 bytes.
            let bytes = self.groups as usize * GROUP_WORDS * std::mem::size_of::<u64>();
            (KernelKind::Shared, bytes as u32)
        } else {
            (KernelKind::Global, 0)
        };
        Launch {
            kernel,
            blocks,
            threads: THREADS_PER_BLOCK,
            shared_bytes,
        }
    }

    /// Words of the output table: [`GROUP_WORDS`] per group.
    pub fn out_words(&self) -> usize {
        self.groups as usize * GROUP_WORDS
    }

    /// The partials of the groups present in `table`, the kernels' output
    /// for these `columns` (one per group with users, in the order of their
    /// slots, as `CpuAggregator`'s dense table gives them).
    pub fn partials(
        &self,
        columns: &Columns,
        table: &[u64],
    ) -> Result<Vec<Partial>, AggregateError> {
        if table.len() < self.out_words() {
            return Err(AggregateError::Gpu {
                step: "reading the groups back",
                detail: format!(
                    "{} words came back for {} groups of {GROUP_WORDS}",
                    table.len(),
                    self.groups
                ),
            });
        }
        // Two's complement: the u64 sums read back as the signed ones.
        let word = |w: u64| w as i64;
        let sum = |acc: &[u64], m: usize| Sum {
            n: word(acc[1 + 2 * m]),
            total: word(acc[2 + 2 * m]),
        };
        Ok(table
            .chunks_exact(GROUP_WORDS)
            .take(self.groups as usize)
            .enumerate()
            .filter(|(_, acc)| acc[0] != 0)
            .map(|(slot, acc)| Partial {
                key: columns
                    .dimensions
                    .iter()
                    .zip(&self.strides)
                    .map(|(d, stride)| {
                        let code = slot / *stride as usize % (d.values.len() + 1);
                        // Below the dictionary's size + 1, a u16 (its limit).
                        d.value(code as u16).map(str::to_owned)
                    })
                    .collect(),
                users: word(acc[0]),
                income_lakh: sum(acc, 0),
                household_size: sum(acc, 1),
                overall_risk_centi: sum(acc, 2),
            })
            .collect())
    }
}

/// The compiled kernels of `aggregate.cu`.
struct Kernels {
    shared: CudaFunction,
    global: CudaFunction,
}

/// Grouped counts and sums on CUDA device 0.
pub struct GpuAggregator {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    device: String,
    multiprocessors: usize,
}

impl std::fmt::Debug for GpuAggregator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuAggregator")
            .field("device", &self.device)
            .field("multiprocessors", &self.multiprocessors)
            .finish_non_exhaustive()
    }
}

impl GpuAggregator {
    /// Opens CUDA device 0 and compiles `aggregate.cu`, or says why not, as
    /// [`super::GpuEngine::open`] does (no driver library, no NVRTC, no
    /// device, a driver or NVRTC failure). Never panics.
    pub fn open() -> Result<Self, GpuOpenError> {
        let aggregator = open_guarded(
            "opening device 0 and compiling the aggregation kernels",
            Self::open_device,
        )?;
        tracing::info!(
            device = %aggregator.device,
            "GPU aggregation open: kernels compiled with NVRTC"
        );
        Ok(aggregator)
    }

    fn open_device() -> Result<Self, GpuOpenError> {
        let device = Device::open()?;
        let module = device
            .ctx
            .load_module(compile_source(KERNEL_SOURCE, KERNEL_FILE)?)
            .map_err(driver("loading the compiled aggregation kernels"))?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(driver("finding a kernel in the compiled module"))
        };
        let kernels = Kernels {
            shared: function("um_aggregate_shared_kernel")?,
            global: function("um_aggregate_global_kernel")?,
        };
        Ok(Self {
            ctx: device.ctx,
            kernels,
            device: device.description,
            multiprocessors: device.multiprocessors,
        })
    }

    /// The device, in words (name, compute capability, SMs).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Runs the kernels over `input`: the output table of
    /// [`KernelInput::out_words`] words.
    fn on_device(&self, input: &KernelInput) -> Result<Vec<u64>, AggregateError> {
        let n_dims = u32::try_from(input.strides.len()).unwrap_or(u32::MAX);
        let stream = self.ctx.new_stream().map_err(gpu("creating a stream"))?;
        let codes = upload(&stream, &input.codes)?;
        let strides = upload(&stream, &input.strides)?;
        let values = upload(&stream, &input.values)?;
        let present = upload(&stream, &input.present)?;
        let mut out = stream
            .alloc_zeros::<u64>(input.out_words().max(1))
            .map_err(gpu("allocating device memory"))?;
        let launch = input.launch(self.multiprocessors);
        let config = LaunchConfig {
            grid_dim: (launch.blocks, 1, 1),
            block_dim: (launch.threads, 1, 1),
            shared_mem_bytes: launch.shared_bytes,
        };
        match launch.kernel {
            KernelKind::Shared => {
                let mut builder = stream.launch_builder(&self.kernels.shared);
                builder
                    .arg(&input.rows)
                    .arg(&n_dims)
                    .arg(&codes)
                    .arg(&strides)
                    .arg(&values)
                    .arg(&present)
                    .arg(&input.groups)
                    .arg(&mut out);
                // SAFETY: the arguments of um_aggregate_shared_kernel in
                // aggregate.cu, in order; `codes` holds n_dims × rows codes,
                // `values` and `present` 3 × rows, every group index is below
                // `groups` (the codes are below their dictionaries' sizes + 1
                // and the strides their mixed radix), `out` holds `groups`
                // tables, and the shared memory one.
                unsafe { builder.launch(config) }.map_err(gpu("launching um_aggregate_shared"))?;
            }
            KernelKind::Global => {
                let mut builder = stream.launch_builder(&self.kernels.global);
                builder
                    .arg(&input.rows)
                    .arg(&n_dims)
                    .arg(&codes)
                    .arg(&strides)
                    .arg(&values)
                    .arg(&present)
                    .arg(&mut out);
                // SAFETY: the arguments of um_aggregate_global_kernel, in
                // order, over the same buffers as above.
                unsafe { builder.launch(config) }.map_err(gpu("launching um_aggregate_global"))?;
            }
        }
        stream
            .synchronize()
            .map_err(gpu("running the aggregation kernel"))?;
        stream
            .clone_dtoh(&out)
            .map_err(gpu("copying the groups back"))
    }
}

impl Aggregator for GpuAggregator {
    fn name(&self) -> &'static str {
        "gpu"
    }

    fn aggregate(&self, columns: &Columns) -> Result<Vec<Partial>, AggregateError> {
        let input = match KernelInput::prepare(columns)? {
            Prepared::Kernel(input) => input,
            Prepared::OnCpu { reason } => {
                tracing::info!(%reason, "grouping these columns on the CPU (the same partials)");
                return CpuAggregator.aggregate(columns);
            }
        };
        if input.rows == 0 {
            return Ok(Vec::new());
        }
        let step = "aggregating on the GPU";
        let table =
            catch_unwind(AssertUnwindSafe(|| self.on_device(&input))).unwrap_or_else(|panic| {
                Err(AggregateError::Gpu {
                    step,
                    detail: format!("panicked: {}", panic_message(panic.as_ref())),
                })
            })?;
        input.partials(columns, &table)
    }
}

/// Maps a driver error to [`AggregateError::Gpu`] for `step`.
fn gpu(step: &'static str) -> impl Fn(cudarc::driver::DriverError) -> AggregateError {
    move |e| AggregateError::Gpu {
        step,
        detail: e.to_string(),
    }
}

/// Copies `host` to the device; an empty slice becomes one zero element,
/// as the driver does not allocate nothing.
fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> Result<CudaSlice<T>, AggregateError> {
    if host.is_empty() {
        return stream
            .alloc_zeros(1)
            .map_err(gpu("allocating device memory"));
    }
    stream
        .clone_htod(host)
        .map_err(gpu("copying the columns to the device"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::aggregate::CodedColumn;

    fn column(name: &str, values: &[Option<&str>]) -> CodedColumn {
        let mut c = CodedColumn::new(name);
        for v in values {
            c.push(*v).expect("push");
        }
        c
    }

    fn input(columns: &Columns) -> KernelInput {
        match KernelInput::prepare(columns).expect("prepare") {
            Prepared::Kernel(input) => input,
            Prepared::OnCpu { reason } => panic!("left to the CPU: {reason}"),
        }
    }

    #[test]
    fn strides_are_the_mixed_radix_of_the_dictionaries_first_dimension_first() {
        let mut c = Columns::new(&[]);
        c.dimensions = vec![
            column("region", &[Some("KA"), Some("TN"), None]),
            column("gender", &[Some("f"), None, Some("m")]),
        ];
        c.income_lakh = vec![Some(-3), None, Some(7)];
        c.household_size = vec![None; 3];
        c.overall_risk_centi = vec![Some(1), Some(2), None];
        let input = input(&c);
        // region: NULL, KA, TN (3); gender: NULL, f, m (3).
        assert_eq!(input.groups, 9);
        assert_eq!(input.strides, [3, 1]);
        assert_eq!(input.codes, [1, 2, 0, 1, 0, 2]);
        assert_eq!(input.values, [-3, 0, 7, 0, 0, 0, 1, 2, 0]);
        assert_eq!(input.present, [1, 0, 1, 0, 0, 0, 1, 1, 0]);
        assert_eq!(input.launch(132).kernel, KernelKind::Shared);
    }

    #[test]
    fn partials_read_the_table_back_as_signed_sums_per_present_group() {
        let mut c = Columns::new(&[]);
        c.dimensions = vec![column("region", &[Some("KA"), None])];
        c.income_lakh = vec![Some(-5), None];
        c.household_size = vec![None; 2];
        c.overall_risk_centi = vec![None; 2];
        let input = input(&c);
        // Slot 0 (NULL): 1 user; slot 1 (KA): 1 user, income -5.
        let mut table = vec![0u64; input.out_words()];
        table[0] = 1;
        table[GROUP_WORDS] = 1;
        table[GROUP_WORDS + 1] = 1;
        table[GROUP_WORDS + 2] = (-5i64) as u64;
        let partials = input.partials(&c, &table).expect("partials");
        let mut cpu = CpuAggregator.aggregate(&c).expect("cpu");
        cpu.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(partials, cpu);
        assert!(input.partials(&c, &table[..3]).is_err(), "a short table");
    }

    #[test]
    fn key_spaces_past_the_dense_table_and_bad_columns_are_not_the_kernels() {
        let mut c = Columns::new(&[]);
        let many: Vec<String> = (0..300).map(|i| format!("v{i}")).collect();
        let values: Vec<Option<&str>> = many.iter().map(|v| Some(v.as_str())).collect();
        c.dimensions = vec![column("a", &values), column("b", &values)];
        c.income_lakh = vec![None; 300];
        c.household_size = vec![None; 300];
        c.overall_risk_centi = vec![None; 300];
        match KernelInput::prepare(&c).expect("prepare") {
            Prepared::OnCpu { reason } => assert!(reason.contains("a (301) x b (301)"), "{reason}"),
            Prepared::Kernel(_) => panic!("301 × 301 groups are past the dense table"),
        }
        c.dimensions.pop();
        assert!(matches!(KernelInput::prepare(&c), Ok(Prepared::Kernel(_))));
        c.dimensions[0].codes[7] = 302;
        assert!(matches!(
            KernelInput::prepare(&c),
            Err(AggregateError::CodeOutOfRange { code: 302, .. })
        ));
        c.household_size.pop();
        assert!(matches!(
            KernelInput::prepare(&c),
            Err(AggregateError::Ragged { .. })
        ));
    }

    #[test]
    fn the_grid_is_sized_by_the_rows_and_the_sms_and_big_tables_go_global() {
        let mut c = Columns::new(&[]);
        c.income_lakh = vec![None; 1000];
        c.household_size = vec![None; 1000];
        c.overall_risk_centi = vec![None; 1000];
        let small = input(&c).launch(132);
        assert_eq!((small.kernel, small.blocks), (KernelKind::Shared, 4));
        assert_eq!(small.shared_bytes, 56);
        let big = KernelInput {
            rows: 100_000_000,
            groups: SHARED_GROUPS as u32 + 1,
            ..input(&c)
        };
        let launch = big.launch(132);
        assert_eq!((launch.kernel, launch.blocks), (KernelKind::Global, 528));
        assert_eq!(launch.shared_bytes, 0);
        assert_eq!(
            big.launch(0).blocks,
            BLOCKS_PER_SM,
            "no SM count: still a grid"
        );
    }

    #[test]
    fn the_kernel_source_has_the_kernels_the_aggregator_loads() {
        for name in ["um_aggregate_shared_kernel", "um_aggregate_global_kernel"] {
            assert!(
                KERNEL_SOURCE.contains(&format!("extern \"C\" __global__ void {name}(")),
                "{name}"
            );
        }
    }

    #[test]
    fn nvrtc_compiles_the_aggregation_kernels_where_it_is_installed() {
        // NVRTC is a host library: this runs wherever it is, GPU or not.
        // SAFETY: loads the library only, as GpuAggregator::open does.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            umstore_e2e::skip::skip_or_fail(
                umstore_e2e::skip::Component::Gpu,
                GpuOpenError::NoNvrtcLibrary,
            );
            return;
        }
        let ptx = compile_source(KERNEL_SOURCE, KERNEL_FILE)
            .unwrap_or_else(|e| panic!("{e}"))
            .to_src();
        for name in ["um_aggregate_shared_kernel", "um_aggregate_global_kernel"] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} in the PTX"
            );
        }
    }
}
