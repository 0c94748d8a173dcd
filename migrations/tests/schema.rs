//! The migrations against a real PostgreSQL 15 started by the e2e harness:
//! each test gets a fresh database.

use tokio_postgres::{Client, NoTls};
use umstore_migrations::regions::REGIONS;
use umstore_migrations::roles::{Purpose, SCHEMA};
use umstore_migrations::{embedded, MigrateError, Migration, MigrationState, Runner};

async fn connect(conninfo: &str) -> Client {
    let (client, connection) = tokio_postgres::connect(conninfo, NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    client
}

/// A fresh, empty database on the shared primary.
async fn fresh_db() -> String {
    umstore_e2e::shared()
        .fresh_database()
        .await
        .expect("fresh database")
        .1
}

async fn migrated_db() -> (String, Client) {
    let conninfo = fresh_db().await;
    let mut client = connect(&conninfo).await;
    Runner::default().up(&mut client).await.expect("migrate up");
    (conninfo, client)
}

async fn count(client: &Client, sql: &str) -> i64 {
    client.query_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test]
async fn up_creates_schema_and_a_second_run_applies_nothing() {
    let conninfo = fresh_db().await;
    let mut client = connect(&conninfo).await;
    let runner = Runner::default();
    assert_eq!(
        runner.pending(&client).await.expect("pending").len(),
        embedded().len()
    );

    let first = runner.up(&mut client).await.expect("first up");
    assert_eq!(first.applied.len(), embedded().len());
    assert_eq!(first.already_applied, 0);
    let second = runner.up(&mut client).await.expect("second up");
    assert!(
        second.applied.is_empty(),
        "second run applied {:?}",
        second.applied
    );
    assert_eq!(second.already_applied, embedded().len());
    runner.verify(&client).await.expect("verify");

    let recorded = client
        .query("SELECT version, name, checksum, duration_ms FROM umstore.schema_migrations ORDER BY version", &[])
        .await
        .expect("records");
    assert_eq!(recorded.len(), embedded().len());
    for (row, m) in recorded.iter().zip(embedded()) {
        assert_eq!(row.get::<_, i32>(0) as u32, m.version);
        assert_eq!(row.get::<_, &str>(1), m.name);
        assert_eq!(row.get::<_, &str>(2), m.checksum());
        assert!(row.get::<_, i64>(3) >= 0);
    }
    for table in [
        "user_metadata",
        "user_derived_attributes",
        "user_risk_scores",
        "user_eligibility_cache",
        "user_metadata_history",
        "user_data_keys",
        "processed_events",
        "outbox",
        "user_directory",
        "regions",
    ] {
        let sql = format!("SELECT count(*) FROM umstore.{table}");
        assert!(count(&client, &sql).await >= 0, "{table} exists");
    }
}

#[tokio::test]
async fn a_tampered_migration_is_refused_naming_version_and_both_checksums() {
    let (_conninfo, mut client) = migrated_db().await;
    let mut tampered = embedded();
    let original = tampered[2].checksum();
    tampered[2] = Migration {
        sql: "CREATE TABLE umstore.sneaky (id int);",
        ..tampered[2].clone()
    };
    let runner = Runner::new(tampered);
    let err = runner
        .up(&mut client)
        .await
        .expect_err("tampered migration must be refused");
    let text = err.to_string();
    assert!(
        matches!(err, MigrateError::ChecksumMismatch { version: 3, .. }),
        "{text}"
    );
    assert!(
        text.contains(&original),
        "names the recorded checksum: {text}"
    );
    assert!(
        text.contains(&umstore_migrations::checksum(
            "CREATE TABLE umstore.sneaky (id int);"
        )),
        "{text}"
    );
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'sneaky'"
        )
        .await,
        0
    );
    assert!(runner.verify(&client).await.is_err());
    let status = runner.status(&client).await.expect("status");
    assert!(matches!(status[2].state, MigrationState::Changed { .. }));
}

