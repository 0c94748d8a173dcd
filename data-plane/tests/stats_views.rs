//! The materialized stats views (migration 0011): partials from two stores
//! merged with the small-group suppression after the merge; the endpoint's
//! answer from the views against the live GROUP BY; a write shown only after
//! a refresh; the age header and metric; the scheduled refresh, one process
//! at a time. Every read and refresh runs as the production logins.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use support::ingest::created;
use support::{cli, free_port, get_as, http_get, http_post, stdout, wait_for, Served, Store};
use tokio_postgres::Client;
use umstore_data_plane::stats::{self, views};
use umstore_data_plane::store::query::{self, Filter};
use umstore_migrations::roles::Purpose;
use uuid::Uuid;

/// The refresh function's advisory lock key ('umstats').
const REFRESH_LOCK: i64 = 0x0075_6d73_7461_7473;

/// Adds `n` users of `region` in `bracket` with income `income_lakh` each
/// and, when given, an overall risk: fixtures written as the superuser, as
/// `seed` writes (the views read only non-PII columns).
async fn add_users(
    su: &Client,
    region: &str,
    bracket: &str,
    n: i32,
    income_lakh: i16,
    risk: Option<f64>,
) {
    su.execute(
        "WITH u AS (SELECT gen_random_uuid() AS id FROM generate_series(1, $2)),
              dir AS (INSERT INTO umstore.user_directory (user_id, region)
                      SELECT id, $1::text::bpchar FROM u RETURNING user_id),
              m AS (INSERT INTO umstore.user_metadata (user_id, region, gender, income_lakh, household_size)
                    SELECT user_id, $1::text::bpchar, 'female', $4, 4 FROM dir RETURNING user_id)
         INSERT INTO umstore.user_derived_attributes (user_id, region, age_group, income_bracket,
             life_stage, employment_category, bpl_status, tax_bracket, is_senior_citizen, is_farmer,
             source_version)
         SELECT user_id, $1::text::bpchar, 'adult', $3, 'established', 'formal', $3 = 'BPL', 'nil',
                false, false, 1 FROM m",
        &[&region, &n, &bracket, &income_lakh],
    )
    .await
    .expect("add users");
    if let Some(risk) = risk {
        su.execute(
            "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk,
                 benefit_loss_risk, overall_risk, model_version, computed_at)
             SELECT d.user_id, d.region, 0.1, 0.1, 0.1, $3::float8::numeric, 'm/1', now()
             FROM umstore.user_derived_attributes d
             WHERE d.region = $1::text::bpchar AND d.income_bracket = $2
               AND NOT EXISTS (SELECT 1 FROM umstore.user_risk_scores r
                               WHERE r.region = d.region AND r.user_id = d.user_id)",
            &[&region, &bracket, &risk],
        )
        .await
        .expect("add risk scores");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_merged_across_two_clusters_suppress_small_groups_by_their_totals() {
    // Two stores' schemas on real PostgreSQL, as two clusters of a tier-4
    // store would hold them, seeded differently.
    let (a, b) = (Store::migrated().await, Store::migrated().await);
    let (su_a, su_b) = (
        support::connect(a.superuser()).await,
        support::connect(b.superuser()).await,
    );
    // KA/BPL: 6 + 7, under 10 in each, 13 in total: shown.
    add_users(&su_a, "KA", "BPL", 6, 2, Some(0.40)).await;
    add_users(&su_b, "KA", "BPL", 7, 3, Some(0.70)).await;
    // TN/LIG: 4 + 5 = 9: suppressed, though the merge sees both.
    add_users(&su_a, "TN", "LIG", 4, 5, None).await;
    add_users(&su_b, "TN", "LIG", 5, 5, None).await;
    // AP/MIG: 12 in one cluster only: shown.
    add_users(&su_a, "AP", "MIG", 12, 9, None).await;

    let dims = vec!["region".to_owned(), "income_bracket".to_owned()];
    let mut clusters = Vec::new();
    for store in [&a, &b] {
        // The writer refreshes; analytics reads the partials.
        let writer = store.connect(Purpose::Writer).await;
        let done = views::refresh(&writer, true).await.expect("refresh");
        assert!(done.iter().all(|r| r.refreshed), "{done:?}");
        let analytics = store.connect(Purpose::Analytics).await;
        clusters.push(
            views::partials(&analytics, &[], &dims)
                .await
                .expect("partials"),
        );
    }
    // Each cluster alone shows none of KA/BPL (6 and 7 are under 10).
    for c in &clusters {
        let alone = stats::merge(std::slice::from_ref(c), &dims, 10);
        assert!(alone.iter().all(|g| g.group["region"] != "KA"), "{alone:?}");
    }
    let merged = stats::merge(&clusters, &dims, 10);
    let by_region: BTreeMap<String, &query::Group> = merged
        .iter()
        .map(|g| (g.group["region"].as_str().unwrap_or("").to_owned(), g))
        .collect();
    assert_eq!(
        by_region.keys().collect::<Vec<_>>(),
        ["AP", "KA"],
        "{merged:?}"
    );
    let ka = by_region["KA"];
    assert_eq!(ka.users, 13);
    assert_eq!(ka.group["income_bracket"], "BPL");
    // Averages from the merged sums: (6×2 + 7×3) / 13, (6×0.40 + 7×0.70) / 13.
    assert_eq!(ka.avg_income_lakh, Some(33.0 / 13.0));
    let risk = ka.avg_overall_risk.expect("risk");
    assert!((risk - 7.3 / 13.0).abs() < 1e-12, "{risk}");
    assert_eq!(ka.avg_household_size, Some(4.0));
    assert_eq!(by_region["AP"].users, 12);
    assert_eq!(by_region["AP"].avg_overall_risk, None);

    // The grants: analytics reads the scoped view only, refreshes nothing.
    let analytics = a.connect(Purpose::Analytics).await;
    for sql in [
        "SELECT count(*) FROM umstore.stats_groups_mv",
        "SELECT * FROM umstore.refresh_stats_views(true)",
    ] {
        let err = analytics.query(sql, &[]).await.expect_err(sql);
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{sql}: {err:?}"
        );
    }
    // A session scoped to one region sees that region's partials only.
    analytics
        .batch_execute("SET umstore.regions = 'AP'")
        .await
        .expect("scope");
    let scoped = views::partials(&analytics, &[], &dims)
        .await
        .expect("scoped partials");
    assert!(
        scoped.iter().all(|p| p.key[0].as_deref() == Some("AP")),
        "{scoped:?}"
    );
}

