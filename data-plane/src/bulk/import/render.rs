//! A batch of new users as the rows the write path would store for each
//! one's `METADATA_CREATED` (`ingest/apply.rs`): personal data sealed under a
//! fresh data key per user (on the bulk engine), the blind index, the
//! derived attributes, a `created` history row listing every field set, and
//! the directory and key rows; rendered as COPY text and loaded.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use chrono::{Datelike, NaiveDate};
use serde_json::{json, Map, Value};
use tokio_postgres::{Client, Transaction};
use zeroize::Zeroizing;

use super::{autocommit, copy_in, db, ImportError, Screened};
use crate::bulk::{random_nonces, BulkEngine, SealBatch};
use crate::crypto::{BlindIndexKey, DataKey, FieldAad, Keyring};
use crate::derive::{derive_from, Inputs};
use crate::ingest::event::{Change, MetadataPatch};
use crate::seed::CopyText;

/// The tables an import writes, with their COPY column lists, in load order
/// (a row before the rows that reference it).
pub const TABLES: [(&str, &str); 5] = [
    ("user_directory", "user_id, region"),
    (
        "user_data_keys",
        "user_id, region, wrapped_key, kek_name, kek_version",
    ),
    (
        "user_metadata",
        "user_id, region, full_name_enc, date_of_birth_enc, birth_year, gender, marital_status, \
         district_enc, pincode_enc, area_type, social_category, disability, phone_enc, \
         identity_token_enc, identity_token_bidx, annual_income_enc, income_lakh, occupation, \
         employment_type, land_holding_acres, has_bank_account, ration_card, household_size, \
         dependents, children, senior_members, head_of_household, version, last_event_at",
    ),
    (
        "user_derived_attributes",
        "user_id, region, age_group, income_bracket, life_stage, employment_category, bpl_status, \
         tax_bracket, is_senior_citizen, is_farmer, per_capita_income_lakh, source_version",
    ),
    (
        "user_metadata_history",
        "user_id, region, change_type, changed_fields, old_values, new_values, changed_by, \
         event_id, version, changed_at",
    ),
];

/// The personal data of one user in plaintext.
pub(crate) struct PiiPlain {
    pub full_name: Option<Zeroizing<Vec<u8>>>,
    pub date_of_birth: NaiveDate,
    pub district: Option<Zeroizing<Vec<u8>>>,
    pub pincode: Option<Zeroizing<Vec<u8>>>,
    pub phone: Option<Zeroizing<Vec<u8>>>,
    pub identity_token: Option<Zeroizing<Vec<u8>>>,
    pub annual_income: i64,
}

/// The sealed columns in the write path's order: (history field, column).
const SEALED: [(&str, &str); 7] = [
    ("full_name", "full_name_enc"),
    ("date_of_birth", "date_of_birth_enc"),
    ("district", "district_enc"),
    ("pincode", "pincode_enc"),
    ("phone", "phone_enc"),
    ("identity_token", "identity_token_enc"),
    ("annual_income", "annual_income_enc"),
];

impl PiiPlain {
    /// The plaintext of each of [`SEALED`], `None` where not set.
    fn values(&self) -> [Option<Zeroizing<Vec<u8>>>; 7] {
        [
            self.full_name.clone(),
            Some(Zeroizing::new(self.date_of_birth.to_string().into_bytes())),
            self.district.clone(),
            self.pincode.clone(),
            self.phone.clone(),
            self.identity_token.clone(),
            Some(Zeroizing::new(self.annual_income.to_string().into_bytes())),
        ]
    }
}

/// A batch rendered as COPY text, one stream per table of [`TABLES`].
pub(crate) struct Rendered {
    tables: [Bytes; 5],
    users: u64,
}