#[tokio::test]
async fn a_database_ahead_of_the_binary_is_refused() {
    let (_conninfo, mut client) = migrated_db().await;
    let older = Runner::new(embedded().into_iter().take(5).collect());
    let err = older.up(&mut client).await.expect_err("newer database");
    assert!(
        matches!(err, MigrateError::UnknownApplied { version: 6, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn concurrent_runners_apply_each_migration_exactly_once() {
    let conninfo = fresh_db().await;
    let mut runs = Vec::new();
    for _ in 0..4 {
        let conninfo = conninfo.clone();
        runs.push(tokio::spawn(async move {
            let mut client = connect(&conninfo).await;
            Runner::default()
                .up(&mut client)
                .await
                .map(|r| r.applied.len())
        }));
    }
    let mut applied = Vec::new();
    for run in runs {
        applied.push(run.await.expect("join").expect("every runner succeeds"));
    }
    applied.sort_unstable();
    assert_eq!(
        applied,
        vec![0, 0, 0, embedded().len()],
        "one runner applies all, the others none"
    );
    let client = connect(&conninfo).await;
    assert_eq!(
        count(&client, "SELECT count(*) FROM umstore.schema_migrations").await,
        embedded().len() as i64
    );
}

#[tokio::test]
async fn user_metadata_has_one_list_partition_per_region_and_no_default() {
    let (_c, client) = migrated_db().await;
    let rows = client
        .query(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid)
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'umstore.user_metadata'::regclass ORDER BY 1",
            &[],
        )
        .await
        .expect("partitions");
    assert_eq!(rows.len(), 36);
    for (row, region) in rows.iter().zip(REGIONS.iter()) {
        assert_eq!(
            row.get::<_, &str>(0),
            format!("user_metadata_{}", region.code.to_lowercase())
        );
        assert_eq!(
            row.get::<_, &str>(1),
            format!("FOR VALUES IN ('{}')", region.code)
        );
    }
    let strategy: String = client
        .query_one("SELECT partstrat::text FROM pg_partitioned_table WHERE partrelid = 'umstore.user_metadata'::regclass", &[])
        .await
        .expect("strategy")
        .get(0);
    assert_eq!(strategy, "l");
}

#[tokio::test]
async fn the_schema_is_granted_to_exactly_the_purpose_groups_which_cannot_log_in() {
    let (_c, client) = migrated_db().await;
    // Roles are cluster-wide (other databases' runs share them); the schema's ACL is
    // this database's own record of the groups migration 0001 created and granted.
    let rows = client
        .query(
            "SELECT r.rolname, r.rolcanlogin
             FROM pg_namespace n, aclexplode(n.nspacl) a JOIN pg_roles r ON r.oid = a.grantee
             WHERE n.nspname = $1 AND a.grantee <> n.nspowner AND a.privilege_type = 'USAGE'
             ORDER BY 1",
            &[&SCHEMA],
        )
        .await
        .expect("schema ACL");
    let granted: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut groups: Vec<&str> = Purpose::ALL.iter().map(|p| p.group()).collect();
    groups.sort_unstable();
    assert_eq!(granted, groups);
    assert!(
        rows.iter().all(|r| !r.get::<_, bool>(1)),
        "a group role can log in"
    );
}

#[tokio::test]
async fn every_key_of_a_per_user_table_includes_region() {
    // The directory and the routes are found by user id alone: keyed by it.
    // The region-move tables stay local to the coordinator (citus::LOCAL_TABLES);
    // bulk_imports is per file, not per user.
    let (_c, client) = migrated_db().await;
    let rows = client
        .query(
            "SELECT t.relname::text, conname::text, contype::text,
                    array(SELECT attname::text FROM pg_attribute
                          WHERE attrelid = conrelid AND attnum = ANY (conkey))
             FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid
             WHERE connamespace = 'umstore'::regnamespace AND contype IN ('p', 'u', 'f')
               AND t.relname NOT IN ('regions', 'user_directory', 'user_routes', 'schema_migrations', 'key_material', 'key_rotations', 'stats_refreshes',
                                     'region_state', 'region_move_log', 'region_placement', 'region_moves',
                                     'bulk_imports')
               AND conparentid = 0",
            &[],
        )
        .await
        .expect("constraints");
    assert!(rows.len() >= 10, "found {} keys", rows.len());
    for row in &rows {
        let columns: Vec<String> = row.get(3);
        assert!(
            columns.iter().any(|c| c == "region"),
            "{} {} ({}) lacks region: {columns:?}",
            row.get::<_, &str>(0),
            row.get::<_, &str>(1),
            row.get::<_, &str>(2)
        );
    }
}

#[tokio::test]
async fn the_seed_indexes_exist() {
    let (_c, client) = migrated_db().await;
    let rows = client
        .query(
            "SELECT tablename::text, indexdef FROM pg_indexes WHERE schemaname = 'umstore'",
            &[],
        )
        .await
        .expect("indexes");
    let defs: Vec<(String, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let has = |table: &str, cols: &str| defs.iter().any(|(t, d)| t == table && d.contains(cols));
    assert!(
        has("user_metadata", "(region, birth_year)"),
        "state and age"
    );
    assert!(has("user_metadata", "(income_lakh)"), "income");
    assert!(
        has("user_derived_attributes", "(region, life_stage)"),
        "life stage"
    );
    assert!(
        has("user_derived_attributes", "(region, income_bracket)"),
        "income bracket"
    );
    assert!(
        has("user_eligibility_cache", "(region, scheme_id, eligible)"),
        "scheme"
    );
    assert!(has("user_eligibility_cache", "(expires_at)"), "expiry");
    assert!(
        has("user_risk_scores", "(region, overall_risk DESC)"),
        "overall risk"
    );
    assert!(
        has("user_metadata_history", "(region, user_id, changed_at)"),
        "user and time"
    );
    let options: Vec<String> = client
        .query_one(
            "SELECT reloptions FROM pg_class WHERE oid = 'umstore.user_metadata_history'::regclass",
            &[],
        )
        .await
        .expect("reloptions")
        .get(0);
    assert!(
        options.contains(&"autovacuum_vacuum_scale_factor=0.01".to_owned()),
        "{options:?}"
    );
}

const USER: &str = "8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a01";

async fn insert_user(
    client: &Client,
    user: &str,
    region: &str,
) -> Result<u64, tokio_postgres::Error> {
    client
        .execute(
            "WITH d AS (INSERT INTO umstore.user_directory (user_id, region) VALUES ($1::text::uuid, $2))
             INSERT INTO umstore.user_metadata (user_id, region, gender, birth_year, full_name_enc)
             VALUES ($1::text::uuid, $2, 'female', 1990, '\\x01'::bytea)",
            &[&user, &region],
        )
        .await
}

#[tokio::test]
async fn a_lookup_by_user_id_touches_one_partition() {
    let (_c, client) = migrated_db().await;
    // a user in every region, so pruning has something to prune
    for (i, r) in REGIONS.iter().enumerate() {
        let user = format!("00000000-0000-4000-8000-{i:012}");
        insert_user(&client, &user, r.code).await.expect("insert");
    }
    insert_user(&client, USER, "KA")
        .await
        .expect("insert KA user");
    let plan: Vec<String> = client
        .query(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF, SUMMARY OFF)
             SELECT * FROM umstore.user_metadata
             WHERE region = umstore.user_region($1::text::uuid) AND user_id = $1::text::uuid",
            &[&USER],
        )
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let text = plan.join("\n");
    let scanned: Vec<&String> = plan
        .iter()
        .filter(|l| l.contains(" on user_metadata_"))
        .collect();
    assert_eq!(
        scanned.len(),
        1,
        "exactly one partition in the plan:\n{text}"
    );
    assert!(scanned[0].contains("user_metadata_ka"), "{text}");
    assert!(
        text.contains("Subplans Removed: 35"),
        "35 partitions pruned at executor start:\n{text}"
    );
}

#[tokio::test]
async fn an_unknown_region_is_refused_naming_it_and_nothing_is_written() {
    let (_c, client) = migrated_db().await;
    let err = client
        .execute(
            "INSERT INTO umstore.user_metadata (user_id, region) VALUES ($1::text::uuid, 'XX')",
            &[&USER],
        )
        .await
        .expect_err("XX is not a region");
    let db = err.as_db_error().expect("db error");
    let text = format!("{} {}", db.message(), db.detail().unwrap_or(""));
    assert!(text.contains("(region) = (XX)"), "{text}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM umstore.user_metadata").await,
        0
    );
    let err = insert_user(&client, USER, "ZZ")
        .await
        .expect_err("directory refuses ZZ too");
    let detail = err
        .as_db_error()
        .and_then(|e| e.detail())
        .unwrap_or("")
        .replace(' ', "");
    assert!(detail.contains("(region)=(ZZ)"), "{err:?}");
    assert_eq!(
        count(&client, "SELECT count(*) FROM umstore.user_directory").await,
        0
    );
}

#[tokio::test]
async fn risk_scores_outside_zero_to_one_and_missing_fields_are_refused() {
    let (_c, client) = migrated_db().await;
    insert_user(&client, USER, "KA").await.expect("user");
    let insert = "INSERT INTO umstore.user_risk_scores
        (user_id, region, financial_risk, deadline_risk, benefit_loss_risk, overall_risk, model_version, computed_at)
        VALUES ($1::text::uuid, 'KA', $2::float8::numeric, 0.1, 0.1, 0.1, $3, now())";
    let err = client
        .execute(insert, &[&USER, &1.5f64, &"m1"])
        .await
        .expect_err("1.5 is out of range");
    let db = err.as_db_error().expect("db error");
    assert_eq!(
        db.constraint(),
        Some("user_risk_scores_financial_risk_check"),
        "{db:?}"
    );
    let err = client
        .execute(insert, &[&USER, &-0.01f64, &"m1"])
        .await
        .expect_err("negative");
    assert!(err.as_db_error().is_some());
    let null_model: Option<&str> = None;
    let err = client
        .execute(insert, &[&USER, &0.5f64, &null_model])
        .await
        .expect_err("model version is required");
    assert_eq!(
        err.as_db_error().and_then(|e| e.column()),
        Some("model_version")
    );
    assert_eq!(
        count(&client, "SELECT count(*) FROM umstore.user_risk_scores").await,
        0
    );
    client
        .execute(insert, &[&USER, &0.37f64, &"m1"])
        .await
        .expect("a valid score is stored");
    assert_eq!(
        count(&client, "SELECT count(*) FROM umstore.user_risk_scores").await,
        1
    );
}

#[tokio::test]
async fn derived_scores_and_eligibility_need_the_user_in_the_same_region() {
    let (_c, client) = migrated_db().await;
    insert_user(&client, USER, "KA").await.expect("KA user");
    let insert = "INSERT INTO umstore.user_risk_scores
        (user_id, region, financial_risk, deadline_risk, benefit_loss_risk, overall_risk, model_version, computed_at)
        VALUES ($1::text::uuid, $2, 0.1, 0.1, 0.1, 0.1, 'm1', now())";
    let err = client
        .execute(insert, &[&USER, &"TN"])
        .await
        .expect_err("the user is not in TN");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err:?}"
    );
    let unknown = "8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0aff";
    let err = client
        .execute(insert, &[&unknown, &"KA"])
        .await
        .expect_err("unknown user");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION),
        "{err:?}"
    );
    client
        .execute(insert, &[&USER, &"KA"])
        .await
        .expect("the user's own region");
    let partitions: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhparent IN ('umstore.user_derived_attributes'::regclass,
                 'umstore.user_risk_scores'::regclass, 'umstore.user_eligibility_cache'::regclass)",
            &[],
        )
        .await
        .expect("partitions")
        .get(0);
    assert_eq!(partitions, 3 * 36);
}

