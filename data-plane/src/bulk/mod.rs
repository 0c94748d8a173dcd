//! Bulk engines: AES-256-GCM seal and open of many fields under many per-user
//! keys in one call (docs/bulk.md).
//!
//! One trait, [`BulkEngine`], and its engines: [`CpuEngine`] (rayon over
//! AES-NI through `aes-gcm`) and [`GpuEngine`] (CUDA kernels compiled with
//! NVRTC, through `cudarc`).
//! Every engine reads the same flat batches ([`SealBatch`], [`OpenBatch`]:
//! a key table, then per field a key index, its AAD and its bytes laid end to
//! end with offsets) and writes exactly the sealed-field format of
//! [`crate::crypto::DataKey::seal`]: `[format = 1][nonce: 12][ciphertext + tag: 16]`.
//! Nonces are the caller's ([`random_nonces`] in production), so two engines
//! given the same batch and nonces produce the same bytes.

pub mod aggregate;
mod batch;
mod cpu;
mod gpu;
pub mod gpu_aggregate;
pub mod import;
mod output;
pub mod select;
#[cfg(test)]
mod tests;

pub use batch::{
    random_nonces, FieldLabel, FieldNonce, KeyIndex, OpenBatch, SealBatch, MAX_BATCH_BYTES,
    SEAL_OVERHEAD,
};
pub use cpu::CpuEngine;
pub use gpu::{GpuEngine, GpuOpenError, GpuTimings};
pub use gpu_aggregate::GpuAggregator;
pub use output::{FailureReason, FieldFailure, OpenedBatch, SealedBatch};
pub use select::{select, EngineChoice, Selected, GPU_CROSSOVER_FIELDS};

use thiserror::Error;

/// Which kind of hardware an engine runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Host CPU cores.
    Cpu,
    /// A CUDA GPU ([`GpuEngine`]).
    Gpu,
}

/// What an engine is, for `--engine` logging and `/metrics` labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    /// Short name, also the metric label: `cpu` (later `gpu`).
    pub name: &'static str,
    /// Hardware kind.
    pub kind: EngineKind,
    /// Worker threads (CPU) or streaming multiprocessors (GPU) the engine
    /// spreads a batch over.
    pub parallelism: usize,
    /// Whether the AES and GHASH steps run on dedicated instructions
    /// (AES-NI and PCLMULQDQ on x86-64, the crypto extensions on aarch64)
    /// rather than the constant-time software fallback.
    pub hardware_aes: bool,
    /// What it runs on, in words: `x86_64, AES-NI + PCLMULQDQ`, a GPU's name.
    pub device: String,
}

impl std::fmt::Display for EngineInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} engine on {} ({} threads)",
            self.name, self.device, self.parallelism
        )
    }
}

/// Why a whole batch call failed. A field that does not open is not one of
/// these: it is a [`FieldFailure`] in the [`OpenedBatch`].
#[derive(Debug, Error)]
pub enum BulkError {
    /// `seal_batch` needs exactly one nonce per field.
    #[error("seal_batch was given {nonces} nonces for {fields} fields; pass one per field (random_nonces)")]
    NonceCount {
        /// Nonces passed.
        nonces: usize,
        /// Fields in the batch.
        fields: usize,
    },
    /// The batch would pass a limit of the flat layout; send it in parts.
    #[error("batch too large: {what} would pass {limit}; split the input into smaller batches")]
    BatchTooLarge {
        /// What overflowed.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A field names a key that is not in its batch's key table (a
    /// [`KeyIndex`] from another batch).
    #[error("key index {index} is not in this batch's table of {keys} keys; add the key to this batch first")]
    UnknownKey {
        /// Index given.
        index: u32,
        /// Keys in the table.
        keys: usize,
    },
    /// The OS random number generator failed while drawing nonces.
    #[error("drawing {count} nonces from the OS RNG failed: {detail}")]
    Rng {
        /// Nonces asked for.
        count: usize,
        /// The RNG's error.
        detail: String,
    },
    /// The engine's worker threads could not be started.
    #[error("starting {threads} worker threads for the CPU engine failed: {detail}")]
    ThreadPool {
        /// Threads asked for.
        threads: usize,
        /// rayon's error.
        detail: String,
    },
    /// AES-GCM refused a field (only possible past its 64 GiB input limit,
    /// which the batch limits rule out; reported rather than panicking).
    #[error("AES-GCM refused to seal field {item} ({len} bytes)")]
    Seal {
        /// Index of the field in the batch.
        item: usize,
        /// Its plaintext length.
        len: usize,
    },
    /// `--engine gpu` and no GPU engine could be opened.
    #[error("--engine gpu needs a CUDA GPU and its driver, and none is usable: {detail}; use --engine cpu or auto")]
    NoGpu {
        /// Why not (no driver library, no device, NVRTC failed ...).
        detail: String,
    },
    /// A CUDA call failed during a batch on the GPU engine (device memory
    /// exhausted, a kernel fault, the driver gone), or the CUDA bindings
    /// panicked (caught and reported here).
    #[error("the GPU engine failed while {step}: {detail}; the batch was not processed (retry it, or use --engine cpu)")]
    Gpu {
        /// What the engine was doing.
        step: &'static str,
        /// The driver's error.
        detail: String,
    },
    /// The engine's output did not have the layout the batch implies (a bug
    /// in the engine; reported rather than panicking).
    #[error("engine output layout mismatch at field {item}: {detail}")]
    Layout {
        /// Index of the field where it was noticed.
        item: usize,
        /// What did not match.
        detail: &'static str,
    },
}

/// Batch AES-256-GCM in the sealed-field format, implemented by each engine.
///
/// Both calls take the whole batch and return when every field is done.
/// Given the same batch and nonces, every engine returns byte-identical
/// output.
pub trait BulkEngine: Send + Sync {
    /// What this engine is (name, hardware, parallelism).
    fn info(&self) -> EngineInfo;

    /// Short name: `cpu` or `gpu`.
    fn name(&self) -> &'static str {
        self.info().name
    }

    /// Seals every field of `batch`, field `i` under `nonces[i]`.
    /// Output field `i` is `[1][nonces[i]][ciphertext][tag]`, as
    /// `DataKey::seal` writes it. Nonces must never repeat under one key:
    /// use [`random_nonces`] unless reproducing a known output.
    fn seal_batch(
        &self,
        batch: &SealBatch,
        nonces: &[FieldNonce],
    ) -> Result<SealedBatch, BulkError>;

    /// Opens every field of `batch`. A field that is truncated, of an unknown
    /// format or does not authenticate is a [`FieldFailure`] for that field
    /// alone (its index, user and column); the rest open. `Err` only when
    /// the engine itself could not run.
    fn open_batch(&self, batch: &OpenBatch) -> Result<OpenedBatch, BulkError>;
}
