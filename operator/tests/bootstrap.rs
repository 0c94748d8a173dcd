//! The bootstrap and migrate steps against a real PostgreSQL that checks passwords
//! (scram-sha-256 on TCP), as the coordinator does: the login users the data plane
//! and the other clients use connect with the passwords of their Secrets, get their
//! purpose's grants (the administrator login a member of `umstore_admin`, no
//! superuser), and a second run changes nothing. The replica lag probe reads a real
//! primary's `pg_stat_replication` with streaming replicas.

use std::io::Write;

use k8s_openapi::api::core::v1::Pod;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use umstore_crds::{MigrationPolicy, ReplicaLag};
use umstore_data_plane::crypto::{DataKeyCache, KeyProvider, Keyring, LocalKeyProvider};
use umstore_e2e::Postgres;
use umstore_migrations::{MigrateError, Runner, PII_COLUMNS};
use umstore_operator::builders::credentials::{generate_password, Credentials, Role};
use umstore_operator::db::Connector;
use umstore_operator::meta::REPLICA_POOL_LABEL;
use umstore_operator::steps::bootstrap::{bootstrap, ensure_database, scram_verifier};
use umstore_operator::steps::migrate::{migrate, Approval, Migrated};
use umstore_operator::steps::{lag, views};

const HOST: &str = "pilot-coordinator.umstore.svc";

/// A dedicated server (roles are cluster-wide, so not the shared one) whose TCP
/// connections need a password, with a `postgres` superuser as in the image.
async fn password_checking_server(admin_password: &str) -> (Postgres, Connector) {
    password_checking_server_with_replicas(admin_password, 0).await
}

/// [`password_checking_server`] whose first replica use clones `replicas`
/// streaming replicas (over the unix socket, which stays trusted).
async fn password_checking_server_with_replicas(
    admin_password: &str,
    replicas: usize,
) -> (Postgres, Connector) {
    let pg = Postgres::start_with_replicas(replicas).expect("start PostgreSQL");
    let local = pg
        .connect("postgres")
        .await
        .expect("connect over the socket");
    let verifier = scram_verifier(admin_password);
    let sql: String = local
        .query_one(
            "SELECT format('CREATE ROLE postgres SUPERUSER LOGIN PASSWORD %L', $1::text)",
            &[&verifier],
        )
        .await
        .expect("quote")
        .get(0);
    local.batch_execute(&sql).await.expect("create postgres");
    let hba: String = local
        .query_one("SHOW hba_file", &[])
        .await
        .expect("hba_file")
        .get(0);
    let mut f = std::fs::File::create(&hba).expect("rewrite pg_hba.conf");
    writeln!(f, "local all all trust").expect("write");
    writeln!(f, "local replication all trust").expect("write");
    writeln!(f, "host all all 127.0.0.1/32 scram-sha-256").expect("write");
    drop(f);
    local
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let connector =
        Connector::in_cluster().with_address(HOST, 5432, ("127.0.0.1".to_string(), pg.port()));
    (pg, connector)
}

fn credentials() -> Credentials {
    Credentials {
        passwords: Role::ALL
            .iter()
            .map(|r| (*r, generate_password().expect("password")))
            .collect(),
        ..Credentials::default()
    }
}

