//! `seed`: deterministic synthetic users, loaded with COPY.
//!
//! A producer thread generates users, seals their PII and renders COPY text
//! in batches; the caller's connection streams each batch into the five
//! tables inside one transaction, so a failed seed leaves nothing behind.

mod copy_text;
mod generate;

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::NaiveDate;
use thiserror::Error;
use tokio_postgres::Client;
use tracing::info;

pub(crate) use copy_text::copy_rows;
pub use copy_text::CopyText;
pub use generate::Generator;

use crate::crypto::{seal_pii, BlindIndexKey, CryptoError, DataKey, Keyring};
use crate::derive::derive;

/// Users per batch handed from the generator to the COPY stream.
pub const BATCH: usize = 5_000;

/// The tables `seed` writes, with the COPY column lists, in load order.
pub const TABLES: [(&str, &str); 5] = [
    ("umstore.user_directory", "user_id, region"),
    (
        "umstore.user_data_keys",
        "user_id, region, wrapped_key, kek_name, kek_version",
    ),
    (
        "umstore.user_metadata",
        "user_id, region, full_name_enc, date_of_birth_enc, birth_year, gender, marital_status, \
         district_enc, pincode_enc, area_type, social_category, disability, phone_enc, \
         identity_token_enc, identity_token_bidx, annual_income_enc, income_lakh, occupation, \
         employment_type, land_holding_acres, has_bank_account, ration_card, household_size, \
         dependents, children, senior_members, head_of_household",
    ),
    (
        "umstore.user_derived_attributes",
        "user_id, region, age_group, income_bracket, life_stage, employment_category, bpl_status, \
         tax_bracket, is_senior_citizen, is_farmer, per_capita_income_lakh, source_version",
    ),
    (
        "umstore.user_metadata_history",
        "user_id, region, change_type, changed_fields, new_values, changed_by, version",
    ),
];

/// Index of `user_metadata` in [`TABLES`].
const METADATA: usize = 2;

/// Index of `user_derived_attributes` in [`TABLES`].
const DERIVED: usize = 3;

/// Derived rows wait until this many users' metadata is loaded (or all of it,
/// for smaller seeds). Each partition's foreign-key check plans its lookup
/// once per connection; planned against a nearly empty partition it scans the
/// partition for every row, and as the partition grows the load turned
/// quadratic. Planned against a partition with a few hundred rows, it is an
/// index lookup for good.
const DERIVED_AFTER: u64 = 50_000;

async fn copy_into(
    tx: &tokio_postgres::Transaction<'_>,
    table_index: usize,
    text: Bytes,
) -> Result<(), SeedError> {
    let (table, columns) = TABLES[table_index];
    let err = |source| SeedError::Copy { table, source };
    let started = Instant::now();
    copy_text::copy_rows(tx, &format!("COPY {table} ({columns}) FROM STDIN"), text)
        .await
        .map_err(err)?;
    tracing::debug!(
        table,
        ms = started.elapsed().as_millis() as u64,
        "copied a batch"
    );
    Ok(())
}

