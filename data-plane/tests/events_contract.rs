//! The event contract (docs/events.md): the JSON Schemas under
//! `docs/events/schemas` say what the data plane's parser accepts.
//!
//! Every example under `docs/events/examples` is judged alike by its type's
//! schema (boon, draft 2020-12, formats asserted) and by the real parser
//! (`ingest::event::parse`); an `invalid-*.json` example must be refused by
//! both, each naming the offending field. Every event type the parser knows
//! needs a schema and a valid example. And the schemas and the parser must agree
//! on values around every rule, tried field by field on the valid examples; the
//! few values they judge differently are listed below, and in docs/events.md.
//!
//! What a schema cannot say (an `occurred_at` or `computed_at` at most 5 minutes
//! ahead, a date of birth not after today, each `scheme_id` once per event) the
//! schemas accept and the parser refuses: the last test checks that; the
//! examples lie in the past.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use boon::{Compiler, ErrorKind, InstanceToken, SchemaIndex, Schemas, ValidationError};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use umstore_data_plane::ingest::event::{self, EventType, Rejection};
use umstore_migrations::regions::REGIONS;

/// What an `invalid-*.json` example is refused for.
struct Refusal {
    /// The example's file name.
    file: &'static str,
    /// The parser's rejection code.
    code: &'static str,
    /// Text the parser's reason must contain (it names the field).
    parser_says: &'static str,
    /// The field the schema must fail on (a leaf error's instance path, dotted
    /// as the parser writes paths; for a missing or unexpected property, the
    /// object's path with that property).
    schema_field: &'static str,
}

/// One row per `invalid-*.json` file: a file without a row, or a row without a
/// file, fails the test.
const REFUSALS: &[Refusal] = &[
    Refusal {
        file: "invalid-envelope-unknown-field.json",
        code: "malformed",
        parser_says: "`trace_id`",
        schema_field: "trace_id",
    },
    Refusal {
        file: "invalid-missing-required-field.json",
        code: "invalid",
        parser_says: "`date_of_birth`",
        schema_field: "payload.date_of_birth",
    },
    Refusal {
        file: "invalid-pincode.json",
        code: "invalid",
        parser_says: "payload.pincode",
        schema_field: "payload.pincode",
    },
    Refusal {
        file: "invalid-score-1.5.json",
        code: "invalid",
        parser_says: "payload.results[0].score",
        schema_field: "payload.results[0].score",
    },
    Refusal {
        file: "invalid-unknown-event-type.json",
        code: "unknown_type",
        parser_says: "\"METADATA_DELETED\"",
        schema_field: "event_type",
    },
    Refusal {
        file: "invalid-unknown-field.json",
        code: "invalid",
        parser_says: "`email`",
        schema_field: "payload.email",
    },
    Refusal {
        file: "invalid-unknown-region.json",
        code: "invalid",
        parser_says: "region \"TG\"",
        schema_field: "region",
    },
    Refusal {
        file: "invalid-update-null-required.json",
        code: "invalid",
        parser_says: "payload.ration_card",
        schema_field: "payload.ration_card",
    },
    Refusal {
        file: "invalid-household-size-0.json",
        code: "invalid",
        parser_says: "payload.household_size",
        schema_field: "payload.household_size",
    },
    Refusal {
        file: "invalid-schema-version-2.json",
        code: "invalid",
        parser_says: "schema_version 2",
        schema_field: "schema_version",
    },
    Refusal {
        file: "invalid-nil-user-id.json",
        code: "invalid",
        parser_says: "user_id",
        schema_field: "user_id",
    },
    Refusal {
        file: "invalid-occurred-at-without-offset.json",
        code: "malformed",
        parser_says: "occurred_at",
        schema_field: "occurred_at",
    },
    Refusal {
        file: "invalid-update-empty-payload.json",
        code: "invalid",
        parser_says: "payload names no field",
        schema_field: "payload",
    },
];

