//! `bulk stats`: the stats endpoint's grouped counts and averages over whole
//! regions, read from a replica with binary COPY and grouped on the bulk
//! engine (docs/bulk.md, "`bulk stats`").
//!
//! The groups, counts, averages and suppression are the endpoint's: the same
//! dimensions and filters ([`query::DIMENSIONS`], [`Filter::parse`]), the
//! same partials merged by [`stats::merge`] (averages from the merged sums,
//! groups under `--min-group` in total left out), and its JSON shape.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use umstore_data_plane::api::bodies::StatsBody;
use umstore_data_plane::api::pools::Logins;
use umstore_data_plane::api::query::MAX_DIMENSIONS;
use umstore_data_plane::api::schema_version;
use umstore_data_plane::bulk::aggregate::{aggregator, Aggregator};
use umstore_data_plane::bulk::{EngineChoice, EngineKind};
use umstore_data_plane::clusters::placement::Placement;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::db::Database;
use umstore_data_plane::stats::{self, scan, Partial};
use umstore_data_plane::store::query::{self, Filter, Group};
use umstore_migrations::regions::REGIONS;
use umstore_migrations::roles::Purpose;

/// How the answer is printed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// One line per group, aligned columns.
    #[default]
    Table,
    /// The stats endpoint's JSON body.
    Json,
}

/// The arguments of `bulk stats`.
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Which engine computes the aggregates (`auto`: the GPU where one is
    /// usable, else the CPU; `gpu` without one: an error saying why).
    #[arg(long, default_value = "auto", value_parser = super::bulk::parse_engine)]
    engine: EngineChoice,
    /// Up to 3 dimensions, comma-separated, as the endpoint's `group_by`.
    #[arg(long, value_delimiter = ',')]
    group_by: Vec<String>,
    /// One region (a code such as KA); without it, every region.
    #[arg(long)]
    region: Option<String>,
    /// A filter of the endpoint, `name=value` (state, age_min, age_max,
    /// gender, income_bracket, life_stage, bpl_status); repeatable.
    #[arg(long = "filter", value_name = "NAME=VALUE")]
    filters: Vec<String>,
    /// Groups with fewer users than this (in total over every cluster) are
    /// left out, as `serve --stats-min-group`.
    #[arg(long, default_value_t = stats::DEFAULT_MIN_GROUP,
          value_parser = clap::value_parser!(u32).range(2..))]
    min_group: u32,
    /// `table` or `json` (the endpoint's body).
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// The analytics login (reads as `umstore_analytics`: no PII columns),
    /// as `serve` takes it; without it, --database-url's login reads.
    #[arg(long, env = "UMSTORE_ANALYTICS_DATABASE_URL", hide_env_values = true)]
    analytics_database_url: Option<String>,
    /// The analytics login on its replica pool: read there when given.
    #[arg(long, env = "UMSTORE_ANALYTICS_REPLICA_URL", hide_env_values = true)]
    analytics_replica_url: Option<String>,
}

/// The dimensions of `--group-by`, checked as the endpoint checks `group_by`.
fn dimensions(given: &[String]) -> Result<Vec<String>> {
    let dims: Vec<String> = given
        .iter()
        .map(|d| d.trim().to_owned())
        .filter(|d| !d.is_empty())
        .collect();
    for d in &dims {
        if !query::DIMENSIONS.contains(&d.as_str()) {
            bail!(
                "cannot group by {d:?}: --group-by takes up to {MAX_DIMENSIONS} of {}",
                query::DIMENSIONS.join(", ")
            );
        }
    }
    let mut unique = dims.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != dims.len() || dims.len() > MAX_DIMENSIONS {
        bail!("--group-by takes up to {MAX_DIMENSIONS} different dimensions, not {dims:?}");
    }
    Ok(dims)
}

