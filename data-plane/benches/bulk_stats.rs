//! `bulk stats` aggregation over N rows: the CPU engine's group-by of the
//! copied columns vs the same GROUP BY in PostgreSQL (the stats endpoint's
//! live query, `HAVING` and all), on one store, as the analytics login.
//! Reports, per grouping, the best and median of `--runs` runs of:
//!
//! - `postgres`: `query::stats`, the endpoint's GROUP BY;
//! - `copy`: the binary COPY of the needed columns (`stats::scan`);
//! - `engine`: the CPU engine's group-by of those columns, then the merge;
//! - `bulk`: copy + engine, what `bulk stats` spends;
//!
//! and the ratios postgres / engine and postgres / bulk. The answers are
//! checked equal first. Where a CUDA GPU is present, a `gpu engine` line
//! under each grouping gives the same for `GpuAggregator` (copies to and from
//! the device included), its answer checked equal to the CPU's; without one,
//! `GPU rows skipped: <why>` is printed once.
//!
//! ```sh
//! cargo bench -p umstore-data-plane --bench bulk_stats -- --rows 10000000 --runs 3
//! ```
//!
//! The rows are synthetic (generate_series as the superuser: regions,
//! genders, brackets, life stages spread evenly, a third with risk scores),
//! on the harness's PostgreSQL on this machine.

#[path = "../tests/support/mod.rs"]
#[allow(unused_imports)]
mod support;

use std::time::{Duration, Instant};

use support::Store;
use umstore_data_plane::bulk::aggregate::{Aggregator, CpuAggregator};
use umstore_data_plane::bulk::GpuAggregator;
use umstore_data_plane::stats::{self, scan};
use umstore_data_plane::store::query;
use umstore_migrations::roles::Purpose;

struct Args {
    rows: u64,
    runs: usize,
}