/// Draws and wraps the users' data keys, seals their personal data on
/// `engine` and renders every row.
pub(crate) async fn seal_and_render(
    keyring: &Keyring,
    engine: Arc<dyn BulkEngine>,
    users: Vec<Screened>,
    today: NaiveDate,
) -> Result<(Rendered, std::time::Duration, u64), ImportError> {
    let engine_name = engine.name();
    let keys: Vec<DataKey> = users.iter().map(|_| DataKey::generate()).collect();
    let refs: Vec<(uuid::Uuid, &str, &DataKey)> = users
        .iter()
        .zip(&keys)
        .map(|(u, k)| (u.user.event.user_id, u.user.event.region, k))
        .collect();
    let wrapped = if refs.is_empty() {
        Vec::new()
    } else {
        keyring
            .provider()
            .wrap_batch(&refs)
            .await
            .map_err(|source| ImportError::Keys {
                what: "wrapping the batch's data keys",
                source,
            })?
    };
    drop(refs);
    let bidx = keyring.blind_index().clone();
    let job = tokio::task::spawn_blocking(move || {
        let fields: usize = users
            .iter()
            .map(|u| u.pii.values().iter().flatten().count())
            .sum();
        let mut batch = SealBatch::with_capacity(users.len(), fields, fields * 32);
        for (user, key) in users.iter().zip(&keys) {
            let index = batch.add_key(key)?;
            for ((_, column), value) in SEALED.iter().zip(user.pii.values()) {
                if let Some(value) = value {
                    let aad = FieldAad {
                        user_id: user.user.event.user_id,
                        region: user.user.event.region,
                        column,
                    };
                    batch.push(index, &aad, &value)?;
                }
            }
        }
        drop(keys);
        let nonces = random_nonces(batch.len())?;
        let sealing = Instant::now();
        let sealed = engine.seal_batch(&batch, &nonces)?;
        let seal_time = sealing.elapsed();
        let mut next = 0usize;
        let mut t: [CopyText; 5] = Default::default();
        for (user, w) in users.iter().zip(&wrapped) {
            let mut own: [Option<&[u8]>; 7] = [None; 7];
            for (slot, value) in own.iter_mut().zip(user.pii.values()) {
                if value.is_some() {
                    *slot = sealed.get(next);
                    next += 1;
                }
            }
            render_user(&mut t, user, &own, w, &bidx, today);
        }
        Ok::<_, crate::bulk::BulkError>((
            t.map(CopyText::into_bytes),
            users.len(),
            fields,
            seal_time,
        ))
    });
    let (tables, users, fields, seal_time) = job
        .await
        .map_err(|_| ImportError::Thread("sealing"))?
        .map_err(|source| ImportError::Engine {
            engine: engine_name,
            source,
        })?;
    Ok((
        Rendered {
            tables,
            users: users as u64,
        },
        seal_time,
        fields as u64,
    ))
}

fn change_opt<T: Clone>(c: &Change<T>) -> Option<T> {
    match c {
        Change::Set(v) => Some(v.clone()),
        _ => None,
    }
}

