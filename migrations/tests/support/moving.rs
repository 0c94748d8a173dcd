//! The load of the region-move test and benchmark: seeded users, and one write
//! as the data plane of a store with several clusters makes it.

use tokio_postgres::Client;
use umstore_migrations::roles::Purpose;

/// Creates `purpose`'s login (a member of its group) unless the server has it.
pub async fn login_role(client: &Client, purpose: Purpose) {
    let login = purpose.login().expect("a client purpose has a login");
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{login}') THEN
                 CREATE ROLE {login} LOGIN IN ROLE {};
               END IF;
             END $$",
            purpose.group()
        ))
        .await
        .expect("login role");
}

/// `users` users in `region`: a directory row, a metadata row, a data key and
/// a history row each.
pub async fn seed(client: &Client, region: &str, users: i64) {
    client
        .execute(
            "WITH u AS (
                 INSERT INTO umstore.user_directory (user_id, region)
                 SELECT gen_random_uuid(), $1::text::bpchar FROM generate_series(1, $2::int8)
                 RETURNING user_id, region),
             m AS (
                 INSERT INTO umstore.user_metadata (user_id, region, gender, birth_year)
                 SELECT user_id, region, 'female', 1990 FROM u RETURNING user_id, region),
             k AS (
                 INSERT INTO umstore.user_data_keys (user_id, region, wrapped_key, kek_name, kek_version)
                 SELECT user_id, region, '\\x00', 'seed', 1 FROM m RETURNING user_id, region)
             INSERT INTO umstore.user_metadata_history
                 (user_id, region, change_type, changed_fields, changed_by, version)
             SELECT user_id, region, 'created', '{}', 'seed', 1 FROM k",
            &[&region, &users],
        )
        .await
        .unwrap_or_else(|e| panic!("seed: {e}"));
}

/// One write to KA, in one transaction: `umstore.region_write` first, then a
/// new user (`existing` None: directory and metadata rows) or an update of
/// `existing` (its metadata row's version and a history row). Returns the
/// user and the version acknowledged.
pub async fn write_once(
    client: &mut Client,
    existing: Option<&str>,
) -> Result<(String, i64), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let id: String = match existing {
        Some(id) => id.to_owned(),
        None => tx
            .query_one("SELECT gen_random_uuid()::text", &[])
            .await?
            .get(0),
    };
    tx.execute("SELECT umstore.region_write('KA', $1::text::uuid)", &[&id])
        .await?;
    let version = match existing {
        None => {
            tx.execute(
                "INSERT INTO umstore.user_directory (user_id, region) VALUES ($1::text::uuid, 'KA')",
                &[&id],
            )
            .await?;
            tx.execute(
                "INSERT INTO umstore.user_metadata (user_id, region, gender)
                 VALUES ($1::text::uuid, 'KA', 'male')",
                &[&id],
            )
            .await?;
            1
        }
        Some(_) => {
            let version: i64 = tx
                .query_one(
                    "UPDATE umstore.user_metadata SET version = version + 1, updated_at = now()
                     WHERE region = 'KA' AND user_id = $1::text::uuid RETURNING version",
                    &[&id],
                )
                .await?
                .get(0);
            tx.execute(
                "INSERT INTO umstore.user_metadata_history
                     (user_id, region, change_type, changed_fields, changed_by, version)
                 VALUES ($1::text::uuid, 'KA', 'updated', '{version}', 'load', $2)",
                &[&id, &version],
            )
            .await?;
            version
        }
    };
    tx.commit().await?;
    Ok((id, version))
}
