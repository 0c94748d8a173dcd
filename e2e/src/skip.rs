//! What a test does when a component it needs is not on this machine.
//!
//! On a developer's machine it skips: it prints why and returns (passing). In CI,
//! where `scripts/install-deps.sh --test` installed or built everything, a missing
//! component is a broken install, so with `UMSTORE_REQUIRE_COMPONENTS=1` the test
//! fails with the same message instead. Three components are exempt and may still skip
//! there: Citus (not in any package registry; built from source where wanted), a
//! real cluster (`KUBECONFIG`) and a CUDA GPU, which CI does not have.
//!
//! Every skip is also appended, as one line, to the file named by `UMSTORE_SKIP_LOG`
//! when it is set (`.ci/run` prints that file's lines at the end), because cargo hides
//! a passing test's output.
//!
//! ```no_run
//! use umstore_e2e::skip::{skip_or_fail, Component};
//! # fn helm() -> Option<std::path::PathBuf> { None }
//! let Some(helm) = helm() else {
//!     skip_or_fail(Component::Helm, "no helm binary ($HELM or PATH)");
//!     return;
//! };
//! ```

use std::fmt;
use std::io::Write;

/// The variable that turns a skip of a non-exempt component into a failure.
pub const REQUIRE_ENV: &str = "UMSTORE_REQUIRE_COMPONENTS";
/// The variable naming the file each skip is appended to.
pub const LOG_ENV: &str = "UMSTORE_SKIP_LOG";

/// Something a test needs from the machine, which may be missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// PostgreSQL 15 server binaries (`initdb`, `postgres`).
    Postgres,
    /// `pgbouncer`.
    PgBouncer,
    /// `pgbackrest`.
    PgBackRest,
    /// The `openssl` CLI (test certificates and keys).
    OpenSsl,
    /// OpenBao's `bao` binary.
    OpenBao,
    /// kube-apiserver and etcd, built from their Go modules.
    KubeApiServer,
    /// kube-controller-manager, kube-scheduler and kwok (with its stage files), built
    /// from their Go modules, beside a [`Self::KubeApiServer`].
    ControlPlane,
    /// `helm`, built from its Go module.
    Helm,
    /// Patroni (`scripts/install-deps.sh --test` puts it in a venv).
    Patroni,
    /// Citus (`citus.so`): exempt, it is in no package registry.
    Citus,
    /// A real Kubernetes cluster (`KUBECONFIG`): exempt, CI has none.
    Cluster,
    /// The system C compiler (`$CC` or `cc`; Rust's linker, so CI has it): the GPU
    /// engine's kernels are compiled as C and checked on the CPU with it.
    CCompiler,
    /// A CUDA GPU with its driver and NVRTC (the GPU engine's tests and benchmark):
    /// exempt, CI has none; those tests skip with the reason `GpuEngine::open` gives.
    Gpu,
}

impl Component {
    /// The name printed in messages and the skip log.
    pub fn name(self) -> &'static str {
        match self {
            Self::Postgres => "postgresql",
            Self::PgBouncer => "pgbouncer",
            Self::PgBackRest => "pgbackrest",
            Self::OpenSsl => "openssl",
            Self::OpenBao => "openbao",
            Self::KubeApiServer => "kube-apiserver",
            Self::ControlPlane => "kube-control-plane",
            Self::Helm => "helm",
            Self::Patroni => "patroni",
            Self::Citus => "citus",
            Self::Cluster => "cluster",
            Self::CCompiler => "cc",
            Self::Gpu => "gpu",
        }
    }

    /// Whether a test may skip for want of it even under [`REQUIRE_ENV`].
    pub fn is_exempt(self) -> bool {
        matches!(self, Self::Citus | Self::Cluster | Self::Gpu)
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether [`REQUIRE_ENV`] is set to something other than empty, `0` or `false`.
pub fn components_required() -> bool {
    std::env::var(REQUIRE_ENV)
        .is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "no"))
}

/// The test's skip, or failure: call it, then `return` from the test.
///
/// Without [`REQUIRE_ENV`], or for an exempt component, it prints
/// `skipping (<component>): <reason>` to stderr and appends a line to the
/// [`LOG_ENV`] file. Under [`REQUIRE_ENV`] it panics with
/// `<component> is required (UMSTORE_REQUIRE_COMPONENTS is set) but missing: <reason>`.
#[track_caller]
pub fn skip_or_fail(component: Component, reason: impl fmt::Display) {
    let reason = reason.to_string();
    if components_required() && !component.is_exempt() {
        panic!("{component} is required ({REQUIRE_ENV} is set) but missing: {reason}");
    }
    eprintln!("skipping ({component}): {reason}");
    if let Some(path) = std::env::var_os(LOG_ENV).filter(|p| !p.is_empty()) {
        let line = log_line(&test_name(), component, &reason);
        // One write per line in append mode: concurrent tests do not interleave.
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            eprintln!(
                "could not append to {LOG_ENV}={}: {e}",
                std::path::Path::new(&path).display()
            );
        }
    }
}

/// `<test>\t<component>\t<reason>\n`, the reason on one line.
fn log_line(test: &str, component: Component, reason: &str) -> String {
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    format!("{test}\t{component}\t{reason}\n")
}

/// `<test binary>::<test>`: libtest names each test's thread after the test.
fn test_name() -> String {
    let binary = std::env::current_exe()
        .ok()
        .and_then(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        // Cargo appends `-<hash>` to test binaries.
        .map(|s| match s.rsplit_once('-') {
            Some((name, hash)) if hash.chars().all(|c| c.is_ascii_hexdigit()) => name.to_owned(),
            _ => s,
        })
        .unwrap_or_else(|| "?".to_owned());
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("?");
    format!("{binary}::{test}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_citus_a_real_cluster_and_a_gpu_are_exempt() {
        use Component::*;
        let exempt: Vec<Component> = [
            Postgres,
            PgBouncer,
            OpenSsl,
            OpenBao,
            KubeApiServer,
            ControlPlane,
            Helm,
            Patroni,
            Citus,
            Cluster,
            CCompiler,
            Gpu,
        ]
        .into_iter()
        .filter(|c| c.is_exempt())
        .collect();
        assert_eq!(exempt, [Citus, Cluster, Gpu]);
    }

    #[test]
    fn a_log_line_is_one_line_with_test_component_and_reason() {
        let line = log_line("t::a", Component::Helm, "no helm\n  binary here");
        assert_eq!(line, "t::a\thelm\tno helm binary here\n");
    }
}
