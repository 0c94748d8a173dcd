//! The keyring: a key provider, the cache of unwrapped data keys and the
//! blind-index key. Its SQL lives in [`crate::store::keys`] and
//! [`crate::store::erasure`].

use std::sync::Arc;

use thiserror::Error;
use tokio_postgres::{Client, GenericClient};
use tracing::info;
use uuid::Uuid;

use crate::store::reader::Reader;

use super::{
    BlindIndexKey, CryptoError, DataKey, DataKeyCache, FieldAad, KeyProvider, SealedField,
    WrappedKey,
};
use crate::clusters::fence::{Refusal, RegionCheck, REGION_WRITE};
use crate::store::erasure::{
    INSERT_ERASED_HISTORY, INSERT_ERASURE_AUDIT, MARK_USER_ERASED, QUEUE_USER_ERASED,
    SELECT_USER_REGION,
};
use crate::store::keys::{
    DESTROY_USER_KEY, INSERT_BLIND_INDEX, INSERT_USER_KEY, SELECT_BLIND_INDEX, SELECT_USER_KEY,
};

/// The blind-index key is wrapped with this identity (it belongs to no user).
const STORE_KEY_OWNER: Uuid = Uuid::nil();
const STORE_KEY_REGION: &str = "--";

/// Why a keyring operation failed.
#[derive(Debug, Error)]
pub enum KeyringError {
    /// Wrapping, unwrapping or talking to Vault failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A query failed.
    #[error("{what}: {source}")]
    Database {
        /// What the keyring was doing.
        what: &'static str,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// No such user.
    #[error("user {0} is not in the store")]
    UnknownUser(Uuid),
    /// The region's write check refused the erasure (several clusters): the
    /// region is fenced for a moment while it moves (retry soon), or this
    /// cluster does not serve it (read the placement again, erase there).
    #[error("the user's region is moving between clusters: {source}")]
    RegionMoving {
        /// Fenced or moved.
        refusal: Refusal,
        /// The database's refusal.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn db(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> KeyringError {
    move |source| KeyringError::Database { what, source }
}

/// A user's data key, or the fact that it was destroyed.
#[derive(Debug, Clone)]
pub enum UserKey {
    /// The unwrapped key.
    Active(Arc<DataKey>),
    /// Crypto-shredded at this time (RFC 3339): the user's PII cannot be read.
    Erased(String),
}

/// What `forget_user` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForgetReport {
    /// The user's region.
    pub region: String,
    /// False when the key was already destroyed earlier (nothing changed).
    pub destroyed_now: bool,
}

/// Provider + cache + blind-index key.
#[derive(Debug)]
pub struct Keyring {
    provider: KeyProvider,
    cache: DataKeyCache,
    blind_index: BlindIndexKey,
}

impl Keyring {
    /// Opens the keyring: loads the blind-index key from `umstore.key_material`
    /// (creating and storing it wrapped on first use).
    pub async fn open(
        provider: KeyProvider,
        cache: DataKeyCache,
        client: &impl GenericClient,
    ) -> Result<Self, KeyringError> {
        let blind_index = match load_blind_index(&provider, client).await? {
            Some(key) => key,
            None => {
                let (key, raw) = KeyProvider::new_blind_index_key();
                let wrapped = provider
                    .wrap(
                        STORE_KEY_OWNER,
                        STORE_KEY_REGION,
                        &DataKey::from_bytes(*raw),
                    )
                    .await?;
                client
                    .execute(
                        INSERT_BLIND_INDEX,
                        &[&wrapped.wrapped, &wrapped.kek_name, &wrapped.kek_version],
                    )
                    .await
                    .map_err(db("storing the blind-index key"))?;
                // Another process may have stored one first: use whichever won.
                match load_blind_index(&provider, client).await? {
                    Some(stored) => stored,
                    None => key,
                }
            }
        };
        Ok(Self {
            provider,
            cache,
            blind_index,
        })
    }

    /// The key provider.
    pub fn provider(&self) -> &KeyProvider {
        &self.provider
    }

    /// The blind-index key.
    pub fn blind_index(&self) -> &BlindIndexKey {
        &self.blind_index
    }

    /// The cache of unwrapped keys.
    pub fn cache(&self) -> &DataKeyCache {
        &self.cache
    }

