//! The backup Job's Citus restore point (tier 3 and up,
//! `builders::backup::RESTORE_POINT_SCRIPT`), run by `sh` with `psql` as the Job
//! runs it: on a Citus cluster it makes one named restore point on the coordinator
//! and every worker; on plain PostgreSQL it does nothing and does not fail.

use std::path::Path;
use std::process::Command;

use umstore_e2e::localpg::LocalCluster;
use umstore_e2e::Citus;
use umstore_operator::builders::backup::RESTORE_POINT_SCRIPT;

/// Runs the script against `node`'s `dbname` over its socket as its superuser;
/// returns the restore point it exported (empty when none).
fn run_against(node: &LocalCluster, dbname: &str) -> String {
    let bindir = node.binaries().bindir.display().to_string();
    let path = format!("{bindir}:{}", std::env::var("PATH").unwrap_or_default());
    let out = Command::new("/bin/sh")
        .args([
            "-c",
            &format!("set -eu\n{RESTORE_POINT_SCRIPT}echo \"point=${{UMSTORE_RESTORE_POINT:-}}\""),
        ])
        .env("PATH", path)
        .env("PGHOST", node.socket_dir())
        .env("PGPORT", node.port().to_string())
        .env("PGUSER", node.superuser())
        .env("PGDATABASE", dbname)
        .output()
        .expect("run the script");
    assert!(
        out.status.success(),
        "the restore point script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("point="))
        .unwrap_or_default()
        .to_string()
}

fn log_of(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn without_citus_no_restore_point_is_made_and_nothing_fails() {
    let pg = umstore_e2e::shared()
        .postgres()
        .expect("PostgreSQL (scripts/install-deps.sh installs it)");
    assert_eq!(run_against(pg.primary(), "postgres"), "");
}

#[test]
fn on_citus_one_named_restore_point_is_made_on_every_node() {
    let Some(citus) = Citus::start_or_skip() else {
        return;
    };
    let point = run_against(citus.coordinator(), "postgres");
    assert!(
        point.starts_with("umstore-") && point.ends_with('Z') && point.len() == 24,
        "a point named by time: {point:?}"
    );
    let created = format!("restore point \"{point}\" created");
    assert!(
        log_of(citus.coordinator().log_path()).contains(&created),
        "the coordinator logged {created}"
    );
    for worker in citus.workers() {
        assert!(
            log_of(worker.log_path()).contains(&created),
            "worker {} logged {created}",
            worker.port()
        );
    }
}