/// Values the parser accepts in some field where the schema refuses them: the
/// parser's libraries read more than the contract's formats (docs/events.md,
/// "Where the parser is more lenient"). Producers must not rely on them. An
/// entry that no longer makes a difference fails the test: remove it here and
/// in the docs.
const PARSER_ALONE_ACCEPTS: &[&str] = &[
    // uuid: the simple, braced and URN forms.
    r#""6a2f9d130c7e4b58a4e13d9b7f205c86""#,
    r#""{6a2f9d13-0c7e-4b58-a4e1-3d9b7f205c86}""#,
    r#""urn:uuid:6a2f9d13-0c7e-4b58-a4e1-3d9b7f205c86""#,
    // chrono: a space for T, an offset without a colon, :60 in any minute.
    r#""2026-11-21 06:40:00Z""#,
    r#""2026-11-21T06:40:00+0530""#,
    r#""2026-11-21T06:40:60Z""#,
    // chrono: dates without zero padding, or with a sign.
    r#""1994-1-6""#,
    r#""+1994-01-26""#,
];

/// Values the schema accepts in some field where the parser refuses them: JSON
/// Schema cannot tell 5.0 from 5, the parser's integers refuse a fraction part.
const SCHEMA_ALONE_ACCEPTS: &[&str] = &["1.0", "5.0"];

fn events_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/events")
}

/// The `.json` files of a directory, sorted by name.
fn json_files(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let name = p.file_name().expect("a file name").to_string_lossy().into();
            (name, p)
        })
        .collect();
    files.sort();
    files
}

fn read_json(path: &Path) -> (Vec<u8>, Value) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    (bytes, value)
}

/// The schemas, compiled, by the event type they describe.
struct Contract {
    schemas: Schemas,
    by_type: BTreeMap<String, (SchemaIndex, Value)>,
}

impl Contract {
    fn load() -> Self {
        let mut schemas = Schemas::new();
        let mut compiler = Compiler::new();
        // Draft 2020-12 treats `format` as an annotation unless asked.
        compiler.enable_format_assertions();
        let mut by_type = BTreeMap::new();
        for (name, path) in json_files(&events_dir().join("schemas")) {
            let stem = name
                .strip_suffix(".schema.json")
                .unwrap_or_else(|| panic!("schemas/{name}: name it <event_type>.schema.json"));
            let (_, value) = read_json(&path);
            let event_type = stem.to_uppercase();
            assert_eq!(
                value.pointer("/properties/event_type/const"),
                Some(&json!(event_type)),
                "schemas/{name} must fix event_type to {event_type}"
            );
            let index = compiler
                .compile(path.to_str().expect("a UTF-8 path"), &mut schemas)
                .unwrap_or_else(|e| panic!("schemas/{name} does not compile: {e:#}"));
            by_type.insert(event_type, (index, value));
        }
        assert!(!by_type.is_empty(), "no schema under docs/events/schemas");
        Contract { schemas, by_type }
    }

    /// The schema of the type the event names, if there is one.
    fn schema_for(&self, event: &Value) -> Option<SchemaIndex> {
        let name = event.get("event_type")?.as_str()?;
        self.by_type.get(name).map(|(index, _)| *index)
    }

    /// The contract's verdict: valid against the schema of the type it names.
    fn verdict(&self, event: &Value) -> Result<(), String> {
        let index = self
            .schema_for(event)
            .ok_or_else(|| "no schema for its event_type".to_owned())?;
        self.schemas
            .validate(event, index)
            .map_err(|e| format!("{e}"))
    }
}

/// The fields a validation error points at, dotted as the parser writes paths
/// (`payload.results[0].score`).
fn failed_fields(error: &ValidationError) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![error];
    while let Some(e) = stack.pop() {
        if !e.causes.is_empty() {
            stack.extend(e.causes.iter());
            continue;
        }
        let mut at = String::new();
        for token in &e.instance_location.tokens {
            match token {
                InstanceToken::Prop(p) if at.is_empty() => at.push_str(p),
                InstanceToken::Prop(p) => {
                    at.push('.');
                    at.push_str(p);
                }
                InstanceToken::Item(i) => at.push_str(&format!("[{i}]")),
            }
        }
        let join = |name: &str| {
            if at.is_empty() {
                name.to_owned()
            } else {
                format!("{at}.{name}")
            }
        };
        match &e.kind {
            ErrorKind::AdditionalProperties { got } => {
                out.extend(got.iter().map(|g| join(g)));
            }
            ErrorKind::Required { want } => out.extend(want.iter().map(|w| join(w))),
            _ => out.push(at),
        }
    }
    out
}