#[tokio::test]
async fn history_is_append_only() {
    let (_c, client) = migrated_db().await;
    client
        .execute(
            "INSERT INTO umstore.user_metadata_history (user_id, region, change_type, changed_fields, changed_by, version)
             VALUES ($1::text::uuid, 'KA', 'created', '{gender}', 'test', 1)",
            &[&USER],
        )
        .await
        .expect("append");
    for sql in [
        "UPDATE umstore.user_metadata_history SET changed_by = 'x'",
        "DELETE FROM umstore.user_metadata_history",
    ] {
        let err = client.execute(sql, &[]).await.expect_err(sql);
        assert!(
            err.to_string().contains("append-only") || format!("{err:?}").contains("append-only"),
            "{err:?}"
        );
    }
    assert_eq!(
        count(
            &client,
            "SELECT count(*) FROM umstore.user_metadata_history"
        )
        .await,
        1
    );
}

async fn as_role<T>(
    client: &mut Client,
    role: &str,
    f: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> T,
) -> T {
    let tx = client.transaction().await.expect("tx");
    tx.batch_execute(&format!("SET LOCAL ROLE {role}"))
        .await
        .expect("set role");
    let out = f(&tx).await;
    tx.rollback().await.expect("rollback");
    out
}

#[tokio::test]
async fn analytics_cannot_read_pii_columns_but_reads_the_rest() {
    let (_c, mut client) = migrated_db().await;
    insert_user(&client, USER, "KA").await.expect("user");
    for column in umstore_migrations::PII_COLUMNS {
        let err = as_role(&mut client, Purpose::Analytics.group(), async |tx| {
            tx.query(&format!("SELECT {column} FROM umstore.user_metadata"), &[])
                .await
        })
        .await
        .expect_err(column);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{column}: {err:?}"
        );
    }
    let rows = as_role(&mut client, Purpose::Analytics.group(), async |tx| {
        tx.query(
            "SELECT user_id, region, gender, birth_year FROM umstore.user_metadata",
            &[],
        )
        .await
    })
    .await
    .expect("non-PII columns");
    assert_eq!(rows.len(), 1);
    for forbidden in [
        "SELECT * FROM umstore.user_data_keys",
        "SELECT new_values FROM umstore.user_metadata_history",
    ] {
        let err = as_role(&mut client, Purpose::Analytics.group(), async |tx| {
            tx.query(forbidden, &[]).await
        })
        .await;
        assert!(err.is_err(), "analytics must not run {forbidden}");
    }
    // a role that may decrypt reads the PII ciphertext
    let rows = as_role(&mut client, Purpose::Dashboard.group(), async |tx| {
        tx.query("SELECT full_name_enc FROM umstore.user_metadata", &[])
            .await
    })
    .await
    .expect("dashboard reads PII ciphertext");
    assert_eq!(rows.len(), 1);
}

