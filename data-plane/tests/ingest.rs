//! Applying events on a real PostgreSQL, as the writer login: exactly once, in one
//! transaction each, stale events refused, history, derived attributes, the
//! eligibility cache and the outbox kept with the row.

mod support;

use std::sync::Arc;

use chrono::{DateTime, Duration as Span, SubsecRound, Utc};
use serde_json::{json, Value};
use support::ingest::{created, envelope, fixture};
use umstore_data_plane::ingest::{Outcome, Rejection, SubmitError};
use uuid::Uuid;

#[tokio::test]
async fn a_created_then_updated_user_has_its_row_history_derived_attributes_and_outbox() {
    let f = fixture().await;
    let user = Uuid::new_v4();
    let t0 = Utc::now() - Span::minutes(10);
    assert_eq!(
        f.submit(&created(user, t0)).await.expect("created"),
        Outcome::Applied { version: Some(1) }
    );
    // A cached eligibility result, to see the update drop it.
    f.admin
        .execute(
            "INSERT INTO umstore.user_eligibility_cache (user_id, region, scheme_id, eligible,
                computed_at, expires_at) VALUES ($1, 'KA', 'PM-KISAN', true, now(), now() + interval '1 day')",
            &[&user],
        )
        .await
        .expect("cache an eligibility result");

    let update = envelope(
        "METADATA_UPDATED",
        user,
        t0 + Span::minutes(1),
        json!({"annual_income": 2500000, "ration_card": "apl", "district": null, "occupation": "farmer"}),
    );
    assert_eq!(
        f.submit(&update).await.expect("updated"),
        Outcome::Applied { version: Some(2) }
    );

    let row = f
        .admin
        .query_one(
            "SELECT version, income_lakh, ration_card, district_enc IS NULL, occupation,
                    full_name_enc IS NOT NULL, last_event_at
             FROM umstore.user_metadata WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("row");
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, Option<i16>>(1), Some(25));
    assert_eq!(row.get::<_, Option<String>>(2).as_deref(), Some("apl"));
    assert!(row.get::<_, bool>(3), "district cleared by null");
    assert_eq!(row.get::<_, Option<String>>(4).as_deref(), Some("farmer"));
    assert!(row.get::<_, bool>(5), "untouched fields kept");

    let derived = f
        .admin
        .query_one(
            "SELECT income_bracket, bpl_status, is_farmer, source_version
             FROM umstore.user_derived_attributes WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("derived");
    assert_eq!(
        derived.get::<_, String>(0),
        "HIG",
        "recomputed from the new income"
    );
    assert!(!derived.get::<_, bool>(1));
    assert!(derived.get::<_, bool>(2));
    assert_eq!(derived.get::<_, i64>(3), 2);

    let history = f
        .admin
        .query(
            "SELECT change_type, changed_fields, old_values, new_values, version, changed_by
             FROM umstore.user_metadata_history WHERE user_id = $1 ORDER BY version",
            &[&user],
        )
        .await
        .expect("history");
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].get::<_, String>(0), "created");
    assert_eq!(history[1].get::<_, String>(0), "updated");
    let mut changed: Vec<String> = history[1].get(1);
    changed.sort();
    assert_eq!(
        changed,
        ["annual_income", "district", "occupation", "ration_card"]
    );
    let (old, new): (Value, Value) = (history[1].get(2), history[1].get(3));
    assert_eq!(old["ration_card"], "bpl");
    assert_eq!(new["ration_card"], "apl");
    assert!(new["district"].is_null());
    // PII in history is ciphertext, never the value.
    let income = new["annual_income"].as_str().expect("sealed income");
    assert!(!income.contains("2500000"));
    assert_eq!(history[1].get::<_, String>(5), "metadata-engine");

    assert_eq!(
        f.count(
            "SELECT count(*) FROM umstore.user_eligibility_cache WHERE user_id = $1",
            user
        )
        .await,
        0,
        "the eligibility cache was invalidated"
    );
    let outbox = f
        .admin
        .query(
            "SELECT subject, payload FROM umstore.outbox WHERE user_id = $1 ORDER BY id",
            &[&user],
        )
        .await
        .expect("outbox");
    let subjects: Vec<String> = outbox.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        subjects,
        [
            "umstore.events.out.METADATA_STORED",
            "umstore.events.out.ELIGIBILITY_CACHE_INVALIDATED",
            "umstore.events.out.METADATA_STORED",
            "umstore.events.out.ELIGIBILITY_CACHE_INVALIDATED",
        ]
    );
    let invalidated: Value = outbox[3].get(1);
    assert_eq!(invalidated["entries_removed"], 1);
    assert_eq!(invalidated["version"], 2);
}

