//! Rendering the chart `charts/umstore-operator` with `helm template`, for the chart
//! and monitoring tests. They need a `helm` binary (`$HELM` or on `PATH`;
//! `scripts/install-deps.sh --test` builds one from its Go module) and skip with
//! [`NO_HELM`] without it, or fail under `UMSTORE_REQUIRE_COMPONENTS=1`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_yaml_ng::Value;

/// Why a rendering test skips.
pub const NO_HELM: &str =
    "no helm binary ($HELM or PATH); scripts/install-deps.sh --test builds one with Go";

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart's directory.
pub fn chart() -> PathBuf {
    repo().join("charts/umstore-operator")
}

/// The helm binary: `$HELM`, else `helm` on `PATH`.
pub fn helm() -> Option<PathBuf> {
    if let Some(h) = std::env::var_os("HELM") {
        return Some(PathBuf::from(h));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("helm"))
        .find(|p| p.is_file())
}

/// `helm template` of the chart with `values` (None: defaults), as parsed documents.
pub fn render(helm: &Path, values: Option<&Path>) -> Vec<Value> {
    let mut args: Vec<String> = Vec::new();
    if let Some(v) = values {
        args.push("--values".into());
        args.push(v.display().to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    try_render(helm, &args).unwrap_or_else(|e| panic!("helm template failed: {e}"))
}

/// `helm template` of the chart (release `umstore` in `umstore-system`, with the
/// CRDs) with extra `args` (`--values`, `--set`): the parsed documents, or helm's
/// error output.
pub fn try_render(helm: &Path, args: &[&str]) -> Result<Vec<Value>, String> {
    let out = Command::new(helm)
        .args([
            "template",
            "umstore",
            "--namespace",
            "umstore-system",
            "--include-crds",
        ])
        .args(["--kube-version", "1.33.0"])
        .arg(chart())
        .args(args)
        .output()
        .expect("run helm");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8(out.stdout).expect("utf-8");
    Ok(text
        .split("\n---")
        .map(|doc| serde_yaml_ng::from_str::<Value>(doc).expect("valid YAML"))
        .filter(|v| !v.is_null())
        .collect())
}

/// A rendered document as a k8s-openapi type.
pub fn typed<T: serde::de::DeserializeOwned>(doc: &Value) -> T {
    serde_yaml_ng::from_value(doc.clone()).unwrap_or_else(|e| panic!("{doc:?} does not parse: {e}"))
}
