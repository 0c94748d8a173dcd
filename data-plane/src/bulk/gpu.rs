//! The GPU engine: batch AES-256-GCM on a CUDA device through `cudarc`.
//!
//! The kernels are CUDA C in `data-plane/kernels/aes_gcm.cu`, built into the
//! binary with `include_str!` and compiled with NVRTC when the engine opens,
//! so neither the build nor the image needs a CUDA toolkit: the driver
//! (`libcuda`) and NVRTC (`libnvrtc`) are loaded at run time. Where either is
//! missing, or there is no device, [`GpuEngine::open`] says which and why; it
//! never panics (cudarc's dynamic loading panics on a missing library or
//! symbol, so both libraries are probed first and every call into cudarc runs
//! under `catch_unwind`).
//!
//! A batch is one upload per flat buffer (keys, key indices, AAD, bytes,
//! offsets, nonces), then three kernels on one stream, then one download:
//! per key the AES-256 round keys and `H = AES_K(0)`; per 16-byte CTR block
//! over all fields the keystream XOR; per field the header, GHASH and tag
//! (seal), or the format and tag check first and the CTR blocks of the
//! fields that verified after (open). The bytes are those of `CpuEngine`
//! given the same batch and nonces (tests/bulk_gpu.rs).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions, Ptx};
use zeroize::Zeroizing;

use super::batch::{FieldNonce, OpenBatch, SealBatch};
use super::output::{FieldStatus, OpenedBatch, SealedBatch};
use super::{BulkEngine, BulkError, EngineInfo, EngineKind};

/// The kernels' CUDA C source, compiled with NVRTC at [`GpuEngine::open`].
const KERNEL_SOURCE: &str = include_str!("../../kernels/aes_gcm.cu");
/// The name NVRTC reports the source under in its log.
const KERNEL_FILE: &str = "aes_gcm.cu";
/// Bytes of AES-256 round keys per key, as the kernels lay them out.
const ROUND_KEYS_LEN: usize = 240;
/// Threads per CUDA block for every kernel.
const THREADS_PER_BLOCK: u32 = 256;

/// Why [`GpuEngine::open`] found no usable GPU.
#[derive(Debug, thiserror::Error)]
pub enum GpuOpenError {
    /// `libcuda` could not be loaded.
    #[error(
        "the CUDA driver library (libcuda.so.1) could not be loaded: install the NVIDIA \
         driver, or add the directory holding libcuda to LD_LIBRARY_PATH"
    )]
    NoDriverLibrary,
    /// `libnvrtc` could not be loaded.
    #[error(
        "the NVRTC library (libnvrtc.so, libnvrtc.so.12, ...) could not be loaded: install \
         CUDA's NVRTC runtime (e.g. the cuda-nvrtc package), or add its directory to \
         LD_LIBRARY_PATH"
    )]
    NoNvrtcLibrary,
    /// The driver loaded but reports no usable device.
    #[error("the CUDA driver reports no usable device: {detail}")]
    NoDevice {
        /// The driver's answer.
        detail: String,
    },
    /// A driver call failed while opening.
    #[error("the CUDA driver failed while {step}: {detail}")]
    Driver {
        /// What was being done.
        step: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// NVRTC refused the kernels (a driver and NVRTC that do not match, or
    /// a bug in the source); the log says where.
    #[error("NVRTC could not compile kernels/{file}: {detail}")]
    Compile {
        /// The kernel source file (`aes_gcm.cu`, `aggregate.cu`).
        file: &'static str,
        /// NVRTC's error and log.
        detail: String,
    },
    /// The CUDA bindings panicked (a symbol missing from an old driver, for
    /// one); caught rather than taking the process down.
    #[error("the CUDA bindings panicked while {step}: {detail}")]
    Panicked {
        /// What was being done.
        step: &'static str,
        /// The panic's message.
        detail: String,
    },
}

/// Where the time of one GPU batch went: host→device copies, the kernels
/// alone, device→host copies (the benchmark's with and without transfer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GpuTimings {
    /// Allocating device buffers and copying the batch to the device.
    pub upload: Duration,
    /// The kernels, from the first launch until the stream is idle.
    pub kernels: Duration,
    /// Copying the output back to the host.
    pub download: Duration,
}