/// The filters of `--region` and `--filter`, parsed as the endpoint parses
/// them; a region must be one of India's codes.
fn filters(args: &StatsArgs) -> Result<Vec<Filter>> {
    let mut raw: Vec<(String, String)> = Vec::new();
    if let Some(region) = &args.region {
        raw.push(("region".into(), region.clone()));
    }
    for f in &args.filters {
        let Some((name, value)) = f.split_once('=') else {
            bail!("--filter {f:?}: expected name=value, e.g. gender=female");
        };
        raw.push((name.trim().to_owned(), value.trim().to_owned()));
    }
    let mut parsed = Vec::new();
    for (name, value) in raw {
        if !Filter::NAMES.contains(&name.as_str()) || name == "identity_token" {
            bail!(
                "--filter {name}: not a stats filter; one of {}",
                Filter::NAMES
                    .iter()
                    .filter(|n| **n != "identity_token")
                    .copied()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let filter = Filter::parse(&name, &value).map_err(|e| anyhow::anyhow!("--{name}: {e}"))?;
        if let Filter::Region(code) = &filter {
            if !REGIONS.iter().any(|r| r.code == code) {
                bail!(
                    "region {code:?} is not a region code: one of {}",
                    REGIONS.iter().map(|r| r.code).collect::<Vec<_>>().join(" ")
                );
            }
        }
        parsed.push(filter);
    }
    Ok(parsed)
}

/// The aggregator `--engine` names: the CPU's for `cpu`; the GPU's for
/// `gpu`, or its error saying why there is none; for `auto`, the GPU's where
/// one opens (a whole-region scan is past any crossover), else the CPU's.
fn engine(choice: EngineChoice) -> Result<(Box<dyn Aggregator>, String)> {
    match choice {
        EngineChoice::Cpu => Ok((aggregator(EngineKind::Cpu)?, "--engine cpu".into())),
        EngineChoice::Gpu => Ok((
            aggregator(EngineKind::Gpu).context("--engine gpu")?,
            "--engine gpu".into(),
        )),
        EngineChoice::Auto => match aggregator(EngineKind::Gpu) {
            Ok(gpu) => Ok((gpu, "--engine auto: a GPU is usable".into())),
            Err(why) => Ok((
                aggregator(EngineKind::Cpu)?,
                format!("--engine auto: the CPU ({why})"),
            )),
        },
    }
}

/// Where to read: the analytics login's replica, its primary, or
/// --database-url's login.
fn logins(args: &StatsArgs, database: &Database) -> Result<Logins> {
    let primary = match &args.analytics_database_url {
        Some(url) => Database::parse(url).context("--analytics-database-url")?,
        None => {
            warn!(
                "no --analytics-database-url (UMSTORE_ANALYTICS_DATABASE_URL): reading as \
                 --database-url's login"
            );
            database.clone()
        }
    };
    let mut logins = Logins {
        primary: [(Purpose::Analytics, primary)].into(),
        replica: Default::default(),
    };
    if let Some(url) = &args.analytics_replica_url {
        let replica = Database::parse(url).context("--analytics-replica-url")?;
        logins.replica.insert(Purpose::Analytics, replica);
    }
    Ok(logins)
}

/// The login a cluster is read through: its analytics replica when it has
/// one.
fn reader(logins: &Logins) -> Result<&Database> {
    logins
        .replica
        .get(&Purpose::Analytics)
        .or_else(|| logins.primary.get(&Purpose::Analytics))
        .context("no analytics login")
}

/// What to read: per cluster, its name (several clusters) and login, and the
/// filters limited to the regions the placement gives it now.
async fn targets(
    logins: &Logins,
    layout: Option<&Layout>,
    filters: &[Filter],
) -> Result<Vec<(Option<String>, Database, Vec<Filter>)>> {
    let Some(layout) = layout.filter(|l| l.is_multi()) else {
        return Ok(vec![(None, reader(logins)?.clone(), filters.to_vec())]);
    };
    let per_cluster = layout.logins(logins);
    // Where each region is now: the home cluster's placement over the layout.
    let analytics = logins
        .primary
        .get(&Purpose::Analytics)
        .context("no analytics login")?;
    let home = layout.clusters()[0].primary.apply(analytics);
    let client = home
        .connect()
        .await
        .context("reading the region placement from the home cluster")?;
    let placement = Placement::new(Arc::new(layout.clone()));
    placement
        .load(&client)
        .await
        .context("reading the region placement from the home cluster")?;
    let mut targets = Vec::new();
    for (index, (cluster, logins)) in layout.clusters().iter().zip(&per_cluster).enumerate() {
        let regions = placement.regions_of(index);
        if regions.is_empty() {
            continue;
        }
        let mut filters = filters.to_vec();
        filters.push(Filter::InRegions(regions));
        targets.push((Some(cluster.name.clone()), reader(logins)?.clone(), filters));
    }
    Ok(targets)
}

/// Runs `bulk stats`.
pub async fn run(args: StatsArgs, database: &Database, layout: Option<&Layout>) -> Result<()> {
    let dims = dimensions(&args.group_by)?;
    let filters = filters(&args)?;
    let (aggregator, reason) = engine(args.engine)?;
    info!(engine = aggregator.name(), %reason, "bulk stats engine");
    let logins = logins(&args, database)?;
    let mut partials: Vec<Vec<Partial>> = Vec::new();
    for (name, login, filters) in targets(&logins, layout, &filters).await? {
        let cluster = name.as_deref().unwrap_or("-");
        let mut client = login
            .connect()
            .await
            .with_context(|| format!("connecting to cluster {cluster}"))?;
        let started = Instant::now();
        let columns = scan::scan(&mut client, &filters, &dims)
            .await
            .with_context(|| format!("reading the stats columns of cluster {cluster}"))?;
        let scanned = started.elapsed();
        let started = Instant::now();
        let part = aggregator.aggregate(&columns)?;
        let aggregated = started.elapsed();
        info!(
            cluster,
            rows = columns.len(),
            groups = part.len(),
            copy_ms = scanned.as_millis() as u64,
            aggregate_ms = aggregated.as_millis() as u64,
            rows_per_s = (columns.len() as f64 / aggregated.as_secs_f64().max(1e-9)) as u64,
            "aggregated"
        );
        partials.push(part);
    }
    let groups = stats::merge(&partials, &dims, i64::from(args.min_group));
    let body = StatsBody {
        schema_version: schema_version(),
        group_by: dims,
        min_group_size: i64::from(args.min_group),
        groups,
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&body)?),
        Output::Table => print!("{}", table(&body)),
    }
    Ok(())
}

