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
use crate::store::keys::{
    FINISH_ROTATION, INSERT_ROTATION, SAVE_ROTATION_CURSOR, SELECT_KEYS_TO_REWRAP,
    SELECT_REGION_SCOPE, SELECT_STORE_KEYS_TO_REWRAP, SELECT_UNFINISHED_ROTATION,
    UPDATE_REWRAPPED_KEYS, UPDATE_REWRAPPED_STORE_KEY, UPDATE_ROTATION_TARGET,
};

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

/// **Test aid.** The environment variable that makes a rotation stop for good
/// at a named point, so a crash test can kill the process exactly there:
/// `<point>` or `<point>:<n>` (the n-th time the point is reached, for
/// batches), with the points of [`PausePoint`]. When the point is reached the
/// rotation logs `pausing the rotation at <point>` and waits forever: it never
/// continues, so it cannot change what a rotation does, only where a killed one
/// stops. Never set it outside tests.
pub const PAUSE_ENV: &str = "UMSTORE_ROTATION_PAUSE_AT";

/// Where [`PAUSE_ENV`] can stop a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PausePoint {
    /// Vault rotated the transit key; no key is rewrapped yet.
    TransitRotated,
    /// A batch is rewrapped by Vault and updated in its open transaction, not
    /// yet committed.
    BatchRewrapped,
    /// Every data key is rewrapped; Vault rewrapped a store key, which is not
    /// stored yet.
    StoreKeyRewrapped,
    /// Vault's `min_decryption_version` is raised; the rotation is not yet
    /// recorded as finished.
    MinVersionRaised,
}

impl PausePoint {
    /// Every point.
    pub const ALL: [PausePoint; 4] = [
        PausePoint::TransitRotated,
        PausePoint::BatchRewrapped,
        PausePoint::StoreKeyRewrapped,
        PausePoint::MinVersionRaised,
    ];

    /// Its name in [`PAUSE_ENV`].
    pub const fn name(self) -> &'static str {
        match self {
            PausePoint::TransitRotated => "transit-rotated",
            PausePoint::BatchRewrapped => "batch-rewrapped",
            PausePoint::StoreKeyRewrapped => "store-key-rewrapped",
            PausePoint::MinVersionRaised => "min-version-raised",
        }
    }
}

/// The pause asked for through [`PAUSE_ENV`], and how often each point was
/// reached.
struct Pause {
    at: Option<(PausePoint, usize)>,
    reached: [usize; 4],
}

impl Pause {
    fn from_env() -> Self {
        let at = std::env::var(PAUSE_ENV).ok().and_then(|value| {
            let (name, nth) = match value.split_once(':') {
                Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                None => (value.clone(), 1),
            };
            let point = PausePoint::ALL.into_iter().find(|p| p.name() == name);
            if point.is_none() {
                warn!(value = %value, "{PAUSE_ENV} names no pause point; ignored");
            }
            point.map(|p| (p, nth))
        });
        Self {
            at,
            reached: [0; 4],
        }
    }

    async fn reached(&mut self, point: PausePoint) {
        let index = PausePoint::ALL
            .iter()
            .position(|p| *p == point)
            .unwrap_or(0);
        self.reached[index] += 1;
        if self.at == Some((point, self.reached[index])) {
            warn!(
                "pausing the rotation at {} ({PAUSE_ENV}, a test aid): waiting to be killed",
                point.name()
            );
            std::future::pending::<()>().await;
        }
    }
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
    let scope = client
        .query_one(SELECT_REGION_SCOPE, &[])
        .await
        .map_err(db("reading the session's region scope"))?;
    if scope.get::<_, Option<bool>>(0) != Some(true) {
        let setting: Option<String> = scope.get(1);
        return Err(RotationError::RegionScoped(setting.unwrap_or_default()));
    }
    let mut pause = Pause::from_env();
    let kek = provider.kek_name().to_owned();
    let unfinished = client
        .query_opt(SELECT_UNFINISHED_ROTATION, &[&kek])
        .await
        .map_err(db("looking for an unfinished rotation"))?;
    let (rotation_id, recorded_target, mut cursor, mut total, resumed) = match unfinished {
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
            // Record the rotation first, with the version rotating will create:
            // a process killed after Vault rotated finds it here and does not
            // rotate again.
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
    if resumed {
        info!(kek = %kek, version = recorded_target, rewrapped = total, "resuming an interrupted rotation");
    }

    // Make sure the transit key is at the recorded version: rotate unless a
    // killed run did already.
    let mut latest = provider.versions().await?.latest;
    if latest < recorded_target {
        latest = provider.rotate().await?;
        info!(kek = %kek, version = latest, "transit key rotated; rewrapping data keys");
        pause.reached(PausePoint::TransitRotated).await;
    }
    let version = latest.max(recorded_target);
    if version != recorded_target {
        // Rotated outside this rotation as well: rewrap to the newest version.
        client
            .execute(UPDATE_ROTATION_TARGET, &[&rotation_id, &version])
            .await
            .map_err(db("recording the rotation's version"))?;
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
                SELECT_KEYS_TO_REWRAP,
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
            &[&rotation_id, &cursor_region, &cursor_user, &updated],
        )
        .await
        .map_err(db("saving the rotation cursor"))?;
        pause.reached(PausePoint::BatchRewrapped).await;
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
    }

    rewrap_store_keys(client, provider, &kek, version, &mut pause).await?;
    provider.set_min_decryption_version(version).await?;
    pause.reached(PausePoint::MinVersionRaised).await;
    client
        .execute(FINISH_ROTATION, &[&rotation_id])
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