/// The wire names of a fieldless enum the parser deserializes, read from the
/// type itself: serde names every variant when it refuses an unknown one, so a
/// variant added there is found here without editing this test.
fn wire_names<T: serde::de::DeserializeOwned>() -> Vec<String> {
    let refusal = match serde_json::from_value::<T>(json!("?")) {
        Ok(_) => panic!("\"?\" was accepted as a variant"),
        Err(e) => e.to_string(),
    };
    let (_, expected) = refusal
        .split_once("expected")
        .unwrap_or_else(|| panic!("serde's refusal lists no variants: {refusal}"));
    let names: Vec<String> = expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    assert!(!names.is_empty(), "no variants found in {refusal:?}");
    names
}

/// The event types the parser knows.
fn parser_event_types() -> Vec<EventType> {
    wire_names::<EventType>()
        .iter()
        .map(|name| {
            let t: EventType = serde_json::from_value(json!(name))
                .unwrap_or_else(|e| panic!("{name} from serde's list does not parse: {e}"));
            assert_eq!(t.as_str(), name, "EventType::as_str disagrees with serde");
            t
        })
        .collect()
}

/// The parser's clock.
fn now() -> DateTime<Utc> {
    Utc::now()
}

#[test]
fn every_event_type_the_parser_knows_has_a_schema_and_a_valid_example() {
    let contract = Contract::load();
    let known = parser_event_types();
    let examples: Vec<(String, Value)> = json_files(&events_dir().join("examples"))
        .into_iter()
        .filter(|(name, _)| !name.starts_with("invalid-"))
        .map(|(name, path)| (name, read_json(&path).1))
        .collect();
    for t in &known {
        assert!(
            contract.by_type.contains_key(t.as_str()),
            "{} has no schema: add docs/events/schemas/{}.schema.json",
            t.as_str(),
            t.as_str().to_lowercase()
        );
        assert!(
            examples
                .iter()
                .any(|(_, v)| v.get("event_type") == Some(&json!(t.as_str()))),
            "{} has no valid example under docs/events/examples",
            t.as_str()
        );
    }
    for name in contract.by_type.keys() {
        assert!(
            known.iter().any(|t| t.as_str() == name),
            "schemas/{}.schema.json describes {name}, which the parser does not know",
            name.to_lowercase()
        );
    }
}

#[test]
fn valid_examples_pass_their_schema_and_the_parser() {
    let contract = Contract::load();
    let mut seen = 0;
    for (name, path) in json_files(&events_dir().join("examples")) {
        if name.starts_with("invalid-") {
            continue;
        }
        seen += 1;
        let (bytes, value) = read_json(&path);
        let event_type = value
            .get("event_type")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("examples/{name} names no event_type"));
        assert!(
            name.starts_with(&event_type.to_lowercase()),
            "examples/{name}: name a valid example <event_type>[-what].json"
        );
        if let Err(e) = contract.verdict(&value) {
            panic!("examples/{name} fails its schema: {e}");
        }
        let parsed = event::parse(&bytes, now())
            .unwrap_or_else(|r| panic!("examples/{name} is refused by the parser: {r}"));
        assert_eq!(parsed.event_type().as_str(), event_type, "examples/{name}");
    }
    assert!(seen > 0, "no valid example under docs/events/examples");
}

