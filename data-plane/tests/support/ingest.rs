//! A migrated store with the write path on it: an [`Ingest`] on a pool of writer
//! logins (the identity the data plane uses), the local key provider, and the
//! superuser's connection for the tests' own observations; event builders.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Duration as Span, Utc};
use serde_json::{json, Value};
use tokio_postgres::Client;
use umstore_data_plane::crypto::{DataKeyCache, KeyProvider, KeyProviderConfig, Keyring};
use umstore_data_plane::db::Database;
use umstore_data_plane::ingest::{ApplyConfig, Ingest, Outcome, SubmitError};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

use super::{connect, Store};

pub struct Fixture {
    pub store: Store,
    pub ingest: Ingest,
    pub admin: Client,
    pub keys: tempfile::TempDir,
}

/// A migrated store and an ingest on it (subjects under `umstore.events`).
pub async fn fixture() -> Fixture {
    fixture_with("umstore.events").await
}

/// A migrated store and an ingest on it, outbound subjects under `subject_prefix`.
pub async fn fixture_with(subject_prefix: &str) -> Fixture {
    let store = Store::migrated().await;
    let writer = store.connect(Purpose::Writer).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let provider = KeyProvider::open(KeyProviderConfig::Local {
        dir: keys.path().to_path_buf(),
        require_vault: false,
    })
    .await
    .expect("local key provider");
    let keyring = Keyring::open(
        provider,
        DataKeyCache::new(1000, Duration::from_secs(60)),
        &writer,
    )
    .await
    .expect("keyring");
    let database = Database::parse(&store.url(Purpose::Writer)).expect("writer url");
    let ingest = Ingest::new(
        &database,
        8,
        Arc::new(keyring),
        ApplyConfig {
            subject_prefix: subject_prefix.into(),
            eligibility_ttl: Span::hours(24),
        },
    )
    .expect("pool");
    let admin = connect(store.superuser()).await;
    Fixture {
        store,
        ingest,
        admin,
        keys,
    }
}

/// An event of `event_type` for `user` in KA.
pub fn envelope(event_type: &str, user: Uuid, at: DateTime<Utc>, payload: Value) -> Value {
    json!({
        "event_id": Uuid::new_v4(),
        "event_type": event_type,
        "occurred_at": at,
        "user_id": user,
        "region": "KA",
        "source": "metadata-engine",
        "schema_version": 1,
        "payload": payload,
    })
}

/// A full `METADATA_CREATED` for `user`.
pub fn created(user: Uuid, at: DateTime<Utc>) -> Value {
    envelope(
        "METADATA_CREATED",
        user,
        at,
        json!({
            "full_name": "Asha Rao",
            "date_of_birth": "1960-04-02",
            "gender": "female",
            "annual_income": 240000,
            "household_size": 4,
            "employment_type": "agriculture",
            "ration_card": "bpl",
            "district": "Mysuru",
            "pincode": "570001",
            "phone": "9876543210",
            "identity_token": "tok-0001-abcd",
            "children": 2,
            "land_holding_acres": 1.5,
        }),
    )
}

impl Fixture {
    pub async fn submit(&self, event: &Value) -> Result<Outcome, SubmitError> {
        self.ingest
            .submit(event.to_string().as_bytes())
            .await
            .map(|(_, o)| o)
    }

    /// History rows, outbox rows and the version of `user`.
    pub async fn counts(&self, user: Uuid) -> (i64, i64, i64) {
        (
            self.count(
                "SELECT count(*) FROM umstore.user_metadata_history WHERE user_id = $1",
                user,
            )
            .await,
            self.count(
                "SELECT count(*) FROM umstore.outbox WHERE user_id = $1",
                user,
            )
            .await,
            self.count(
                "SELECT max(version) FROM umstore.user_metadata WHERE user_id = $1",
                user,
            )
            .await,
        )
    }

    pub async fn count(&self, sql: &str, user: Uuid) -> i64 {
        self.admin
            .query_one(sql, &[&user])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }
}