/// The rows of one user, as `apply` writes them for a `METADATA_CREATED`.
fn render_user(
    t: &mut [CopyText; 5],
    user: &Screened,
    sealed: &[Option<&[u8]>; 7],
    wrapped: &crate::crypto::WrappedKey,
    bidx: &BlindIndexKey,
    today: NaiveDate,
) {
    let event = &user.user.event;
    let default = MetadataPatch::default();
    let p = user.user.patch().unwrap_or(&default);
    let (id, region) = (event.user_id, event.region);
    let gender = change_opt(&p.gender).map(|v| v.as_str());
    let marital = change_opt(&p.marital_status).map(|v| v.as_str());
    let area = change_opt(&p.area_type).map(|v| v.as_str());
    let social = change_opt(&p.social_category).map(|v| v.as_str());
    let disability = change_opt(&p.disability).unwrap_or(false);
    let occupation = change_opt(&p.occupation);
    let employment = change_opt(&p.employment_type).map(|v| v.as_str());
    let acres = change_opt(&p.land_holding_acres).map(|a| (a * 100.0).round() / 100.0);
    let bank = change_opt(&p.has_bank_account);
    let ration = change_opt(&p.ration_card).map(|v| v.as_str());
    let household = change_opt(&p.household_size);
    let dependents = change_opt(&p.dependents);
    let children = change_opt(&p.children);
    let seniors = change_opt(&p.senior_members);
    let head = change_opt(&p.head_of_household);
    let token_bidx = user
        .pii
        .identity_token
        .as_ref()
        .map(|v| bidx.index("identity_token", v));
    let income = user.pii.annual_income;
    let birth_year = i16::try_from(user.pii.date_of_birth.year()).unwrap_or_default();
    let income_lakh = i16::try_from(income.max(0) / 100_000).unwrap_or(i16::MAX);

    t[0].plain(id).text(region).end_row();
    t[1].plain(id)
        .text(region)
        .bytea(&wrapped.wrapped)
        .text(&wrapped.kek_name)
        .plain(wrapped.kek_version)
        .end_row();

    let m = &mut t[2];
    m.plain(id).text(region);
    let bytea = |m: &mut CopyText, v: Option<&[u8]>| match v {
        Some(b) => {
            m.bytea(b);
        }
        None => {
            m.null();
        }
    };
    let text = |m: &mut CopyText, v: Option<&str>| match v {
        Some(s) => {
            m.text(s);
        }
        None => {
            m.null();
        }
    };
    fn plain<T: std::fmt::Display>(m: &mut CopyText, v: Option<T>) {
        match v {
            Some(v) => {
                m.plain(v);
            }
            None => {
                m.null();
            }
        }
    }
    bytea(m, sealed[0]);
    bytea(m, sealed[1]);
    m.plain(birth_year);
    text(m, gender);
    text(m, marital);
    bytea(m, sealed[2]);
    bytea(m, sealed[3]);
    text(m, area);
    text(m, social);
    m.plain(disability);
    bytea(m, sealed[4]);
    bytea(m, sealed[5]);
    bytea(m, token_bidx.as_deref());
    bytea(m, sealed[6]);
    m.plain(income_lakh);
    text(m, occupation.as_deref());
    text(m, employment);
    plain(m, acres);
    plain(m, bank);
    text(m, ration);
    plain(m, household);
    plain(m, dependents);
    plain(m, children);
    plain(m, seniors);
    plain(m, head);
    m.plain(1).plain(event.occurred_at.to_rfc3339());
    m.end_row();

    let inputs = Inputs {
        date_of_birth: user.pii.date_of_birth,
        household_size: household.unwrap_or(1),
        annual_income: income,
        ration_card: ration.unwrap_or("none"),
        children: children.unwrap_or(0),
        employment_type: employment.unwrap_or("unemployed"),
        land_holding_centiacres: acres.map_or(0, |a| (a * 100.0).round() as i64),
    };
    let d = derive_from(&inputs, today);
    t[3].plain(id)
        .text(region)
        .text(d.age_group)
        .text(d.income_bracket)
        .text(d.life_stage)
        .text(d.employment_category)
        .plain(d.bpl_status)
        .text(d.tax_bracket)
        .plain(d.is_senior_citizen)
        .plain(d.is_farmer)
        .plain(d.per_capita_income_lakh)
        .plain(1)
        .end_row();

    // The history row `apply` writes for a created user: every field set, in
    // its order, personal data as base64 ciphertext; disability only when true.
    let mut fields: Vec<&str> = Vec::with_capacity(22);
    let mut new = Map::new();
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        Value::String(base64::engine::general_purpose::STANDARD.encode(b))
    };
    for (i, (name, _)) in SEALED.iter().enumerate() {
        if let Some(b) = sealed[i] {
            fields.push(name);
            new.insert((*name).into(), b64(b));
        }
    }
    let mut put = |name: &'static str, v: Option<Value>| {
        if let Some(v) = v {
            fields.push(name);
            new.insert(name.into(), v);
        }
    };
    put("gender", gender.map(|v| json!(v)));
    put("marital_status", marital.map(|v| json!(v)));
    put("area_type", area.map(|v| json!(v)));
    put("social_category", social.map(|v| json!(v)));
    put("disability", disability.then_some(json!(true)));
    put("occupation", occupation.as_ref().map(|v| json!(v)));
    put("employment_type", employment.map(|v| json!(v)));
    put("land_holding_acres", acres.map(|v| json!(v)));
    put("has_bank_account", bank.map(|v| json!(v)));
    put("ration_card", ration.map(|v| json!(v)));
    put("household_size", household.map(|v| json!(v)));
    put("dependents", dependents.map(|v| json!(v)));
    put("children", children.map(|v| json!(v)));
    put("senior_members", seniors.map(|v| json!(v)));
    put("head_of_household", head.map(|v| json!(v)));
    // Every field was unset before: old values are all null.
    let old: Map<String, Value> = fields
        .iter()
        .map(|f| ((*f).to_owned(), Value::Null))
        .collect();
    let h = &mut t[4];
    h.plain(id)
        .text(region)
        .text("created")
        .text(&format!("{{{}}}", fields.join(",")))
        .text(&Value::Object(old).to_string())
        .text(&Value::Object(new).to_string())
        .text(&event.source);
    if user.user.has_event_id {
        h.plain(event.event_id);
    } else {
        h.null();
    }
    h.plain(1).plain(event.occurred_at.to_rfc3339());
    h.end_row();
}

