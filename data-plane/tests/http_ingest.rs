//! `POST /api/v1/events` on the `serve` binary, as a newcomer uses it on a local
//! run: no NATS, the token made in the data directory, the writer login.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use chrono::{Duration as Span, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope};
use support::{free_port, http_get, http_post, wait_for, Served, Store};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

fn statuses(body: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|x| x["status"].as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_posted_over_http_apply_once_and_bad_ones_say_why() {
    let store = Store::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = store.url(Purpose::Writer);
    let data_dir = dir.path().display().to_string();
    let served = Served::start(&[
        "serve",
        "--no-migrate",
        "--listen",
        &listen,
        "--database-url",
        &url,
        "--data-dir",
        &data_dir,
    ]);
    let ready = wait_for(port, "/readyz", Duration::from_secs(60), |s, _| s == 200);
    assert!(
        matches!(ready, Some((200, _))),
        "not ready: {ready:?}\n{}",
        served.stop().1
    );
    let token_file = dir.path().join("api-tokens").join("writer");
    let mode = std::fs::metadata(&token_file)
        .expect("a token made in the data directory")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the token file is the owner's only");
    let secret = std::fs::read_to_string(&token_file).expect("token");
    let secret = secret.trim();
    let token = Some(secret);

    let user = Uuid::new_v4();
    let t0 = Utc::now() - Span::minutes(30);
    let event = created(user, t0).to_string();
    let (status, body) = http_post(port, "/api/v1/events", None, &event);
    assert_eq!(status, 401, "{body}");
    let (status, _) = http_post(port, "/api/v1/events", Some("not-the-token-at-all"), &event);
    assert_eq!(status, 401);
    // Another purpose's token is known but not allowed to write.
    let ai = std::fs::read_to_string(dir.path().join("api-tokens").join("ai")).expect("ai token");
    let (status, body) = http_post(port, "/api/v1/events", Some(ai.trim()), &event);
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("serves the purposes writer; the token is for ai"),
        "{body}"
    );

    let (status, body) = http_post(port, "/api/v1/events", token, &event);
    assert_eq!(
        (status, statuses(&body)),
        (200, vec!["applied".to_owned()]),
        "{body}"
    );
    assert!(body.contains("\"version\":1"), "{body}");
    let (status, body) = http_post(port, "/api/v1/events", token, &event);
    assert_eq!(
        (status, statuses(&body)),
        (200, vec!["duplicate".to_owned()])
    );

    let mut bad = created(Uuid::new_v4(), t0);
    bad["payload"]["household_size"] = json!(0);
    let (status, body) = http_post(port, "/api/v1/events", token, &bad.to_string());
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("payload.household_size is 0"), "{body}");

    let batch = json!([
        envelope("METADATA_UPDATED", user, t0 + Span::minutes(5), json!({"children": 1})),
        envelope("METADATA_UPDATED", user, t0 + Span::minutes(1), json!({"children": 3})),
        envelope("METADATA_UPDATED", Uuid::new_v4(), t0, json!({"children": 2})),
        {"event_id": "not-a-uuid"},
    ]);
    let (status, body) = http_post(port, "/api/v1/events", token, &batch.to_string());
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        statuses(&body),
        ["applied", "stale", "rejected", "rejected"]
    );
    assert!(body.contains("unknown user"), "{body}");

    let (status, body) = http_post(port, "/api/v1/events", token, "{nope");
    assert_eq!(status, 400, "{body}");
    let (status, _) = http_post(port, "/api/v1/events", token, "[]");
    assert_eq!(status, 400);
    let (_, metrics) = http_get(port, "/metrics").expect("metrics");
    for line in [
        "umstore_ingest_events_total{outcome=\"applied\"} 2",
        "umstore_ingest_events_total{outcome=\"duplicate\"} 1",
        "umstore_ingest_events_total{outcome=\"stale\"} 1",
        "umstore_ingest_events_total{outcome=\"rejected\"} 3",
        "umstore_ingest_apply_seconds_count 2",
    ] {
        assert!(metrics.contains(line), "/metrics lacks {line}:\n{metrics}");
    }
    let (_, log) = served.stop();
    assert!(!log.contains("Asha"), "the log shows personal data");
    assert!(!log.contains(secret), "the log shows the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_bus_when_one_is_configured() {
    let store = Store::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // Nothing listens there.
    let nats = format!("nats://127.0.0.1:{}", free_port());
    let listen = format!("127.0.0.1:{port}");
    let url = store.url(Purpose::Writer);
    let data_dir = dir.path().display().to_string();
    let served = Served::start(&[
        "serve",
        "--no-migrate",
        "--listen",
        &listen,
        "--database-url",
        &url,
        "--data-dir",
        &data_dir,
        "--nats-url",
        &nats,
    ]);
    let seen = wait_for(port, "/readyz", Duration::from_secs(30), |s, body| {
        s == 503 && body.contains("NATS")
    });
    assert!(
        matches!(&seen, Some((503, body)) if body.contains(&nats)),
        "readiness does not name the bus: {seen:?}"
    );
    assert!(http_get(port, "/healthz").is_some_and(|(s, _)| s == 200));
    drop(served);
}
