//! Tests that run a real server (skipped, with a message, where PostgreSQL is missing;
//! failed instead under `UMSTORE_REQUIRE_COMPONENTS`, as in CI).

use std::net::TcpListener;
use std::time::Duration;

use crate::*;

/// The PostgreSQL binaries, or `None` after saying why the test skips. This is the
/// harness's `skip_or_fail` rule, inline because this crate cannot depend on the
/// harness: under `UMSTORE_REQUIRE_COMPONENTS` (set, and not empty, `0`, `false` or
/// `no`) a missing server fails the test; otherwise the skip is printed and appended
/// to the `UMSTORE_SKIP_LOG` file when that is set.
fn binaries_or_skip() -> Option<PgBinaries> {
    const REQUIRE_ENV: &str = "UMSTORE_REQUIRE_COMPONENTS";
    let e = match PgBinaries::discover() {
        Ok(bins) => return Some(bins),
        Err(e) => e,
    };
    let required = std::env::var(REQUIRE_ENV)
        .is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "no"));
    if required {
        panic!("postgresql is required ({REQUIRE_ENV} is set) but missing: {e}");
    }
    eprintln!("skipping (postgresql): {e}");
    if let Some(path) = std::env::var_os("UMSTORE_SKIP_LOG").filter(|p| !p.is_empty()) {
        let test = std::thread::current().name().unwrap_or("?").to_owned();
        let reason = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let line = format!("umstore_localpg::{test}\tpostgresql\t{reason}\n");
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
    }
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// A temp dir under /tmp, handed to postgres when we are root.
fn postgres_tempdir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("umstore-localpg-")
        .tempdir_in("/tmp")
        .unwrap();
    chown_to_postgres_if_root(dir.path()).unwrap();
    dir
}

fn test_options(port: u16) -> ClusterOptions {
    ClusterOptions {
        port,
        listen_tcp: true,
        durable: false,
        start_timeout: Duration::from_secs(30),
        stop_timeout: Duration::from_secs(10),
        ..ClusterOptions::default()
    }
}

#[test]
fn cluster_initialises_starts_answers_and_stops() {
    let Some(bins) = binaries_or_skip() else {
        return;
    };
    let dir = postgres_tempdir();
    let port = free_port();
    let mut cluster =
        LocalCluster::init_or_reuse(&bins, &dir.path().join("pg"), test_options(port)).unwrap();
    cluster.start().unwrap();
    assert_eq!(cluster.psql("postgres", "SELECT 1").unwrap(), "1");
    assert_eq!(
        cluster
            .psql("postgres", "SHOW shared_preload_libraries")
            .unwrap(),
        "pg_stat_statements"
    );
    assert_eq!(cluster.psql("postgres", "SHOW fsync").unwrap(), "off");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
    let conninfo = cluster.conninfo("postgres");
    assert!(conninfo.contains(&format!("port={port}")));
    assert!(conninfo.contains("user=umstore"));

    cluster.stop();
    assert!(!cluster.is_running());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());

    // Reuse keeps the data: no second initdb.
    cluster.psql("postgres", "SELECT 1").unwrap_err();
    drop(cluster);
    let mut again =
        LocalCluster::init_or_reuse(&bins, &dir.path().join("pg"), test_options(port)).unwrap();
    again.start().unwrap();
    assert_eq!(again.psql("postgres", "SELECT 2").unwrap(), "2");
}

#[test]
fn start_succeeds_after_the_previous_server_was_killed() {
    let Some(bins) = binaries_or_skip() else {
        return;
    };
    let dir = postgres_tempdir();
    let data = dir.path().join("pg");
    let mut cluster = LocalCluster::init_or_reuse(&bins, &data, test_options(free_port())).unwrap();
    cluster.start().unwrap();
    cluster
        .psql(
            "postgres",
            "SET synchronous_commit = on; CREATE TABLE survives (x int); INSERT INTO survives VALUES (7)",
        )
        .unwrap();
    let pid = cluster.pid().unwrap();
    // SAFETY: pid is our own child.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while cluster.is_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "SIGKILL not delivered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        data.join("postmaster.pid").exists(),
        "stale pid file expected"
    );
    // The same handle notices the crash and starts again, recovering the data.
    cluster.start().unwrap();
    assert_ne!(cluster.pid(), Some(pid));
    assert_eq!(
        cluster.psql("postgres", "SELECT x FROM survives").unwrap(),
        "7"
    );

    // And a fresh handle (as after a crash of the embedding process) works too.
    let pid = cluster.pid().unwrap();
    // SAFETY: pid is our own child.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let _ = cluster.child.take().map(|mut c| c.wait());
    let mut fresh = LocalCluster::init_or_reuse(&bins, &data, test_options(free_port())).unwrap();
    fresh.start().unwrap();
    assert_eq!(
        fresh.psql("postgres", "SELECT x FROM survives").unwrap(),
        "7"
    );
}

#[test]
fn startup_failure_reports_the_server_log() {
    let Some(bins) = binaries_or_skip() else {
        return;
    };
    let dir = postgres_tempdir();
    let mut opts = test_options(free_port());
    opts.settings
        .push(("shared_buffers".into(), "not-a-size".into()));
    let mut cluster = LocalCluster::init_or_reuse(&bins, &dir.path().join("pg"), opts).unwrap();
    let err = cluster.start().unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, LocalPgError::ExitedDuringStartup { .. }),
        "{msg}"
    );
    assert!(msg.contains("shared_buffers"), "{msg}");
}

#[test]
fn replica_streams_from_primary() {
    let Some(bins) = binaries_or_skip() else {
        return;
    };
    let dir = postgres_tempdir();
    let mut primary = LocalCluster::init_or_reuse(
        &bins,
        &dir.path().join("primary"),
        test_options(free_port()),
    )
    .unwrap();
    primary.start().unwrap();
    let mut replica = LocalCluster::init_replica(
        &bins,
        &primary.conninfo("postgres"),
        &dir.path().join("replica"),
        test_options(free_port()),
    )
    .unwrap();
    replica.start().unwrap();
    assert_eq!(
        replica
            .psql("postgres", "SELECT pg_is_in_recovery()")
            .unwrap(),
        "t"
    );
}