async fn login(pg: &Postgres, role: Role, password: &str) -> Result<Client, tokio_postgres::Error> {
    let conninfo = format!(
        "host=127.0.0.1 port={} dbname=umstore user={} password={password}",
        pg.port(),
        role.user()
    );
    let (client, connection) = tokio_postgres::connect(&conninfo, NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

#[tokio::test]
async fn bootstrap_and_migrate_give_each_client_a_working_login_and_rerun_as_no_ops() {
    let creds = credentials();
    let (pg, connector) = password_checking_server(creds.password(Role::Admin)).await;
    let admin = creds.password(Role::Admin);

    // The maintenance connection creates the database, once.
    let maintenance = connector
        .connect(HOST, 5432, "postgres", "postgres", admin)
        .await
        .expect("admin connects with the admin Secret's password");
    assert!(ensure_database(&maintenance)
        .await
        .expect("create database"));
    assert!(!ensure_database(&maintenance).await.expect("exists"));
    assert!(
        connector
            .connect(HOST, 5432, "postgres", "postgres", "not-the-password")
            .await
            .is_err(),
        "the server must check passwords for this test to mean anything"
    );

    let mut client = connector
        .connect(HOST, 5432, "umstore", "postgres", admin)
        .await
        .expect("connect to umstore");
    let first = bootstrap(&mut client, &creds, 1).await.expect("bootstrap");
    assert!(first
        .roles_created
        .contains(&"umstore_writer_login".to_string()));
    assert!(first.roles_created.contains(&"umstore_writer".to_string()));
    assert!(first.extensions.contains(&"pg_stat_statements".to_string()));
    assert_eq!(first.memberships.len(), Role::CLIENTS.len());

    match migrate(&mut client, MigrationPolicy::Auto, &Approval::None)
        .await
        .expect("migrate")
    {
        Migrated::Current { applied, version } => {
            assert_eq!(version, Runner::default().latest_version());
            assert_eq!(applied.len(), Runner::default().migrations().len());
        }
        other => panic!("expected the schema to be migrated, got {other:?}"),
    }

    // Nothing changes on a second run.
    let second = bootstrap(&mut client, &creds, 1)
        .await
        .expect("bootstrap again");
    assert!(!second.changed(), "second bootstrap changed {second:?}");
    match migrate(&mut client, MigrationPolicy::Auto, &Approval::None)
        .await
        .expect("migrate again")
    {
        Migrated::Current { applied, .. } => assert!(applied.is_empty()),
        other => panic!("expected no migration, got {other:?}"),
    }

    // The writer logs in with its Secret's password and writes; a wrong password fails.
    let writer = login(&pg, Role::Writer, creds.password(Role::Writer))
        .await
        .expect("writer logs in");
    writer
        .execute(
            "INSERT INTO umstore.user_directory (user_id, region) VALUES (gen_random_uuid(), 'KA')",
            &[],
        )
        .await
        .expect("the writer may write the directory");
    let version: i32 = writer
        .query_one("SELECT max(version) FROM umstore.schema_migrations", &[])
        .await
        .expect("the writer may read the schema version (the data plane waits on it)")
        .get(0);
    assert_eq!(version as u32, Runner::default().latest_version());
    // What the data plane does at start as the writer: open the keyring (the
    // blind-index key is created and stored wrapped) and create a user's data key.
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let provider = KeyProvider::Local(Box::new(
        LocalKeyProvider::open_or_create(keys_dir.path()).expect("local key file"),
    ));
    let keyring = Keyring::open(
        provider,
        DataKeyCache::new(100, std::time::Duration::from_secs(60)),
        &writer,
    )
    .await
    .expect("the writer may open the keyring");
    let user: uuid::Uuid = writer
        .query_one("SELECT user_id FROM umstore.user_directory LIMIT 1", &[])
        .await
        .expect("the writer reads the directory")
        .get(0);
    keyring
        .create_user_key(&writer, user, "KA")
        .await
        .expect("the writer may store a wrapped data key");

    // The stats views: none refreshed yet; the writer (the data plane's refresher)
    // refreshes them; the operator's connection reads when, for status.statsViews.
    let unrefreshed = views::refreshes(&mut client, views::TIMEOUT)
        .await
        .expect("the operator reads the refresh log");
    assert!(unrefreshed.is_empty(), "{unrefreshed:?}");
    let refreshed: bool = writer
        .query_one(
            "SELECT refreshed FROM umstore.refresh_stats_views(true)",
            &[],
        )
        .await
        .expect("the writer may refresh the stats views")
        .get(0);
    assert!(refreshed);
    let refreshes = views::refreshes(&mut client, views::TIMEOUT)
        .await
        .expect("the operator reads the refresh log");
    assert_eq!(
        refreshes
            .iter()
            .map(|v| v.name.as_str())
            .collect::<Vec<_>>(),
        ["stats_groups"]
    );
    assert_eq!(refreshes[0].groups, 0, "no user has metadata yet");
    let at: k8s_openapi::jiff::Timestamp = refreshes[0]
        .refreshed_at
        .parse()
        .expect("refreshedAt is RFC 3339");
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(at);
    assert!(
        age.as_secs() < 60 && age.as_secs() >= 0,
        "refreshed just now, not {age:?} ago"
    );

    let Err(refused) = login(&pg, Role::Writer, "wrong").await else {
        panic!("a wrong password must be refused");
    };
    assert_eq!(refused.code(), Some(&SqlState::INVALID_PASSWORD));

    // Analytics logs in and sees no PII column.
    let analytics = login(&pg, Role::Analytics, creds.password(Role::Analytics))
        .await
        .expect("analytics logs in");
    let denied = analytics
        .query(
            &format!(
                "SELECT {} FROM umstore.user_metadata LIMIT 1",
                PII_COLUMNS[0]
            ),
            &[],
        )
        .await
        .expect_err("analytics must not read PII");
    assert_eq!(denied.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    // The administrator login (the API's admin purpose) logs in with its Secret's
    // password as a member of umstore_admin, not as a superuser, and reads every
    // column.
    let admin_login = login(&pg, Role::AdminLogin, creds.password(Role::AdminLogin))
        .await
        .expect("the admin login logs in");
    let row = admin_login
        .query_one(
            "SELECT current_user::text, rolsuper, rolcreaterole, rolcreatedb, rolreplication, \
                    rolbypassrls, pg_has_role(current_user, 'umstore_admin', 'MEMBER') \
               FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .expect("the admin login reads its own role");
    assert_eq!(row.get::<_, String>(0), "umstore_admin_login");
    let attributes: [bool; 5] = [row.get(1), row.get(2), row.get(3), row.get(4), row.get(5)];
    assert_eq!(
        attributes, [false; 5],
        "no superuser, createrole, createdb, replication or bypassrls"
    );
    assert!(row.get::<_, bool>(6), "a member of umstore_admin");
    admin_login
        .query(
            &format!(
                "SELECT {} FROM umstore.user_metadata LIMIT 1",
                PII_COLUMNS[0]
            ),
            &[],
        )
        .await
        .expect("the admin purpose reads every column");
    assert!(
        first
            .memberships
            .contains(&"umstore_admin to umstore_admin_login".to_string()),
        "{:?}",
        first.memberships
    );

    // A password changed by hand is put back to the Secret's, and only that one.
    client
        .batch_execute("ALTER ROLE umstore_ai_login PASSWORD 'changed-by-hand'")
        .await
        .expect("alter");
    assert!(login(&pg, Role::Ai, creds.password(Role::Ai))
        .await
        .is_err());
    let repaired = bootstrap(&mut client, &creds, 1)
        .await
        .expect("bootstrap repairs");
    assert_eq!(repaired.passwords_set, vec!["umstore_ai_login".to_string()]);
    login(&pg, Role::Ai, creds.password(Role::Ai))
        .await
        .expect("ai logs in again with its Secret's password");
}

#[tokio::test]
async fn manual_policy_applies_nothing_and_a_changed_migration_is_refused() {
    let creds = credentials();
    let (_pg, connector) = password_checking_server(creds.password(Role::Admin)).await;
    let admin = creds.password(Role::Admin);
    let maintenance = connector
        .connect(HOST, 5432, "postgres", "postgres", admin)
        .await
        .expect("connect");
    ensure_database(&maintenance).await.expect("database");
    let mut client = connector
        .connect(HOST, 5432, "umstore", "postgres", admin)
        .await
        .expect("connect to umstore");
    bootstrap(&mut client, &creds, 1).await.expect("bootstrap");

    match migrate(&mut client, MigrationPolicy::Manual, &Approval::None)
        .await
        .expect("check")
    {
        Migrated::Pending {
            versions,
            applied_version,
            applied,
        } => {
            assert_eq!(versions.len(), Runner::default().migrations().len());
            assert_eq!(applied_version, None);
            assert!(applied.is_empty());
        }
        other => panic!("expected pending migrations, got {other:?}"),
    }
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'umstore'",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert_eq!(tables, 0, "Manual must not apply anything");

    migrate(&mut client, MigrationPolicy::Auto, &Approval::None)
        .await
        .expect("apply");
    client
        .batch_execute("UPDATE umstore.schema_migrations SET checksum = 'edited' WHERE version = 1")
        .await
        .expect("tamper");
    match migrate(&mut client, MigrationPolicy::Auto, &Approval::None)
        .await
        .expect("check")
    {
        Migrated::Refused(MigrateError::ChecksumMismatch { version, .. }) => assert_eq!(version, 1),
        other => panic!("expected a refusal naming migration 1, got {other:?}"),
    }
}

#[tokio::test]
async fn manual_migrations_apply_up_to_the_approved_version_and_no_further() {
    let creds = credentials();
    let (_pg, connector) = password_checking_server(creds.password(Role::Admin)).await;
    let admin = creds.password(Role::Admin);
    let maintenance = connector
        .connect(HOST, 5432, "postgres", "postgres", admin)
        .await
        .expect("connect");
    ensure_database(&maintenance).await.expect("database");
    let mut client = connector
        .connect(HOST, 5432, "umstore", "postgres", admin)
        .await
        .expect("connect to umstore");
    bootstrap(&mut client, &creds, 1).await.expect("bootstrap");
    let runner = Runner::default();
    let latest = runner.latest_version();

    // An approval naming no migration applies nothing and says so.
    let unknown = Approval::parse(Some("v3"), &runner);
    assert_eq!(unknown, Approval::Unknown("v3".into()));
    assert_eq!(
        Approval::parse(Some(&(latest + 1).to_string()), &runner),
        Approval::Unknown((latest + 1).to_string())
    );
    match migrate(&mut client, MigrationPolicy::Manual, &unknown)
        .await
        .expect("check")
    {
        Migrated::ApprovalUnknown {
            value, versions, ..
        } => {
            assert_eq!(value, "v3");
            assert_eq!(versions.len(), runner.migrations().len());
        }
        other => panic!("expected ApprovalUnknown, got {other:?}"),
    }

    // Approved up to 3: 1, 2 and 3 are applied, the rest stay pending.
    let approval = Approval::parse(Some("3"), &runner);
    assert_eq!(approval, Approval::UpTo(3));
    match migrate(&mut client, MigrationPolicy::Manual, &approval)
        .await
        .expect("apply the approved")
    {
        Migrated::Pending {
            versions,
            applied_version,
            applied,
        } => {
            assert_eq!(applied.len(), 3, "{applied:?}");
            assert!(applied[0].starts_with("1 ("), "{applied:?}");
            assert_eq!(applied_version, Some(3));
            assert_eq!(versions, (4..=latest).collect::<Vec<_>>());
        }
        other => panic!("expected the rest pending, got {other:?}"),
    }
    let applied: i64 = client
        .query_one("SELECT count(*) FROM umstore.schema_migrations", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(applied, 3, "nothing past the approved version");
    // The same approval again applies nothing more.
    match migrate(&mut client, MigrationPolicy::Manual, &approval)
        .await
        .expect("again")
    {
        Migrated::Pending { applied, .. } => assert!(applied.is_empty()),
        other => panic!("expected pending, got {other:?}"),
    }

    // Approving the latest brings the schema current.
    let all = Approval::parse(Some(&latest.to_string()), &runner);
    match migrate(&mut client, MigrationPolicy::Manual, &all)
        .await
        .expect("apply the rest")
    {
        Migrated::Current { applied, version } => {
            assert_eq!(version, latest);
            assert_eq!(applied.len() as u32, latest - 3);
        }
        other => panic!("expected current, got {other:?}"),
    }
}

/// The pods of a tier-2 store the probe is given: a coordinator, two `ai` pool
/// members (only the first streams) and nothing else.
fn pool_pods() -> Vec<Pod> {
    [
        ("pilot-coordinator-0", None),
        ("pilot-replica-ai-0", Some("ai")),
        ("pilot-replica-ai-1", Some("ai")),
    ]
    .into_iter()
    .map(|(name, pool)| {
        let mut labels = serde_json::json!({"umstore.io/patroni-scope": "pilot-coordinator"});
        if let Some(pool) = pool {
            labels[REPLICA_POOL_LABEL] = pool.into();
        }
        serde_json::from_value(serde_json::json!({"metadata": {"name": name, "labels": labels}}))
            .expect("pod")
    })
    .collect()
}

/// Names replica `index`'s replication connection `name`, as Patroni names each
/// member's after its pod, and waits until the primary shows it streaming.
async fn name_standby(pg: &Postgres, primary: &Client, index: usize, name: &str) {
    let replica = umstore_e2e::connect(&pg.replica(index).expect("replica").conninfo("postgres"))
        .await
        .expect("connect to the replica");
    let conninfo: String = replica
        .query_one("SHOW primary_conninfo", &[])
        .await
        .expect("primary_conninfo")
        .get(0);
    let sql: String = replica
        .query_one(
            "SELECT format('ALTER SYSTEM SET primary_conninfo = %L', $1::text)",
            &[&format!("{conninfo} application_name={name}")],
        )
        .await
        .expect("quote")
        .get(0);
    replica.batch_execute(&sql).await.expect("alter system");
    replica
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let streaming = primary
            .query_opt(
                "SELECT 1 FROM pg_stat_replication \
                  WHERE application_name = $1 AND state = 'streaming'",
                &[&name],
            )
            .await
            .expect("pg_stat_replication")
            .is_some();
        if streaming {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica {index} never streamed as {name}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Measures until `done` holds of the measurement (30 s at most); returns it.
async fn eventually(
    client: &mut Client,
    pods: &[Pod],
    done: impl Fn(&[ReplicaLag]) -> bool,
) -> Vec<ReplicaLag> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let lag = lag::measure(client, pods, lag::TIMEOUT)
            .await
            .expect("measured");
        if done(&lag) {
            return lag;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the measurement never got there: {lag:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn replica_lag_of_each_streaming_pool_member_comes_from_the_primary() {
    let creds = credentials();
    let (pg, connector) =
        password_checking_server_with_replicas(creds.password(Role::Admin), 2).await;
    pg.replicas().expect("two streaming replicas");
    // As the operator connects after bootstrap: the superuser, over TCP, with the
    // admin Secret's password.
    let superuser = || {
        connector.connect(
            HOST,
            5432,
            "postgres",
            "postgres",
            creds.password(Role::Admin),
        )
    };
    let mut client = superuser().await.expect("connect as the superuser");
    // Replica 0 is the pool member pilot-replica-ai-0; replica 1 keeps PostgreSQL's
    // default name and is no pool member (like a coordinator standby).
    name_standby(&pg, &client, 0, "pilot-replica-ai-0").await;
    let pods = pool_pods();

    // Replay paused on the member, WAL written on the primary: it is behind.
    let member = umstore_e2e::connect(&pg.replica(0).expect("replica").conninfo("postgres"))
        .await
        .expect("connect to the member");
    member
        .batch_execute("SELECT pg_wal_replay_pause()")
        .await
        .expect("pause replay");
    client
        .batch_execute("CREATE TABLE lag_probe AS SELECT generate_series(1, 20000) AS n")
        .await
        .expect("write on the primary");
    // The member reports its positions once the WAL reaches it.
    let behind = eventually(&mut client, &pods, |lag| {
        lag.first().is_some_and(|l| l.lag_bytes > 0)
    })
    .await;
    assert_eq!(behind.len(), 1, "only the streaming member: {behind:?}");
    assert_eq!(
        (behind[0].pool.as_str(), behind[0].pod.as_str()),
        ("ai", "pilot-replica-ai-0")
    );

    // Replay resumed: it catches up to no lag at all.
    member
        .batch_execute("SELECT pg_wal_replay_resume()")
        .await
        .expect("resume replay");
    let caught_up = eventually(&mut client, &pods, |lag| {
        lag.first().is_some_and(|l| l.lag_bytes == 0)
    })
    .await;
    assert_eq!(caught_up.len(), 1, "{caught_up:?}");
    assert_eq!(caught_up[0].lag_seconds, Some(0.0), "{caught_up:?}");

    // A member that stops streaming is absent, not reported with a stale value.
    drop(member);
    let mut pg = pg;
    pg.stop_replica(0).expect("stop the member");
    eventually(&mut client, &pods, <[ReplicaLag]>::is_empty).await;

    // A probe cut short by its timeout gives nothing and leaves the connection
    // usable and outside any transaction for the migrate step that follows. A
    // session holding pg_stat_replication locked makes the probe wait for sure,
    // so it ends by its timeout: ours, or the server's statement_timeout, which
    // races it by a round trip or two.
    let locker = superuser().await.expect("connect a second session");
    locker
        .batch_execute("BEGIN; LOCK TABLE pg_catalog.pg_stat_replication IN ACCESS EXCLUSIVE MODE")
        .await
        .expect("lock pg_stat_replication");
    let probe = std::time::Duration::from_millis(200);
    match lag::standbys(&mut client, probe).await {
        Err(lag::LagError::Timeout(_)) => {}
        Err(lag::LagError::Database(error)) => assert!(
            format!("{error:#}").contains("statement timeout"),
            "the probe failed for another reason than its timeout: {error:#}"
        ),
        Ok(standbys) => panic!("the probe read a locked view: {standbys:?}"),
    }
    assert_eq!(
        lag::measure(&mut client, &pods, probe).await,
        None,
        "not measured: the status keeps the last measurement"
    );
    locker.batch_execute("COMMIT").await.expect("unlock");
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    // One simple-protocol statement: outside a transaction block it is its own
    // transaction, so both clocks read its start.
    let outside = client
        .simple_query("SELECT now() = statement_timestamp()")
        .await
        .expect("the connection still answers")
        .into_iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
            _ => None,
        });
    assert_eq!(
        outside.as_deref(),
        Some("t"),
        "no transaction left open by the cut-short probe"
    );
    let timeout: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .expect("statement_timeout")
        .get(0);
    assert_eq!(
        timeout, "0",
        "the probe's statement_timeout was local to it"
    );
}
