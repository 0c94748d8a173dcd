//! Online KEK rotation: rotate the transit key, rewrap every wrapped data key
//! in batches (no field is re-encrypted, reads and writes go on), then retire
//! the old versions by raising `min_decryption_version`.
//!
//! A rotation is recorded in `umstore.key_rotations` *before* the transit key
//! is rotated, with the version rotating will create, so a process killed at
//! any point resumes the same rotation when run again and never rotates the
//! transit key twice. Each batch's updates and the cursor commit in one
//! transaction, so every key is rewrapped to the new version exactly once.
//! Its SQL lives in [`crate::store::keys`].

use std::time::Instant;

use thiserror::Error;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::{info, warn};
use uuid::Uuid;

use super::{CryptoError, KeyProvider, WrappedKey};

mod pause;

use crate::store::keys::{
    FINISH_ROTATION, INSERT_ROTATION, SAVE_ROTATION_CURSOR, SELECT_KEYS_TO_REWRAP,
    SELECT_KEYS_TO_REWRAP_AFTER, SELECT_OLDEST_VERSION_IN_USE, SELECT_REGION_SCOPE,
    SELECT_STORE_KEYS_TO_REWRAP, SELECT_UNFINISHED_ROTATION, UPDATE_REWRAPPED_KEYS,
    UPDATE_REWRAPPED_STORE_KEY, UPDATE_ROTATION_TARGET,
};
use pause::Pause;
pub use pause::{PausePoint, PAUSE_ENV};

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
    /// Another process started a rotation of the same key at the same moment.
    #[error(
        "another rotation of key {0} started at the same moment; let it finish, or run \
         `keys rotate` again to resume it if its process is gone"
    )]
    AlreadyRunning(String),
    /// The session sees only some regions: it would retire the old key
    /// version while other regions' keys still need it.
    #[error(
        "the rotation's database session does not see every region (umstore.regions = '{0}'): \
         it must see every region's keys before it retires old key versions; run it unscoped"
    )]
    RegionScoped(String),
    /// Keys kept arriving under an old version after it was retired.
    #[error(
        "keys wrapped under version {version} of key {kek} kept being stored after it was \
         retired; run `keys rotate` again once writers have caught up"
    )]
    OldVersionInUse {
        /// The KEK.
        kek: String,
        /// The old version still in use.
        version: i32,
    },
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> RotationError {
    move |source| RotationError::Database { what, source }
}

/// How to rotate.
#[derive(Debug, Clone, Copy)]
pub struct RotationOptions {
    /// Keys per Vault `rewrap` call and per database transaction.
    pub batch_size: usize,
}

