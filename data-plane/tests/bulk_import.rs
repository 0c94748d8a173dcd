//! `bulk import` against real PostgreSQL, run as the built binary with the
//! writer login (the identity the data plane writes with): a large file with
//! bad records among good ones, a crash (SIGKILL) mid-import then a resume,
//! CSV, and rows equal to what the write path stores for the same event.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::ingest::{created, fixture};
use support::*;
use tokio_postgres::Client;
use umstore_data_plane::crypto::{
    DataKeyCache, FieldAad, KeyProvider, KeyProviderConfig, Keyring, UserKey,
};
use umstore_data_plane::ingest::Outcome;
use umstore_data_plane::seed::Generator;
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

/// A user of the generator as the flat import form.
fn flat(gen: &mut Generator) -> Value {
    umstore_data_plane::seed::import_record(&gen.next_profile())
}

/// What a file holds: the good users (user id → record) and the bad
/// records' lines with a word their reason must contain.
struct File {
    path: PathBuf,
    good: BTreeMap<Uuid, Value>,
    bad: BTreeMap<u64, &'static str>,
}

/// A JSON Lines file of `n` records: good users from `seed`, and every
/// `every`th line a bad record of one of several kinds. `existing` is a user
/// already in the store.
fn write_file(dir: &Path, n: u64, seed: u64, every: u64, existing: Uuid) -> File {
    let today = chrono::Utc::now().date_naive();
    let mut gen = Generator::new(seed, today);
    let path = dir.join(format!("users-{seed}.jsonl"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&path).expect("file"));
    let mut good = BTreeMap::new();
    let mut bad = BTreeMap::new();
    let mut last_good: Option<Uuid> = None;
    for line in 1..=n {
        let text = if line % every == 0 {
            let mut v = flat(&mut gen);
            let (text, reason) = match (line / every) % 7 {
                0 => ("{\"user_id\": ".to_owned(), "not a JSON object"),
                1 => {
                    v["region"] = json!("ZZ");
                    (v.to_string(), "region")
                }
                2 => {
                    v.as_object_mut().expect("object").remove("date_of_birth");
                    (v.to_string(), "date_of_birth")
                }
                3 => {
                    v["household_size"] = json!("four");
                    (v.to_string(), "household_size")
                }
                4 => {
                    v["user_id"] = json!(last_good.expect("a good user before"));
                    (v.to_string(), "appears again")
                }
                5 => {
                    v["user_id"] = json!(existing);
                    (v.to_string(), "already exists")
                }
                _ => {
                    v["nickname"] = json!("x");
                    (v.to_string(), "nickname")
                }
            };
            bad.insert(line, reason);
            text
        } else {
            let v = flat(&mut gen);
            let id: Uuid = v["user_id"].as_str().expect("id").parse().expect("uuid");
            last_good = Some(id);
            good.insert(id, v.clone());
            v.to_string()
        };
        writeln!(out, "{text}").expect("write");
    }
    out.flush().expect("flush");
    File { path, good, bad }
}

/// The import command as the writer login, with the local key file in `keys`.
fn import_command(store: &Store, keys: &Path, file: &Path, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["bulk", "import"])
        .arg(file)
        .args(["--engine", "cpu", "--no-refresh-stats"])
        .args(extra)
        .env("UMSTORE_DATABASE_URL", store.url(Purpose::Writer))
        .env("UMSTORE_DATA_DIR", keys)
        .env_remove("UMSTORE_VAULT_ADDR")
        .env_remove("UMSTORE_CLUSTERS")
        .env("RUST_LOG", "info");
    cmd
}

