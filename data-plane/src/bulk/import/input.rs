//! Reading an import file: JSON Lines or CSV, one user per record, each
//! turned into a `METADATA_CREATED` event and validated by the same parser
//! as the write path ([`crate::ingest::event::from_value`]).
//!
//! A record is either a whole event (an object with `event_type`, as on the
//! bus) or the flat form: `user_id`, `region` and optionally `occurred_at`,
//! `source` and `event_id` beside the payload's fields. A CSV file is the
//! flat form with a header row; an empty cell is an absent field.

use std::fs::File;
use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::Path;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::ImportError;
use crate::ingest::event::{self, Body, Event, MetadataPatch};

/// The file's format, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// One JSON object per line (`.jsonl`, `.ndjson`, `.json`).
    JsonLines,
    /// Comma-separated with a header row (`.csv`).
    Csv,
}

impl Format {
    /// The format of `path`, by extension.
    pub fn of(path: &Path) -> Result<Self, ImportError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match ext.as_deref() {
            Some("jsonl" | "ndjson" | "json") => Ok(Format::JsonLines),
            Some("csv") => Ok(Format::Csv),
            _ => Err(ImportError::Format {
                path: path.to_path_buf(),
            }),
        }
    }

    /// `jsonl` or `csv`, as recorded in `umstore.bulk_imports`.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::JsonLines => "jsonl",
            Format::Csv => "csv",
        }
    }
}

/// A valid user to create.
#[derive(Debug, Clone)]
pub struct NewUser {
    /// The event the record stands for.
    pub event: Event,
    /// Whether the record carried its own `event_id` (a whole event); the
    /// flat form's id is made up for validation and not stored.
    pub has_event_id: bool,
}

impl NewUser {
    /// The `METADATA_CREATED` payload.
    pub fn patch(&self) -> Option<&MetadataPatch> {
        match &self.event.body {
            Body::MetadataCreated(p) => Some(p),
            _ => None,
        }
    }
}

/// One record of the file.
#[derive(Debug)]
pub struct Record {
    /// Line where the record starts (1-based).
    pub line: u64,
    /// Byte offset just past the record: where a resumed import starts.
    pub end: u64,
    /// The user, or why the record is refused (never quoting personal data).
    pub user: Result<NewUser, Refused>,
}

/// Why a record is refused, with the user when it could be read.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The record's `user_id`, when it had a readable one.
    pub user_id: Option<Uuid>,
    /// What is wrong and what to do.
    pub reason: String,
}

/// Fields of the flat form beside the payload.
const ENVELOPE_FIELDS: [&str; 5] = ["user_id", "region", "occurred_at", "source", "event_id"];

/// Payload fields by the JSON type a CSV cell becomes.
const INTEGER_FIELDS: [&str; 5] = [
    "annual_income",
    "household_size",
    "dependents",
    "children",
    "senior_members",
];
const DECIMAL_FIELDS: [&str; 1] = ["land_holding_acres"];
const BOOLEAN_FIELDS: [&str; 3] = ["disability", "has_bank_account", "head_of_household"];
/// Every payload field of `METADATA_CREATED` (docs/events.md).
pub const PAYLOAD_FIELDS: [&str; 22] = [
    "full_name",
    "date_of_birth",
    "gender",
    "annual_income",
    "household_size",
    "employment_type",
    "ration_card",
    "marital_status",
    "district",
    "pincode",
    "area_type",
    "social_category",
    "disability",
    "phone",
    "identity_token",
    "occupation",
    "land_holding_acres",
    "has_bank_account",
    "dependents",
    "children",
    "senior_members",
    "head_of_household",
];

