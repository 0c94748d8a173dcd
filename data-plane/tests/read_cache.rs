//! The read cache across processes: two `serve` processes on one store (one
//! PostgreSQL database, the purposes' own logins), one NATS JetStream and one
//! OpenBao transit key, each with its own cache. An update that arrives on the
//! inbound stream reaches both caches through `METADATA_STORED` within a few
//! seconds although their TTL is an hour; an erased user is never served from
//! either cache; a purpose without PII never gets PII from one; with the cache
//! off (and for `as_of` and read-your-writes reads) answers are as before.

mod support;

use std::time::{Duration, Instant};

use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope};
use support::{free_port, get_with, http_get, http_post, stdout, wait_for, Answer, Served, Store};
use umstore_data_plane::ingest::bus::{self, BusConfig};
use umstore_e2e::skip::{skip_or_fail, Component};
use umstore_e2e::{Nats, OpenBao};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

/// Everything the processes share: the store, the bus, the transit key.
struct Shared {
    store: Store,
    admin_url: String,
    nats: Nats,
    bus: BusConfig,
    bao: &'static OpenBao,
    transit_key: String,
}

impl Shared {
    /// `None` (after a skip) without OpenBao.
    async fn new() -> Option<Self> {
        let bao = match umstore_e2e::shared().openbao() {
            Ok(bao) => bao,
            Err(e) => {
                skip_or_fail(Component::OpenBao, format!("no OpenBao: {e}"));
                return None;
            }
        };
        let store = Store::migrated().await;
        let admin_url = store.admin_url().await;
        let nats = Nats::start().expect("nats-server (apt-get install nats-server)");
        let tag = Uuid::new_v4().simple().to_string()[..8].to_owned();
        let bus = BusConfig {
            url: nats.url(),
            credentials: None,
            subject_prefix: format!("t{tag}.events"),
            stream_prefix: format!("T{}", tag.to_uppercase()),
            workers: 2,
            max_age: Duration::from_secs(3600),
        };
        Some(Self {
            store,
            admin_url,
            nats,
            bus,
            bao,
            transit_key: format!("cache-{tag}"),
        })
    }

    fn vault_env(&self) -> [(&str, String); 5] {
        [
            ("UMSTORE_VAULT_ADDR", self.bao.address()),
            ("VAULT_TOKEN", self.bao.root_token().to_owned()),
            ("UMSTORE_TRANSIT_KEY", self.transit_key.clone()),
            (
                "UMSTORE_EVENTS_SUBJECT_PREFIX",
                self.bus.subject_prefix.clone(),
            ),
            (
                "UMSTORE_EVENTS_STREAM_PREFIX",
                self.bus.stream_prefix.clone(),
            ),
        ]
    }

    /// A METADATA_UPDATED published on the inbound stream, as a producer does.
    async fn publish(&self, event: &Value) {
        let js = bus::connect(&self.bus).await.expect("connect");
        bus::ensure_streams(&js, &self.bus).await.expect("streams");
        let subject = self.bus.inbound_subject(
            event["region"].as_str().expect("region"),
            event["event_type"].as_str().expect("type"),
        );
        js.publish(subject, event.to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
    }

    /// `keys forget-user` through the CLI, as a data-protection officer would.
    fn erase(&self, user: Uuid, dir: &std::path::Path) {
        let user = user.to_string();
        let writer = self.store.url(Purpose::Writer);
        let data_dir = dir.display().to_string();
        let env = self.vault_env();
        let out = std::process::Command::new(support::BIN)
            .args(["keys", "forget-user", &user, "--actor", "dpo"])
            .args(["--database-url", &writer, "--data-dir", &data_dir])
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "warn")
            .output()
            .expect("keys forget-user");
        assert!(
            stdout(&out).contains("erased"),
            "{}{}",
            stdout(&out),
            support::stderr(&out)
        );
    }
}

