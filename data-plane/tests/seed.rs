//! `seed` against real PostgreSQL: what it writes, and that PII is stored
//! only as ciphertext that opens under the user's key.

mod support;

use std::time::Duration;

use support::*;
use tokio_postgres::error::SqlState;
use umstore_data_plane::crypto::{
    DataKeyCache, FieldAad, KeyProvider, Keyring, LocalKeyProvider, UserKey,
};
use umstore_data_plane::seed::{self, Generator, SeedError};
use umstore_migrations::roles::Purpose;

/// A migrated store, a connection as the store's admin (the superuser), which
/// seeds, and one as the writer login, which the data plane uses and which
/// checks what was written. Seeding is a bulk load by the admin: PostgreSQL
/// refuses COPY FROM under row-level security to every other role, the
/// writer login included.
async fn migrated() -> (Store, tokio_postgres::Client, tokio_postgres::Client) {
    let store = Store::migrated().await;
    let admin = connect(store.superuser()).await;
    let writer = store.connect(Purpose::Writer).await;
    (store, admin, writer)
}

async fn keys(client: &tokio_postgres::Client) -> (tempfile::TempDir, Keyring) {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = KeyProvider::Local(Box::new(
        LocalKeyProvider::open_or_create(dir.path()).expect("keys"),
    ));
    let keyring = Keyring::open(
        provider,
        DataKeyCache::new(1_000, Duration::from_secs(60)),
        client,
    )
    .await
    .expect("keyring");
    (dir, keyring)
}

async fn count(client: &tokio_postgres::Client, table: &str) -> i64 {
    client
        .query_one(&format!("SELECT count(*) FROM umstore.{table}"), &[])
        .await
        .expect(table)
        .get(0)
}