/// Turns a decoded record into a user, as of `now` (the default
/// `occurred_at`) with `source` as the default producer.
pub fn to_user(value: Value, now: DateTime<Utc>, source: &str) -> Result<NewUser, Refused> {
    let user_id = value
        .get("user_id")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Uuid>().ok());
    let refuse = |reason: String| Refused { user_id, reason };
    let Value::Object(mut map) = value else {
        return Err(refuse(
            "a record is a JSON object: a METADATA_CREATED event, or user_id, region and the \
             payload's fields"
                .into(),
        ));
    };
    let whole_event = map.contains_key("event_type");
    let has_event_id = whole_event || map.contains_key("event_id");
    let envelope = if whole_event {
        Value::Object(map)
    } else {
        let mut env = Map::new();
        for f in ENVELOPE_FIELDS {
            if let Some(v) = map.remove(f) {
                env.insert(f.into(), v);
            }
        }
        env.entry("event_id")
            .or_insert_with(|| Value::String(Uuid::new_v4().to_string()));
        env.entry("occurred_at")
            .or_insert_with(|| Value::String(now.to_rfc3339()));
        env.entry("source")
            .or_insert_with(|| Value::String(source.into()));
        env.insert("event_type".into(), "METADATA_CREATED".into());
        env.insert("schema_version".into(), event::SCHEMA_VERSION.into());
        env.insert("payload".into(), Value::Object(map));
        Value::Object(env)
    };
    let event = event::from_value(envelope, now).map_err(|e| refuse(e.to_string()))?;
    if !matches!(event.body, Body::MetadataCreated(_)) {
        return Err(refuse(format!(
            "event_type {} does not create a user: bulk import takes METADATA_CREATED only; \
             send other events to the events endpoint or the bus",
            event.event_type().as_str()
        )));
    }
    Ok(NewUser {
        event,
        has_event_id,
    })
}

/// Reads records from an import file, from a given offset.
pub struct Input {
    inner: Inner,
    now: DateTime<Utc>,
    source: String,
}

enum Inner {
    Json {
        reader: BufReader<File>,
        offset: u64,
        line: u64,
        buf: String,
    },
    Csv {
        reader: Box<csv::Reader<File>>,
        headers: Vec<Column>,
        record: csv::StringRecord,
    },
}

/// What a CSV column holds.
#[derive(Debug, Clone)]
struct Column {
    name: String,
    kind: CellKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CellKind {
    Text,
    Integer,
    Decimal,
    Boolean,
}

impl Input {
    /// Opens `path` and moves to `offset` (0, or where a committed batch
    /// ended), counting lines from `line` + 1.
    pub fn open(
        path: &Path,
        format: Format,
        offset: u64,
        line: u64,
        now: DateTime<Utc>,
        source: &str,
    ) -> Result<Self, ImportError> {
        let io = |source| ImportError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut file = File::open(path).map_err(io)?;
        let inner = match format {
            Format::JsonLines => {
                file.seek(SeekFrom::Start(offset)).map_err(io)?;
                Inner::Json {
                    reader: BufReader::with_capacity(1 << 20, file),
                    offset,
                    line,
                    buf: String::new(),
                }
            }
            Format::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(true)
                    .buffer_capacity(1 << 20)
                    .from_reader(file);
                let headers = columns(reader.headers().map_err(|e| csv_error(path, e))?)?;
                if offset > 0 {
                    let mut pos = csv::Position::new();
                    pos.set_byte(offset).set_line(line + 1);
                    reader.seek(pos).map_err(|e| csv_error(path, e))?;
                }
                Inner::Csv {
                    reader: Box::new(reader),
                    headers,
                    record: csv::StringRecord::new(),
                }
            }
        };
        Ok(Input {
            inner,
            now,
            source: source.to_owned(),
        })
    }