/// Why seeding failed. Nothing was written.
#[derive(Debug, Error)]
pub enum SeedError {
    /// The first user of this seed already exists.
    #[error("users of seed {seed} are already present (user {user_id}): pass another --seed to add more users")]
    AlreadySeeded {
        /// The seed.
        seed: u64,
        /// Its first user.
        user_id: uuid::Uuid,
    },
    /// A COPY or the transaction failed; the transaction was rolled back.
    #[error("loading {table} failed, nothing was written: {source}")]
    Copy {
        /// Table being loaded.
        table: &'static str,
        /// Database error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Writing the COPY files failed.
    #[error("writing COPY file {path}: {source}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Wrapping the data keys failed.
    #[error("wrapping data keys failed, nothing was written: {0}")]
    Keys(#[from] CryptoError),
    /// The generator thread stopped unexpectedly.
    #[error("the generator thread stopped unexpectedly")]
    Generator,
}

/// What a seed run did.
#[derive(Debug, Clone, Copy)]
pub struct SeedReport {
    /// Users written.
    pub users: u64,
    /// Wall time.
    pub elapsed: Duration,
}

impl SeedReport {
    /// Users per second.
    pub fn users_per_second(&self) -> f64 {
        self.users as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// One batch of COPY text, one stream per table of [`TABLES`]; the data keys
/// table is rendered once the batch's keys are wrapped.
struct Batch {
    tables: [CopyText; 5],
    keys: Vec<(uuid::Uuid, &'static str, DataKey)>,
}

impl Batch {
    /// Wraps the batch's data keys (one provider call) and renders their rows.
    async fn wrap_keys(&mut self, keyring: &Keyring) -> Result<(), SeedError> {
        let refs: Vec<(uuid::Uuid, &str, &DataKey)> =
            self.keys.iter().map(|(u, r, k)| (*u, *r, k)).collect();
        let wrapped = keyring.provider().wrap_batch(&refs).await?;
        for ((user_id, region, _), w) in self.keys.iter().zip(&wrapped) {
            self.tables[1]
                .plain(user_id)
                .text(region)
                .bytea(&w.wrapped)
                .text(&w.kek_name)
                .plain(w.kek_version)
                .end_row();
        }
        self.keys.clear();
        Ok(())
    }
}

fn render_batch(gen: &mut Generator, bidx: &BlindIndexKey, n: usize, today: NaiveDate) -> Batch {
    let mut t: [CopyText; 5] = Default::default();
    let mut keys = Vec::with_capacity(n);
    let year = gen.year();
    for _ in 0..n {
        let p = gen.next_profile();
        let key = DataKey::generate();
        let pii = seal_pii(&p, &key, bidx);
        let d = derive(&p, today);
        keys.push((p.user_id, p.region, key));

        t[0].plain(p.user_id).text(p.region).end_row();
        let birth_year = chrono::Datelike::year(&p.date_of_birth).clamp(1900, year);
        let land = format!(
            "{}.{:02}",
            p.land_holding_centiacres / 100,
            p.land_holding_centiacres % 100
        );
        t[2].plain(p.user_id)
            .text(p.region)
            .bytea(&pii.full_name)
            .bytea(&pii.date_of_birth)
            .plain(birth_year)
            .text(p.gender)
            .text(p.marital_status)
            .bytea(&pii.district)
            .bytea(&pii.pincode)
            .text(p.area_type)
            .text(p.social_category)
            .plain(p.disability)
            .bytea(&pii.phone)
            .bytea(&pii.identity_token)
            .bytea(&pii.identity_token_bidx)
            .bytea(&pii.annual_income)
            .plain(p.income_lakh())
            .text(p.occupation)
            .text(p.employment_type)
            .plain(&land)
            .plain(p.has_bank_account)
            .text(p.ration_card)
            .plain(p.household_size)
            .plain(p.dependents)
            .plain(p.children)
            .plain(p.senior_members)
            .plain(p.head_of_household)
            .end_row();
        t[3].plain(p.user_id)
            .text(p.region)
            .text(d.age_group)
            .text(d.income_bracket)
            .text(d.life_stage)
            .text(d.employment_category)
            .plain(d.bpl_status)
            .text(d.tax_bracket)
            .plain(d.is_senior_citizen)
            .plain(d.is_farmer)
            .plain(format!("{:.2}", d.per_capita_income_lakh))
            .plain(1)
            .end_row();
        // A `created` row lists every field and records the non-PII values;
        // the PII ciphertexts are in the current row, and state as of an
        // earlier time is rebuilt from the current row and the old values of
        // later changes (see docs/data-model.md).
        let new_values = serde_json::json!({
            "birth_year": birth_year,
            "gender": p.gender,
            "marital_status": p.marital_status,
            "area_type": p.area_type,
            "social_category": p.social_category,
            "disability": p.disability,
            "income_lakh": p.income_lakh(),
            "occupation": p.occupation,
            "employment_type": p.employment_type,
            "land_holding_acres": land,
            "has_bank_account": p.has_bank_account,
            "ration_card": p.ration_card,
            "household_size": p.household_size,
            "dependents": p.dependents,
            "children": p.children,
            "senior_members": p.senior_members,
            "head_of_household": p.head_of_household,
        });
        t[4].plain(p.user_id)
            .text(p.region)
            .text("created")
            .plain(CREATED_FIELDS)
            .text(&new_values.to_string())
            .text("seed")
            .plain(1)
            .end_row();
    }
    Batch { tables: t, keys }
}

/// `changed_fields` of a `created` history row: every column.
const CREATED_FIELDS: &str = "{full_name_enc,date_of_birth_enc,birth_year,gender,marital_status,\
district_enc,pincode_enc,area_type,social_category,disability,phone_enc,identity_token_enc,\
identity_token_bidx,annual_income_enc,income_lakh,occupation,employment_type,land_holding_acres,\
has_bank_account,ration_card,household_size,dependents,children,senior_members,head_of_household}";

/// Spawns the generator thread: batches of rendered COPY text for `users`.
fn spawn_generator(
    users: u64,
    seed: u64,
    today: NaiveDate,
    bidx: BlindIndexKey,
) -> tokio::sync::mpsc::Receiver<Batch> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(2);
    std::thread::spawn(move || {
        let mut gen = Generator::new(seed, today);
        let mut left = users;
        while left > 0 {
            let n = left.min(BATCH as u64) as usize;
            left -= n as u64;
            if tx
                .blocking_send(render_batch(&mut gen, &bidx, n, today))
                .is_err()
            {
                return;
            }
        }
    });
    rx
}

/// The first user a seed produces (to detect a repeated seed).
pub fn first_user(seed: u64, today: NaiveDate) -> uuid::Uuid {
    Generator::new(seed, today).next_profile().user_id
}

/// Seeds `users` synthetic users from `seed` into the database, in one
/// transaction on `client`.
pub async fn seed(
    client: &mut Client,
    users: u64,
    seed: u64,
    keyring: &Keyring,
) -> Result<SeedReport, SeedError> {
    seed_with(client, None, users, seed, keyring).await
}

/// Tables loaded on the second connection when there is one.
const SECOND_CONNECTION: [usize; 3] = [0, 1, 4];

/// Like [`seed`], with a second connection to load half of the tables in
/// parallel (two server processes): `user_metadata` and
/// `user_derived_attributes` in one transaction, the directory, keys and
/// history in the other. Both commit only after every COPY succeeded; a
/// failure before then leaves nothing.
pub async fn seed_with(
    client: &mut Client,
    second: Option<&mut Client>,
    users: u64,
    seed: u64,
    keyring: &Keyring,
) -> Result<SeedReport, SeedError> {
    let started = Instant::now();
    let today = chrono::Utc::now().date_naive();
    let first = first_user(seed, today);
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM umstore.user_directory WHERE user_id = $1)",
            &[&first],
        )
        .await
        .map_err(|source| SeedError::Copy {
            table: "umstore.user_directory",
            source,
        })?
        .get(0);
    if exists {
        return Err(SeedError::AlreadySeeded {
            seed,
            user_id: first,
        });
    }
    let begin = |source| SeedError::Copy {
        table: "transaction",
        source,
    };
    let mut rx = spawn_generator(users, seed, today, keyring.blind_index().clone());
    let tx = client.transaction().await.map_err(begin)?;
    let tx2 = match second {
        Some(c) => Some(c.transaction().await.map_err(begin)?),
        None => None,
    };
    let mut written = 0u64;
    let mut derived_backlog: Vec<Bytes> = Vec::new();
    while written < users {
        let mut batch = rx.recv().await.ok_or(SeedError::Generator)?;
        batch.wrap_keys(keyring).await?;
        // The rendered text moves into Bytes without a copy; clones share it.
        let tables = batch.tables.map(CopyText::into_bytes);
        let text = |i: usize| tables[i].clone();
        written += (users - written).min(BATCH as u64);
        derived_backlog.push(text(DERIVED));
        // See DERIVED_AFTER: hold derived rows back until enough metadata is in.
        let derived_now = if written >= DERIVED_AFTER.min(users) {
            std::mem::take(&mut derived_backlog)
        } else {
            Vec::new()
        };
        let main = async {
            copy_into(&tx, METADATA, text(METADATA)).await?;
            for d in derived_now {
                copy_into(&tx, DERIVED, d).await?;
            }
            Ok::<(), SeedError>(())
        };
        match &tx2 {
            Some(tx2) => {
                let other = async {
                    for i in SECOND_CONNECTION {
                        copy_into(tx2, i, text(i)).await?;
                    }
                    Ok::<(), SeedError>(())
                };
                let (a, b) = tokio::join!(main, other);
                a?;
                b?;
            }
            None => {
                for i in SECOND_CONNECTION {
                    copy_into(&tx, i, text(i)).await?;
                }
                main.await?;
            }
        }
        if written % 100_000 < BATCH as u64 {
            info!(written, users, "seeding");
        }
    }
    let commit = |source| SeedError::Copy {
        table: "commit",
        source,
    };
    if let Some(tx2) = tx2 {
        tx2.commit().await.map_err(commit)?;
    }
    tx.commit().await.map_err(commit)?;
    Ok(SeedReport {
        users,
        elapsed: started.elapsed(),
    })
}

/// Writes the COPY text `seed` would load into one file per table in `dir`
/// (`<table>.copy`), and `load.psql`, a psql script that loads them in one
/// transaction with `\copy` (the baseline of the seed benchmark).
pub async fn write_copy_files(
    dir: &Path,
    users: u64,
    seed: u64,
    keyring: &Keyring,
) -> Result<(), SeedError> {
    use std::io::Write;
    let today = chrono::Utc::now().date_naive();
    let ferr = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SeedError::File { path, source }
    };
    std::fs::create_dir_all(dir).map_err(ferr(dir))?;
    let mut files = Vec::new();
    for (table, _) in TABLES {
        let path = dir.join(format!("{table}.copy"));
        let f = std::fs::File::create(&path).map_err(ferr(&path))?;
        files.push((path, std::io::BufWriter::new(f)));
    }
    let mut rx = spawn_generator(users, seed, today, keyring.blind_index().clone());
    while let Some(mut batch) = rx.recv().await {
        batch.wrap_keys(keyring).await?;
        for ((path, f), text) in files.iter_mut().zip(batch.tables.iter()) {
            f.write_all(text.as_bytes()).map_err(ferr(path))?;
        }
    }
    for (path, mut f) in files {
        f.flush().map_err(ferr(&path))?;
    }
    let mut script = String::from("BEGIN;\n");
    for (table, columns) in TABLES {
        let path = dir.join(format!("{table}.copy"));
        let path = std::fs::canonicalize(&path).map_err(ferr(&path))?;
        script.push_str(&format!(
            "\\copy {table} ({columns}) FROM '{}'\n",
            path.display()
        ));
    }
    script.push_str("COMMIT;\n");
    let load = dir.join("load.psql");
    std::fs::write(&load, script).map_err(ferr(&load))?;
    Ok(())
}

/// A generated profile as a record of `bulk import`'s flat form (user_id,
/// region and the `METADATA_CREATED` payload's fields), personal data in
/// plaintext: synthetic users to try or measure an import with.
pub fn import_record(p: &crate::model::Profile) -> serde_json::Value {
    serde_json::json!({
        "user_id": p.user_id,
        "region": p.region,
        "full_name": p.full_name,
        "date_of_birth": p.date_of_birth.to_string(),
        "gender": p.gender,
        "annual_income": p.annual_income,
        "household_size": p.household_size,
        "employment_type": p.employment_type,
        "ration_card": p.ration_card,
        "marital_status": p.marital_status,
        "district": p.district,
        "pincode": p.pincode,
        "area_type": p.area_type,
        "social_category": p.social_category,
        "disability": p.disability,
        "phone": p.phone,
        "identity_token": p.identity_token,
        "occupation": p.occupation,
        "land_holding_acres": p.land_holding_centiacres as f64 / 100.0,
        "has_bank_account": p.has_bank_account,
        "dependents": p.dependents,
        "children": p.children,
        "senior_members": p.senior_members,
        "head_of_household": p.head_of_household,
    })
}

/// Writes the users `seed` would generate as a JSON Lines file for `bulk
/// import` (see [`import_record`]).
pub fn write_import_file(path: &Path, users: u64, seed: u64) -> Result<(), SeedError> {
    use std::io::Write;
    let err = |source| SeedError::File {
        path: path.to_path_buf(),
        source,
    };
    let today = chrono::Utc::now().date_naive();
    let mut gen = Generator::new(seed, today);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(err)?);
    for _ in 0..users {
        let line = import_record(&gen.next_profile()).to_string();
        out.write_all(line.as_bytes()).map_err(err)?;
        out.write_all(b"\n").map_err(err)?;
    }
    out.flush().map_err(err)
}