impl Rendered {
    /// Users in the batch.
    pub fn users(&self) -> u64 {
        self.users
    }
}

/// Loads rendered batches: COPY straight into the tables for a login that
/// bypasses row-level security; else into temporary tables (PostgreSQL
/// refuses COPY FROM into a table whose policies apply to the login, as they
/// do to the writer), then `INSERT ... SELECT`; under Citus, which runs an
/// `INSERT ... SELECT` into a distributed table as a COPY into its shards
/// (refused there for the same reason), one multi-row `INSERT ... VALUES`
/// per table, built on the server from the temporary table with every value
/// quoted by `format('%L')`, which Citus runs as ordinary INSERTs per shard.
pub(crate) struct Loader {
    mode: LoadMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoadMode {
    Copy,
    InsertSelect,
    InsertValues,
}

impl Loader {
    /// Checks the login and creates the temporary tables it needs.
    pub async fn prepare(client: &Client) -> Result<Self, ImportError> {
        let rows = autocommit(
            client,
            "SELECT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user),
                    EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'citus')",
            &[],
        )
        .await
        .map_err(db("checking the login's row-level security"))?;
        let Some(row) = rows.first() else {
            return Ok(Loader {
                mode: LoadMode::InsertSelect,
            });
        };
        let (bypass, citus): (bool, bool) = (row.get(0), row.get(1));
        let mode = match (bypass, citus) {
            (true, _) => LoadMode::Copy,
            (false, false) => LoadMode::InsertSelect,
            (false, true) => LoadMode::InsertValues,
        };
        Ok(Loader { mode })
    }

    /// Loads `batch` in `tx`; returns the users written.
    pub async fn load(&self, tx: &Transaction<'_>, batch: Rendered) -> Result<u64, ImportError> {
        if batch.users == 0 {
            return Ok(0);
        }
        for ((table, columns), text) in TABLES.iter().zip(batch.tables) {
            if self.mode == LoadMode::Copy {
                copy_in(
                    tx,
                    &format!("COPY umstore.{table} ({columns}) FROM STDIN"),
                    text,
                    table,
                )
                .await?;
                continue;
            }
            // Created in the batch's transaction (no session state: through
            // PgBouncer's transaction pooling the next one may be elsewhere).
            tx.batch_execute(&format!(
                "CREATE TEMP TABLE import_{table} ON COMMIT DROP AS \
                 SELECT {columns} FROM umstore.{table} WITH NO DATA"
            ))
            .await
            .map_err(db(format!("preparing the staging table of {table}")))?;
            copy_in(
                tx,
                &format!("COPY import_{table} ({columns}) FROM STDIN"),
                text,
                table,
            )
            .await?;
            let statement = match self.mode {
                LoadMode::InsertValues => insert_values(table, columns),
                _ => format!(
                    "INSERT INTO umstore.{table} ({columns}) SELECT {columns} FROM import_{table}"
                ),
            };
            tx.batch_execute(&statement)
                .await
                .map_err(db(format!("writing umstore.{table}")))?;
        }
        Ok(batch.users)
    }
}

/// A DO block that inserts the staged rows of `table` with one multi-row
/// `INSERT ... VALUES`, each value quoted on the server by `format('%L')`
/// (the column names are this module's constants; no value is spliced in
/// here).
fn insert_values(table: &str, columns: &str) -> String {
    let names: Vec<&str> = columns.split(',').map(str::trim).collect();
    let placeholders = vec!["%L"; names.len()].join(", ");
    let args = names
        .iter()
        .map(|c| format!("r.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "DO $import$ DECLARE q text; BEGIN \
           SELECT 'INSERT INTO umstore.{table} ({columns}) VALUES ' \
                  || string_agg(format('({placeholders})', {args}), ', ') \
             INTO q FROM import_{table} r; \
           IF q IS NOT NULL THEN EXECUTE q; END IF; \
         END $import$"
    )
}
