//! `--engine auto|cpu|gpu`: which [`BulkEngine`] a command runs its batches on.
//!
//! `cpu` is always there. `gpu` needs a CUDA device and its driver; without
//! them it is a clear error, never a silent fall back to the CPU. `auto`
//! takes the GPU only when one is present and the work is past
//! [`GPU_CROSSOVER_FIELDS`], and says why it chose what it chose.

use std::sync::Arc;

use super::{BulkEngine, BulkError, CpuEngine, GpuEngine};

/// Fields in one batch from which `auto` prefers a present GPU to the CPU
/// cores: below it, launching kernels and moving the batch to the device and
/// back costs more than the CPU engine takes for the whole batch
/// (docs/bulk.md, "Choosing an engine").
pub const GPU_CROSSOVER_FIELDS: usize = 65_536;

/// The `--engine` value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// The GPU when present and the batches are large enough, else the CPU.
    #[default]
    Auto,
    /// The CPU engine on every core.
    Cpu,
    /// The GPU engine; an error when no GPU is usable.
    Gpu,
}

impl EngineChoice {
    /// The value as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineChoice::Auto => "auto",
            EngineChoice::Cpu => "cpu",
            EngineChoice::Gpu => "gpu",
        }
    }
}

impl std::fmt::Display for EngineChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(EngineChoice::Auto),
            "cpu" => Ok(EngineChoice::Cpu),
            "gpu" => Ok(EngineChoice::Gpu),
            other => Err(format!(
                "unknown engine {other:?}: expected auto, cpu or gpu"
            )),
        }
    }
}

/// The engine chosen and why, for the log line a command writes when it
/// starts.
pub struct Selected {
    /// The engine.
    pub engine: Arc<dyn BulkEngine>,
    /// Why this one: `--engine cpu`, `no GPU: ...`, `batches of 5000 fields
    /// are below the GPU crossover of 65536`, ...
    pub reason: String,
}

impl std::fmt::Debug for Selected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Selected")
            .field("engine", &self.engine.info())
            .field("reason", &self.reason)
            .finish()
    }
}

/// Opens the GPU engine, or says why there is none.
fn open_gpu() -> Result<Arc<dyn BulkEngine>, String> {
    match GpuEngine::open() {
        Ok(engine) => Ok(Arc::new(engine)),
        Err(e) => Err(e.to_string()),
    }
}

/// Chooses the engine for `choice` when the command's batches hold about
/// `batch_fields` fields each.
pub fn select(choice: EngineChoice, batch_fields: usize) -> Result<Selected, BulkError> {
    let cpu = || -> Arc<dyn BulkEngine> { Arc::new(CpuEngine::new()) };
    match choice {
        EngineChoice::Cpu => Ok(Selected {
            engine: cpu(),
            reason: "--engine cpu".into(),
        }),
        EngineChoice::Gpu => match open_gpu() {
            Ok(engine) => Ok(Selected {
                engine,
                reason: "--engine gpu".into(),
            }),
            Err(detail) => Err(BulkError::NoGpu { detail }),
        },
        EngineChoice::Auto if batch_fields < GPU_CROSSOVER_FIELDS => Ok(Selected {
            engine: cpu(),
            reason: format!(
                "--engine auto: batches of {batch_fields} fields are below the GPU crossover of \
                 {GPU_CROSSOVER_FIELDS}"
            ),
        }),
        EngineChoice::Auto => match open_gpu() {
            Ok(engine) => Ok(Selected {
                engine,
                reason: format!(
                    "--engine auto: a GPU is present and batches of {batch_fields} fields are \
                     past the crossover of {GPU_CROSSOVER_FIELDS}"
                ),
            }),
            Err(detail) => Ok(Selected {
                engine: cpu(),
                reason: format!("--engine auto: no GPU ({detail})"),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_choices_and_names_them_back() {
        for s in ["auto", "cpu", "gpu"] {
            let c: EngineChoice = s.parse().expect("parses");
            assert_eq!(c.to_string(), s);
        }
        let err = "tpu".parse::<EngineChoice>().expect_err("refused");
        assert!(err.contains("expected auto, cpu or gpu"), "{err}");
    }

    #[test]
    fn cpu_is_always_there_and_auto_keeps_small_batches_on_it() {
        let s = select(EngineChoice::Cpu, 10).expect("cpu");
        assert_eq!(s.engine.name(), "cpu");
        let s = select(EngineChoice::Auto, 10).expect("auto");
        assert_eq!(s.engine.name(), "cpu");
        assert!(s.reason.contains("below the GPU crossover"), "{}", s.reason);
    }
}
