//! `seed` against real PostgreSQL: what it writes, and that PII is stored
//! only as ciphertext that opens under the user's key.

mod support;

use std::time::Duration;

use support::*;
use umstore_data_plane::crypto::{
    DataKeyCache, FieldAad, KeyProvider, Keyring, LocalKeyProvider, UserKey,
};
use umstore_data_plane::seed::{self, Generator, SeedError};
use umstore_migrations::Runner;

async fn migrated() -> tokio_postgres::Client {
    let db = fresh_db().await;
    let mut client = connect(&db).await;
    Runner::default().up(&mut client).await.expect("migrate");
    client
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
    let mut client = migrated().await;
    let (_dir, keys) = keys(&client).await;
    let report = seed::seed(&mut client, 12_345, 42, &keys)
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
    let mut client = migrated().await;
    let (_dir, keys) = keys(&client).await;
    seed::seed(&mut client, 1_000, 7, &keys)
        .await
        .expect("first seed");
    let err = seed::seed(&mut client, 1_000, 7, &keys)
        .await
        .expect_err("same seed again");
    assert!(
        matches!(err, SeedError::AlreadySeeded { seed: 7, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pass another --seed"));
    assert_eq!(count(&client, "user_metadata").await, 1_000);
    seed::seed(&mut client, 500, 8, &keys)
        .await
        .expect("another seed adds users");
    assert_eq!(count(&client, "user_metadata").await, 1_500);
}

#[tokio::test]
async fn derived_attributes_agree_with_the_derive_function() {
    let mut client = migrated().await;
    let (_dir, keys) = keys(&client).await;
    seed::seed(&mut client, 300, 11, &keys).await.expect("seed");
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
    let db = fresh_db().await;
    let out = cli(&[
        "seed",
        "--users",
        "10",
        "--database-url",
        &db,
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
    let db = fresh_db().await;
    let mut client = connect(&db).await;
    Runner::default().up(&mut client).await.expect("migrate");
    let mut second = connect(&db).await;
    let (_dir, keys) = keys(&client).await;
    // More users than the derived-attributes backlog holds back (50,000).
    let users = 55_000;
    seed::seed_with(&mut client, Some(&mut second), users, 31, &keys)
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
