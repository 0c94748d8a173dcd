//! The bootstrap and migrate steps against a real PostgreSQL that checks passwords
//! (scram-sha-256 on TCP), as the coordinator does: the login users the data plane
//! and the other clients use connect with the passwords of their Secrets, get their
//! purpose's grants, and a second run changes nothing.

use std::io::Write;

use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use umstore_crds::MigrationPolicy;
use umstore_data_plane::crypto::{DataKeyCache, KeyProvider, Keyring, LocalKeyProvider};
use umstore_e2e::Postgres;
use umstore_migrations::{MigrateError, Runner, PII_COLUMNS};
use umstore_operator::builders::credentials::{generate_password, Credentials, Role};
use umstore_operator::db::Connector;
use umstore_operator::steps::bootstrap::{bootstrap, ensure_database, scram_verifier};
use umstore_operator::steps::migrate::{migrate, Migrated};

const HOST: &str = "pilot-coordinator.umstore.svc";

/// A dedicated server (roles are cluster-wide, so not the shared one) whose TCP
/// connections need a password, with a `postgres` superuser as in the image.
async fn password_checking_server(admin_password: &str) -> (Postgres, Connector) {
    let pg = Postgres::start_with_replicas(0).expect("start PostgreSQL");
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

    match migrate(&mut client, MigrationPolicy::Auto)
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
    match migrate(&mut client, MigrationPolicy::Auto)
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

    match migrate(&mut client, MigrationPolicy::Manual)
        .await
        .expect("check")
    {
        Migrated::Pending {
            versions,
            applied_version,
        } => {
            assert_eq!(versions.len(), Runner::default().migrations().len());
            assert_eq!(applied_version, None);
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

    migrate(&mut client, MigrationPolicy::Auto)
        .await
        .expect("apply");
    client
        .batch_execute("UPDATE umstore.schema_migrations SET checksum = 'edited' WHERE version = 1")
        .await
        .expect("tamper");
    match migrate(&mut client, MigrationPolicy::Auto)
        .await
        .expect("check")
    {
        Migrated::Refused(MigrateError::ChecksumMismatch { version, .. }) => assert_eq!(version, 1),
        other => panic!("expected a refusal naming migration 1, got {other:?}"),
    }
}