impl GpuTimings {
    /// Upload, kernels and download together.
    pub fn total(&self) -> Duration {
        self.upload + self.kernels + self.download
    }
}

/// The compiled kernels of `aes_gcm.cu`.
struct Kernels {
    key_setup: CudaFunction,
    seal_ctr: CudaFunction,
    seal_tag: CudaFunction,
    open_tag: CudaFunction,
    open_ctr: CudaFunction,
}

/// Batch AES-256-GCM on CUDA device 0.
pub struct GpuEngine {
    ctx: Arc<CudaContext>,
    kernels: Kernels,
    device: String,
    multiprocessors: usize,
}

impl std::fmt::Debug for GpuEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEngine")
            .field("device", &self.device)
            .field("multiprocessors", &self.multiprocessors)
            .finish_non_exhaustive()
    }
}

impl GpuEngine {
    /// Opens CUDA device 0 and compiles the kernels, or says why not: no
    /// driver library, no NVRTC library, no device, a driver or NVRTC
    /// failure (with the underlying message). Never panics.
    pub fn open() -> Result<Self, GpuOpenError> {
        let engine = open_guarded(
            "opening device 0 and compiling the kernels",
            Self::open_device,
        )?;
        tracing::info!(device = %engine.device, "GPU engine open: kernels compiled with NVRTC");
        Ok(engine)
    }

    fn open_device() -> Result<Self, GpuOpenError> {
        let device = Device::open()?;
        let module = device
            .ctx
            .load_module(compile_kernels()?)
            .map_err(driver("loading the compiled kernels"))?;
        let function = |name: &str| {
            module
                .load_function(name)
                .map_err(driver("finding a kernel in the compiled module"))
        };
        let kernels = Kernels {
            key_setup: function("um_key_setup_kernel")?,
            seal_ctr: function("um_seal_ctr_kernel")?,
            seal_tag: function("um_seal_tag_kernel")?,
            open_tag: function("um_open_tag_kernel")?,
            open_ctr: function("um_open_ctr_kernel")?,
        };
        Ok(Self {
            ctx: device.ctx,
            kernels,
            device: device.description,
            multiprocessors: device.multiprocessors,
        })
    }

    /// [`BulkEngine::seal_batch`], with where the time went.
    pub fn seal_batch_timed(
        &self,
        batch: &SealBatch,
        nonces: &[FieldNonce],
    ) -> Result<(SealedBatch, GpuTimings), BulkError> {
        if nonces.len() != batch.len() {
            return Err(BulkError::NonceCount {
                nonces: nonces.len(),
                fields: batch.len(),
            });
        }
        let out_offsets = batch.sealed_offsets();
        if batch.is_empty() {
            return Ok((
                SealedBatch::new(Vec::new(), out_offsets),
                GpuTimings::default(),
            ));
        }
        guarded("sealing a batch", || {
            self.seal_on_device(batch, nonces, out_offsets)
        })
    }

    /// [`BulkEngine::open_batch`], with where the time went.
    pub fn open_batch_timed(
        &self,
        batch: &OpenBatch,
    ) -> Result<(OpenedBatch, GpuTimings), BulkError> {
        let pt_offsets = batch.plaintext_offsets();
        if batch.is_empty() {
            let opened = OpenedBatch::assemble(batch, Zeroizing::new(Vec::new()), pt_offsets, &[])?;
            return Ok((opened, GpuTimings::default()));
        }
        guarded("opening a batch", || self.open_on_device(batch, pt_offsets))
    }