fn args() -> Args {
    let mut a = Args {
        rows: 10_000_000,
        runs: 3,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let value = |i: usize| -> u64 {
            argv.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} takes a number", argv[i]))
        };
        match argv[i].as_str() {
            "--rows" => a.rows = value(i),
            "--runs" => a.runs = value(i) as usize,
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

/// The groupings measured: the dashboard's usual ones.
const GROUPINGS: [&[&str]; 3] = [
    &["region", "income_bracket"],
    &["gender", "life_stage", "bpl_status"],
    &[],
];

/// Inserts `rows` synthetic users, in batches of a million.
async fn load(su: &tokio_postgres::Client, rows: u64) {
    let batch = 1_000_000u64;
    let mut from = 0u64;
    while from < rows {
        let to = (from + batch).min(rows);
        su.execute(
            "WITH u AS (
                SELECT gen_random_uuid() AS id, i,
                       (SELECT array_agg(region ORDER BY region) FROM umstore.regions) AS rs
                FROM generate_series($1::int8, $2::int8 - 1) i),
              dir AS (INSERT INTO umstore.user_directory (user_id, region)
                      SELECT id, rs[(1 + i % 36)::int] FROM u RETURNING user_id, region),
              m AS (INSERT INTO umstore.user_metadata
                        (user_id, region, birth_year, gender, area_type, social_category,
                         income_lakh, household_size)
                    SELECT d.user_id, d.region, (1940 + (2147483647 & hashtext(d.user_id::text)) % 80)::int2,
                           (ARRAY['female','male','transgender','undisclosed'])[1 + (2147483647 & hashtext(d.user_id::text || 'g')) % 4],
                           (ARRAY['rural','urban'])[1 + (2147483647 & hashtext(d.user_id::text || 'a')) % 2],
                           (ARRAY['general','obc','sc','st'])[1 + (2147483647 & hashtext(d.user_id::text || 's')) % 4],
                           ((2147483647 & hashtext(d.user_id::text || 'i')) % 40)::int2,
                           (1 + (2147483647 & hashtext(d.user_id::text || 'h')) % 8)::int2
                    FROM dir d RETURNING user_id, region, income_lakh)
             INSERT INTO umstore.user_derived_attributes (user_id, region, age_group, income_bracket,
                 life_stage, employment_category, bpl_status, tax_bracket, is_senior_citizen,
                 is_farmer, source_version)
             SELECT user_id, region, 'adult',
                    CASE WHEN income_lakh < 3 THEN 'BPL' WHEN income_lakh < 10 THEN 'LIG'
                         WHEN income_lakh < 25 THEN 'MIG' ELSE 'HIG' END,
                    (ARRAY['childhood','student','early_career','family_building','established',
                           'pre_retirement','retired'])[1 + (2147483647 & hashtext(user_id::text || 'l')) % 7],
                    'formal', income_lakh < 3, 'nil', false, false, 1
             FROM m",
            &[&(from as i64), &(to as i64)],
        )
        .await
        .expect("load users");
        from = to;
        eprintln!("loaded {to} rows");
    }
    su.batch_execute(
        "INSERT INTO umstore.user_risk_scores (user_id, region, financial_risk, deadline_risk,
             benefit_loss_risk, overall_risk, model_version, computed_at)
         SELECT user_id, region, 0.1, 0.1, 0.1,
                ((2147483647 & hashtext(user_id::text)) % 101) / 100.0, 'm/1', now()
         FROM umstore.user_metadata WHERE (2147483647 & hashtext(user_id::text)) % 3 = 0",
    )
    .await
    .expect("risk scores");
    // Alone: VACUUM refuses a transaction block (several statements are one).
    su.batch_execute(
        "VACUUM ANALYZE umstore.user_metadata, umstore.user_derived_attributes, \
         umstore.user_risk_scores",
    )
    .await
    .expect("vacuum");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Best and median of `samples`, in ms.
fn summary(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    (ms(samples[0]), ms(samples[samples.len() / 2]))
}

async fn bench(args: Args) {
    let store = Store::migrated().await;
    let su = support::connect(store.superuser()).await;
    let t = Instant::now();
    load(&su, args.rows).await;
    eprintln!("loaded in {:.1} s", t.elapsed().as_secs_f64());
    println!(
        "loaded {} rows in {:.1} s; {} threads in rayon's pool",
        args.rows,
        t.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    let mut analytics = store.connect(Purpose::Analytics).await;
    let gpu = match GpuAggregator::open() {
        Ok(gpu) => {
            println!("GPU aggregation on {}", gpu.device());
            Some(gpu)
        }
        Err(e) => {
            println!("GPU rows skipped: {e}");
            None
        }
    };
    println!(
        "{:<36} {:>13} {:>13} {:>13} {:>13} {:>9} {:>9} {:>12}",
        "group_by",
        "postgres ms",
        "copy ms",
        "engine ms",
        "bulk ms",
        "pg/engine",
        "pg/bulk",
        "engine Mrow/s"
    );
    for dims in GROUPINGS {
        let dims: Vec<String> = dims.iter().map(|d| (*d).to_owned()).collect();
        let (mut pg, mut copy, mut engine, mut bulk) = (vec![], vec![], vec![], vec![]);
        let mut on_gpu = vec![];
        for run in 0..args.runs {
            let t = Instant::now();
            let live = query::stats(&analytics, &[], &dims, 10)
                .await
                .expect("GROUP BY");
            pg.push(t.elapsed());

            let t = Instant::now();
            let columns = scan::scan(&mut analytics, &[], &dims).await.expect("copy");
            let copied = t.elapsed();
            let t = Instant::now();
            let partials = CpuAggregator.aggregate(&columns).expect("aggregate");
            let groups = stats::merge(&[partials], &dims, 10);
            let grouped = t.elapsed();
            copy.push(copied);
            engine.push(grouped);
            bulk.push(copied + grouped);
            if run == 0 {
                assert_eq!(
                    serde_json::to_string(&groups).expect("json"),
                    serde_json::to_string(&live).expect("json"),
                    "{dims:?}: the engine's answer is the GROUP BY's"
                );
                assert_eq!(columns.len() as u64, args.rows);
            }
            if let Some(gpu) = &gpu {
                let t = Instant::now();
                let partials = gpu.aggregate(&columns).expect("gpu aggregate");
                let gpu_groups = stats::merge(&[partials], &dims, 10);
                on_gpu.push(t.elapsed());
                if run == 0 {
                    assert_eq!(
                        serde_json::to_string(&gpu_groups).expect("json"),
                        serde_json::to_string(&groups).expect("json"),
                        "{dims:?}: the GPU's answer is the CPU's"
                    );
                }
            }
        }
        let (pg_best, pg_median) = summary(pg);
        let (copy_best, copy_median) = summary(copy);
        let (engine_best, engine_median) = summary(engine);
        let (bulk_best, bulk_median) = summary(bulk);
        println!(
            "{:<36} {:>6.0} ({:>4.0}) {:>6.0} ({:>4.0}) {:>6.0} ({:>4.0}) {:>6.0} ({:>4.0}) {:>8.1}x {:>8.2}x {:>12.1}",
            if dims.is_empty() { "(none)".to_owned() } else { dims.join(",") },
            pg_best,
            pg_median,
            copy_best,
            copy_median,
            engine_best,
            engine_median,
            bulk_best,
            bulk_median,
            pg_best / engine_best,
            pg_best / bulk_best,
            args.rows as f64 / engine_best / 1000.0,
        );
        if !on_gpu.is_empty() {
            let (gpu_best, gpu_median) = summary(on_gpu);
            println!(
                "{:<36} {:>13} {:>13} {:>6.0} ({:>4.0}) {:>6.0} ({:>4.0}) {:>8.1}x {:>8.2}x {:>12.1}",
                "  gpu engine",
                "",
                "",
                gpu_best,
                gpu_median,
                copy_best + gpu_best,
                copy_median + gpu_median,
                pg_best / gpu_best,
                pg_best / (copy_best + gpu_best),
                args.rows as f64 / gpu_best / 1000.0,
            );
        }
    }
    println!("(best of {} runs, median in parentheses)", args.runs);
}

fn main() {
    let args = args();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(bench(args));
}
