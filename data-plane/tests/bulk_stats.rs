//! `bulk stats` against the stats endpoint's own GROUP BY: on a seeded store,
//! read as the analytics login from a streaming replica, the command's JSON
//! equals what the endpoint answers live (`query::stats`, `HAVING count(*) >=
//! k` in the database) for several groupings and filters, float for float,
//! small groups left out alike; the merge of the endpoint's partials gives
//! the same; bad arguments are errors that say what is wrong.

mod support;

use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use support::{cli, stderr, stdout, Store};
use umstore_data_plane::api::bodies::StatsBody;
use umstore_data_plane::api::schema_version;
use umstore_data_plane::bulk::{select, EngineChoice};
use umstore_data_plane::stats;
use umstore_data_plane::store::query::{self, Filter};
use umstore_migrations::roles::Purpose;

/// Runs `bulk stats -o json` with `args` as the analytics login (on
/// `replica`'s port when given).
fn bulk_stats(store: &Store, replica: Option<u16>, args: &[&str]) -> Output {
    let primary = store.url(Purpose::Analytics);
    let replica = replica.map(|port| store.url_at(Purpose::Analytics, port));
    let mut all = vec![
        "--database-url",
        &primary,
        "bulk",
        "stats",
        "--analytics-database-url",
        &primary,
    ];
    if let Some(replica) = &replica {
        all.extend(["--analytics-replica-url", replica.as_str()]);
    }
    all.extend_from_slice(args);
    cli(&all)
}

fn json_of(out: &Output, what: &str) -> Value {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        stderr(out),
        stdout(out)
    );
    serde_json::from_str(&stdout(out)).unwrap_or_else(|e| panic!("{what}: {e}: {}", stdout(out)))
}

/// The endpoint's JSON body of `groups`, as `-o json` prints it.
fn body_text(dims: &[String], groups: Vec<query::Group>) -> String {
    serde_json::to_string_pretty(&StatsBody {
        schema_version: schema_version(),
        group_by: dims.to_vec(),
        min_group_size: 10,
        groups,
    })
    .expect("json")
}

