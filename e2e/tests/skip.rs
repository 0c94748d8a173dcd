//! `skip_or_fail` as CI sees it: each case reruns this test binary on one probe test
//! with the environment `.ci/run` sets, and checks the exit status, what it printed
//! and the skip log.

use std::path::Path;
use std::process::{Command, Output};

use umstore_e2e::skip::{skip_or_fail, Component, LOG_ENV, REQUIRE_ENV};

/// Set only in the child processes: which component the probe reports missing.
const PROBE_ENV: &str = "UMSTORE_SKIP_PROBE";

#[test]
fn probe() {
    let component = match std::env::var(PROBE_ENV).as_deref() {
        Ok("helm") => Component::Helm,
        Ok("citus") => Component::Citus,
        Ok("cluster") => Component::Cluster,
        _ => return,
    };
    skip_or_fail(component, "it is not installed on this machine");
}

fn run_probe(component: &str, require: bool, log: &Path) -> Output {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args(["--exact", "probe", "--nocapture", "--test-threads=1"])
        .env(PROBE_ENV, component)
        .env(LOG_ENV, log)
        .env_remove(REQUIRE_ENV);
    if require {
        cmd.env(REQUIRE_ENV, "1");
    }
    cmd.output().expect("rerun the test binary")
}

#[test]
fn a_missing_component_skips_and_is_logged_without_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("skips");
    let out = run_probe("helm", false, &log);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a skip passes: {stderr}");
    assert!(
        stderr.contains("skipping (helm): it is not installed on this machine"),
        "{stderr}"
    );
    let logged = std::fs::read_to_string(&log).expect("skip log written");
    assert!(
        logged.ends_with("::probe\thelm\tit is not installed on this machine\n"),
        "{logged:?}"
    );
    assert_eq!(logged.lines().count(), 1);
}

#[test]
fn a_missing_component_fails_the_test_under_require_components() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("skips");
    let out = run_probe("helm", true, &log);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must fail: {stdout}{stderr}");
    assert!(
        stderr.contains(
            "helm is required (UMSTORE_REQUIRE_COMPONENTS is set) but missing: \
             it is not installed on this machine"
        ),
        "{stderr}"
    );
    assert!(!log.exists(), "a failure is not logged as a skip");
}

#[test]
fn citus_and_a_real_cluster_still_skip_under_require_components() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("skips");
    for component in ["citus", "cluster"] {
        let out = run_probe(component, true, &log);
        assert!(
            out.status.success(),
            "{component} is exempt: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let logged = std::fs::read_to_string(&log).expect("skip log written");
    let components: Vec<&str> = logged
        .lines()
        .filter_map(|l| l.split('\t').nth(1))
        .collect();
    assert_eq!(components, ["citus", "cluster"]);
}