#[test]
fn invalid_examples_are_refused_by_schema_and_parser_naming_the_field() {
    let contract = Contract::load();
    let files = json_files(&events_dir().join("examples"));
    for refusal in REFUSALS {
        assert!(
            files.iter().any(|(name, _)| name == refusal.file),
            "REFUSALS names examples/{}, which does not exist",
            refusal.file
        );
    }
    let mut seen = 0;
    for (name, path) in files {
        if !name.starts_with("invalid-") {
            continue;
        }
        seen += 1;
        let expected = REFUSALS
            .iter()
            .find(|r| r.file == name)
            .unwrap_or_else(|| panic!("examples/{name}: add what it is refused for to REFUSALS"));
        let (bytes, value) = read_json(&path);

        // No schema accepts it, and the schema of the type it names (or, for a
        // type without one, every schema) fails on the field.
        let own = contract.schema_for(&value);
        for (schema_type, (index, _)) in &contract.by_type {
            let Err(error) = contract.schemas.validate(&value, *index) else {
                panic!("examples/{name} passes the {schema_type} schema");
            };
            if own.is_none() || own == Some(*index) {
                let fields = failed_fields(&error);
                assert!(
                    fields.iter().any(|f| f == expected.schema_field),
                    "examples/{name}: the {schema_type} schema should fail on {}, \
                     it fails on {fields:?}: {error}",
                    expected.schema_field
                );
            }
        }

        let rejection: Rejection = match event::parse(&bytes, now()) {
            Ok(e) => panic!("examples/{name} is accepted by the parser: {e:?}"),
            Err(r) => r,
        };
        assert_eq!(
            rejection.code(),
            expected.code,
            "examples/{name}: {rejection}"
        );
        let reason = rejection.to_string();
        assert!(
            reason.contains(expected.parser_says),
            "examples/{name}: the parser's reason should contain {:?}: {reason}",
            expected.parser_says
        );
    }
    assert!(
        seen > 0,
        "no invalid-*.json example under docs/events/examples"
    );
}

/// Values tried in every field of every valid example: around the ranges,
/// lengths, formats and enums of the contract.
fn probes() -> Vec<Value> {
    let s = |c: char, n: usize| Value::String(std::iter::repeat_n(c, n).collect());
    let mut v = vec![
        json!(null),
        json!(true),
        json!(false),
        json!(0),
        json!(1),
        json!(-1),
        json!(0.5),
        json!(1.5),
        json!(2),
        json!(30),
        json!(31),
        json!(50),
        json!(51),
        json!(100000),
        json!(100000.01),
        json!(1_000_000_000_000_i64),
        json!(1_000_000_000_001_i64),
        json!(""),
        json!(" "),
        json!("x"),
        s('a', 64),
        s('a', 65),
        s('a', 100),
        s('a', 101),
        s('a', 128),
        s('a', 129),
        s('a', 200),
        s('a', 201),
        json!("has space"),
        json!("-leading-dash"),
        json!("model/2026.11:rc-1_a"),
        json!("571999"),
        json!("057199"),
        json!("57199"),
        json!("+919000000001"),
        json!("9000000001"),
        json!("919000000001"),
        json!("vault:v1:AAAA"),
        json!("vault:v12:YWJjZA=="),
        // Not transit ciphertext: refused by the schema and, as plaintext that
        // fails the field's own rules, by the parser.
        json!("vault:v1"),
        json!("vault:v1:not base64!"),
        json!("vault:v:AAAA"),
        json!("vault:v1:AA==="),
        json!("1994-01-26"),
        json!("1900-01-01"),
        json!("1899-12-31"),
        json!("1994-02-30"),
        json!("26-01-1994"),
        json!("2026-11-21T06:40:00Z"),
        json!("2026-11-21T06:40:00+05:30"),
        json!("2026-11-21T06:40:00.123456789Z"),
        json!("2026-11-21T06:40:00.1234567891Z"),
        json!("2026-11-21t06:40:00z"),
        json!("2016-12-31T23:59:60Z"),
        json!("2026-11-21T06:40Z"),
        json!("2026-11-21T06:40:00"),
        json!("2026-11-21"),
        json!("6a2f9d13-0c7e-4b58-a4e1-3d9b7f205c86"),
        json!("6A2F9D13-0C7E-4B58-A4E1-3D9B7F205C86"),
        json!("00000000-0000-0000-0000-000000000000"),
        json!("KA"),
        json!("TG"),
        json!("ka"),
        json!([]),
        json!(["a reason"]),
        Value::Array(vec![s('r', 500)]),
        Value::Array(vec![s('r', 501)]),
        Value::Array(vec![json!("r"); 20]),
        Value::Array(vec![json!("r"); 21]),
        json!({}),
    ];
    // Every value the parser's enums and region list know, so that one the
    // schema lacks is found.
    for names in [
        wire_names::<EventType>(),
        wire_names::<event::Gender>(),
        wire_names::<event::MaritalStatus>(),
        wire_names::<event::AreaType>(),
        wire_names::<event::SocialCategory>(),
        wire_names::<event::EmploymentType>(),
        wire_names::<event::RationCard>(),
    ] {
        v.extend(names.into_iter().map(Value::String));
    }
    v.extend(REGIONS.iter().map(|r| json!(r.code)));
    for text in PARSER_ALONE_ACCEPTS.iter().chain(SCHEMA_ALONE_ACCEPTS) {
        v.push(serde_json::from_str(text).expect("a JSON value"));
    }
    v
}