#[tokio::test]
async fn a_redelivered_event_changes_nothing_and_an_older_one_is_stale() {
    let f = fixture().await;
    let user = Uuid::new_v4();
    let t0 = Utc::now() - Span::minutes(10);
    f.submit(&created(user, t0)).await.expect("created");
    let newer = envelope(
        "METADATA_UPDATED",
        user,
        t0 + Span::minutes(5),
        json!({"occupation": "weaver"}),
    );
    assert!(matches!(
        f.submit(&newer).await,
        Ok(Outcome::Applied { version: Some(2) })
    ));
    let before = f.counts(user).await;
    assert_eq!(f.submit(&newer).await.expect("again"), Outcome::Duplicate);
    assert_eq!(
        f.counts(user).await,
        before,
        "a redelivery changed something"
    );

    let older = envelope(
        "METADATA_UPDATED",
        user,
        t0 + Span::minutes(2),
        json!({"occupation": "potter"}),
    );
    assert_eq!(f.submit(&older).await.expect("stale"), Outcome::Stale);
    assert_eq!(
        f.counts(user).await,
        before,
        "a stale event changed something"
    );
    let occupation: Option<String> = f
        .admin
        .query_one(
            "SELECT occupation FROM umstore.user_metadata WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("row")
        .get(0);
    assert_eq!(occupation.as_deref(), Some("weaver"));
    let outcome: String = f
        .admin
        .query_one(
            "SELECT outcome FROM umstore.processed_events WHERE event_id = $1",
            &[&uuid(&older["event_id"])],
        )
        .await
        .expect("recorded")
        .get(0);
    assert_eq!(outcome, "stale");
    // The stale event redelivered is a duplicate.
    assert_eq!(f.submit(&older).await.expect("again"), Outcome::Duplicate);
}

fn uuid(v: &Value) -> Uuid {
    v.as_str().and_then(|s| s.parse().ok()).expect("a uuid")
}

#[tokio::test]
async fn risk_and_eligibility_apply_to_known_users_only_and_never_go_back_in_time() {
    let f = fixture().await;
    let user = Uuid::new_v4();
    let now = Utc::now();
    let risk = |at: DateTime<Utc>, overall: f64| {
        envelope(
            "RISK_SCORES_COMPUTED",
            user,
            at,
            json!({"financial_risk": 0.5, "deadline_risk": 0.25, "benefit_loss_risk": 0.125,
                   "overall_risk": overall, "model_version": "risk-v3", "computed_at": at}),
        )
    };
    match f.submit(&risk(now, 0.4)).await {
        Err(SubmitError::Rejected(Rejection::Unappliable(m))) => {
            assert!(m.contains("unknown user"), "{m}")
        }
        other => panic!("risk for an unknown user: {other:?}"),
    }
    f.submit(&created(user, now - Span::hours(1)))
        .await
        .expect("created");
    assert!(matches!(
        f.submit(&risk(now, 0.4)).await,
        Ok(Outcome::Applied { .. })
    ));
    assert_eq!(
        f.submit(&risk(now - Span::minutes(1), 0.9))
            .await
            .expect("older"),
        Outcome::Stale
    );
    let overall: String = f
        .admin
        .query_one(
            "SELECT overall_risk::text FROM umstore.user_risk_scores WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("scores")
        .get(0);
    assert_eq!(overall, "0.40");

    let eligibility = envelope(
        "ELIGIBILITY_COMPUTED",
        user,
        now,
        json!({"computed_at": now, "rules_version": "rules-2026.11",
        "results": [
            {"scheme_id": "PM-KISAN", "eligible": true, "score": 0.91, "reasons": ["farmer"]},
            {"scheme_id": "PMAY-G", "eligible": false}
        ]}),
    );
    assert!(matches!(
        f.submit(&eligibility).await,
        Ok(Outcome::Applied { .. })
    ));
    let rows = f
        .admin
        .query(
            "SELECT scheme_id, eligible, extract(epoch FROM expires_at - computed_at)::int8
             FROM umstore.user_eligibility_cache WHERE user_id = $1 ORDER BY scheme_id",
            &[&user],
        )
        .await
        .expect("eligibility");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].get::<_, String>(0), "PM-KISAN");
    assert!(rows[0].get::<_, bool>(1));
    assert_eq!(
        rows[0].get::<_, i64>(2),
        24 * 3600,
        "expires a TTL after computed_at"
    );
}