    /// The data key of `user_id` (from the cache, else unwrapped and cached).
    pub async fn user_key(
        &self,
        client: &impl Reader,
        user_id: Uuid,
        region: &str,
    ) -> Result<UserKey, KeyringError> {
        if let Some(key) = self.cache.get(&user_id) {
            return Ok(UserKey::Active(key));
        }
        let wrapped = match read_user_key(client, user_id, region).await? {
            StoredKey::Wrapped(wrapped) => wrapped,
            StoredKey::Destroyed(at) => return Ok(UserKey::Erased(at)),
        };
        let key = match self.provider.unwrap(user_id, region, &wrapped).await {
            Ok(key) => key,
            // A rotation rewrapped this key and retired the old version between
            // our read and Vault's answer: the rewrapped key is stored by now.
            Err(CryptoError::RetiredKeyVersion { .. }) => {
                match read_user_key(client, user_id, region).await? {
                    StoredKey::Wrapped(again) if again.kek_version > wrapped.kek_version => {
                        self.provider.unwrap(user_id, region, &again).await?
                    }
                    StoredKey::Wrapped(_) => {
                        return Err(CryptoError::RetiredKeyVersion {
                            user_id,
                            kek_version: wrapped.kek_version,
                        }
                        .into())
                    }
                    StoredKey::Destroyed(at) => return Ok(UserKey::Erased(at)),
                }
            }
            Err(e) => return Err(e.into()),
        };
        let key = Arc::new(key);
        self.cache.insert(user_id, key.clone());
        Ok(UserKey::Active(key))
    }

    /// Creates and stores a data key for a new user; when one exists already
    /// (a concurrent writer), returns that one.
    pub async fn create_user_key(
        &self,
        client: &(impl GenericClient + Sync),
        user_id: Uuid,
        region: &str,
    ) -> Result<UserKey, KeyringError> {
        let key = DataKey::generate();
        let wrapped = self.provider.wrap(user_id, region, &key).await?;
        let inserted = client
            .execute(
                INSERT_USER_KEY,
                &[
                    &user_id,
                    &region,
                    &wrapped.wrapped,
                    &wrapped.kek_name,
                    &wrapped.kek_version,
                ],
            )
            .await
            .map_err(db("storing a data key"))?;
        if inserted == 0 {
            return self.user_key(client, user_id, region).await;
        }
        let key = Arc::new(key);
        self.cache.insert(user_id, key.clone());
        Ok(UserKey::Active(key))
    }

    /// Seals an inbound PII value for storage under `key`. A value the
    /// Metadata Engine already encrypted under the transit key (`vault:vN:...`)
    /// is decrypted through Vault first, so what is stored is always sealed
    /// under the user's own data key; the plaintext lives only in memory
    /// (zeroized on drop).
    pub async fn seal_inbound(
        &self,
        key: &DataKey,
        aad: &FieldAad<'_>,
        value: &str,
    ) -> Result<SealedField, KeyringError> {
        if super::ciphertext_version(value).is_some() {
            let plain = self.provider.decrypt_inbound(value).await?;
            return Ok(key.seal(aad, &plain));
        }
        Ok(key.seal(aad, value.as_bytes()))
    }

    /// Crypto-shredding: destroys the user's data key, marks the user erased,
    /// appends an `erased` history row and an audit row (who, when, why; no
    /// PII) and queues `USER_ERASED` on `<subject_prefix>.out.USER_ERASED` in
    /// the outbox (every data-plane process drops the user from its read
    /// cache), in one transaction, and drops the key from the cache.
    /// Afterwards the user's PII, history included, cannot be decrypted.
    /// Repeating it changes nothing.
    pub async fn forget_user(
        &self,
        client: &mut Client,
        user_id: Uuid,
        actor: &str,
        reason: Option<&str>,
        subject_prefix: &str,
    ) -> Result<ForgetReport, KeyringError> {
        self.forget_user_checked(
            client,
            user_id,
            actor,
            reason,
            subject_prefix,
            RegionCheck::Off,
        )
        .await
    }