/// The answer as aligned columns: the dimensions, users and the averages
/// (`-` for none).
fn table(body: &StatsBody) -> String {
    let mut header: Vec<String> = body.group_by.clone();
    header.extend(
        [
            "users",
            "avg_income_lakh",
            "avg_household_size",
            "avg_overall_risk",
        ]
        .map(str::to_owned),
    );
    let avg = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
    let rows: Vec<Vec<String>> = body
        .groups
        .iter()
        .map(|g: &Group| {
            let mut row: Vec<String> = body
                .group_by
                .iter()
                .map(|d| match g.group.get(d) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Null) | None => "-".to_owned(),
                    Some(other) => other.to_string(),
                })
                .collect();
            row.push(g.users.to_string());
            row.extend([
                avg(g.avg_income_lakh),
                avg(g.avg_household_size),
                avg(g.avg_overall_risk),
            ]);
            row
        })
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| -> String {
        let text: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", text.join("  ").trim_end())
    };
    let mut out = line(&header);
    for r in &rows {
        out.push_str(&line(r));
    }
    out.push_str(&format!(
        "{} groups shown; groups under {} users left out\n",
        body.groups.len(),
        body.min_group_size
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_grouping_names_the_dimension_and_the_allowed_ones() {
        let err = dimensions(&["colour".into()]).expect_err("refused");
        assert!(err.to_string().contains("\"colour\""), "{err}");
        assert!(err.to_string().contains("income_bracket"), "{err}");
        let err = dimensions(&["region".into(), "region".into()]).expect_err("twice");
        assert!(err.to_string().contains("different"), "{err}");
        assert_eq!(
            dimensions(&[" region".into(), "gender ".into()]).expect("ok"),
            ["region", "gender"]
        );
    }

    #[test]
    fn gpu_is_the_gpu_or_says_why_and_auto_falls_back_to_the_cpu() {
        let gpu = engine(EngineChoice::Gpu);
        let (aggregator, reason) = engine(EngineChoice::Auto).expect("auto");
        match gpu {
            Ok((gpu, _)) => {
                assert_eq!(gpu.name(), "gpu");
                assert_eq!(aggregator.name(), "gpu", "auto takes a usable GPU");
            }
            Err(err) => {
                let text = format!("{err:#}");
                assert!(
                    text.contains("--engine gpu") && text.contains("--engine cpu"),
                    "{text}"
                );
                assert_eq!(aggregator.name(), "cpu");
                assert!(reason.starts_with("--engine auto: the CPU ("), "{reason}");
            }
        }
        let (cpu, _) = engine(EngineChoice::Cpu).expect("cpu");
        assert_eq!(cpu.name(), "cpu");
    }
}