#[tokio::test]
async fn invalid_events_are_refused_with_a_reason_that_shows_no_personal_data() {
    let f = fixture().await;
    let user = Uuid::new_v4();
    let now = Utc::now();
    let mut bad_score = envelope(
        "RISK_SCORES_COMPUTED",
        user,
        now,
        json!({"financial_risk": 1.5, "deadline_risk": 0.1, "benefit_loss_risk": 0.1,
               "overall_risk": 0.1, "model_version": "m", "computed_at": now}),
    );
    let mut unknown_region = created(user, now);
    unknown_region["region"] = json!("ZZ");
    let mut unknown_type = created(user, now);
    unknown_type["event_type"] = json!("METADATA_DELETED");
    let mut missing = created(user, now);
    missing["payload"]
        .as_object_mut()
        .expect("payload")
        .remove("gender");
    let mut wrong_pii = created(user, now);
    wrong_pii["payload"]["phone"] = json!("call-me-maybe-98765");
    let mut secret_type = created(user, now);
    secret_type["payload"]["date_of_birth"] = json!("Asha's birthday 1960");
    let mut extra = created(user, now);
    extra["payload"]["favourite_colour"] = json!("blue");
    let clear_required = envelope("METADATA_UPDATED", user, now, json!({"gender": null}));
    bad_score["source"] = json!("ai-core");
    let cases: Vec<(&str, Vec<u8>, &str, &str)> = vec![
        (
            "malformed JSON",
            b"{\"event_id\":".to_vec(),
            "malformed",
            "not JSON",
        ),
        (
            "unknown type",
            unknown_type.to_string().into_bytes(),
            "unknown_type",
            "METADATA_DELETED",
        ),
        (
            "unknown region",
            unknown_region.to_string().into_bytes(),
            "invalid",
            "region \"ZZ\"",
        ),
        (
            "score 1.5",
            bad_score.to_string().into_bytes(),
            "invalid",
            "payload.financial_risk is 1.5",
        ),
        (
            "missing field",
            missing.to_string().into_bytes(),
            "invalid",
            "missing field `gender`",
        ),
        (
            "unknown field",
            extra.to_string().into_bytes(),
            "invalid",
            "unknown field `favourite_colour`",
        ),
        (
            "bad phone",
            wrong_pii.to_string().into_bytes(),
            "invalid",
            "payload.phone (not shown)",
        ),
        (
            "bad date",
            secret_type.to_string().into_bytes(),
            "invalid",
            "payload.date_of_birth: not a valid value",
        ),
        (
            "required cleared",
            clear_required.to_string().into_bytes(),
            "invalid",
            "payload.gender cannot be null",
        ),
    ];
    for (what, bytes, code, says) in cases {
        match f.ingest.submit(&bytes).await {
            Err(SubmitError::Rejected(r)) => {
                let message = r.to_string();
                assert_eq!(r.code(), code, "{what}: {message}");
                assert!(message.contains(says), "{what}: {message:?} lacks {says:?}");
                for secret in ["Asha", "9876543210", "call-me", "birthday", "570001"] {
                    assert!(
                        !message.contains(secret),
                        "{what}: {message} shows {secret}"
                    );
                }
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert_eq!(
        f.count(
            "SELECT count(*) FROM umstore.processed_events WHERE user_id = $1",
            user
        )
        .await,
        0,
        "nothing recorded for a refused event"
    );
}

#[tokio::test]
async fn concurrent_events_for_one_user_apply_in_order_or_are_stale() {
    let f = Arc::new(fixture().await);
    let user = Uuid::new_v4();
    let t0 = (Utc::now() - Span::hours(1)).trunc_subsecs(6);
    f.submit(&created(user, t0)).await.expect("created");
    // 60 updates, each a new household size, submitted from 8 tasks in a
    // shuffled order: the latest by occurred_at wins, none interleaves wrongly.
    let mut events: Vec<(i64, Value)> = (1..=60)
        .map(|i| {
            let at = t0 + Span::seconds(i);
            let size = 1 + (i % 40);
            (
                i,
                envelope(
                    "METADATA_UPDATED",
                    user,
                    at,
                    json!({"household_size": size}),
                ),
            )
        })
        .collect();
    fastrand::shuffle(&mut events);
    let chunks: Vec<Vec<(i64, Value)>> = events.chunks(8).map(|c| c.to_vec()).collect();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for (_, e) in chunk {
                outcomes.push(f.submit(&e).await.expect("applied or stale"));
            }
            outcomes
        }));
    }
    let mut applied = 0;
    for t in tasks {
        for o in t.await.expect("task") {
            match o {
                Outcome::Applied { .. } => applied += 1,
                Outcome::Stale => {}
                Outcome::Duplicate => panic!("no event was sent twice"),
            }
        }
    }
    let row = f
        .admin
        .query_one(
            "SELECT household_size, version, last_event_at FROM umstore.user_metadata WHERE user_id = $1",
            &[&user],
        )
        .await
        .expect("row");
    assert_eq!(
        row.get::<_, Option<i16>>(0),
        Some(1 + (60 % 40)),
        "the latest event's value"
    );
    assert_eq!(row.get::<_, DateTime<Utc>>(2), t0 + Span::seconds(60));
    let history_versions = f
        .count(
            "SELECT count(*) FROM umstore.user_metadata_history WHERE user_id = $1",
            user,
        )
        .await;
    assert_eq!(
        history_versions,
        row.get::<_, i64>(1),
        "one history row per version"
    );
    assert!(applied >= 1);
    let _ = &f.store;
}