    fn seal_on_device(
        &self,
        batch: &SealBatch,
        nonces: &[FieldNonce],
        out_offsets: Vec<u32>,
    ) -> Result<(SealedBatch, GpuTimings), BulkError> {
        let n = count(batch.len(), "the number of fields")?;
        let n_keys = count(batch.key_count(), "the number of keys")?;
        let (plaintext, pt_offsets) = batch.data_flat();
        let blocks = block_offsets(pt_offsets)?;
        let n_blocks = blocks.last().copied().unwrap_or(0);
        let (aad, aad_offsets) = flat_aad(batch.len(), |i| batch.aad(i))?;
        let out_len = out_offsets.last().copied().unwrap_or(0) as usize;

        let started = Instant::now();
        let stream = self.ctx.new_stream().map_err(gpu("creating a stream"))?;
        let mut keys = upload(&stream, batch.keys().as_flattened())?;
        let key_of = upload(&stream, batch.key_indices())?;
        let nonces = upload(&stream, nonces.as_flattened())?;
        let aad = upload(&stream, &aad)?;
        let aad_offsets = upload(&stream, &aad_offsets)?;
        let mut plaintext = upload(&stream, plaintext)?;
        let pt_offsets = upload(&stream, pt_offsets)?;
        let blocks = upload(&stream, &blocks)?;
        let out_offsets_d = upload(&stream, &out_offsets)?;
        let mut round_keys = zeros::<u8>(&stream, batch.key_count() * ROUND_KEYS_LEN)?;
        let mut hkeys = zeros::<u8>(&stream, batch.key_count() * 16)?;
        let mut out = zeros::<u8>(&stream, out_len)?;
        stream.synchronize().map_err(gpu("copying the batch"))?;
        let uploaded = Instant::now();

        let k = &self.kernels;
        let mut launch = stream.launch_builder(&k.key_setup);
        launch
            .arg(&n_keys)
            .arg(&keys)
            .arg(&mut round_keys)
            .arg(&mut hkeys);
        // SAFETY: the arguments are those of um_key_setup_kernel in
        // aes_gcm.cu, in order; it touches keys [0, n_keys) of buffers sized
        // for batch.key_count() keys.
        unsafe { launch.launch(grid(n_keys)) }.map_err(gpu("launching um_key_setup"))?;
        if n_blocks > 0 {
            let mut launch = stream.launch_builder(&k.seal_ctr);
            launch
                .arg(&n_blocks)
                .arg(&n)
                .arg(&blocks)
                .arg(&key_of)
                .arg(&round_keys)
                .arg(&nonces)
                .arg(&plaintext)
                .arg(&pt_offsets)
                .arg(&mut out)
                .arg(&out_offsets_d);
            // SAFETY: the arguments of um_seal_ctr_kernel, in order; every
            // offset and key index comes from the batch these buffers were
            // copied from, and `out` is sized by its sealed offsets.
            unsafe { launch.launch(grid(n_blocks)) }.map_err(gpu("launching um_seal_ctr"))?;
        }
        let mut launch = stream.launch_builder(&k.seal_tag);
        launch
            .arg(&n)
            .arg(&key_of)
            .arg(&round_keys)
            .arg(&hkeys)
            .arg(&nonces)
            .arg(&aad)
            .arg(&aad_offsets)
            .arg(&pt_offsets)
            .arg(&mut out)
            .arg(&out_offsets_d);
        // SAFETY: the arguments of um_seal_tag_kernel, in order, as above.
        unsafe { launch.launch(grid(n)) }.map_err(gpu("launching um_seal_tag"))?;
        stream
            .synchronize()
            .map_err(gpu("running the seal kernels"))?;
        let ran = Instant::now();

        let mut sealed = stream
            .clone_dtoh(&out)
            .map_err(gpu("copying the sealed fields back"))?;
        sealed.truncate(out_len);
        let done = Instant::now();
        // Keys and plaintexts do not outlive the batch on the device either.
        for buffer in [&mut keys, &mut round_keys, &mut hkeys, &mut plaintext] {
            stream
                .memset_zeros(buffer)
                .map_err(gpu("clearing the keys and plaintexts on the device"))?;
        }
        stream
            .synchronize()
            .map_err(gpu("clearing the keys and plaintexts on the device"))?;
        let timings = GpuTimings {
            upload: uploaded - started,
            kernels: ran - uploaded,
            download: done - ran,
        };
        Ok((SealedBatch::new(sealed, out_offsets), timings))
    }

