//! The base schema on a real Citus cluster (coordinator + 2 workers from the
//! harness, where Citus is built): every per-user table distributes by region,
//! colocated, which is what the keys-include-region rule is for. Skips with
//! the reason where `citus.so` is not installed (Citus is exempt from
//! `UMSTORE_REQUIRE_COMPONENTS`: it skips in CI too).

use tokio_postgres::NoTls;
use umstore_migrations::Runner;

/// What the operator's distribute step will run (Citus's documented functions).
/// Citus accepts only foreign keys a partition inherits from its parent, so the
/// per-partition keys of the derived tables (cheap row checks on plain
/// PostgreSQL) are first replaced by one key on each parent.
const DISTRIBUTE: &[&str] = &[
    r#"-- The history's append-only trigger goes with it to the workers.
    SET citus.enable_unsafe_triggers TO on;"#,
    r#"DO $$
    DECLARE
        c record;
    BEGIN
        FOR c IN
            SELECT con.conname, cl.relname
            FROM pg_constraint con
            JOIN pg_class cl ON cl.oid = con.conrelid
            JOIN pg_namespace n ON n.oid = cl.relnamespace
            WHERE n.nspname = 'umstore' AND con.contype = 'f' AND con.conparentid = 0 AND cl.relispartition
        LOOP
            EXECUTE format('ALTER TABLE umstore.%I DROP CONSTRAINT %I', c.relname, c.conname);
        END LOOP;
    END
    $$;"#,
    r#"ALTER TABLE umstore.user_derived_attributes ADD FOREIGN KEY (region, user_id)
        REFERENCES umstore.user_metadata (region, user_id) ON DELETE CASCADE;"#,
    r#"ALTER TABLE umstore.user_risk_scores ADD FOREIGN KEY (region, user_id)
        REFERENCES umstore.user_metadata (region, user_id) ON DELETE CASCADE;"#,
    r#"ALTER TABLE umstore.user_eligibility_cache ADD FOREIGN KEY (region, user_id)
        REFERENCES umstore.user_metadata (region, user_id) ON DELETE CASCADE;"#,
    r#"-- Keys to umstore.regions are set aside while tables are distributed (a
    -- local table referencing a new reference table would be converted to a
    -- Citus local table first), and put back once every table is distributed.
    CREATE TEMP TABLE region_keys AS
        SELECT cl.relname, con.conname
        FROM pg_constraint con
        JOIN pg_class cl ON cl.oid = con.conrelid
        JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = 'umstore' AND con.contype = 'f' AND con.conparentid = 0
          AND con.confrelid = 'umstore.regions'::regclass;"#,
    r#"DO $$
    DECLARE
        c record;
    BEGIN
        FOR c IN SELECT * FROM region_keys LOOP
            EXECUTE format('ALTER TABLE umstore.%I DROP CONSTRAINT %I', c.relname, c.conname);
        END LOOP;
    END
    $$;"#,
    r#"SELECT create_reference_table('umstore.regions');"#,
    r#"SELECT create_reference_table('umstore.key_material');"#,
    r#"SELECT create_reference_table('umstore.key_rotations');"#,
    r#"SELECT create_distributed_table('umstore.user_directory', 'user_id');"#,
    r#"SELECT create_distributed_table('umstore.user_metadata', 'region', colocate_with => 'none');"#,
    r#"SELECT create_distributed_table('umstore.user_derived_attributes', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.user_risk_scores', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.user_eligibility_cache', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.user_metadata_history', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.user_data_keys', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.processed_events', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.outbox', 'region', colocate_with => 'umstore.user_metadata');"#,
    r#"SELECT create_distributed_table('umstore.erasure_audit', 'region', colocate_with => 'umstore.user_metadata');"#,
    "SET citus.multi_shard_modify_mode TO 'sequential'",
    r#"DO $$
    DECLARE
        c record;
    BEGIN
        FOR c IN SELECT * FROM region_keys LOOP
            EXECUTE format('ALTER TABLE umstore.%I ADD FOREIGN KEY (region) REFERENCES umstore.regions (region)', c.relname);
        END LOOP;
    END
    $$;"#,
];

#[tokio::test]
async fn the_schema_distributes_by_region_on_citus() {
    let Some(citus) = umstore_e2e::shared().citus_or_skip() else {
        return;
    };
    let (mut client, connection) = tokio_postgres::connect(&citus.conninfo("postgres"), NoTls)
        .await
        .expect("connect");
    tokio::spawn(connection);
    Runner::default()
        .up(&mut client)
        .await
        .expect("base migrations run on a Citus coordinator");
    for statement in DISTRIBUTE {
        if let Err(e) = client.batch_execute(statement).await {
            panic!("{statement}: {e:?}");
        }
    }

    let distributed: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_dist_partition p JOIN pg_class c ON c.oid = p.logicalrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'umstore' AND c.relname NOT LIKE '%\\_%\\_%\\_%' ESCAPE '\\'",
            &[],
        )
        .await
        .expect("pg_dist_partition")
        .get(0);
    assert!(distributed >= 13, "{distributed} tables known to Citus");

    // A user written through the coordinator lands on a worker and reads back,
    // with the per-partition foreign keys enforced.
    client
        .batch_execute(
            "INSERT INTO umstore.user_directory (user_id, region) VALUES ('8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a01', 'KA');
             INSERT INTO umstore.user_metadata (user_id, region, gender) VALUES ('8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a01', 'KA', 'female');
             INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk, benefit_loss_risk, overall_risk, model_version, computed_at)
                 VALUES ('8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a01', 'KA', 0.1, 0.2, 0.3, 0.4, 'm1', now());",
        )
        .await
        .expect("writes through the coordinator");
    let err = client
        .batch_execute(
            "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk, benefit_loss_risk, overall_risk, model_version, computed_at)
                 VALUES ('8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a01', 'TN', 0.1, 0.2, 0.3, 0.4, 'm1', now());",
        )
        .await
        .expect_err("no such user in TN");
    assert!(
        err.to_string().contains("foreign key") || format!("{err:?}").contains("foreign key"),
        "{err:?}"
    );
    let overall: f64 = client
        .query_one(
            "SELECT overall_risk::float8 FROM umstore.user_risk_scores
             WHERE region = 'KA' AND user_id = '8b7e2a56-0f0e-4c55-9d3c-1f1f6d0c0a01'",
            &[],
        )
        .await
        .expect("read back")
        .get(0);
    assert!((overall - 0.4).abs() < 1e-9);
}