#[tokio::test]
async fn seed_writes_every_table_and_pii_only_as_ciphertext() {
    let (_store, mut admin, client) = migrated().await;
    let (_dir, keys) = keys(&client).await;
    let report = seed::seed(&mut admin, 12_345, 42, &keys)
        .await
        .expect("seed");
    assert_eq!(report.users, 12_345);
    for table in [
        "user_directory",
        "user_data_keys",
        "user_metadata",
        "user_derived_attributes",
        "user_metadata_history",
    ] {
        assert_eq!(count(&client, table).await, 12_345, "{table}");
    }
    let regions: i64 = client
        .query_one(
            "SELECT count(DISTINCT region) FROM umstore.user_metadata",
            &[],
        )
        .await
        .expect("regions")
        .get(0);
    assert!(regions >= 34, "users spread over the regions ({regions})");

    // The first user of seed 42, as the generator made it.
    let today = chrono::Utc::now().date_naive();
    let profile = Generator::new(42, today).next_profile();
    let row = client
        .query_one(
            "SELECT m.pincode_enc, m.full_name_enc, m.identity_token_bidx, m::text
             FROM umstore.user_metadata m
             WHERE m.region = umstore.user_region($1) AND m.user_id = $1",
            &[&profile.user_id],
        )
        .await
        .expect("first user");
    let whole_row: String = row.get(3);
    assert!(
        !whole_row.contains(&profile.pincode),
        "pincode stored in plaintext"
    );
    assert!(
        !whole_row.contains(&hex_of(profile.full_name.as_bytes())),
        "name stored in plaintext"
    );
    let UserKey::Active(key) = keys
        .user_key(&client, profile.user_id, profile.region)
        .await
        .expect("unwrap")
    else {
        panic!("the key is active");
    };
    let aad = |column| FieldAad {
        user_id: profile.user_id,
        region: profile.region,
        column,
    };
    let pincode = key
        .open(&aad("pincode_enc"), row.get::<_, &[u8]>(0))
        .expect("pincode opens");
    assert_eq!(pincode, profile.pincode.as_bytes());
    let name = key
        .open(&aad("full_name_enc"), row.get::<_, &[u8]>(1))
        .expect("name opens");
    assert_eq!(name, profile.full_name.as_bytes());
    assert!(
        key.open(&aad("district_enc"), row.get::<_, &[u8]>(0))
            .is_err(),
        "bound to its column"
    );
    let bidx: Vec<u8> = row.get(2);
    assert_eq!(
        bidx,
        keys.blind_index()
            .index("identity_token", profile.identity_token.as_bytes())
    );
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test]
async fn seeding_the_same_seed_twice_is_refused_and_changes_nothing() {
    let (_store, mut admin, client) = migrated().await;
    let (_dir, keys) = keys(&client).await;
    seed::seed(&mut admin, 1_000, 7, &keys)
        .await
        .expect("first seed");
    let err = seed::seed(&mut admin, 1_000, 7, &keys)
        .await
        .expect_err("same seed again");
    assert!(
        matches!(err, SeedError::AlreadySeeded { seed: 7, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pass another --seed"));
    assert_eq!(count(&client, "user_metadata").await, 1_000);
    seed::seed(&mut admin, 500, 8, &keys)
        .await
        .expect("another seed adds users");
    assert_eq!(count(&client, "user_metadata").await, 1_500);
}

#[tokio::test]
async fn derived_attributes_agree_with_the_derive_function() {
    let (_store, mut admin, client) = migrated().await;
    let (_dir, keys) = keys(&client).await;
    seed::seed(&mut admin, 300, 11, &keys).await.expect("seed");
    let today = chrono::Utc::now().date_naive();
    let mut generator = Generator::new(11, today);
    for _ in 0..300 {
        let p = generator.next_profile();
        let d = umstore_data_plane::derive::derive(&p, today);
        let row = client
            .query_one(
                "SELECT age_group, income_bracket, life_stage, bpl_status, tax_bracket
                 FROM umstore.user_derived_attributes WHERE region = $1 AND user_id = $2",
                &[&p.region, &p.user_id],
            )
            .await
            .expect("derived row");
        assert_eq!(row.get::<_, &str>(0), d.age_group);
        assert_eq!(row.get::<_, &str>(1), d.income_bracket);
        assert_eq!(row.get::<_, &str>(2), d.life_stage);
        assert_eq!(row.get::<_, bool>(3), d.bpl_status);
        assert_eq!(row.get::<_, &str>(4), d.tax_bracket);
    }
}

#[tokio::test]
async fn seed_refuses_an_unmigrated_database() {
    let store = Store::unmigrated().await;
    let out = cli(&[
        "seed",
        "--users",
        "10",
        "--database-url",
        &store.url(Purpose::Writer),
        "--data-dir",
        "/tmp/umstore-seed-test-keys",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("run `migrate up`"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_seed_on_two_connections_loads_every_row_past_the_derived_backlog() {
    let (store, mut admin, client) = migrated().await;
    let mut second = connect(store.superuser()).await;
    let (_dir, keys) = keys(&client).await;
    // More users than the derived-attributes backlog holds back (50,000).
    let users = 55_000;
    seed::seed_with(&mut admin, Some(&mut second), users, 31, &keys)
        .await
        .expect("seed");
    for table in [
        "user_directory",
        "user_data_keys",
        "user_metadata",
        "user_derived_attributes",
        "user_metadata_history",
    ] {
        assert_eq!(count(&client, table).await, users as i64, "{table}");
    }
    let orphans: i64 = client
        .query_one(
            "SELECT count(*) FROM umstore.user_directory d
             LEFT JOIN umstore.user_metadata m USING (region, user_id) WHERE m.user_id IS NULL",
            &[],
        )
        .await
        .expect("orphans")
        .get(0);
    assert_eq!(orphans, 0, "every directory row has its metadata");
}

/// The sealed columns as the catalog has them: every column of an umstore
/// table (partitions aside) whose name marks it as ciphertext (`_enc`) or a
/// blind index (`_bidx`), with a statement that reads it, quoted by the server.
async fn sealed_columns(client: &tokio_postgres::Client) -> Vec<(String, String, String)> {
    client
        .query(
            "SELECT c.relname::text, a.attname::text,
                    format('SELECT %I FROM %I.%I LIMIT 1', a.attname, n.nspname, c.relname)
             FROM pg_attribute a
             JOIN pg_class c ON c.oid = a.attrelid
             JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = 'umstore' AND c.relkind IN ('r', 'p', 'v', 'm')
               AND NOT c.relispartition AND a.attnum > 0 AND NOT a.attisdropped
               AND (a.attname LIKE '%\\_enc' OR a.attname LIKE '%\\_bidx')
             ORDER BY 1, 2",
            &[],
        )
        .await
        .expect("catalog")
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

async fn refused(client: &tokio_postgres::Client, sql: &str) -> bool {
    match client.query(sql, &[]).await {
        Ok(_) => false,
        Err(e) => e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE),
    }
}

#[tokio::test]
async fn the_analytics_login_reads_no_sealed_column_and_only_the_regions_it_is_scoped_to() {
    let (store, mut admin, writer) = migrated().await;
    let (_dir, keys) = keys(&writer).await;
    seed::seed(&mut admin, 2_000, 5, &keys).await.expect("seed");
    let analytics = store.connect(Purpose::Analytics).await;
    let wrong = store
        .url(Purpose::Analytics)
        .replace(&password(Purpose::Analytics), "not-its-password");
    assert!(
        tokio_postgres::connect(&wrong, tokio_postgres::NoTls)
            .await
            .is_err(),
        "the analytics login needs its password"
    );

    // The catalog's sealed columns are exactly the schema's list of PII columns.
    let sealed = sealed_columns(&analytics).await;
    let mut listed: Vec<(String, String)> = umstore_migrations::PII_COLUMNS
        .iter()
        .map(|c| ("user_metadata".to_owned(), (*c).to_owned()))
        .collect();
    listed.sort();
    let found: Vec<(String, String)> = sealed
        .iter()
        .map(|(t, c, _)| (t.clone(), c.clone()))
        .collect();
    assert_eq!(
        found, listed,
        "the catalog's *_enc/*_bidx columns and umstore_migrations::PII_COLUMNS disagree"
    );
    for (table, column, select) in &sealed {
        assert!(
            refused(&analytics, select).await,
            "analytics can read {table}.{column}"
        );
    }
    // Nor the PII ciphertext in history values, the keys, or a partition directly.
    for select in [
        "SELECT old_values FROM umstore.user_metadata_history LIMIT 1",
        "SELECT new_values FROM umstore.user_metadata_history LIMIT 1",
        "SELECT wrapped_key FROM umstore.user_data_keys LIMIT 1",
        "SELECT wrapped_key FROM umstore.key_material LIMIT 1",
        "SELECT * FROM umstore.user_metadata LIMIT 1",
        "SELECT full_name_enc FROM umstore.user_metadata_ka LIMIT 1",
    ] {
        assert!(refused(&analytics, select).await, "analytics ran {select}");
    }
    // What analytics is for: the non-PII attributes of every user.
    let readable: i64 = analytics
        .query_one(
            "SELECT count(*) FROM (SELECT user_id, region, birth_year, gender, income_lakh,
                 occupation, ration_card FROM umstore.user_metadata) m",
            &[],
        )
        .await
        .expect("non-PII columns")
        .get(0);
    assert_eq!(readable, 2_000);

    // Row-level security: scoped to regions, a session sees only theirs.
    let mut per_region = std::collections::BTreeMap::<&str, i64>::new();
    let mut generator = Generator::new(5, chrono::Utc::now().date_naive());
    for _ in 0..2_000 {
        *per_region
            .entry(generator.next_profile().region)
            .or_default() += 1;
    }
    let count = |table: &'static str| {
        let analytics = &analytics;
        async move {
            analytics
                .query_one(
                    &format!("SELECT count(*), count(*) FILTER (WHERE region NOT IN ('KA', 'TN')) FROM umstore.{table}"),
                    &[],
                )
                .await
                .expect(table)
        }
    };
    analytics
        .batch_execute("SET umstore.regions = 'KA,TN'")
        .await
        .expect("scope");
    let expected =
        per_region.get("KA").copied().unwrap_or(0) + per_region.get("TN").copied().unwrap_or(0);
    assert!(expected > 0, "the seed has users in KA or TN");
    for table in [
        "user_metadata",
        "user_derived_attributes",
        "user_metadata_history",
        "user_directory",
    ] {
        let row = count(table).await;
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (expected, 0),
            "{table} scoped to KA and TN"
        );
    }
    analytics
        .batch_execute("RESET umstore.regions")
        .await
        .expect("unscope");
    assert_eq!(count("user_metadata").await.get::<_, i64>(0), 2_000);

    // A writer scoped to a region cannot write another region's rows.
    writer
        .batch_execute("SET umstore.regions = 'KA'")
        .await
        .expect("scope");
    let err = writer
        .execute(
            "INSERT INTO umstore.user_directory (user_id, region) VALUES ($1, 'TN')",
            &[&uuid::Uuid::new_v4()],
        )
        .await
        .expect_err("out of scope");
    assert!(
        err.as_db_error()
            .is_some_and(|e| e.message().contains("row-level security")),
        "{err:?}"
    );
}