impl Default for RotationOptions {
    fn default() -> Self {
        Self { batch_size: 500 }
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
    if matches!(provider, KeyProvider::Local(_)) {
        return Err(CryptoError::NeedsVault("key rotation").into());
    }
    check_sees_every_region(client).await?;
    let mut pause = Pause::from_env();
    let mut run = start_or_resume(client, provider, opts).await?;
    if run.resumed {
        info!(kek = %run.kek, version = run.version, rewrapped = run.total, "resuming an interrupted rotation");
    }

    // Make sure the transit key is at the recorded version: rotate unless a
    // killed run did already.
    let mut latest = provider.versions().await?.latest;
    if latest < run.version {
        latest = provider.rotate().await?;
        info!(kek = %run.kek, version = latest, "transit key rotated; rewrapping data keys");
        pause.reached(PausePoint::TransitRotated).await;
    }
    if latest > run.version {
        // Rotated outside this rotation as well: rewrap to the newest version.
        run.version = latest;
        client
            .execute(UPDATE_ROTATION_TARGET, &[&run.id, &latest])
            .await
            .map_err(db("recording the rotation's version"))?;
    }

    let limit = i64::try_from(opts.batch_size.max(1)).unwrap_or(500);
    let mut use_cursor = true;
    let mut retire_attempts = 0;
    loop {
        // A killed run may have retired the old version before a straggler (below)
        // was stored under it: make it decryptable again so the key can be rewrapped.
        reopen_versions_in_use(client, provider, &run.kek).await?;
        rewrap_data_keys(
            client,
            provider,
            &mut run,
            limit,
            &mut use_cursor,
            &mut pause,
            &mut progress,
        )
        .await?;
        rewrap_store_keys(client, provider, &run.kek, run.version, &mut pause).await?;
        provider.set_min_decryption_version(run.version).await?;
        pause.reached(PausePoint::MinVersionRaised).await;
        // A writer that wrapped a key just before the transit key rotated and
        // committed it only after the last sweep left it under the version just
        // retired: reopen that version and sweep again.
        match oldest_version_in_use(client, &run.kek).await? {
            Some(oldest) if oldest < run.version => {
                retire_attempts += 1;
                if retire_attempts > MAX_RETIRE_ATTEMPTS {
                    return Err(RotationError::OldVersionInUse {
                        kek: run.kek,
                        version: oldest,
                    });
                }
                warn!(kek = %run.kek, version = oldest, "a key was stored under the old version after the sweep; rewrapping it");
            }
            _ => break,
        }
    }
    client
        .execute(FINISH_ROTATION, &[&run.id])
        .await
        .map_err(db("finishing the rotation"))?;
    info!(kek = %run.kek, version = run.version, rewrapped = run.total, "rotation finished; older key versions retired");
    Ok(RotationReport {
        rotation_id: run.id,
        version: run.version,
        rewrapped_now: run.now,
        rewrapped_total: run.total,
        resumed: run.resumed,
    })
}

/// A rotation as recorded in `key_rotations`, and this run's counts.
struct Run {
    id: i64,
    kek: String,
    /// The version keys are rewrapped to.
    version: i32,
    /// The last key of the last committed batch of the first pass.
    cursor: Option<(String, Uuid)>,
    /// Keys rewrapped by the rotation, earlier runs included.
    total: i64,
    /// Keys rewrapped by this run.
    now: i64,
    batches: usize,
    started: Instant,
    resumed: bool,
}

/// Refuses a session that row-level security holds to some regions.
async fn check_sees_every_region(client: &Client) -> Result<(), RotationError> {
    let scope = client
        .query_one(SELECT_REGION_SCOPE, &[])
        .await
        .map_err(db("reading the session's region scope"))?;
    if scope.get::<_, Option<bool>>(0) != Some(true) {
        let setting: Option<String> = scope.get(1);
        return Err(RotationError::RegionScoped(setting.unwrap_or_default()));
    }
    Ok(())
}

/// The KEK's unfinished rotation, or a new one recorded with the version
/// rotating will create: recorded *before* Vault rotates, so a process killed
/// after Vault rotated finds it here and does not rotate again.
async fn start_or_resume(
    client: &Client,
    provider: &KeyProvider,
    opts: RotationOptions,
) -> Result<Run, RotationError> {
    let kek = provider.kek_name().to_owned();
    let unfinished = client
        .query_opt(SELECT_UNFINISHED_ROTATION, &[&kek])
        .await
        .map_err(db("looking for an unfinished rotation"))?;
    let (id, version, cursor, total, resumed) = match unfinished {
        Some(row) => {
            let cursor = match (
                row.get::<_, Option<String>>(2),
                row.get::<_, Option<Uuid>>(3),
            ) {
                (Some(region), Some(user)) => Some((region, user)),
                _ => None,
            };
            (row.get(0), row.get(1), cursor, row.get(4), true)
        }
        None => {
            let target = provider.versions().await?.latest + 1;
            let batch = i32::try_from(opts.batch_size).unwrap_or(i32::MAX);
            let id: i64 = client
                .query_one(INSERT_ROTATION, &[&kek, &target, &batch])
                .await
                .map_err(|e| {
                    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                        RotationError::AlreadyRunning(kek.clone())
                    } else {
                        db("recording the rotation")(e)
                    }
                })?
                .get(0);
            (id, target, None, 0, false)
        }
    };
    Ok(Run {
        id,
        kek,
        version,
        cursor,
        total,
        now: 0,
        batches: 0,
        started: Instant::now(),
        resumed,
    })
}