/// The request as the endpoint's filters and dimensions.
fn request(group_by: &str, filters: &[(&str, &str)]) -> (Vec<Filter>, Vec<String>) {
    let dims = group_by
        .split(',')
        .filter(|d| !d.is_empty())
        .map(str::to_owned)
        .collect();
    let filters = filters
        .iter()
        .map(|(k, v)| Filter::parse(k, v).expect("filter"))
        .collect();
    (filters, dims)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_stats_equal_the_endpoints_group_by_with_small_groups_left_out() {
    let pg = umstore_e2e::shared().primary();
    let replica_port = pg.replica(0).expect("a streaming replica").port();
    let store = Store::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let seeded = cli(&[
        "seed",
        "--users",
        "3000",
        "--seed",
        "12",
        "--database-url",
        store.superuser(),
        "--data-dir",
        &data_dir,
    ]);
    assert!(seeded.status.success(), "{}", stderr(&seeded));
    // Risk scores for about a third of the users, of every value 0.00–1.00
    // (seed writes none), and a few users erased: they count nowhere.
    let su = support::connect(store.superuser()).await;
    su.batch_execute(
        "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk,
             benefit_loss_risk, overall_risk, model_version, computed_at)
         SELECT user_id, region, 0.1, 0.1, 0.1,
                (abs(hashtext(user_id::text)) % 101) / 100.0, 'm/1', now()
         FROM umstore.user_metadata WHERE abs(hashtext(user_id::text)) % 3 = 0;
         UPDATE umstore.user_metadata SET erased_at = now()
         WHERE user_id IN (SELECT user_id FROM umstore.user_metadata ORDER BY user_id LIMIT 25);",
    )
    .await
    .expect("risk scores and erasures");
    pg.wait_for_replicas().await.expect("the replica caught up");

    let analytics = store.connect(Purpose::Analytics).await;
    let cases: [(&str, &[(&str, &str)]); 7] = [
        ("region,income_bracket", &[]),
        ("", &[]),
        ("gender,life_stage", &[("region", "UP")]),
        ("age_group", &[("bpl_status", "true")]),
        (
            "area_type,social_category,employment_category",
            &[("income_bracket", "BPL")],
        ),
        (
            "bpl_status",
            &[("state", "Uttar Pradesh"), ("gender", "male")],
        ),
        ("region", &[("age_min", "30"), ("age_max", "60")]),
    ];
    let mut suppressed_somewhere = false;
    for (group_by, filters) in cases {
        let mut args: Vec<String> = vec!["-o".into(), "json".into()];
        if !group_by.is_empty() {
            args.extend(["--group-by".into(), group_by.into()]);
        }
        for (k, v) in filters {
            if *k == "region" {
                args.extend(["--region".into(), (*v).into()]);
            } else {
                args.extend(["--filter".into(), format!("{k}={v}")]);
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let what = format!("group_by={group_by} {filters:?}");

        let (parsed, dims) = request(group_by, filters);
        let live = query::stats(&analytics, &parsed, &dims, 10)
            .await
            .expect("the endpoint's GROUP BY");
        // Compared as text: the endpoint's body printed as the command
        // prints it, so every float is compared exactly (shortest
        // round-trip digits), not through a JSON parser's rounding.
        let out = bulk_stats(&store, Some(replica_port), &args);
        let printed = json_of(&out, &what);
        assert!(
            !printed["groups"].as_array().expect("groups").is_empty(),
            "{what}: some group"
        );
        assert_eq!(stdout(&out).trim_end(), body_text(&dims, live), "{what}");
        // The endpoint's other path (partials merged, as with several
        // clusters or the views) answers the same, float for float.
        let partials = query::stats_partials(&analytics, &parsed, &dims)
            .await
            .expect("partials");
        suppressed_somewhere |= partials.iter().any(|p| p.users < 10);
        let merged = stats::merge(&[partials], &dims, 10);
        assert_eq!(
            stdout(&out).trim_end(),
            body_text(&dims, merged),
            "{what}: merged partials"
        );
    }
    assert!(
        suppressed_somewhere,
        "some group was small enough to be left out"
    );

    // The primary (no replica URL) gives the same; a table by default.
    let json = json_of(
        &bulk_stats(&store, None, &["-o", "json", "--group-by", "region"]),
        "primary",
    );
    assert!(!json["groups"].as_array().expect("groups").is_empty());
    let table = bulk_stats(&store, None, &["--group-by", "region,gender"]);
    assert!(table.status.success(), "{}", stderr(&table));
    let text = stdout(&table);
    assert!(
        text.starts_with("region") && text.contains("avg_overall_risk"),
        "{text}"
    );
    assert!(text.contains("groups shown"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_groupings_regions_filters_and_engines_are_errors_that_say_what_is_wrong() {
    let store = Store::migrated().await;
    let refused = |args: &[&str], expected: &[&str]| {
        let out = bulk_stats(&store, None, args);
        assert!(!out.status.success(), "{args:?} was accepted");
        let err = stderr(&out);
        for e in expected {
            assert!(err.contains(e), "{args:?}: {e:?} not in {err}");
        }
    };
    refused(
        &["--group-by", "colour"],
        &["cannot group by \"colour\"", "income_bracket"],
    );
    refused(
        &["--group-by", "region,gender,life_stage,age_group"],
        &["up to 3"],
    );
    refused(&["--region", "ZZ"], &["\"ZZ\" is not a region code", "KA"]);
    refused(&["--region", "ka"], &["two-letter code"]);
    refused(
        &["--filter", "colour=red"],
        &["colour", "not a stats filter"],
    );
    refused(&["--filter", "gender=robot"], &["gender is one of"]);
    refused(
        &["--filter", "risk_above=0.5"],
        &["risk_above is not available to bulk stats"],
    );
    refused(&["--engine", "gpu"], &["gpu"]);
    refused(&["--engine", "tpu"], &["expected auto, cpu or gpu"]);
    // An empty store: no groups, not an error.
    let out = bulk_stats(&store, None, &["-o", "json", "--region", "KA"]);
    assert_eq!(json_of(&out, "empty")["groups"], serde_json::json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_its_engine_on_metrics_and_refuses_a_missing_gpu() {
    let store = Store::migrated().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().display().to_string();
    let writer = store.url(Purpose::Writer);
    let port = support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let args = |engine: &'static str| -> Vec<String> {
        [
            "serve",
            "--no-migrate",
            "--engine",
            engine,
            "--listen",
            &listen,
            "--database-url",
            &writer,
            "--data-dir",
            &data_dir,
        ]
        .map(str::to_owned)
        .to_vec()
    };
    let cpu = args("cpu");
    let served = support::Served::start(&cpu.iter().map(String::as_str).collect::<Vec<_>>());
    let metrics = support::wait_for(port, "/metrics", Duration::from_secs(60), |s, body| {
        s == 200 && body.contains("umstore_bulk_engine_info")
    });
    let Some((_, text)) = metrics else {
        panic!("no /metrics\n{}", served.stop().1)
    };
    let line = text
        .lines()
        .find(|l| l.starts_with("umstore_bulk_engine_info{"))
        .expect("the engine's info");
    assert!(
        line.starts_with("umstore_bulk_engine_info{engine=\"cpu\",device=\"")
            && line.ends_with("} 1"),
        "{line}"
    );
    let (_, log) = served.stop();
    assert!(log.contains("bulk engine"), "{log}");
    assert!(log.contains("--engine cpu"), "{log}");

    // Without a usable GPU, `--engine gpu` is a startup error with the reason.
    if select(EngineChoice::Gpu, 1).is_err() {
        let gpu = args("gpu");
        let out = cli(&gpu.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!out.status.success(), "started without a GPU");
        let err = stderr(&out);
        assert!(err.contains("--engine gpu"), "{err}");
        assert!(err.contains("use --engine cpu or auto"), "{err}");
    }
}

/// Adds `n` users of `region` in `bracket` (income `income_lakh`, risk 0.40
/// for every other one) as the superuser, as `seed` writes.
async fn add_users(su: &tokio_postgres::Client, region: &str, bracket: &str, n: i32, income: i16) {
    su.execute(
        "WITH u AS (SELECT gen_random_uuid() AS id, i FROM generate_series(1, $2) i),
              dir AS (INSERT INTO umstore.user_directory (user_id, region)
                      SELECT id, $1::text::bpchar FROM u RETURNING user_id),
              m AS (INSERT INTO umstore.user_metadata (user_id, region, gender, income_lakh, household_size)
                    SELECT user_id, $1::text::bpchar, 'female', $4, 3 FROM dir RETURNING user_id)
         INSERT INTO umstore.user_derived_attributes (user_id, region, age_group, income_bracket,
             life_stage, employment_category, bpl_status, tax_bracket, is_senior_citizen, is_farmer,
             source_version)
         SELECT user_id, $1::text::bpchar, 'adult', $3, 'established', 'formal', $3 = 'BPL', 'nil',
                false, false, 1 FROM m",
        &[&region, &n, &bracket, &income],
    )
    .await
    .expect("add users");
    su.execute(
        "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk,
             benefit_loss_risk, overall_risk, model_version, computed_at)
         SELECT d.user_id, d.region, 0.1, 0.1, 0.1, 0.40, 'm/1', now()
         FROM umstore.user_derived_attributes d
         WHERE d.region = $1::text::bpchar AND d.income_bracket = $2
           AND NOT EXISTS (SELECT 1 FROM umstore.user_risk_scores r
                           WHERE r.region = d.region AND r.user_id = d.user_id)
           AND (2147483647 & hashtext(d.user_id::text)) % 2 = 0",
        &[&region, &bracket],
    )
    .await
    .expect("add risk scores");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clusters_are_read_each_for_its_placed_regions_and_suppressed_by_their_totals() {
    let home = Store::migrated().await;
    let pg = umstore_e2e::Postgres::start().expect("PostgreSQL (a second server)");
    let south = Store::migrated_on(&pg).await;
    let (su_home, su_south) = (
        support::connect(home.superuser()).await,
        support::connect(south.superuser()).await,
    );
    // BPL: 6 + 7 = 13, under 10 in each cluster: shown. LIG: 4 + 5 = 9:
    // left out. MIG: 12 in home alone: shown. HIG: KA rows left in home
    // (not placed there): read in south only, where there are none.
    add_users(&su_home, "AP", "BPL", 6, 2).await;
    add_users(&su_south, "KA", "BPL", 7, 3).await;
    add_users(&su_home, "TS", "LIG", 4, 5).await;
    add_users(&su_south, "KL", "LIG", 5, 5).await;
    add_users(&su_home, "AP", "MIG", 12, 9).await;
    add_users(&su_home, "KA", "HIG", 20, 30).await;
    let layout = serde_json::json!([
        {"name": "home", "regions": ["AP", "TS"],
         "primary": {"host": "127.0.0.1", "port": home.port(), "dbname": home.name}},
        {"name": "south", "regions": ["KA", "KL"],
         "primary": {"host": "127.0.0.1", "port": south.port(), "dbname": south.name}},
    ])
    .to_string();
    let analytics = home.url(Purpose::Analytics);
    let out = cli(&[
        "--clusters",
        &layout,
        "--database-url",
        &analytics,
        "bulk",
        "stats",
        "-o",
        "json",
        "--group-by",
        "income_bracket",
        "--analytics-database-url",
        &analytics,
    ]);
    let body = json_of(&out, "two clusters");
    let users: Vec<(String, i64)> = body["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .map(|g| {
            (
                g["group"]["income_bracket"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned(),
                g["users"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(
        users,
        [("BPL".to_owned(), 13), ("MIG".to_owned(), 12)],
        "{body}"
    );
    // The endpoint's merge of each cluster's partials for its regions.
    let dims = vec!["income_bracket".to_owned()];
    let mut partials = Vec::new();
    for (store, regions) in [(&home, ["AP", "TS"]), (&south, ["KA", "KL"])] {
        let client = store.connect(Purpose::Analytics).await;
        let filters = [Filter::InRegions(
            regions.iter().map(|r| (*r).to_owned()).collect(),
        )];
        partials.push(
            query::stats_partials(&client, &filters, &dims)
                .await
                .expect("partials"),
        );
    }
    assert_eq!(
        stdout(&out).trim_end(),
        body_text(&dims, stats::merge(&partials, &dims, 10))
    );
    // One region: its cluster alone.
    let out = cli(&[
        "--clusters",
        &layout,
        "--database-url",
        &analytics,
        "bulk",
        "stats",
        "-o",
        "json",
        "--region",
        "AP",
        "--min-group",
        "5",
        "--analytics-database-url",
        &analytics,
    ]);
    assert_eq!(json_of(&out, "AP")["groups"][0]["users"], 18);
}