    fn open_on_device(
        &self,
        batch: &OpenBatch,
        pt_offsets: Vec<u32>,
    ) -> Result<(OpenedBatch, GpuTimings), BulkError> {
        let n = count(batch.len(), "the number of fields")?;
        let n_keys = count(batch.key_count(), "the number of keys")?;
        let (sealed, sealed_offsets) = batch.data_flat();
        let blocks = block_offsets(&pt_offsets)?;
        let n_blocks = blocks.last().copied().unwrap_or(0);
        let (aad, aad_offsets) = flat_aad(batch.len(), |i| batch.aad(i))?;
        let pt_len = pt_offsets.last().copied().unwrap_or(0) as usize;

        let started = Instant::now();
        let stream = self.ctx.new_stream().map_err(gpu("creating a stream"))?;
        let mut keys = upload(&stream, batch.keys().as_flattened())?;
        let key_of = upload(&stream, batch.key_indices())?;
        let aad = upload(&stream, &aad)?;
        let aad_offsets = upload(&stream, &aad_offsets)?;
        let sealed = upload(&stream, sealed)?;
        let sealed_offsets = upload(&stream, sealed_offsets)?;
        let pt_offsets_d = upload(&stream, &pt_offsets)?;
        let blocks = upload(&stream, &blocks)?;
        let mut round_keys = zeros::<u8>(&stream, batch.key_count() * ROUND_KEYS_LEN)?;
        let mut hkeys = zeros::<u8>(&stream, batch.key_count() * 16)?;
        let mut status = zeros::<u8>(&stream, batch.len())?;
        let mut out = zeros::<u8>(&stream, pt_len)?;
        stream.synchronize().map_err(gpu("copying the batch"))?;
        let uploaded = Instant::now();

        let k = &self.kernels;
        let mut launch = stream.launch_builder(&k.key_setup);
        launch
            .arg(&n_keys)
            .arg(&keys)
            .arg(&mut round_keys)
            .arg(&mut hkeys);
        // SAFETY: the arguments of um_key_setup_kernel, in order (see seal).
        unsafe { launch.launch(grid(n_keys)) }.map_err(gpu("launching um_key_setup"))?;
        let mut launch = stream.launch_builder(&k.open_tag);
        launch
            .arg(&n)
            .arg(&key_of)
            .arg(&round_keys)
            .arg(&hkeys)
            .arg(&aad)
            .arg(&aad_offsets)
            .arg(&sealed)
            .arg(&sealed_offsets)
            .arg(&mut status);
        // SAFETY: the arguments of um_open_tag_kernel, in order; offsets and
        // key indices come from the batch these buffers were copied from.
        unsafe { launch.launch(grid(n)) }.map_err(gpu("launching um_open_tag"))?;
        if n_blocks > 0 {
            let mut launch = stream.launch_builder(&k.open_ctr);
            launch
                .arg(&n_blocks)
                .arg(&n)
                .arg(&blocks)
                .arg(&key_of)
                .arg(&round_keys)
                .arg(&sealed)
                .arg(&sealed_offsets)
                .arg(&status)
                .arg(&mut out)
                .arg(&pt_offsets_d);
            // SAFETY: the arguments of um_open_ctr_kernel, in order; `out`
            // is sized by the plaintext offsets it writes at.
            unsafe { launch.launch(grid(n_blocks)) }.map_err(gpu("launching um_open_ctr"))?;
        }
        stream
            .synchronize()
            .map_err(gpu("running the open kernels"))?;
        let ran = Instant::now();

        let status_bytes = stream
            .clone_dtoh(&status)
            .map_err(gpu("copying the fields' status back"))?;
        let mut plaintext = Zeroizing::new(
            stream
                .clone_dtoh(&out)
                .map_err(gpu("copying the plaintexts back"))?,
        );
        plaintext.truncate(pt_len);
        let done = Instant::now();
        for buffer in [&mut keys, &mut round_keys, &mut hkeys, &mut out] {
            stream
                .memset_zeros(buffer)
                .map_err(gpu("clearing the keys and plaintexts on the device"))?;
        }
        stream
            .synchronize()
            .map_err(gpu("clearing the keys and plaintexts on the device"))?;

        let status = status_bytes
            .iter()
            .take(batch.len())
            .enumerate()
            .map(|(item, s)| field_status(item, *s))
            .collect::<Result<Vec<_>, _>>()?;
        let timings = GpuTimings {
            upload: uploaded - started,
            kernels: ran - uploaded,
            download: done - ran,
        };
        let opened = OpenedBatch::assemble(batch, plaintext, pt_offsets, &status)?;
        Ok((opened, timings))
    }
}

impl BulkEngine for GpuEngine {
    fn info(&self) -> EngineInfo {
        EngineInfo {
            name: "gpu",
            kind: EngineKind::Gpu,
            parallelism: self.multiprocessors,
            // Table-based AES and bitwise GHASH in CUDA cores: no dedicated
            // instructions (docs/bulk.md, "GPU engine").
            hardware_aes: false,
            device: self.device.clone(),
        }
    }