/// One `serve` process: the writer login for ingest, each reading purpose as
/// its own login, OpenBao, and the bus unless `bus` is false; `cache`:
/// `--read-cache-verify`'s value, or `None` for no cache.
struct Pod {
    served: Option<Served>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Pod {
    async fn start(shared: &Shared, cache: Option<&str>) -> Self {
        Self::start_with(shared, cache, true).await
    }

    async fn start_with(shared: &Shared, cache: Option<&str>, bus: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = dir.path().display().to_string();
        let writer = shared.store.url(Purpose::Writer);
        let mut args: Vec<String> = [
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--data-dir",
            &data_dir,
            "--admin-database-url",
            &shared.admin_url,
        ]
        .map(str::to_owned)
        .to_vec();
        if bus {
            args.extend(["--nats-url".to_owned(), shared.nats.url()]);
        }
        for p in [Purpose::Ai, Purpose::Rules, Purpose::Dashboard] {
            args.push(format!("--{}-database-url", p.slug()));
            args.push(shared.store.url(p));
        }
        if let Some(verify) = cache {
            args.extend(
                [
                    "--read-cache-entries",
                    "1000",
                    // Long: only an invalidation can make a change visible.
                    "--read-cache-ttl",
                    "1h",
                    "--read-cache-verify",
                    verify,
                ]
                .map(str::to_owned),
            );
        }
        let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
        let env = shared.vault_env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let served = Served::start_logging_env(&args, log, &env);
        let pod = Self {
            served: Some(served),
            port,
            dir,
        };
        let ready = wait_for(port, "/readyz", Duration::from_secs(60), |s, _| s == 200);
        assert!(
            matches!(ready, Some((200, _))),
            "not ready: {ready:?}\n{}",
            pod.log()
        );
        if cache.is_some() {
            // Following the outbound stream before the test writes anything.
            let live = wait_for(port, "/metrics", Duration::from_secs(30), |_, body| {
                body.lines().any(|l| l == "umstore_read_cache_live 1")
            });
            assert!(
                live.is_some_and(|(_, b)| b.contains("umstore_read_cache_live 1")),
                "the cache never followed the events\n{}",
                pod.log()
            );
        }
        pod
    }

    fn token(&self, purpose: Purpose) -> String {
        let path = self.dir.path().join("api-tokens").join(purpose.slug());
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .to_owned()
    }

    fn get(&self, purpose: Purpose, user: Uuid) -> Answer {
        self.get_with(purpose, &format!("/api/v1/user-metadata/{user}"), &[])
    }

    fn get_with(&self, purpose: Purpose, path: &str, headers: &[(&str, &str)]) -> Answer {
        get_with(self.port, path, &self.token(purpose), headers)
    }

    /// The value of a metric line that starts with `name` (0 when absent).
    fn metric(&self, name: &str) -> f64 {
        let (_, body) = http_get(self.port, "/metrics").expect("/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    fn send(&self, events: &Value) -> Value {
        let (status, body) = http_post(
            self.port,
            "/api/v1/events",
            Some(&self.token(Purpose::Writer)),
            &events.to_string(),
        );
        assert_eq!(status, 200, "{body}");
        assert!(!body.contains("rejected"), "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn stop(&mut self) -> String {
        if let Some(served) = self.served.take() {
            served.stop();
        }
        self.log()
    }
}

fn cache_state(answer: &Answer) -> Option<&str> {
    answer.header("x-read-cache")
}

/// Reads `user` as `purpose` twice: a miss that fills, then a hit.
fn warm(pod: &Pod, purpose: Purpose, user: Uuid) -> Value {
    let first = pod.get(purpose, user);
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(cache_state(&first), Some("miss"), "{:?}", first.headers);
    let second = pod.get(purpose, user);
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(cache_state(&second), Some("hit"), "{:?}", second.headers);
    assert_eq!(second.header("x-served-by"), Some("cache"));
    assert_eq!(
        first.json(),
        second.json(),
        "a hit answers what the miss did"
    );
    second.json()
}

/// Creates a user through `pod`'s HTTP ingest.
async fn create_user(pod: &Pod) -> Uuid {
    let user = Uuid::new_v4();
    pod.send(&json!([created(user, Utc::now() - Span::minutes(10))]));
    user
}

/// Waits until each of `pods` has counted `n` invalidations for `reason`
/// (`metadata_stored`, `user_erased`): so that a warm-up is not undone by
/// the event of the write before it.
fn seen(pods: &[&Pod], reason: &str, n: f64) {
    let metric = format!("umstore_read_cache_invalidations_total{{reason=\"{reason}\"}}");
    for pod in pods {
        let deadline = Instant::now() + Duration::from_secs(15);
        while pod.metric(&metric) < n {
            assert!(
                Instant::now() < deadline,
                "{metric} stayed below {n}\n{}",
                pod.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Both processes serve `district` for `user` (as ai, PII decrypted) before
/// `deadline`; returns how long it took.
fn until_both_serve(pods: [&Pod; 2], user: Uuid, district: &str, within: Duration) -> Duration {
    let started = Instant::now();
    for pod in pods {
        loop {
            let answer = pod.get(Purpose::Ai, user);
            assert_eq!(answer.status, 200, "{}", answer.body);
            if answer.json()["pii"]["district"] == district {
                break;
            }
            assert!(
                started.elapsed() < within,
                "still {} after {within:?} ({:?}): the invalidation never came\n{}",
                answer.json()["pii"]["district"],
                cache_state(&answer),
                pod.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_on_the_inbound_stream_reaches_both_caches_within_seconds_despite_an_hour_ttl() {
    let Some(shared) = Shared::new().await else {
        return;
    };
    // Hits from memory alone: only METADATA_STORED can end the old answer.
    let a = Pod::start(&shared, Some("none")).await;
    let b = Pod::start(&shared, Some("none")).await;
    let user = create_user(&a).await;
    seen(&[&a, &b], "metadata_stored", 1.0);
    for pod in [&a, &b] {
        let before = warm(pod, Purpose::Ai, user);
        assert_eq!(before["pii"]["district"], "Mysuru", "{before}");
    }

    shared
        .publish(&envelope(
            "METADATA_UPDATED",
            user,
            Utc::now() - Span::minutes(1),
            json!({"district": "Udupi", "annual_income": 310000}),
        ))
        .await;
    let took = until_both_serve([&a, &b], user, "Udupi", Duration::from_secs(15));
    eprintln!("both processes served the update {took:?} after it was published");

    for pod in [&a, &b] {
        // Cached again, the new answer.
        let again = warm_again(pod, user);
        assert_eq!(again["pii"]["district"], "Udupi");
        assert_eq!(again["version"], 2);
        let stored = r#"umstore_read_cache_invalidations_total{reason="metadata_stored"}"#;
        assert!(pod.metric(stored) >= 2.0, "{}", pod.log());
        assert!(pod.metric(r#"umstore_read_cache_lookups_total{result="hit"}"#) >= 2.0);
        assert!(pod.metric("umstore_read_cache_invalidation_lag_seconds_count") >= 1.0);
        assert!(pod.metric("umstore_read_cache_hit_age_seconds_count") >= 2.0);
    }
}

/// After an invalidation: a hit with the current answer (one miss may come first).
fn warm_again(pod: &Pod, user: Uuid) -> Value {
    let first = pod.get(Purpose::Ai, user);
    assert_eq!(first.status, 200);
    let second = pod.get(Purpose::Ai, user);
    assert_eq!(cache_state(&second), Some("hit"), "{:?}", second.headers);
    second.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_erased_user_is_never_served_from_either_cache() {
    let Some(shared) = Shared::new().await else {
        return;
    };
    // The default: every hit checked against the user's row. These two have
    // no bus at all, as if every invalidation were lost: the check alone
    // must keep the erased user out.
    let mut a = Pod::start_with(&shared, Some("version"), false).await;
    let mut b = Pod::start_with(&shared, Some("version"), false).await;
    let user = create_user(&a).await;
    for pod in [&a, &b] {
        for purpose in [Purpose::Ai, Purpose::Dashboard, Purpose::Rules] {
            warm(pod, purpose, user);
        }
    }
    shared.erase(user, a.dir.path());
    // At once: the hit's check finds the erasure.
    for pod in [&a, &b] {
        for purpose in [Purpose::Ai, Purpose::Dashboard, Purpose::Rules] {
            let answer = pod.get(purpose, user);
            assert_eq!(answer.status, 410, "{}: {}", purpose.slug(), answer.body);
            assert_eq!(answer.json()["error"], "erased");
            assert!(!answer.body.contains("Asha"), "{}", answer.body);
        }
    }
    for pod in [&a, &b] {
        let verify = r#"umstore_read_cache_invalidations_total{reason="verify"}"#;
        assert!(pod.metric(verify) >= 3.0, "{}", pod.log());
    }

    // Memory-only hits: the event is what protects them. A second user, warm
    // in two processes trusting the events alone.
    let mut c = Pod::start(&shared, Some("none")).await;
    let mut d = Pod::start(&shared, Some("none")).await;
    let other = create_user(&c).await;
    seen(&[&c, &d], "metadata_stored", 1.0);
    for pod in [&c, &d] {
        warm(pod, Purpose::Ai, other);
    }
    shared.erase(other, c.dir.path());
    // Not read until USER_ERASED has dropped it (these two started after the
    // first erasure, and follow only what is new); then it is gone.
    seen(&[&c, &d], "user_erased", 1.0);
    for pod in [&c, &d] {
        let answer = pod.get(Purpose::Ai, other);
        assert_eq!(answer.status, 410, "{}", answer.body);
        assert!(!answer.body.contains("Asha"));
    }
    for pod in [&mut a, &mut b, &mut c, &mut d] {
        let log = pod.stop();
        for secret in ["Asha", "9876543210", "Mysuru", "tok-0001-abcd"] {
            assert!(!log.contains(secret), "the log shows {secret}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purpose_without_pii_never_gets_pii_from_the_cache() {
    let Some(shared) = Shared::new().await else {
        return;
    };
    let a = Pod::start(&shared, Some("none")).await;
    let user = create_user(&a).await;
    seen(&[&a], "metadata_stored", 1.0);
    // A PII purpose fills its entry first; the rules engine's is its own.
    let ai = warm(&a, Purpose::Ai, user);
    assert_eq!(ai["pii_included"], true);
    assert_eq!(ai["pii"]["full_name"], "Asha Rao");
    let first = a.get(Purpose::Rules, user);
    assert_eq!(cache_state(&first), Some("miss"), "rules has no entry yet");
    for _ in 0..3 {
        let rules = a.get(Purpose::Rules, user);
        assert_eq!(cache_state(&rules), Some("hit"));
        assert_eq!(rules.json()["pii_included"], false);
        assert!(rules.json().get("pii").is_none(), "{}", rules.body);
        for secret in ["Asha", "9876543210", "570001", "tok-0001-abcd"] {
            assert!(!rules.body.contains(secret), "{secret} in {}", rules.body);
        }
    }
    // Analytics may not read one user at all, cached or not.
    let analytics = a.get(Purpose::Analytics, user);
    assert_eq!(analytics.status, 403, "{}", analytics.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cache_off_or_bypassed_answers_are_what_they_were() {
    let Some(shared) = Shared::new().await else {
        return;
    };
    let off = Pod::start(&shared, None).await;
    let on = Pod::start(&shared, Some("none")).await;
    let user = create_user(&off).await;
    seen(&[&on], "metadata_stored", 1.0);
    let plain = off.get(Purpose::Dashboard, user);
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert_eq!(cache_state(&plain), None, "no cache header without a cache");
    assert_eq!(plain.header("x-served-by"), Some("primary"));
    let hit = warm(&on, Purpose::Dashboard, user);
    assert_eq!(plain.json(), hit, "cached or not, the same answer");
    assert_eq!(off.metric("umstore_read_cache_live"), 0.0);

    // An update sent over HTTP to the process without a cache: the other
    // process's entry goes (METADATA_STORED), and a read-your-writes read
    // bypasses the cache at once.
    let sent = off.send(&json!([envelope(
        "METADATA_UPDATED",
        user,
        Utc::now() - Span::minutes(1),
        json!({"district": "Hassan"}),
    )]));
    let lsn = sent["lsn"].as_str().expect("lsn").to_owned();
    let path = format!("/api/v1/user-metadata/{user}");
    let own = on.get_with(Purpose::Dashboard, &path, &[("X-Min-Lsn", &lsn)]);
    assert_eq!(own.status, 200);
    assert_eq!(cache_state(&own), Some("bypass"));
    assert_eq!(own.json()["pii"]["district"], "Hassan");
    // `as_of` bypasses it too.
    let then = (Utc::now() - Span::minutes(5)).format("%Y-%m-%dT%H:%M:%SZ");
    let old = on.get_with(Purpose::Dashboard, &format!("{path}?as_of={then}"), &[]);
    assert_eq!(old.status, 200, "{}", old.body);
    assert_eq!(cache_state(&old), Some("bypass"));
    assert_eq!(old.json()["pii"]["district"], "Mysuru");
    assert!(on.metric(r#"umstore_read_cache_lookups_total{result="bypass"}"#) >= 2.0);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = on.get(Purpose::Dashboard, user);
        if now.json()["pii"]["district"] == "Hassan" {
            break;
        }
        assert!(Instant::now() < deadline, "no invalidation\n{}", on.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    let plain_after = off.get(Purpose::Dashboard, user);
    assert_eq!(plain_after.json()["pii"]["district"], "Hassan");
}