#[tokio::test]
async fn readers_cannot_write_and_the_writer_cannot_delete_users() {
    let (_c, mut client) = migrated_db().await;
    insert_user(&client, USER, "KA").await.expect("user");
    for role in [
        Purpose::Ai.group(),
        Purpose::Rules.group(),
        Purpose::JsonGenerator.group(),
        Purpose::Dashboard.group(),
        Purpose::Analytics.group(),
    ] {
        let err = as_role(&mut client, role, async |tx| {
            tx.execute("UPDATE umstore.user_metadata SET gender = 'male'", &[])
                .await
        })
        .await;
        assert!(err.is_err(), "{role} must not update metadata");
    }
    let err = as_role(&mut client, Purpose::Writer.group(), async |tx| {
        tx.execute("DELETE FROM umstore.user_metadata", &[]).await
    })
    .await;
    assert!(
        err.is_err(),
        "writer must not delete users (erasure is crypto-shredding)"
    );
    let updated = as_role(&mut client, Purpose::Writer.group(), async |tx| {
        tx.execute("UPDATE umstore.user_metadata SET gender = 'male'", &[])
            .await
    })
    .await
    .expect("writer updates");
    assert_eq!(updated, 1);
}

#[tokio::test]
async fn region_scope_limits_what_a_session_sees_and_writes() {
    let (_c, mut client) = migrated_db().await;
    insert_user(&client, USER, "KA").await.expect("KA user");
    insert_user(&client, "8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a02", "TN")
        .await
        .expect("TN user");
    let visible = |regions: &'static str| {
        async move |tx: &tokio_postgres::Transaction<'_>| {
            tx.batch_execute(&format!("SET LOCAL umstore.regions = '{regions}'"))
                .await
                .expect("scope");
            tx.query(
                "SELECT region::text FROM umstore.user_metadata ORDER BY 1",
                &[],
            )
            .await
            .expect("select")
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        as_role(&mut client, Purpose::Dashboard.group(), visible("KA")).await,
        vec!["KA"]
    );
    assert_eq!(
        as_role(&mut client, Purpose::Dashboard.group(), visible("KA,TN")).await,
        vec!["KA", "TN"]
    );
    assert_eq!(
        as_role(&mut client, Purpose::Analytics.group(), visible("*")).await,
        vec!["KA", "TN"]
    );
    assert_eq!(
        as_role(&mut client, Purpose::Ai.group(), visible("DL")).await,
        Vec::<String>::new()
    );
    let err = as_role(&mut client, Purpose::Writer.group(), async |tx| {
        tx.batch_execute("SET LOCAL umstore.regions = 'KA'").await.expect("scope");
        tx.execute(
            "INSERT INTO umstore.user_directory (user_id, region) VALUES ('8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a03', 'TN')",
            &[],
        )
        .await
    })
    .await
    .expect_err("a KA-scoped writer cannot write TN");
    assert!(
        err.to_string().contains("row-level security")
            || format!("{err:?}").contains("row-level security"),
        "{err:?}"
    );
}