    fn seal_batch(
        &self,
        batch: &SealBatch,
        nonces: &[FieldNonce],
    ) -> Result<SealedBatch, BulkError> {
        self.seal_batch_timed(batch, nonces)
            .map(|(sealed, _)| sealed)
    }

    fn open_batch(&self, batch: &OpenBatch) -> Result<OpenedBatch, BulkError> {
        self.open_batch_timed(batch).map(|(opened, _)| opened)
    }
}

/// CUDA device 0, opened: what the GPU engine and the GPU aggregation
/// (`gpu_aggregate.rs`) each start from.
pub(super) struct Device {
    /// Its context (the device's primary context, shared by both).
    pub(super) ctx: Arc<CudaContext>,
    /// Name, compute capability and SMs, in words.
    pub(super) description: String,
    /// Streaming multiprocessors.
    pub(super) multiprocessors: usize,
}

impl Device {
    /// Opens device 0. Call it under [`open_guarded`], which checks first
    /// that the libraries are there and catches cudarc's panics.
    pub(super) fn open() -> Result<Self, GpuOpenError> {
        let count = CudaContext::device_count().map_err(|e| GpuOpenError::NoDevice {
            detail: e.to_string(),
        })?;
        if count < 1 {
            return Err(GpuOpenError::NoDevice {
                detail: "0 devices".into(),
            });
        }
        let ctx = CudaContext::new(0).map_err(driver("creating a context on device 0"))?;
        let name = ctx.name().map_err(driver("reading the device's name"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(driver("reading the compute capability"))?;
        let multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(driver("reading the multiprocessor count"))?;
        Ok(Self {
            ctx,
            description: format!("{name}, compute {major}.{minor}, {multiprocessors} SMs"),
            multiprocessors: usize::try_from(multiprocessors).unwrap_or(0),
        })
    }
}

/// Runs `open` (which opens a [`Device`] and loads kernels) once the driver
/// and NVRTC libraries are known to load, turning a panic inside cudarc
/// into [`GpuOpenError::Panicked`] for `step`: cudarc's dynamic loading
/// panics on a missing library or symbol.
pub(super) fn open_guarded<T>(
    step: &'static str,
    open: impl FnOnce() -> Result<T, GpuOpenError>,
) -> Result<T, GpuOpenError> {
    // SAFETY: loading the driver and NVRTC libraries runs their
    // initialisers, as any use of CUDA does; nothing else is called.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(GpuOpenError::NoDriverLibrary);
    }
    // SAFETY: as above.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return Err(GpuOpenError::NoNvrtcLibrary);
    }
    catch_unwind(AssertUnwindSafe(open)).unwrap_or_else(|panic| {
        Err(GpuOpenError::Panicked {
            step,
            detail: panic_message(panic.as_ref()),
        })
    })
}

/// Maps a driver error while opening to [`GpuOpenError::Driver`] for `step`.
pub(super) fn driver(step: &'static str) -> impl Fn(cudarc::driver::DriverError) -> GpuOpenError {
    move |e| GpuOpenError::Driver {
        step,
        detail: e.to_string(),
    }
}

/// Compiles `aes_gcm.cu` to PTX with NVRTC (no device needed).
fn compile_kernels() -> Result<Ptx, GpuOpenError> {
    compile_source(KERNEL_SOURCE, KERNEL_FILE)
}

/// Compiles the CUDA C `source` of `kernels/{file}` to PTX with NVRTC, for
/// NVRTC's default architecture (no device needed).
pub(super) fn compile_source(source: &str, file: &'static str) -> Result<Ptx, GpuOpenError> {
    let opts = CompileOptions {
        name: Some(file.into()),
        ..Default::default()
    };
    compile_ptx_with_opts(source, opts).map_err(|e| GpuOpenError::Compile {
        file,
        detail: compile_error(&e),
    })
}

/// Runs `f`, turning a panic inside cudarc into an error.
fn guarded<R>(
    step: &'static str,
    f: impl FnOnce() -> Result<R, BulkError>,
) -> Result<R, BulkError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(BulkError::Gpu {
            step,
            detail: format!("panicked: {}", panic_message(panic.as_ref())),
        })
    })
}