    /// [`Self::forget_user`] on a cluster of a store with several
    /// ([`RegionCheck::On`]): the region's write check runs first, and its
    /// refusal is [`KeyringError::RegionMoving`].
    pub async fn forget_user_checked(
        &self,
        client: &mut Client,
        user_id: Uuid,
        actor: &str,
        reason: Option<&str>,
        subject_prefix: &str,
        check: RegionCheck,
    ) -> Result<ForgetReport, KeyringError> {
        let tx = client
            .transaction()
            .await
            .map_err(db("starting the erasure"))?;
        let region: String = tx
            .query_opt(SELECT_USER_REGION, &[&user_id])
            .await
            .map_err(db("finding the user's region"))?
            .ok_or(KeyringError::UnknownUser(user_id))?
            .get(0);
        if check == RegionCheck::On {
            tx.execute(REGION_WRITE, &[&region, &user_id])
                .await
                .map_err(|source| match Refusal::of(&source) {
                    Some(refusal) => KeyringError::RegionMoving { refusal, source },
                    None => KeyringError::Database {
                        what: "checking the user's region",
                        source,
                    },
                })?;
        }
        let destroyed = tx
            .execute(DESTROY_USER_KEY, &[&region, &user_id])
            .await
            .map_err(db("destroying the data key"))?;
        if destroyed > 0 {
            let marked = tx
                .query_opt(MARK_USER_ERASED, &[&region, &user_id])
                .await
                .map_err(db("marking the user erased"))?;
            if let Some(marked) = marked {
                let version: i64 = marked.get(0);
                let erased_at: chrono::DateTime<chrono::Utc> = marked.get(1);
                let payload = serde_json::json!({
                    "event_type": "USER_ERASED",
                    "user_id": user_id,
                    "region": region,
                    "version": version,
                    "erased_at": erased_at,
                });
                let subject = format!("{subject_prefix}.out.USER_ERASED");
                let msg_id = format!("{user_id}:USER_ERASED");
                tx.execute(
                    QUEUE_USER_ERASED,
                    &[&region, &user_id, &subject, &msg_id, &payload],
                )
                .await
                .map_err(db("queueing USER_ERASED"))?;
            }
            tx.execute(INSERT_ERASED_HISTORY, &[&region, &user_id, &actor])
                .await
                .map_err(db("recording the erasure in history"))?;
            tx.execute(INSERT_ERASURE_AUDIT, &[&region, &user_id, &actor, &reason])
                .await
                .map_err(db("writing the erasure audit row"))?;
        }
        tx.commit().await.map_err(db("committing the erasure"))?;
        self.cache.forget(&user_id);
        info!(%user_id, region = %region, destroyed_now = destroyed > 0, "user crypto-shredded");
        Ok(ForgetReport {
            region,
            destroyed_now: destroyed > 0,
        })
    }
}

/// A user's stored key: wrapped, or destroyed at this time (RFC 3339).
enum StoredKey {
    Wrapped(WrappedKey),
    Destroyed(String),
}

/// The user's stored key; an error for an unknown user.
async fn read_user_key(
    client: &impl Reader,
    user_id: Uuid,
    region: &str,
) -> Result<StoredKey, KeyringError> {
    let row = client
        .query_opt(SELECT_USER_KEY, &[&region, &user_id])
        .await
        .map_err(db("reading a data key"))?
        .ok_or(KeyringError::UnknownUser(user_id))?;
    let wrapped: Option<Vec<u8>> = row.get(0);
    Ok(match wrapped {
        Some(wrapped) => StoredKey::Wrapped(WrappedKey {
            wrapped,
            kek_name: row.get(1),
            kek_version: row.get(2),
        }),
        None => StoredKey::Destroyed(row.get::<_, Option<String>>(3).unwrap_or_default()),
    })
}

async fn load_blind_index(
    provider: &KeyProvider,
    client: &impl GenericClient,
) -> Result<Option<BlindIndexKey>, KeyringError> {
    let Some(row) = client
        .query_opt(SELECT_BLIND_INDEX, &[])
        .await
        .map_err(db("reading the blind-index key"))?
    else {
        return Ok(None);
    };
    let wrapped = WrappedKey {
        wrapped: row.get(0),
        kek_name: row.get(1),
        kek_version: row.get(2),
    };
    let key = provider
        .unwrap(STORE_KEY_OWNER, STORE_KEY_REGION, &wrapped)
        .await?;
    Ok(Some(BlindIndexKey::from_bytes(*key.expose())))
}