/// `serve` on a store, every purpose reading as its own login.
struct Api {
    served: Option<Served>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Api {
    async fn start(store: &Store, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let data_dir = dir.path().display().to_string();
        let writer = store.url(Purpose::Writer);
        let analytics = store.url(Purpose::Analytics);
        let dashboard = store.url(Purpose::Dashboard);
        let mut args = vec![
            "serve",
            "--no-migrate",
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--data-dir",
            &data_dir,
            "--analytics-database-url",
            &analytics,
            "--dashboard-database-url",
            &dashboard,
        ];
        args.extend_from_slice(extra);
        let log = std::fs::File::create(dir.path().join("serve.log")).expect("log");
        let served = Served::start_logging(&args, log);
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    /// GET the stats: (source header, age header, body).
    fn stats(&self, query: &str) -> (String, Option<f64>, Value) {
        let path = format!("/api/v1/user-metadata/stats?{query}");
        let answer = get_as(self.port, &path, Some(&self.token(Purpose::Analytics)));
        assert_eq!(
            answer.status,
            200,
            "{path}: {}\n{}",
            answer.body,
            self.log()
        );
        let source = answer.header("x-stats-source").unwrap_or("").to_owned();
        let age = answer.header("x-stats-age").and_then(|a| a.parse().ok());
        (source, age, answer.json())
    }

    fn metrics(&self) -> String {
        http_get(self.port, "/metrics").expect("metrics").1
    }

    /// `seed` of 1,500 users from `seed` into `store` (as its owner, with this
    /// server's keys), which must succeed.
    fn seed(&self, store: &Store, seed: u64) -> std::process::Output {
        let data_dir = self.dir.path().display().to_string();
        let seed = seed.to_string();
        let seeded = cli(&[
            "seed",
            "--users",
            "1500",
            "--seed",
            &seed,
            "--database-url",
            store.superuser(),
            "--data-dir",
            &data_dir,
        ]);
        assert!(seeded.status.success(), "{}", support::stderr(&seeded));
        seeded
    }

    fn stop(&mut self) -> String {
        if let Some(served) = self.served.take() {
            served.stop();
        }
        self.log()
    }
}

/// The answer's groups by their values: (users, three averages).
type Groups = BTreeMap<String, (i64, [Option<f64>; 3])>;

fn groups_of(answer: &Value) -> Groups {
    answer["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            let avg = |k: &str| g[k].as_f64();
            (
                g["group"].to_string(),
                (
                    g["users"].as_i64().expect("users"),
                    [
                        avg("avg_income_lakh"),
                        avg("avg_household_size"),
                        avg("avg_overall_risk"),
                    ],
                ),
            )
        })
        .collect()
}

/// The live GROUP BY of the same request, run by the library as analytics.
async fn live(analytics: &Client, query: &str) -> Groups {
    let mut filters = Vec::new();
    let mut dims = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').expect("k=v");
        if k == "group_by" {
            dims = v.split(',').map(str::to_owned).collect();
        } else {
            filters.push(Filter::parse(k, v).expect("filter"));
        }
    }
    let groups = query::stats(analytics, &filters, &dims, 10)
        .await
        .expect("live stats");
    groups_of(&serde_json::json!({ "groups": groups }))
}