    /// The next record, `None` at the end of the file.
    pub fn next_record(&mut self, path: &Path) -> Result<Option<Record>, ImportError> {
        match &mut self.inner {
            Inner::Json {
                reader,
                offset,
                line,
                buf,
            } => loop {
                buf.clear();
                let n = reader.read_line(buf).map_err(|source| ImportError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                if n == 0 {
                    return Ok(None);
                }
                *offset += n as u64;
                *line += 1;
                let text = buf.trim();
                if text.is_empty() {
                    continue;
                }
                let user = match serde_json::from_str::<Value>(text) {
                    Ok(value) => to_user(value, self.now, &self.source),
                    Err(e) => Err(Refused {
                        user_id: None,
                        reason: format!("not a JSON object: {e}"),
                    }),
                };
                return Ok(Some(Record {
                    line: *line,
                    end: *offset,
                    user,
                }));
            },
            Inner::Csv {
                reader,
                headers,
                record,
            } => {
                let start_line = reader.position().line();
                match reader.read_record(record) {
                    Ok(false) => Ok(None),
                    Ok(true) => {
                        let line = record.position().map_or(start_line, |p| p.line());
                        let end = reader.position().byte();
                        let user = csv_value(headers, record)
                            .and_then(|v| to_user(v, self.now, &self.source));
                        Ok(Some(Record { line, end, user }))
                    }
                    // A row with another number of fields, or bad UTF-8: that
                    // row alone is refused.
                    Err(e) if is_row_error(&e) => {
                        let line = e.position().map_or(start_line, |p| p.line());
                        let end = reader.position().byte();
                        Ok(Some(Record {
                            line,
                            end,
                            user: Err(Refused {
                                user_id: None,
                                reason: row_error(&e, headers.len()),
                            }),
                        }))
                    }
                    Err(e) => Err(csv_error(path, e)),
                }
            }
        }
    }
}

fn is_row_error(e: &csv::Error) -> bool {
    matches!(
        e.kind(),
        csv::ErrorKind::UnequalLengths { .. } | csv::ErrorKind::Utf8 { .. }
    )
}

fn row_error(e: &csv::Error, columns: usize) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { len, .. } => format!(
            "the row has {len} fields and the header {columns}: quote values that contain commas"
        ),
        csv::ErrorKind::Utf8 { .. } => "the row is not valid UTF-8: save the file as UTF-8".into(),
        _ => "the row cannot be read".into(),
    }
}

fn csv_error(path: &Path, e: csv::Error) -> ImportError {
    match e.into_kind() {
        csv::ErrorKind::Io(source) => ImportError::Read {
            path: path.to_path_buf(),
            source,
        },
        other => ImportError::Header(format!("{other:?}")),
    }
}

/// The header's columns, each a known field, none twice.
fn columns(header: &csv::StringRecord) -> Result<Vec<Column>, ImportError> {
    let mut out: Vec<Column> = Vec::with_capacity(header.len());
    for name in header.iter() {
        let name = name.trim();
        if !ENVELOPE_FIELDS.contains(&name) && !PAYLOAD_FIELDS.contains(&name) {
            return Err(ImportError::Header(format!(
                "unknown column {:?}: the columns are user_id, region, the METADATA_CREATED \
                 payload's fields ({}) and optionally occurred_at, source and event_id",
                name.chars().take(40).collect::<String>(),
                PAYLOAD_FIELDS.join(", ")
            )));
        }
        if out.iter().any(|c| c.name == name) {
            return Err(ImportError::Header(format!(
                "column {name} appears twice in the header"
            )));
        }
        let kind = if INTEGER_FIELDS.contains(&name) {
            CellKind::Integer
        } else if DECIMAL_FIELDS.contains(&name) {
            CellKind::Decimal
        } else if BOOLEAN_FIELDS.contains(&name) {
            CellKind::Boolean
        } else {
            CellKind::Text
        };
        out.push(Column {
            name: name.to_owned(),
            kind,
        });
    }
    for required in ["user_id", "region"] {
        if !out.iter().any(|c| c.name == required) {
            return Err(ImportError::Header(format!(
                "the header has no {required} column: every row needs its user_id and region"
            )));
        }
    }
    Ok(out)
}