/// The message of a caught panic.
pub(super) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

fn compile_error(e: &CompileError) -> String {
    match e {
        CompileError::CompileError { nvrtc, log, .. } => {
            format!("{nvrtc:?}; log: {}", log.to_string_lossy().trim())
        }
        other => format!("{other:?}"),
    }
}

/// Maps a driver error to [`BulkError::Gpu`] for `step`.
fn gpu(step: &'static str) -> impl Fn(cudarc::driver::DriverError) -> BulkError {
    move |e| BulkError::Gpu {
        step,
        detail: e.to_string(),
    }
}

fn count(n: usize, what: &'static str) -> Result<u32, BulkError> {
    u32::try_from(n).map_err(|_| BulkError::BatchTooLarge {
        what,
        limit: u64::from(u32::MAX),
    })
}

/// One thread per item, [`THREADS_PER_BLOCK`] to a block.
fn grid(threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (threads.div_ceil(THREADS_PER_BLOCK).max(1), 1, 1),
        block_dim: (THREADS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Copies `host` to the device; an empty slice becomes one zero element,
/// as the driver does not allocate nothing.
fn upload<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    host: &[T],
) -> Result<CudaSlice<T>, BulkError> {
    if host.is_empty() {
        return zeros(stream, 1);
    }
    stream
        .clone_htod(host)
        .map_err(gpu("copying the batch to the device"))
}

/// A zeroed device buffer of at least one element.
fn zeros<T: DeviceRepr + ValidAsZeroBits>(
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>, BulkError> {
    stream
        .alloc_zeros(len.max(1))
        .map_err(gpu("allocating device memory"))
}

/// CTR-block offsets (`n + 1`, from 0) of fields laid out by `offsets`:
/// field `i` has `ceil(len / 16)` blocks, an empty field none.
fn block_offsets(offsets: &[u32]) -> Result<Vec<u32>, BulkError> {
    let mut out = Vec::with_capacity(offsets.len().max(1));
    let mut at = 0u32;
    out.push(at);
    for w in offsets.windows(2) {
        let blocks = (w[1] - w[0]).div_ceil(16);
        at = at.checked_add(blocks).ok_or(BulkError::BatchTooLarge {
            what: "the batch's AES-CTR blocks",
            limit: u64::from(u32::MAX),
        })?;
        out.push(at);
    }
    Ok(out)
}

/// The fields' AAD end to end with `n + 1` offsets, as the kernels read it.
fn flat_aad<'a>(
    n: usize,
    aad: impl Fn(usize) -> &'a [u8],
) -> Result<(Vec<u8>, Vec<u32>), BulkError> {
    let mut bytes = Vec::new();
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0);
    for i in 0..n {
        bytes.extend_from_slice(aad(i));
        offsets.push(count(bytes.len(), "the batch's associated data")?);
    }
    Ok((bytes, offsets))
}