fn same(view: &Groups, live: &Groups, query: &str) {
    assert_eq!(
        view.keys().collect::<Vec<_>>(),
        live.keys().collect::<Vec<_>>(),
        "{query}: the same groups"
    );
    for (k, (n, avgs)) in view {
        let (m, live_avgs) = &live[k];
        assert_eq!(n, m, "{query} {k}");
        for (a, b) in avgs.iter().zip(live_avgs) {
            match (a, b) {
                (Some(a), Some(b)) => assert!(
                    (a - b).abs() <= 1e-9 * b.abs().max(1.0),
                    "{query} {k}: {a} vs {b}"
                ),
                _ => assert_eq!(a, b, "{query} {k}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_from_the_views_equal_the_live_group_by_and_show_writes_after_a_refresh() {
    let store = Store::migrated().await;
    let mut api = Api::start(&store, &["--stats-max-age", "1h"]).await;
    // Nothing refreshed yet: live.
    assert_eq!(api.stats("group_by=region").0, "live");
    assert!(!api.metrics().contains("umstore_stats_view_age_seconds{"));

    // A bulk import refreshes the views (seed runs as the store's owner).
    let seeded = api.seed(&store, 5);
    assert!(
        stdout(&seeded).contains("refreshed stats_groups: "),
        "{}",
        stdout(&seeded)
    );
    let analytics = store.connect(Purpose::Analytics).await;
    for q in [
        "group_by=region,income_bracket",
        "group_by=gender,life_stage&region=UP",
        "group_by=age_group&bpl_status=true",
        "",
        "group_by=area_type,social_category,employment_category&income_bracket=BPL",
        "group_by=bpl_status&state=Uttar%20Pradesh&gender=male",
        "group_by=life_stage&life_stage=retired",
    ] {
        let (source, age, body) = api.stats(q);
        assert_eq!(source, "view", "{q}");
        assert!(
            age.is_some_and(|a| (0.0..600.0).contains(&a)),
            "{q}: {age:?}"
        );
        let q_live = q.replace("%20", " ");
        same(&groups_of(&body), &live(&analytics, &q_live).await, q);
    }
    // A filter the views do not hold: the tables answer.
    let (source, age, _) = api.stats("group_by=gender&age_min=18");
    assert_eq!((source.as_str(), age), ("live", None));

    // A write is not in the views until they are refreshed.
    let total = |api: &Api| api.stats("").2["groups"][0]["users"].as_i64();
    let before = total(&api).expect("a total");
    let user = Uuid::new_v4();
    let (status, body) = http_post(
        api.port,
        "/api/v1/events",
        Some(&api.token(Purpose::Writer)),
        &created(user, Utc::now()).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(total(&api), Some(before), "the view is not refreshed yet");
    assert_eq!(
        live(&analytics, "").await.values().next().map(|v| v.0),
        Some(before + 1),
        "the tables have it"
    );
    let refreshed = cli(&[
        "stats",
        "refresh",
        "--database-url",
        &store.url(Purpose::Writer),
    ]);
    assert!(
        refreshed.status.success(),
        "{}",
        support::stderr(&refreshed)
    );
    assert!(stdout(&refreshed).starts_with("refreshed stats_groups: "));
    let (source, age, body) = api.stats("");
    assert_eq!(source, "view");
    assert!(age.is_some_and(|a| a < 60.0), "{age:?}");
    assert_eq!(body["groups"][0]["users"].as_i64(), Some(before + 1));
    let metrics = api.metrics();
    let age_line = metrics
        .lines()
        .find(|l| l.starts_with("umstore_stats_view_age_seconds{view=\"stats_groups\"}"))
        .unwrap_or_else(|| panic!("no age in {metrics}"));
    let seconds: f64 = age_line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number");
    assert!((0.0..60.0).contains(&seconds), "{age_line}");
    assert!(metrics.contains("umstore_stats_requests_total{source=\"view\"}"));
    assert!(metrics.contains("umstore_stats_requests_total{source=\"live\"}"));

    // Older than --stats-max-age: the tables answer, and the metric says how old.
    let su = support::connect(store.superuser()).await;
    su.execute(
        "UPDATE umstore.stats_refreshes SET refreshed_at = now() - interval '2 hours'",
        &[],
    )
    .await
    .expect("age the view");
    assert_eq!(api.stats("group_by=region").0, "live");
    let metrics = api.metrics();
    let old = metrics
        .lines()
        .find(|l| l.starts_with("umstore_stats_view_age_seconds{view=\"stats_groups\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .expect("age");
    assert!(old >= 7200.0, "{old}");
    api.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refreshes_the_views_on_a_schedule_and_skips_while_another_session_refreshes() {
    let store = Store::migrated().await;
    let su = support::connect(store.superuser()).await;
    add_users(&su, "KA", "BPL", 11, 2, None).await;
    let mut api = Api::start(&store, &["--stats-refresh-interval", "1s"]).await;
    let counted = |api: &Api, result: &str| -> u64 {
        let line =
            format!("umstore_stats_refreshes_total{{view=\"stats_groups\",result=\"{result}\"}}");
        api.metrics()
            .lines()
            .find(|l| l.starts_with(&line))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counted(&api, "refreshed") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no refresh\n{}",
            api.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (source, _, body) = api.stats("group_by=region");
    assert_eq!(source, "view");
    assert_eq!(body["groups"][0]["users"], 11);
    let by: String = su
        .query_one("SELECT refreshed_by FROM umstore.stats_refreshes", &[])
        .await
        .expect("log")
        .get(0);
    assert_eq!(by, Purpose::Writer.login().expect("login"));

    // Another session holds the refresh lock (another pod refreshing): this
    // one skips its turns and does not wait.
    su.execute("SELECT pg_advisory_lock($1)", &[&REFRESH_LOCK])
        .await
        .expect("lock");
    let skipped = counted(&api, "skipped");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counted(&api, "skipped") < skipped + 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "never skipped\n{}",
            api.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    su.execute("SELECT pg_advisory_unlock($1)", &[&REFRESH_LOCK])
        .await
        .expect("unlock");
    let refreshed = counted(&api, "refreshed");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while counted(&api, "refreshed") <= refreshed {
        assert!(
            std::time::Instant::now() < deadline,
            "no refresh after unlock"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(api
        .metrics()
        .contains("umstore_stats_refresh_duration_seconds_count{view=\"stats_groups\"}"));
    api.stop();
}

/// A counter's value on `/metrics` (0 when absent).
fn counter(metrics: &str, line: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(line))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_scans_are_grouped_on_the_bulk_engine_and_answer_as_the_group_by() {
    let store = Store::migrated().await;
    // Views off: every answer comes from the tables; scans the planner puts
    // at 1,000 rows or more are grouped on the engine.
    let mut api = Api::start(
        &store,
        &["--stats-max-age", "0", "--stats-engine-rows", "1000"],
    )
    .await;
    api.seed(&store, 9);
    // Before the tables are analyzed the planner knows no rows: the
    // database groups.
    assert_eq!(api.stats("group_by=region").0, "live");
    let su = support::connect(store.superuser()).await;
    su.batch_execute("ANALYZE umstore.user_metadata")
        .await
        .expect("analyze");
    let analytics = store.connect(Purpose::Analytics).await;
    for q in [
        "group_by=region,income_bracket",
        "",
        "group_by=gender,life_stage&age_min=30&age_max=60",
        "group_by=area_type,social_category,employment_category&income_bracket=BPL",
        "group_by=bpl_status&gender=female",
        "group_by=age_group,region&life_stage=retired",
    ] {
        let (source, age, body) = api.stats(q);
        assert_eq!((source.as_str(), age), ("engine", None), "{q}");
        assert_eq!(body["min_group_size"], 10, "{q}");
        same(&groups_of(&body), &live(&analytics, q).await, q);
    }
    // One region holds fewer than 1,000 users by the estimate, and a filter
    // the scan does not evaluate: both grouped by the database.
    let region_rows: f64 = su
        .query_one(
            "SELECT reltuples::float8 FROM pg_class WHERE oid = 'umstore.user_metadata_up'::regclass",
            &[],
        )
        .await
        .expect("estimate")
        .get(0);
    assert!(region_rows > 0.0 && region_rows < 1000.0, "{region_rows}");
    for q in [
        "group_by=gender&region=UP",
        "group_by=region&risk_above=0.5",
    ] {
        let (source, _, body) = api.stats(q);
        assert_eq!(source, "live", "{q}");
        same(&groups_of(&body), &live(&analytics, q).await, q);
    }
    let metrics = api.metrics();
    let fields = counter(
        &metrics,
        "umstore_bulk_engine_fields_total{engine=\"cpu\",operation=\"aggregate\"}",
    );
    // The unfiltered request alone copied out 1,500 rows of 3 measures.
    assert!(fields >= 4_500.0, "{fields}\n{metrics}");
    assert!(
        counter(
            &metrics,
            "umstore_bulk_engine_seconds_total{engine=\"cpu\",operation=\"aggregate\"}"
        ) > 0.0,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "umstore_stats_requests_total{source=\"engine\"}"),
        6.0,
        "{metrics}"
    );
    api.stop();
}