/// A CSV row as the flat JSON form. Values of a cell that does not read as
/// its column's type are never quoted (some columns hold personal data).
fn csv_value(headers: &[Column], record: &csv::StringRecord) -> Result<Value, Refused> {
    let mut map = Map::new();
    let user_id = headers
        .iter()
        .position(|c| c.name == "user_id")
        .and_then(|i| record.get(i))
        .and_then(|s| s.trim().parse::<Uuid>().ok());
    for (column, cell) in headers.iter().zip(record.iter()) {
        let cell = cell.trim();
        if cell.is_empty() {
            continue;
        }
        let bad = |what: &str| Refused {
            user_id,
            reason: format!("column {}: the value is not {what}", column.name),
        };
        let value = match column.kind {
            CellKind::Text => Value::String(cell.to_owned()),
            CellKind::Integer => cell
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| bad("a whole number"))?,
            CellKind::Decimal => cell
                .parse::<f64>()
                .ok()
                .filter(|f| f.is_finite())
                .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                .ok_or_else(|| bad("a number"))?,
            CellKind::Boolean => match cell.to_ascii_lowercase().as_str() {
                "true" | "t" | "yes" | "1" => Value::Bool(true),
                "false" | "f" | "no" | "0" => Value::Bool(false),
                _ => return Err(bad("true or false")),
            },
        };
        map.insert(column.name.clone(), value);
    }
    Ok(Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        "2026-06-01T00:00:00Z".parse().expect("time")
    }

    fn flat() -> Value {
        serde_json::json!({
            "user_id": "0b6f4a4e-4a4b-4c55-9b0a-3c1e9d1e2f10",
            "region": "KA",
            "full_name": "Asha Rao",
            "date_of_birth": "1990-04-01",
            "gender": "female",
            "annual_income": 450000,
            "household_size": 4,
            "employment_type": "salaried",
            "ration_card": "apl",
        })
    }

    #[test]
    fn the_flat_form_becomes_a_created_event_with_defaults() {
        let u = to_user(flat(), now(), "backfill").expect("valid");
        assert_eq!(u.event.region, "KA");
        assert_eq!(u.event.source, "backfill");
        assert_eq!(u.event.occurred_at, now());
        assert!(!u.has_event_id);
        assert!(u.patch().is_some());
    }

    #[test]
    fn a_refusal_names_the_field_and_never_the_personal_value() {
        let mut v = flat();
        v["annual_income"] = serde_json::json!("a lot");
        v["full_name"] = serde_json::json!("Asha Rao");
        let r = to_user(v, now(), "x").expect_err("refused");
        assert!(r.reason.contains("annual_income"), "{}", r.reason);
        assert!(!r.reason.contains("a lot"), "{}", r.reason);
        assert_eq!(
            r.user_id,
            Some(
                "0b6f4a4e-4a4b-4c55-9b0a-3c1e9d1e2f10"
                    .parse()
                    .expect("uuid")
            )
        );
        let mut v = flat();
        v["region"] = serde_json::json!("ZZ");
        let r = to_user(v, now(), "x").expect_err("refused");
        assert!(r.reason.contains("36 region codes"), "{}", r.reason);
    }

    #[test]
    fn other_event_types_are_refused_with_what_to_do() {
        let v = serde_json::json!({
            "event_id": "9b6f4a4e-4a4b-4c55-9b0a-3c1e9d1e2f10",
            "event_type": "METADATA_UPDATED",
            "occurred_at": "2026-05-01T00:00:00Z",
            "user_id": "0b6f4a4e-4a4b-4c55-9b0a-3c1e9d1e2f10",
            "region": "KA",
            "source": "metadata-engine",
            "schema_version": 1,
            "payload": {"gender": "male"},
        });
        let r = to_user(v, now(), "x").expect_err("refused");
        assert!(r.reason.contains("METADATA_CREATED only"), "{}", r.reason);
    }

    #[test]
    fn csv_headers_are_checked_and_cells_typed() {
        let header = csv::StringRecord::from(vec!["user_id", "region", "nickname"]);
        let err = columns(&header).expect_err("unknown column");
        assert!(err.to_string().contains("nickname"), "{err}");
        let header = csv::StringRecord::from(vec!["region", "full_name"]);
        let err = columns(&header).expect_err("no user_id");
        assert!(err.to_string().contains("user_id"), "{err}");
        let header = csv::StringRecord::from(vec![
            "user_id",
            "region",
            "household_size",
            "disability",
            "land_holding_acres",
            "phone",
        ]);
        let cols = columns(&header).expect("known columns");
        let row = csv::StringRecord::from(vec![
            "0b6f4a4e-4a4b-4c55-9b0a-3c1e9d1e2f10",
            "KA",
            "4",
            "yes",
            "1.25",
            "",
        ]);
        let v = csv_value(&cols, &row).expect("typed");
        assert_eq!(v["household_size"], 4);
        assert_eq!(v["disability"], true);
        assert_eq!(v["land_holding_acres"], 1.25);
        assert!(v.get("phone").is_none(), "an empty cell is absent");
        let row = csv::StringRecord::from(vec![
            "0b6f4a4e-4a4b-4c55-9b0a-3c1e9d1e2f10",
            "KA",
            "four",
            "no",
            "",
            "",
        ]);
        let r = csv_value(&cols, &row).expect_err("not a number");
        assert!(r.reason.contains("household_size"), "{}", r.reason);
        assert!(!r.reason.contains("four"), "{}", r.reason);
    }
}