/// Where to try values: every property the schema declares, at its place in
/// `instance` (an array's first item for `items`), with its enum values.
fn targets(schema: &Value, defs: &Value, at: &str, instance: &Value, out: &mut Vec<Target>) {
    let Some(props) = schema.get("properties").and_then(Value::as_object) else {
        return;
    };
    out.push(Target {
        object: at.to_owned(),
        key: None,
        extra: vec![],
    });
    for (key, sub) in props {
        let sub = match sub.get("$ref").and_then(Value::as_str) {
            Some(r) => {
                let name = r.trim_start_matches("#/$defs/");
                defs.get(name).unwrap_or(sub)
            }
            None => sub,
        };
        let mut extra: Vec<Value> = sub
            .get("enum")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        extra.extend(sub.get("const").cloned());
        out.push(Target {
            object: at.to_owned(),
            key: Some(key.clone()),
            extra,
        });
        let here = format!("{at}/{key}");
        if instance.pointer(&here).is_some_and(Value::is_object) {
            targets(sub, defs, &here, instance, out);
        }
        if let Some(items) = sub.get("items") {
            let first = format!("{here}/0");
            if instance.pointer(&first).is_some_and(Value::is_object) {
                targets(items, defs, &first, instance, out);
            }
        }
    }
}

fn object_at<'v>(
    v: &'v mut Value,
    pointer: &str,
) -> Option<&'v mut serde_json::Map<String, Value>> {
    v.pointer_mut(pointer)?.as_object_mut()
}

struct Target {
    /// JSON pointer of the object.
    object: String,
    /// The property tried; `None`: an unexpected property added to the object.
    key: Option<String>,
    /// Values the schema names for this property (its enum).
    extra: Vec<Value>,
}