fn field_status(item: usize, byte: u8) -> Result<FieldStatus, BulkError> {
    Ok(match byte {
        0 => FieldStatus::Opened,
        1 => FieldStatus::Truncated,
        2 => FieldStatus::UnknownFormat,
        3 => FieldStatus::Authentication,
        _ => {
            return Err(BulkError::Layout {
                item,
                detail: "the GPU wrote a field status that is not one of 0..=3",
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bulk::FailureReason;
    use crate::crypto::{DataKey, FIELD_FORMAT_V1};
    use umstore_e2e::skip::{skip_or_fail, Component};

    include!("nist_gcm_vectors.rs");

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vector hex")
    }

    fn nist_key(v: &Vector) -> DataKey {
        DataKey::from_bytes(unhex(v.key).try_into().expect("32-byte key"))
    }

    /// The GPU engine, or `None` after skipping with why there is none
    /// (here rather than in tests/bulk_gpu.rs: raw AAD is crate-private).
    fn gpu() -> Option<GpuEngine> {
        match GpuEngine::open() {
            Ok(engine) => Some(engine),
            Err(e) => {
                skip_or_fail(Component::Gpu, format!("no GPU engine: {e}"));
                None
            }
        }
    }

    #[test]
    fn gpu_engine_seals_and_opens_the_nist_vectors() {
        let Some(engine) = gpu() else {
            return;
        };
        let mut batch = SealBatch::new();
        let mut nonces = Vec::new();
        for v in NIST {
            let key = batch.add_key(&nist_key(v)).expect("key");
            batch
                .push_raw(key, &unhex(v.aad), &unhex(v.pt))
                .expect("push");
            nonces.push(unhex(v.iv).try_into().expect("96-bit IV"));
        }
        let sealed = engine.seal_batch(&batch, &nonces).expect("seal");
        let mut to_open = OpenBatch::new();
        for (i, v) in NIST.iter().enumerate() {
            let field = sealed.get(i).expect("field");
            assert_eq!(field[0], FIELD_FORMAT_V1, "vector {i}");
            assert_eq!(hex::encode(&field[1..13]), v.iv, "vector {i}");
            assert_eq!(
                hex::encode(&field[13..]),
                format!("{}{}", v.ct, v.tag),
                "vector {i}"
            );
            let mut altered = field.to_vec();
            if i == 3 {
                altered[14] ^= 1;
            }
            let key = to_open.add_key(&nist_key(v)).expect("key");
            to_open
                .push_raw(key, &unhex(v.aad), &altered)
                .expect("push");
        }
        let opened = engine.open_batch(&to_open).expect("open");
        for (i, v) in NIST.iter().enumerate() {
            match opened.get(i).expect("in range") {
                Ok(pt) => assert_eq!(hex::encode(pt), v.pt, "vector {i}"),
                Err(f) => {
                    assert_eq!(i, 3);
                    assert_eq!(f.reason, FailureReason::Authentication);
                }
            }
        }
        assert_eq!(opened.failures().len(), 1);
    }

    #[test]
    fn nvrtc_compiles_the_kernels_where_it_is_installed() {
        // NVRTC is a host library: this runs wherever it is, GPU or not.
        // SAFETY: loads the library only, as GpuEngine::open does.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            skip_or_fail(Component::Gpu, GpuOpenError::NoNvrtcLibrary);
            return;
        }
        let ptx = compile_kernels().unwrap_or_else(|e| panic!("{e}")).to_src();
        for name in [
            "um_key_setup_kernel",
            "um_seal_ctr_kernel",
            "um_seal_tag_kernel",
            "um_open_tag_kernel",
            "um_open_ctr_kernel",
        ] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} in the PTX"
            );
        }
    }

    #[test]
    fn open_says_why_there_is_no_gpu_and_never_panics() {
        // SAFETY: loads the library only, as GpuEngine::open does.
        let driver_here = unsafe { cudarc::driver::sys::is_culib_present() };
        match catch_unwind(GpuEngine::open).expect("open must not panic") {
            Ok(engine) => assert_eq!(engine.info().kind, EngineKind::Gpu),
            Err(e) if !driver_here => {
                assert!(matches!(e, GpuOpenError::NoDriverLibrary), "{e}");
                assert!(e.to_string().contains("libcuda"), "{e}");
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn block_offsets_count_partial_blocks_and_skip_empty_fields() {
        // Fields of 0, 1, 16, 17 and 33 bytes.
        let offsets = [0, 0, 1, 17, 34, 67];
        assert_eq!(block_offsets(&offsets).expect("fits"), [0, 0, 1, 2, 4, 7]);
        assert_eq!(block_offsets(&[0]).expect("fits"), [0]);
    }

    #[test]
    fn status_bytes_map_to_the_cpu_engines_statuses() {
        assert_eq!(field_status(0, 0).expect("0"), FieldStatus::Opened);
        assert_eq!(field_status(0, 1).expect("1"), FieldStatus::Truncated);
        assert_eq!(field_status(0, 2).expect("2"), FieldStatus::UnknownFormat);
        assert_eq!(field_status(0, 3).expect("3"), FieldStatus::Authentication);
        assert!(matches!(
            field_status(7, 9),
            Err(BulkError::Layout { item: 7, .. })
        ));
    }

    #[test]
    fn the_kernel_source_has_the_kernels_the_engine_loads() {
        for name in [
            "um_key_setup_kernel",
            "um_seal_ctr_kernel",
            "um_seal_tag_kernel",
            "um_open_tag_kernel",
            "um_open_ctr_kernel",
        ] {
            assert!(
                KERNEL_SOURCE.contains(&format!("extern \"C\" __global__ void {name}(")),
                "{name}"
            );
        }
    }
}