fn run_import(store: &Store, keys: &Path, file: &Path, extra: &[&str]) -> String {
    let out = import_command(store, keys, file, extra)
        .output()
        .expect("run the import");
    assert!(
        out.status.success(),
        "import failed: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

async fn keyring(client: &Client, keys: &Path) -> Keyring {
    let provider = KeyProvider::open(KeyProviderConfig::Local {
        dir: keys.to_path_buf(),
        require_vault: false,
    })
    .await
    .expect("local key provider");
    Keyring::open(
        provider,
        DataKeyCache::new(1_000, Duration::from_secs(60)),
        client,
    )
    .await
    .expect("keyring")
}

/// The users stored, with how many history rows each has.
async fn stored(client: &Client) -> BTreeMap<Uuid, i64> {
    client
        .query(
            "SELECT d.user_id, (SELECT count(*) FROM umstore.user_metadata_history h
                                WHERE h.user_id = d.user_id AND h.region = d.region)
             FROM umstore.user_directory d",
            &[],
        )
        .await
        .expect("users")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

/// The reject file's entries: line → reason.
fn rejects(file: &Path) -> BTreeMap<u64, String> {
    let mut path = file.as_os_str().to_owned();
    path.push(".rejects.jsonl");
    let text = std::fs::read_to_string(PathBuf::from(path)).expect("reject file");
    let mut out = BTreeMap::new();
    add_rejects(&text, &mut out);
    out
}

/// Adds a reject file's `text` to `out` (line → reason); a line already
/// there fails the test.
fn add_rejects(text: &str, out: &mut BTreeMap<u64, String>) {
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("a reject is JSON");
        let n = v["line"].as_u64().expect("line");
        let reason = v["reason"].as_str().expect("reason").to_owned();
        assert!(out.insert(n, reason).is_none(), "line {n} is refused twice");
    }
}

/// Every good user stored once with one history row, every bad record in
/// the reject file once with its reason, nothing else.
async fn check_outcome(client: &Client, file: &File, existing: Uuid) {
    let users = stored(client).await;
    for id in file.good.keys() {
        assert_eq!(
            users.get(id),
            Some(&1),
            "user {id}: stored once, one history row"
        );
    }
    assert_eq!(
        users.len(),
        file.good.len() + 1,
        "the good users and the one that existed before, nothing else"
    );
    assert!(users.contains_key(&existing));
    let refused = rejects(&file.path);
    assert_eq!(
        refused.keys().collect::<Vec<_>>(),
        file.bad.keys().collect::<Vec<_>>(),
        "exactly the bad lines are refused"
    );
    for (line, word) in &file.bad {
        let reason = &refused[line];
        assert!(
            reason.contains(word),
            "line {line}: the reason {reason:?} should name {word:?}"
        );
    }
}

/// One user's personal data opens to what the file said.
async fn check_pii(client: &Client, keys: &Keyring, id: Uuid, record: &Value) {
    let row = client
        .query_one(
            "SELECT region::text, full_name_enc, phone_enc, annual_income_enc
             FROM umstore.user_metadata WHERE user_id = $1",
            &[&id],
        )
        .await
        .expect("metadata row");
    let region: String = row.get(0);
    let UserKey::Active(key) = keys.user_key(client, id, &region).await.expect("key") else {
        panic!("user {id}'s key is erased");
    };
    for (i, (column, field)) in [
        ("full_name_enc", "full_name"),
        ("phone_enc", "phone"),
        ("annual_income_enc", "annual_income"),
    ]
    .into_iter()
    .enumerate()
    {
        let sealed: Vec<u8> = row.get(i + 1);
        let plain = key
            .open(
                &FieldAad {
                    user_id: id,
                    region: &region,
                    column,
                },
                &sealed,
            )
            .expect("opens under the user's key");
        let want = match &record[field] {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        assert_eq!(String::from_utf8(plain).expect("utf-8"), want, "{column}");
    }
}

#[tokio::test]
async fn a_large_file_with_bad_records_imports_every_good_user_once() {
    let f = fixture().await;
    let existing = Uuid::new_v4();
    assert!(matches!(
        f.submit(&created(existing, chrono::Utc::now()))
            .await
            .expect("created"),
        Outcome::Applied { .. }
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(dir.path(), 100_000, 11, 997, existing);
    let out = run_import(&f.store, f.keys.path(), &file.path, &[]);
    assert!(out.contains("users imported"), "{out}");
    let writer = f.store.connect(Purpose::Writer).await;
    check_outcome(&writer, &file, existing).await;
    let keys = keyring(&writer, f.keys.path()).await;
    for (id, record) in file.good.iter().step_by(997).take(50) {
        check_pii(&writer, &keys, *id, record).await;
    }
    // Derived attributes for every user.
    let derived: i64 = writer
        .query_one("SELECT count(*) FROM umstore.user_derived_attributes", &[])
        .await
        .expect("derived")
        .get(0);
    assert_eq!(derived as usize, file.good.len() + 1);
    // The same file again: recorded as done, nothing written.
    let again = run_import(&f.store, f.keys.path(), &file.path, &[]);
    assert!(again.contains("nothing to do"), "{again}");
    assert_eq!(stored(&writer).await.len(), file.good.len() + 1);
}

#[tokio::test]
async fn an_import_killed_midway_resumes_with_no_user_twice_and_none_missing() {
    let f = fixture().await;
    let existing = Uuid::new_v4();
    f.submit(&created(existing, chrono::Utc::now()))
        .await
        .expect("created");
    let dir = tempfile::tempdir().expect("tempdir");
    let file = write_file(dir.path(), 40_000, 23, 211, existing);
    let writer = f.store.connect(Purpose::Writer).await;
    let args = ["--batch-users", "500", "--takeover-after", "2s"];
    let mut child = import_command(&f.store, f.keys.path(), &file.path, &args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the import");
    // Kill it once some batches are in and well before the end.
    let deadline = Instant::now() + Duration::from_secs(120);
    let imported_at_kill = loop {
        let n: i64 = writer
            .query_opt("SELECT imported FROM umstore.bulk_imports", &[])
            .await
            .expect("progress")
            .map_or(0, |r| r.get(0));
        if n >= 5_000 {
            break n;
        }
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the import ended before it could be killed"
        );
        assert!(Instant::now() < deadline, "the import made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A second import of the same file meanwhile is refused, and changes nothing.
    let second = import_command(&f.store, f.keys.path(), &file.path, &[])
        .output()
        .expect("run a second import");
    assert!(!second.status.success());
    assert!(
        stderr(&second).contains("another import of this file"),
        "{}",
        stderr(&second)
    );
    // Child::kill is SIGKILL on Unix: no chance to finish the batch under way.
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
    let partial = stored(&writer).await.len() as i64 - 1;
    assert!(
        partial >= imported_at_kill && (partial as usize) < file.good.len(),
        "killed midway: {partial} of {} users in",
        file.good.len()
    );
    // The dead run's heartbeat is fresh: a run right away is refused, saying
    // when it may take over; after --takeover-after it resumes.
    let early = import_command(&f.store, f.keys.path(), &file.path, &args)
        .output()
        .expect("run right after the kill");
    assert!(!early.status.success());
    assert!(
        stderr(&early).contains("run again once 2 s have passed"),
        "{}",
        stderr(&early)
    );
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let out = run_import(&f.store, f.keys.path(), &file.path, &args);
    assert!(out.contains("resumed an earlier run"), "{out}");
    check_outcome(&writer, &file, existing).await;
    let attempts: i32 = writer
        .query_one("SELECT attempts FROM umstore.bulk_imports", &[])
        .await
        .expect("attempts")
        .get(0);
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn csv_with_quoted_commas_empty_cells_and_bad_cells() {
    let f = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("users.csv");
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    std::fs::write(
        &path,
        format!(
            "user_id,region,full_name,date_of_birth,gender,annual_income,household_size,\
             employment_type,ration_card,occupation,disability,land_holding_acres,phone\n\
             {a},KA,\"Rao, Asha\",1980-01-02,female,350000,3,salaried,apl,\"teacher, school\",\
             no,0.5,9876543210\n\
             {b},TN,Kumar,1975-05-06,male,120000,5,agriculture,bpl,,yes,,\n\
             {c},KA,Devi,1990-03-04,female,abc,2,salaried,apl,,no,,\n\
             {a},KA,Short row\n"
        ),
    )
    .expect("csv");
    let out = run_import(&f.store, f.keys.path(), &path, &[]);
    assert!(out.contains("2 users imported, 2 records refused"), "{out}");
    let refused = rejects(&path);
    assert!(refused[&4].contains("annual_income"), "{refused:?}");
    assert!(
        !refused[&4].contains("abc"),
        "a personal value is never quoted"
    );
    assert!(refused[&5].contains("fields"), "{refused:?}");
    let writer = f.store.connect(Purpose::Writer).await;
    let row = writer
        .query_one(
            "SELECT occupation, disability, land_holding_acres::text, phone_enc IS NULL
             FROM umstore.user_metadata WHERE user_id = $1",
            &[&a],
        )
        .await
        .expect("a");
    assert_eq!(row.get::<_, String>(0), "teacher, school");
    assert!(!row.get::<_, bool>(1));
    assert_eq!(row.get::<_, String>(2), "0.50");
    assert!(!row.get::<_, bool>(3));
    let row = writer
        .query_one(
            "SELECT occupation IS NULL, disability, phone_enc IS NULL
             FROM umstore.user_metadata WHERE user_id = $1",
            &[&b],
        )
        .await
        .expect("b");
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    let keys = keyring(&writer, f.keys.path()).await;
    check_pii(
        &writer,
        &keys,
        a,
        &json!({"full_name": "Rao, Asha", "phone": "9876543210", "annual_income": 350000}),
    )
    .await;
}

/// The rows of a user, as comparable values: personal data opened, ids and
/// times left out.
async fn user_rows(client: &Client, keys: &Keyring, id: Uuid) -> Value {
    let m = client
        .query_one(
            "SELECT region::text, to_jsonb(m) - 'user_id' - 'created_at' - 'updated_at'
                - 'last_event_at' FROM umstore.user_metadata m WHERE user_id = $1",
            &[&id],
        )
        .await
        .expect("metadata");
    let region: String = m.get(0);
    let mut meta: Value = m.get(1);
    let UserKey::Active(key) = keys.user_key(client, id, &region).await.expect("key") else {
        panic!("erased");
    };
    let mut opened = json!({});
    for column in [
        "full_name_enc",
        "date_of_birth_enc",
        "district_enc",
        "pincode_enc",
        "phone_enc",
        "identity_token_enc",
        "annual_income_enc",
    ] {
        let sealed: Option<Vec<u8>> = client
            .query_one(
                &format!("SELECT {column} FROM umstore.user_metadata WHERE user_id = $1"),
                &[&id],
            )
            .await
            .expect("sealed")
            .get(0);
        opened[column] = match sealed {
            Some(s) => json!(String::from_utf8(
                key.open(
                    &FieldAad {
                        user_id: id,
                        region: &region,
                        column,
                    },
                    &s,
                )
                .expect("opens")
            )
            .expect("utf-8")),
            None => Value::Null,
        };
        meta.as_object_mut().expect("row").remove(column);
    }
    let derived: Value = client
        .query_one(
            "SELECT to_jsonb(d) - 'user_id' - 'computed_at' FROM umstore.user_derived_attributes d
             WHERE user_id = $1",
            &[&id],
        )
        .await
        .expect("derived")
        .get(0);
    let h = client
        .query_one(
            "SELECT change_type, changed_fields, old_values, new_values, version
             FROM umstore.user_metadata_history WHERE user_id = $1",
            &[&id],
        )
        .await
        .expect("history");
    let new_values: Value = h.get(3);
    let pii: HashSet<&str> = [
        "full_name",
        "date_of_birth",
        "district",
        "pincode",
        "phone",
        "identity_token",
        "annual_income",
    ]
    .into();
    // Personal data in the history is ciphertext (differs per seal): compare
    // which fields hold it, and the plain values.
    let plain_new: BTreeMap<String, Value> = new_values
        .as_object()
        .expect("object")
        .iter()
        .map(|(k, v)| {
            let v = if pii.contains(k.as_str()) {
                json!(v.is_string())
            } else {
                v.clone()
            };
            (k.clone(), v)
        })
        .collect();
    json!({
        "metadata": meta,
        "pii": opened,
        "derived": derived,
        "history": {
            "change_type": h.get::<_, String>(0),
            "changed_fields": h.get::<_, Vec<String>>(1),
            "old_values": h.get::<_, Value>(2),
            "new_values": plain_new,
            "version": h.get::<_, i64>(4),
        },
    })
}

#[tokio::test]
async fn an_imported_user_is_stored_exactly_as_the_write_path_stores_the_same_event() {
    let f = fixture().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let today = chrono::Utc::now().date_naive();
    let mut gen = Generator::new(5, today);
    let mut records = Vec::new();
    let mut lines = String::new();
    for i in 0..40 {
        let mut v = flat(&mut gen);
        // Some users with optional fields absent or null.
        if i % 3 == 0 {
            let o = v.as_object_mut().expect("object");
            for field in ["district", "phone", "occupation", "land_holding_acres"] {
                o.remove(field);
            }
            o.insert("marital_status".into(), Value::Null);
        }
        lines.push_str(&v.to_string());
        lines.push('\n');
        records.push(v);
    }
    let path = dir.path().join("same.jsonl");
    std::fs::write(&path, lines).expect("file");
    run_import(&f.store, f.keys.path(), &path, &[]);
    // The same payloads through the write path, for other user ids.
    let mut pairs = Vec::new();
    for v in &records {
        let mut payload = v.clone();
        let o = payload.as_object_mut().expect("object");
        let imported: Uuid = o
            .remove("user_id")
            .and_then(|u| u.as_str().map(str::to_owned))
            .expect("id")
            .parse()
            .expect("uuid");
        let region = o.remove("region").expect("region");
        let other = Uuid::new_v4();
        let event = json!({
            "event_id": Uuid::new_v4(),
            "event_type": "METADATA_CREATED",
            "occurred_at": chrono::Utc::now(),
            "user_id": other,
            "region": region,
            "source": "bulk-import",
            "schema_version": 1,
            "payload": payload,
        });
        assert!(matches!(
            f.submit(&event).await.expect("applied"),
            Outcome::Applied { .. }
        ));
        pairs.push((imported, other));
    }
    let writer = f.store.connect(Purpose::Writer).await;
    let keys = keyring(&writer, f.keys.path()).await;
    for (imported, applied) in pairs {
        let a = user_rows(&writer, &keys, imported).await;
        let b = user_rows(&writer, &keys, applied).await;
        assert_eq!(a, b, "user {imported} (imported) vs {applied} (write path)");
    }
}

#[tokio::test]
async fn vault_wraps_the_keys_in_batches_and_transit_values_are_decrypted() {
    use base64::Engine as _;
    use umstore_data_plane::crypto::VaultConfig;
    use umstore_e2e::skip::{skip_or_fail, Component};
    let bao = match umstore_e2e::shared().openbao() {
        Ok(bao) => bao,
        Err(e) => {
            skip_or_fail(Component::OpenBao, e);
            return;
        }
    };
    let store = Store::migrated().await;
    let writer = store.connect(Purpose::Writer).await;
    // The store's transit key: created by the provider, as the data plane does.
    let key = format!("test-{}", Uuid::new_v4().simple());
    let mut config = VaultConfig::with_token(bao.address(), bao.root_token());
    config.key_name = key.clone();
    let keys = Keyring::open(
        KeyProvider::open(KeyProviderConfig::Vault(config))
            .await
            .expect("vault provider"),
        DataKeyCache::new(1_000, Duration::from_secs(60)),
        &writer,
    )
    .await
    .expect("keyring");
    let plaintext = base64::engine::general_purpose::STANDARD.encode("Asha Transit");
    let ciphertext = bao
        .cli(&[
            "write",
            "-field=ciphertext",
            &format!("transit/encrypt/{key}"),
            &format!("plaintext={plaintext}"),
        ])
        .expect("transit encrypt")
        .trim()
        .to_owned();
    assert!(ciphertext.starts_with("vault:v1:"), "{ciphertext}");

    let dir = tempfile::tempdir().expect("tempdir");
    let mut gen = Generator::new(31, chrono::Utc::now().date_naive());
    let mut lines = String::new();
    for _ in 0..1_200 {
        lines.push_str(&flat(&mut gen).to_string());
        lines.push('\n');
    }
    let transit_user = Uuid::new_v4();
    let mut v = flat(&mut gen);
    v["user_id"] = json!(transit_user);
    v["full_name"] = json!(ciphertext);
    lines.push_str(&format!("{v}\n"));
    let mut bogus = flat(&mut gen);
    bogus["full_name"] = json!("vault:v1:bm90IGEgY2lwaGVydGV4dA==");
    lines.push_str(&format!("{bogus}\n"));
    let path = dir.path().join("vault.jsonl");
    std::fs::write(&path, lines).expect("file");

    let out = Command::new(BIN)
        .args(["bulk", "import"])
        .arg(&path)
        .args([
            "--engine",
            "cpu",
            "--batch-users",
            "500",
            "--no-refresh-stats",
        ])
        .args(["--database-url", &store.url(Purpose::Writer)])
        .args(["--vault-addr", &bao.address(), "--transit-key", &key])
        .env("VAULT_TOKEN", bao.root_token())
        .env_remove("UMSTORE_CLUSTERS")
        .output()
        .expect("run the import");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("1201 users imported, 1 records refused"),
        "{}",
        stdout(&out)
    );
    let refused = rejects(&path);
    assert!(
        refused[&1202].contains("full_name") && refused[&1202].contains("could not decrypt"),
        "{refused:?}"
    );
    // Every data key wrapped by the transit key.
    let row = writer
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE kek_name = $1
                AND convert_from(wrapped_key, 'UTF8') LIKE 'vault:v%')
             FROM umstore.user_data_keys",
            &[&key],
        )
        .await
        .expect("keys");
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1_201, 1_201));
    // The transit value was decrypted and sealed under the user's own key.
    check_pii(
        &writer,
        &keys,
        transit_user,
        &json!({"full_name": "Asha Transit", "phone": v["phone"], "annual_income": v["annual_income"]}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_import_through_pgbouncer_transaction_pooling_as_in_a_cluster() {
    use umstore_e2e::skip::{skip_or_fail, Component};
    use umstore_e2e::{PgBouncer, Postgres};
    // In a cluster from tier 2 the writer's connection Secret names PgBouncer
    // (transaction pooling): no session state survives between transactions.
    let pg = match Postgres::start_with_replicas(0) {
        Ok(pg) => pg,
        Err(e) => {
            skip_or_fail(Component::Postgres, e);
            return;
        }
    };
    let store = Store::migrated_on(&pg).await;
    let bouncer = match PgBouncer::start_with_logins(
        &pg,
        &[("umstore_writer_login", &password(Purpose::Writer))],
    ) {
        Ok(b) => b,
        Err(e) => {
            skip_or_fail(Component::PgBouncer, e);
            return;
        }
    };
    let keys = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("through-pgbouncer.jsonl");
    umstore_data_plane::seed::write_import_file(&path, 12_000, 41).expect("file");
    let out = Command::new(BIN)
        .args(["bulk", "import"])
        .arg(&path)
        .args(["--engine", "cpu", "--batch-users", "1000"])
        .env(
            "UMSTORE_DATABASE_URL",
            store.url_at(Purpose::Writer, bouncer.port()),
        )
        .env("UMSTORE_DATA_DIR", keys.path())
        .env_remove("UMSTORE_VAULT_ADDR")
        .env_remove("UMSTORE_CLUSTERS")
        .output()
        .expect("run the import");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("12000 users imported, 0 records refused"),
        "{}",
        stdout(&out)
    );
    let writer = store.connect(Purpose::Writer).await;
    let users = stored(&writer).await;
    assert_eq!(users.len(), 12_000);
    assert!(users.values().all(|h| *h == 1), "one history row each");
}

/// The regions of the south cluster in the two-cluster tests; home holds
/// every other region.
const SOUTH: [&str; 3] = ["KA", "KL", "TN"];

/// Two clusters' layout: home (every region but [`SOUTH`]) and south.
fn two_clusters(home: &Store, south: &Store) -> String {
    let home_regions: Vec<&str> = umstore_migrations::regions::REGIONS
        .iter()
        .map(|r| r.code)
        .filter(|r| !SOUTH.contains(r))
        .collect();
    json!([
        {"name": "home", "regions": home_regions,
         "primary": {"host": "127.0.0.1", "port": home.port(), "dbname": home.name}},
        {"name": "south", "regions": SOUTH,
         "primary": {"host": "127.0.0.1", "port": south.port(), "dbname": south.name}},
    ])
    .to_string()
}

/// The import over both clusters, given home's writer URL (the layout moves
/// it onto south).
fn run_import_clusters(home: &Store, layout: &str, keys: &Path, file: &Path) -> String {
    let out = import_command(home, keys, file, &[])
        .env("UMSTORE_CLUSTERS", layout)
        .output()
        .expect("run the import");
    assert!(
        out.status.success(),
        "import failed: {}\n{}",
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// The reject files of both clusters' runs, merged: line → reason; no line
/// in both.
fn cluster_rejects(file: &Path) -> BTreeMap<u64, String> {
    let mut all = BTreeMap::new();
    for cluster in ["home", "south"] {
        let path = file.with_file_name(format!(
            "{}.{cluster}.rejects.jsonl",
            file.file_name().expect("name").to_string_lossy()
        ));
        add_rejects(
            &std::fs::read_to_string(&path).unwrap_or_default(),
            &mut all,
        );
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_of_two_clusters_gets_each_user_in_its_regions_cluster_with_a_route() {
    let home = Store::migrated().await;
    let pg = umstore_e2e::Postgres::start().expect("PostgreSQL 15 (a second server)");
    let south = Store::migrated_on(&pg).await;
    let layout = two_clusters(&home, &south);
    let keys = tempfile::tempdir().expect("tempdir");
    let dir = tempfile::tempdir().expect("tempdir");

    // A user imported before: in KA, so in south, with its route in home.
    let existing = Uuid::new_v4();
    let mut gen = Generator::new(3, chrono::Utc::now().date_naive());
    let mut first = flat(&mut gen);
    first["user_id"] = json!(existing);
    first["region"] = json!("KA");
    let one = dir.path().join("one.jsonl");
    std::fs::write(&one, format!("{first}\n")).expect("file");
    let out = run_import_clusters(&home, &layout, keys.path(), &one);
    assert!(
        out.contains("all clusters: 1 users imported, 0 records refused"),
        "{out}"
    );

    // 6,000 records, every 97th bad in one of seven ways (a repeat, a user
    // that exists, bad fields), users in all 36 regions.
    let file = write_file(dir.path(), 6_000, 21, 97, existing);
    let out = run_import_clusters(&home, &layout, keys.path(), &file.path);
    assert!(out.contains("into cluster home"), "{out}");
    assert!(out.contains("into cluster south"), "{out}");
    let home_db = support::connect(home.superuser()).await;
    let south_db = support::connect(south.superuser()).await;
    let (in_home, in_south) = (stored(&home_db).await, stored(&south_db).await);
    for (id, record) in &file.good {
        let region = record["region"].as_str().expect("region");
        let (here, there) = if SOUTH.contains(&region) {
            (&in_south, &in_home)
        } else {
            (&in_home, &in_south)
        };
        assert_eq!(
            here.get(id),
            Some(&1),
            "user {id} of {region}: once, in its cluster"
        );
        assert!(
            !there.contains_key(id),
            "user {id} of {region}: not in the other cluster"
        );
    }
    assert_eq!(
        in_home.len() + in_south.len(),
        file.good.len() + 1,
        "the good users and the one before, nothing else"
    );
    assert!(
        file.good
            .values()
            .any(|r| SOUTH.contains(&r["region"].as_str().unwrap_or(""))),
        "the file has south users"
    );
    // Every user's route in home, naming the region of the file.
    let routes: BTreeMap<Uuid, String> = home_db
        .query("SELECT user_id, region::text FROM umstore.user_routes", &[])
        .await
        .expect("routes")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(routes.len(), file.good.len() + 1, "one route per user");
    for (id, record) in &file.good {
        assert_eq!(
            routes.get(id).map(String::as_str),
            record["region"].as_str()
        );
    }
    // Each bad line refused once, by one cluster's run, with its reason.
    let refused = cluster_rejects(&file.path);
    assert_eq!(
        refused.keys().collect::<Vec<_>>(),
        file.bad.keys().collect::<Vec<_>>(),
        "exactly the bad lines are refused"
    );
    for (line, word) in &file.bad {
        // A repeat whose first record another cluster's run imported
        // already is refused as existing: both are true of it.
        let also = match *word {
            "appears again" => "already exists",
            "already exists" => "appears again",
            other => other,
        };
        assert!(
            refused[line].contains(word) || refused[line].contains(also),
            "line {line}: {:?} should name {word:?}",
            refused[line]
        );
    }
    // A south user's personal data opens with the store's keys.
    let south_writer = south.connect(Purpose::Writer).await;
    let ring = keyring(&home.connect(Purpose::Writer).await, keys.path()).await;
    let (id, record) = file
        .good
        .iter()
        .find(|(_, r)| SOUTH.contains(&r["region"].as_str().unwrap_or("")))
        .expect("a south user");
    check_pii(&south_writer, &ring, *id, record).await;

    // The same file again: both clusters' runs are done.
    let again = run_import_clusters(&home, &layout, keys.path(), &file.path);
    assert_eq!(again.matches("nothing to do").count(), 2, "{again}");

    // A user stored in south without a route in home (written before the
    // store had clusters), in a file that puts them in home's AP: refused,
    // found in south's directory.
    home_db
        .execute(
            "DELETE FROM umstore.user_routes WHERE user_id = $1",
            &[&existing],
        )
        .await
        .expect("drop the route");
    let mut moved = flat(&mut gen);
    moved["user_id"] = json!(existing);
    moved["region"] = json!("AP");
    let late = dir.path().join("late.jsonl");
    std::fs::write(&late, format!("{moved}\n")).expect("file");
    let out = run_import_clusters(&home, &layout, keys.path(), &late);
    assert!(
        out.contains("all clusters: 0 users imported, 1 records refused"),
        "{out}"
    );
    assert!(
        cluster_rejects(&late)[&1].contains("already exists (region KA)"),
        "{:?}",
        cluster_rejects(&late)
    );
    assert!(!stored(&home_db).await.contains_key(&existing));

    // A region fenced for a move in south: its batch is refused, nothing of
    // it written, and the same command finishes the import once the fence
    // is down; a region being copied away logs the user for the mover.
    south_db
        .execute(
            "UPDATE umstore.region_state SET state = 'fenced', peer = 'home' WHERE region = 'KL'",
            &[],
        )
        .await
        .expect("fence KL");
    let mut kl = flat(&mut gen);
    kl["region"] = json!("KL");
    let kl_id: Uuid = kl["user_id"].as_str().expect("id").parse().expect("uuid");
    let fenced = dir.path().join("fenced.jsonl");
    std::fs::write(&fenced, format!("{kl}\n")).expect("file");
    let out = import_command(&home, keys.path(), &fenced, &[])
        .env("UMSTORE_CLUSTERS", &layout)
        .output()
        .expect("run the import");
    let err = stderr(&out);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        err.contains("is moving between clusters (fenced)")
            && err.contains("run the same command again"),
        "{err}"
    );
    assert!(!stored(&south_db).await.contains_key(&kl_id));
    south_db
        .execute(
            "UPDATE umstore.region_state SET state = 'copying' WHERE region = 'KL'",
            &[],
        )
        .await
        .expect("copying KL");
    let out = run_import_clusters(&home, &layout, keys.path(), &fenced);
    assert!(out.contains("resumed an earlier run"), "{out}");
    assert_eq!(stored(&south_db).await.get(&kl_id), Some(&1));
    let logged: i64 = south_db
        .query_one(
            "SELECT count(*) FROM umstore.region_move_log WHERE region = 'KL' AND user_id = $1",
            &[&kl_id],
        )
        .await
        .expect("move log")
        .get(0);
    assert_eq!(logged, 1, "the mover copies the user again");
}