/// Rewraps every data key under an older version than the run's, in batches:
/// first in key order behind the saved cursor, then in sweeps without it for
/// keys a concurrent writer created under the old version meanwhile.
async fn rewrap_data_keys(
    client: &mut Client,
    provider: &KeyProvider,
    run: &mut Run,
    limit: i64,
    use_cursor: &mut bool,
    pause: &mut Pause,
    progress: &mut impl FnMut(i64),
) -> Result<(), RotationError> {
    loop {
        let (cursor_region, cursor_user) = match &run.cursor {
            Some((r, u)) if *use_cursor => (Some(r.clone()), Some(*u)),
            _ => (None, None),
        };
        let rows = match (&cursor_region, &cursor_user) {
            (Some(region), Some(user)) => {
                client
                    .query(
                        SELECT_KEYS_TO_REWRAP_AFTER,
                        &[&run.kek, &run.version, region, user, &limit],
                    )
                    .await
            }
            _ => {
                client
                    .query(SELECT_KEYS_TO_REWRAP, &[&run.kek, &run.version, &limit])
                    .await
            }
        }
        .map_err(db("reading a batch of data keys"))?;
        if rows.is_empty() {
            if *use_cursor {
                *use_cursor = false;
                continue;
            }
            return Ok(());
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
        if *use_cursor {
            run.cursor = pending.last().map(|p| (p.region.clone(), p.user_id));
        }
        let (cursor_region, cursor_user) = (
            run.cursor.as_ref().map(|c| c.0.as_str()),
            run.cursor.as_ref().map(|c| c.1),
        );

        let tx = client
            .transaction()
            .await
            .map_err(db("starting a rewrap batch"))?;
        // Compare-and-set on the old wrapped bytes: a key destroyed meanwhile
        // (crypto-shredding) stays destroyed.
        let updated = tx
            .execute(
                UPDATE_REWRAPPED_KEYS,
                &[&regions, &users, &old_bytes, &new_bytes, &new_versions],
            )
            .await
            .map_err(db("storing rewrapped keys"))?;
        let updated = i64::try_from(updated).unwrap_or(i64::MAX);
        tx.execute(
            SAVE_ROTATION_CURSOR,
            &[&run.id, &cursor_region, &cursor_user, &updated],
        )
        .await
        .map_err(db("saving the rotation cursor"))?;
        pause.reached(PausePoint::BatchRewrapped).await;
        tx.commit().await.map_err(db("committing a rewrap batch"))?;
        run.now += updated;
        run.total += updated;
        run.batches += 1;
        progress(run.total);
        info!(
            rewrapped = run.total,
            batch = run.batches,
            per_second = run.now as f64 / run.started.elapsed().as_secs_f64().max(1e-9),
            "rewrapping data keys"
        );
    }
}

/// How often a rotation sweeps again for keys stored under the old version
/// after it was retired, before it gives up.
const MAX_RETIRE_ATTEMPTS: usize = 5;

/// The oldest KEK version a stored key is wrapped under.
async fn oldest_version_in_use(client: &Client, kek: &str) -> Result<Option<i32>, RotationError> {
    Ok(client
        .query_one(SELECT_OLDEST_VERSION_IN_USE, &[&kek])
        .await
        .map_err(db("looking for keys under old versions"))?
        .get(0))
}

/// Lowers the KEK's `min_decryption_version` to the oldest version a stored
/// key still needs, when it was raised past it.
async fn reopen_versions_in_use(
    client: &Client,
    provider: &KeyProvider,
    kek: &str,
) -> Result<(), RotationError> {
    let Some(oldest) = oldest_version_in_use(client, kek).await? else {
        return Ok(());
    };
    if oldest < provider.versions().await?.min_decryption {
        warn!(kek = %kek, version = oldest, "keys are stored under a retired key version; making it decryptable again to rewrap them");
        provider.set_min_decryption_version(oldest).await?;
    }
    Ok(())
}

async fn rewrap_store_keys(
    client: &Client,
    provider: &KeyProvider,
    kek: &str,
    version: i32,
    pause: &mut Pause,
) -> Result<(), RotationError> {
    let rows = client
        .query(SELECT_STORE_KEYS_TO_REWRAP, &[&kek, &version])
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
        pause.reached(PausePoint::StoreKeyRewrapped).await;
        if let Some(new) = new.first() {
            client
                .execute(
                    UPDATE_REWRAPPED_STORE_KEY,
                    &[&name, &new.wrapped, &new.kek_version, &old.wrapped],
                )
                .await
                .map_err(db("storing a rewrapped store key"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_points_have_distinct_names() {
        let mut names: Vec<&str> = PausePoint::ALL.iter().map(|p| p.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), PausePoint::ALL.len());
    }
}