#[test]
fn schemas_and_parser_agree_on_values_around_every_rule() {
    let contract = Contract::load();
    let probes = probes();
    let now = now();
    let known = |list: &[&str]| -> Vec<Value> {
        list.iter()
            .map(|t| serde_json::from_str(t).expect("a JSON value"))
            .collect()
    };
    let parser_alone = known(PARSER_ALONE_ACCEPTS);
    let schema_alone = known(SCHEMA_ALONE_ACCEPTS);
    let mut seen_parser_alone = vec![false; parser_alone.len()];
    let mut seen_schema_alone = vec![false; schema_alone.len()];
    let mut tried = 0;
    let mut disagreements = Vec::new();
    for (name, path) in json_files(&events_dir().join("examples")) {
        if name.starts_with("invalid-") {
            continue;
        }
        let (_, base) = read_json(&path);
        let event_type = base["event_type"].as_str().unwrap_or_default();
        let Some((_, schema)) = contract.by_type.get(event_type) else {
            panic!("examples/{name}: no schema for {event_type}");
        };
        let mut places = Vec::new();
        targets(schema, &schema["$defs"], "", &base, &mut places);
        for target in places {
            // (what was tried, the value tried if any, the event)
            let mut variants: Vec<(String, Option<&Value>, Value)> = Vec::new();
            match &target.key {
                None => {
                    let mut v = base.clone();
                    if let Some(o) = object_at(&mut v, &target.object) {
                        o.insert("unexpected_field".into(), json!(1));
                    }
                    let what = format!("{}/unexpected_field = 1", target.object);
                    variants.push((what, None, v));
                }
                Some(key) => {
                    let mut v = base.clone();
                    if let Some(o) = object_at(&mut v, &target.object) {
                        o.remove(key);
                    }
                    variants.push((format!("{}/{key} removed", target.object), None, v));
                    for probe in probes.iter().chain(&target.extra) {
                        let mut v = base.clone();
                        if let Some(o) = object_at(&mut v, &target.object) {
                            o.insert(key.clone(), probe.clone());
                        }
                        let shown: String = probe.to_string().chars().take(40).collect();
                        let what = format!("{}/{key} = {shown}", target.object);
                        variants.push((what, Some(probe), v));
                    }
                }
            }
            for (what, probe, variant) in variants {
                tried += 1;
                let schema_says = contract.verdict(&variant);
                let parser_says = event::from_value(variant, now).map(|_| ());
                let known_as =
                    |list: &[Value]| probe.and_then(|p| list.iter().position(|k| k == p));
                match (schema_says.is_ok(), parser_says.is_ok()) {
                    (false, true) => {
                        if let Some(i) = known_as(&parser_alone) {
                            seen_parser_alone[i] = true;
                            continue;
                        }
                    }
                    (true, false) => {
                        if let Some(i) = known_as(&schema_alone) {
                            seen_schema_alone[i] = true;
                            continue;
                        }
                    }
                    _ => continue,
                }
                disagreements.push(format!(
                    "examples/{name} with {what}: schema {}, parser {}",
                    schema_says.map_or_else(|e| format!("refuses ({e})"), |_| "accepts".into()),
                    parser_says.map_or_else(|r| format!("refuses ({r})"), |_| "accepts".into()),
                ));
            }
        }
    }
    assert!(tried > 100, "only {tried} variants tried");
    for (list, seen) in [
        (PARSER_ALONE_ACCEPTS, &seen_parser_alone),
        (SCHEMA_ALONE_ACCEPTS, &seen_schema_alone),
    ] {
        for (text, seen) in list.iter().zip(seen) {
            assert!(
                *seen,
                "{text} is listed as judged differently, but schema and parser now agree on it \
                 everywhere: remove it from the list and from docs/events.md"
            );
        }
    }
    assert!(
        disagreements.is_empty(),
        "{} of {tried} variants judged differently:\n{}",
        disagreements.len(),
        disagreements.join("\n")
    );
}

/// The valid example of `event_type` with `change` applied.
fn example_with(event_type: &str, change: impl FnOnce(&mut Value)) -> Value {
    let (_, path) = json_files(&events_dir().join("examples"))
        .into_iter()
        .find(|(name, _)| name == &format!("{}.json", event_type.to_lowercase()))
        .unwrap_or_else(|| panic!("no examples/{}.json", event_type.to_lowercase()));
    let (_, mut value) = read_json(&path);
    change(&mut value);
    value
}

#[test]
fn rules_no_schema_can_express_are_left_to_the_parser() {
    let contract = Contract::load();
    let now = now();
    let ahead = (now + chrono::Duration::minutes(10)).to_rfc3339();
    let tomorrow = (now + chrono::Duration::days(1)).date_naive().to_string();
    let cases = [
        (
            "occurred_at 10 minutes ahead",
            example_with("METADATA_UPDATED", |v| v["occurred_at"] = json!(ahead)),
            "occurred_at",
        ),
        (
            "a date of birth tomorrow",
            example_with("METADATA_CREATED", |v| {
                v["payload"]["date_of_birth"] = json!(tomorrow)
            }),
            "payload.date_of_birth",
        ),
        (
            "risk scores computed 10 minutes ahead",
            example_with("RISK_SCORES_COMPUTED", |v| {
                v["payload"]["computed_at"] = json!(ahead)
            }),
            "payload.computed_at",
        ),
        (
            "one scheme twice",
            example_with("ELIGIBILITY_COMPUTED", |v| {
                let first = v["payload"]["results"][0].clone();
                v["payload"]["results"]
                    .as_array_mut()
                    .expect("results")
                    .push(first);
            }),
            "scheme_id",
        ),
    ];
    for (what, event, field) in cases {
        if let Err(e) = contract.verdict(&event) {
            panic!("{what}: the schema refuses it, so say so in docs/events.md: {e}");
        }
        match event::from_value(event, now) {
            Ok(_) => panic!("{what}: accepted by the parser"),
            Err(r) => {
                assert_eq!(r.code(), "invalid", "{what}: {r}");
                assert!(r.to_string().contains(field), "{what}: {r}");
            }
        }
    }
}
