//! Online KEK rotation: rotate the transit key, rewrap every wrapped data key
//! in batches (no field is re-encrypted, reads and writes go on), then retire
//! the old versions by raising `min_decryption_version`.
//!
//! Progress is persisted in `umstore.key_rotations` in the same transaction as
//! each batch's updates, so a rotation that crashed resumes at its cursor and
//! every key is rewrapped to the new version exactly once.

use std::time::Instant;

use thiserror::Error;
use tokio_postgres::Client;
use tracing::info;
use uuid::Uuid;

use super::{CryptoError, KeyProvider, WrappedKey};

/// Why a rotation stopped.
#[derive(Debug, Error)]
pub enum RotationError {
    /// Vault refused or could not be reached.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A query failed; the current batch was rolled back and the rotation can
    /// be resumed by running it again.
    #[error("{what} (run `keys rotate` again to resume): {source}")]
    Database {
        /// What the rotation was doing.
        what: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Stopped on request after some batches (tests use it to simulate a crash).
    #[error("stopped after {0} batch(es) as requested; run again to resume")]
    Interrupted(usize),
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RotationError {
    move |source| RotationError::Database { what, source }
}

/// How to rotate.
#[derive(Debug, Clone, Copy)]
pub struct RotationOptions {
    /// Keys per Vault `rewrap` call and per database transaction.
    pub batch_size: usize,
    /// Stop (as if crashed) after this many batches.
    pub stop_after_batches: Option<usize>,
}

impl Default for RotationOptions {
    fn default() -> Self {
        Self {
            batch_size: 500,
            stop_after_batches: None,
        }
    }
}

/// What a rotation did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RotationReport {
    /// Id in `umstore.key_rotations`.
    pub rotation_id: i64,
    /// The KEK version every key is wrapped under now.
    pub version: i32,
    /// Keys rewrapped by this run.
    pub rewrapped_now: i64,
    /// Keys rewrapped by this rotation in total (earlier, interrupted runs included).
    pub rewrapped_total: i64,
    /// Whether this run resumed an interrupted rotation.
    pub resumed: bool,
}

struct Pending {
    region: String,
    user_id: Uuid,
    wrapped: WrappedKey,
}

/// Rotates the provider's KEK and rewraps every data key (see the module docs).
/// `progress` is called after each batch with the running total.
pub async fn rotate_and_rewrap(
    client: &mut Client,
    provider: &KeyProvider,
    opts: RotationOptions,
    mut progress: impl FnMut(i64),
) -> Result<RotationReport, RotationError> {
    let kek = provider.kek_name().to_owned();
    let unfinished = client
        .query_opt(
            "SELECT id, target_version, cursor_region::text, cursor_user_id, rewrapped
             FROM umstore.key_rotations WHERE kek_name = $1 AND finished_at IS NULL",
            &[&kek],
        )
        .await
        .map_err(db("looking for an unfinished rotation"))?;
    let (rotation_id, version, mut cursor, mut total, resumed) = match unfinished {
        Some(row) => {
            let cursor = match (
                row.get::<_, Option<String>>(2),
                row.get::<_, Option<Uuid>>(3),
            ) {
                (Some(region), Some(user)) => Some((region, user)),
                _ => None,
            };
            (
                row.get::<_, i64>(0),
                row.get::<_, i32>(1),
                cursor,
                row.get::<_, i64>(4),
                true,
            )
        }
        None => {
            let version = provider.rotate().await?;
            let batch = i32::try_from(opts.batch_size).unwrap_or(i32::MAX);
            let id: i64 = client
                .query_one(
                    "INSERT INTO umstore.key_rotations (kek_name, target_version, batch_size)
                     VALUES ($1, $2, $3) RETURNING id",
                    &[&kek, &version, &batch],
                )
                .await
                .map_err(db("recording the rotation"))?
                .get(0);
            info!(kek = %kek, version, "transit key rotated; rewrapping data keys");
            (id, version, None, 0, false)
        }
    };
    if resumed {
        info!(kek = %kek, version, rewrapped = total, "resuming an interrupted rotation");
    }

    let started = Instant::now();
    let mut now = 0i64;
    let mut batches = 0usize;
    let limit = i64::try_from(opts.batch_size.max(1)).unwrap_or(500);
    // First pass in key order behind the cursor; then sweeps without it for
    // keys a concurrent writer created under the old version meanwhile.
    let mut use_cursor = true;
    loop {
        let (cursor_region, cursor_user) = match &cursor {
            Some((r, u)) if use_cursor => (Some(r.clone()), Some(*u)),
            _ => (None, None),
        };
        let rows = client
            .query(
                "SELECT region::text, user_id, wrapped_key, kek_name, kek_version FROM umstore.user_data_keys
                 WHERE kek_name = $1 AND kek_version < $2 AND wrapped_key IS NOT NULL
                   AND ($3::text IS NULL OR (region, user_id) > ($3::text::char(2), $4::uuid))
                 ORDER BY region, user_id LIMIT $5",
                &[&kek, &version, &cursor_region, &cursor_user, &limit],
            )
            .await
            .map_err(db("reading a batch of data keys"))?;
        if rows.is_empty() {
            if use_cursor {
                use_cursor = false;
                continue;
            }
            break;
        }
        let pending: Vec<Pending> = rows
            .iter()
            .map(|r| Pending {
                region: r.get(0),
                user_id: r.get(1),
                wrapped: WrappedKey {
                    wrapped: r.get(2),
                    kek_name: r.get(3),
                    kek_version: r.get(4),
                },
            })
            .collect();
        let old: Vec<WrappedKey> = pending.iter().map(|p| p.wrapped.clone()).collect();
        let new = provider.rewrap_batch(&old).await?;

        let regions: Vec<&str> = pending.iter().map(|p| p.region.as_str()).collect();
        let users: Vec<Uuid> = pending.iter().map(|p| p.user_id).collect();
        let old_bytes: Vec<&[u8]> = pending
            .iter()
            .map(|p| p.wrapped.wrapped.as_slice())
            .collect();
        let new_bytes: Vec<&[u8]> = new.iter().map(|w| w.wrapped.as_slice()).collect();
        let new_versions: Vec<i32> = new.iter().map(|w| w.kek_version).collect();
        // The sweep (no cursor) leaves the saved cursor where the first pass ended.
        if use_cursor {
            cursor = pending.last().map(|p| (p.region.clone(), p.user_id));
        }
        let (cursor_region, cursor_user) = (
            cursor.as_ref().map(|c| c.0.as_str()),
            cursor.as_ref().map(|c| c.1),
        );

        let tx = client
            .transaction()
            .await
            .map_err(db("starting a rewrap batch"))?;
        // Compare-and-set on the old wrapped bytes: a key destroyed meanwhile
        // (crypto-shredding) stays destroyed.
        let updated = tx
            .execute(
                "UPDATE umstore.user_data_keys k
                 SET wrapped_key = u.new_key, kek_version = u.new_version, rewrapped_at = now()
                 FROM unnest($1::text[], $2::uuid[], $3::bytea[], $4::bytea[], $5::int[])
                      AS u(region, user_id, old_key, new_key, new_version)
                 WHERE k.region = u.region::char(2) AND k.user_id = u.user_id AND k.wrapped_key = u.old_key",
                &[&regions, &users, &old_bytes, &new_bytes, &new_versions],
            )
            .await
            .map_err(db("storing rewrapped keys"))?;
        let updated = i64::try_from(updated).unwrap_or(i64::MAX);
        tx.execute(
            "UPDATE umstore.key_rotations SET cursor_region = $2::text::char(2), cursor_user_id = $3,
                 rewrapped = rewrapped + $4 WHERE id = $1",
            &[&rotation_id, &cursor_region, &cursor_user, &updated],
        )
        .await
        .map_err(db("saving the rotation cursor"))?;
        tx.commit().await.map_err(db("committing a rewrap batch"))?;
        now += updated;
        total += updated;
        batches += 1;
        progress(total);
        info!(
            rewrapped = total,
            batch = batches,
            per_second = now as f64 / started.elapsed().as_secs_f64().max(1e-9),
            "rewrapping data keys"
        );
        if opts.stop_after_batches.is_some_and(|n| batches >= n) {
            return Err(RotationError::Interrupted(batches));
        }
    }

    rewrap_store_keys(client, provider, &kek, version).await?;
    provider.set_min_decryption_version(version).await?;
    client
        .execute(
            "UPDATE umstore.key_rotations SET finished_at = now() WHERE id = $1",
            &[&rotation_id],
        )
        .await
        .map_err(db("finishing the rotation"))?;
    info!(kek = %kek, version, rewrapped = total, "rotation finished; older key versions retired");
    Ok(RotationReport {
        rotation_id,
        version,
        rewrapped_now: now,
        rewrapped_total: total,
        resumed,
    })
}

async fn rewrap_store_keys(
    client: &Client,
    provider: &KeyProvider,
    kek: &str,
    version: i32,
) -> Result<(), RotationError> {
    let rows = client
        .query(
            "SELECT name, wrapped_key, kek_name, kek_version FROM umstore.key_material
             WHERE kek_name = $1 AND kek_version < $2",
            &[&kek, &version],
        )
        .await
        .map_err(db("reading store keys"))?;
    for row in rows {
        let name: String = row.get(0);
        let old = WrappedKey {
            wrapped: row.get(1),
            kek_name: row.get(2),
            kek_version: row.get(3),
        };
        let new = provider.rewrap_batch(std::slice::from_ref(&old)).await?;
        if let Some(new) = new.first() {
            client
                .execute(
                    "UPDATE umstore.key_material SET wrapped_key = $2, kek_version = $3, rewrapped_at = now()
                     WHERE name = $1 AND wrapped_key = $4",
                    &[&name, &new.wrapped, &new.kek_version, &old.wrapped],
                )
                .await
                .map_err(db("storing a rewrapped store key"))?;
        }
    }
    Ok(())
}
