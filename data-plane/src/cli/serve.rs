//! `serve`: /healthz, /readyz and /metrics, with the store prepared (migrated,
//! keyring open, demo users seeded) in the background.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tracing::{debug, error, info, warn};
use umstore_data_plane::api::pools::Logins;
use umstore_data_plane::api::routing::Routing;
use umstore_data_plane::api::{self, ApiTokens, AppState, DbSlot, KeysSlot, ReadPools, Slot};
use umstore_data_plane::backoff::Backoff;
use umstore_data_plane::bulk::aggregate::aggregator;
use umstore_data_plane::bulk::{self, EngineChoice};
use umstore_data_plane::clusters::placement::Placement;
use umstore_data_plane::clusters::Layout;
use umstore_data_plane::crypto::KeyProviderConfig;
use umstore_data_plane::db::Database;
use umstore_data_plane::ingest::bus::{self, BusConfig};
use umstore_data_plane::ingest::{outbox, parse_duration, ApplyConfig, Ingest};
use umstore_data_plane::metrics::Metrics;
use umstore_data_plane::read_cache::{self, ReadCache, ReadCacheConfig, Verify};
use umstore_data_plane::seed;
use umstore_data_plane::stats;
use umstore_migrations::roles::Purpose;
use umstore_migrations::Runner;

use super::{open_keyring, KeyArgs};

/// The arguments of `serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "UMSTORE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Seed 10,000 demo users on first start (when the store is empty).
    #[arg(long)]
    demo: bool,
    /// Do not apply pending migrations at start.
    #[arg(long)]
    no_migrate: bool,
    /// The bulk engine (docs/bulk.md): `auto` takes a GPU when one is usable,
    /// else the CPU; `cpu`; `gpu` refuses to start without a usable GPU.
    /// Shown on /metrics as `umstore_bulk_engine_info`.
    #[arg(long, env = "UMSTORE_ENGINE", default_value = "auto",
          value_parser = super::bulk::parse_engine)]
    engine: EngineChoice,
    #[command(flatten)]
    events: EventArgs,
    #[command(flatten)]
    reads: ReadArgs,
}

/// Who may call the API, and the database logins reads run as (docs/api.md).
#[derive(Debug, clap::Args)]
pub struct ReadArgs {
    /// Directory of bearer tokens, one file per purpose (`writer`, `ai`, `rules`,
    /// `json-generator`, `dashboard`, `analytics`, `admin`) holding the token or
    /// `sha256:<hex>` of it. Without it, a local run makes one token per purpose
    /// in `<data-dir>/api-tokens`.
    #[arg(long, env = "UMSTORE_API_TOKENS_DIR")]
    api_tokens_dir: Option<PathBuf>,
    /// The AI core's login (reads as `umstore_ai`).
    #[arg(long, env = "UMSTORE_AI_DATABASE_URL", hide_env_values = true)]
    ai_database_url: Option<String>,
    /// The rules engine's login (reads as `umstore_rules`).
    #[arg(long, env = "UMSTORE_RULES_DATABASE_URL", hide_env_values = true)]
    rules_database_url: Option<String>,
    /// The JSON profile generator's login (reads as `umstore_json_generator`).
    #[arg(
        long,
        env = "UMSTORE_JSON_GENERATOR_DATABASE_URL",
        hide_env_values = true
    )]
    json_generator_database_url: Option<String>,
    /// The dashboard's login (reads as `umstore_dashboard`).
    #[arg(long, env = "UMSTORE_DASHBOARD_DATABASE_URL", hide_env_values = true)]
    dashboard_database_url: Option<String>,
    /// The analytics login (reads as `umstore_analytics`: no PII columns).
    #[arg(long, env = "UMSTORE_ANALYTICS_DATABASE_URL", hide_env_values = true)]
    analytics_database_url: Option<String>,
    /// An administrator's login (a member of `umstore_admin`).
    #[arg(long, env = "UMSTORE_ADMIN_DATABASE_URL", hide_env_values = true)]
    admin_database_url: Option<String>,
    /// The AI core's login on its replica pool (reads there while the lag allows).
    #[arg(long, env = "UMSTORE_AI_REPLICA_URL", hide_env_values = true)]
    ai_replica_url: Option<String>,
    /// The rules engine's login on its replica pool.
    #[arg(long, env = "UMSTORE_RULES_REPLICA_URL", hide_env_values = true)]
    rules_replica_url: Option<String>,
    /// The JSON profile generator's login on its replica pool.
    #[arg(
        long,
        env = "UMSTORE_JSON_GENERATOR_REPLICA_URL",
        hide_env_values = true
    )]
    json_generator_replica_url: Option<String>,
    /// The dashboard's login on its replica pool.
    #[arg(long, env = "UMSTORE_DASHBOARD_REPLICA_URL", hide_env_values = true)]
    dashboard_replica_url: Option<String>,
    /// The analytics login on its replica pool.
    #[arg(long, env = "UMSTORE_ANALYTICS_REPLICA_URL", hide_env_values = true)]
    analytics_replica_url: Option<String>,
    /// Reads leave a replica that is further behind than this (`100ms`, `2s`).
    #[arg(long, env = "UMSTORE_MAX_REPLICA_LAG", default_value = "100ms")]
    max_replica_lag: String,
    /// Connections per purpose's read pool.
    #[arg(long, env = "UMSTORE_READ_POOL_SIZE", default_value_t = 8,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    read_pool_size: u16,
    /// Stats leave out every group with fewer users than this.
    #[arg(long, env = "UMSTORE_STATS_MIN_GROUP", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(2..))]
    stats_min_group: u32,
    /// Stats are read from the materialized views while they were refreshed at
    /// most this long ago (`15m`, `1h`), else from the tables; `0`: always from
    /// the tables.
    #[arg(long, env = "UMSTORE_STATS_MAX_AGE", default_value = "15m")]
    stats_max_age: String,
    /// Stats read from the tables over at least this many rows (the planner's
    /// estimate of the regions read) copy the rows out and group them on the
    /// bulk engine (`--engine`) instead of a `GROUP BY` on the replica; `0`:
    /// never.
    #[arg(long, env = "UMSTORE_STATS_ENGINE_ROWS", default_value_t = 2_000_000)]
    stats_engine_rows: u64,
    /// Refresh the stats views this often from this process (`10m`); `0`: not
    /// here (a CronJob runs `stats refresh`). One process refreshes at a time;
    /// the others skip their turn. Needs a login that may refresh them (the
    /// writer's `--database-url`).
    #[arg(long, env = "UMSTORE_STATS_REFRESH_INTERVAL", default_value = "0")]
    stats_refresh_interval: String,
    /// Cache this many answers of `GET /api/v1/user-metadata/{id}` (one per
    /// purpose and user) in this process; 0: no cache.
    #[arg(long, env = "UMSTORE_READ_CACHE_ENTRIES", default_value_t = 0)]
    read_cache_entries: u64,
    /// A cached answer is dropped this long after it was read (`30s`, `5m`).
    #[arg(long, env = "UMSTORE_READ_CACHE_TTL", default_value = "30s")]
    read_cache_ttl: String,
    /// What a cache hit is checked against: `version` (one single-row read:
    /// unchanged and not erased) or `none` (memory only, kept fresh by the
    /// outbound events; needs --nats-url).
    #[arg(
        long,
        env = "UMSTORE_READ_CACHE_VERIFY",
        value_enum,
        default_value = "version"
    )]
    read_cache_verify: Verify,
    /// With several clusters (--clusters): cache this many routes (user id →
    /// region) in this process; 0: read every route from the home cluster.
    #[arg(long, env = "UMSTORE_ROUTE_CACHE_ENTRIES", default_value_t = 1_000_000)]
    route_cache_entries: u64,
    /// With several clusters (--clusters): read which cluster holds each
    /// region (the home cluster's `umstore.region_placement`, which overrides
    /// the layout's regions) this often (`1s`, `500ms`); also at once when a
    /// write finds its region moved.
    #[arg(long, env = "UMSTORE_PLACEMENT_REFRESH", default_value = "1s")]
    placement_refresh: String,
}

/// A duration flag where `0` means off.
fn duration_or_off(flag: &str, text: &str) -> Result<Duration> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(text).map_err(|e| anyhow::anyhow!("--{flag}: {e} (or 0: off)"))
}

impl ReadArgs {
    /// The read cache's settings, or `None` when it is off.
    fn read_cache(&self, bus: Option<&BusConfig>) -> Result<Option<ReadCacheConfig>> {
        if self.read_cache_entries == 0 {
            return Ok(None);
        }
        let ttl = parse_duration(&self.read_cache_ttl)
            .map_err(|e| anyhow::anyhow!("--read-cache-ttl: {e}"))?;
        if self.read_cache_verify == Verify::None && bus.is_none() {
            bail!(
                "--read-cache-verify none needs --nats-url: without the outbound events \
                 nothing would drop a changed or erased user from the cache"
            );
        }
        Ok(Some(ReadCacheConfig {
            entries: self.read_cache_entries,
            ttl,
            verify: self.read_cache_verify,
        }))
    }
}

impl ReadArgs {
    /// The tokens: from the directory given, else (outside Kubernetes) made in
    /// the data directory on first start.
    fn tokens(&self, data_dir: &Path) -> Result<ApiTokens> {
        match &self.api_tokens_dir {
            Some(dir) => ApiTokens::load(dir).with_context(|| {
                format!(
                    "reading the API tokens in {} (--api-tokens-dir)",
                    dir.display()
                )
            }),
            None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() => {
                warn!("no UMSTORE_API_TOKENS_DIR: the API refuses every request");
                Ok(ApiTokens::default())
            }
            None => {
                let dir = data_dir.join("api-tokens");
                let tokens = ApiTokens::generate(&dir).with_context(|| {
                    format!(
                        "making API tokens in {}: pass --data-dir, or --api-tokens-dir",
                        dir.display()
                    )
                })?;
                info!(
                    dir = %dir.display(),
                    "API tokens, one file per purpose (Authorization: Bearer <the file's content>)"
                );
                Ok(tokens)
            }
        }
    }

    /// The login of each purpose that reads. Serving the embedded database,
    /// a purpose without a URL logs in as its own login user over the unix
    /// socket (made by [`ensure_embedded_logins`]); the administrator as the
    /// owner.
    fn logins(&self, database: &Database, embedded: bool) -> Result<Logins> {
        let given = [
            (Purpose::Ai, &self.ai_database_url),
            (Purpose::Rules, &self.rules_database_url),
            (Purpose::JsonGenerator, &self.json_generator_database_url),
            (Purpose::Dashboard, &self.dashboard_database_url),
            (Purpose::Analytics, &self.analytics_database_url),
            (Purpose::Admin, &self.admin_database_url),
        ];
        let mut logins = BTreeMap::new();
        for (purpose, url) in given {
            let login = match url {
                Some(url) => Database::parse(url)
                    .with_context(|| format!("--{}-database-url", purpose.slug()))?,
                None if embedded => {
                    let mut login = database.clone();
                    if let Some(user) = purpose.login() {
                        login.pg_config_mut().user(user);
                    }
                    login
                }
                None => continue,
            };
            logins.insert(purpose, login);
        }
        let replicas = [
            (Purpose::Ai, &self.ai_replica_url),
            (Purpose::Rules, &self.rules_replica_url),
            (Purpose::JsonGenerator, &self.json_generator_replica_url),
            (Purpose::Dashboard, &self.dashboard_replica_url),
            (Purpose::Analytics, &self.analytics_replica_url),
        ];
        let mut replica = BTreeMap::new();
        for (purpose, url) in replicas {
            if let Some(url) = url {
                let login = Database::parse(url)
                    .with_context(|| format!("--{}-replica-url", purpose.slug()))?;
                replica.insert(purpose, login);
            }
        }
        Ok(Logins {
            primary: logins,
            replica,
        })
    }
}

/// Makes the purposes' login users in the embedded cluster (no password: its
/// only listener is a unix socket in the data directory, owner only).
async fn ensure_embedded_logins(client: &tokio_postgres::Client) -> Result<()> {
    for purpose in Purpose::CLIENTS {
        let Some(login) = purpose.login() else {
            continue;
        };
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&login])
            .await?
            .is_some();
        if !exists {
            // Both names are constants of this program, never input.
            client
                .batch_execute(&format!(
                    "CREATE ROLE {login} LOGIN IN ROLE {}",
                    purpose.group()
                ))
                .await
                .with_context(|| format!("creating the login {login}"))?;
        }
    }
    Ok(())
}

/// Where events come from and go to (docs/events.md).
#[derive(Debug, clap::Args)]
pub struct EventArgs {
    /// NATS server (`nats://host:4222`); without it events arrive over HTTP only.
    #[arg(long, env = "UMSTORE_NATS_URL")]
    nats_url: Option<String>,
    /// NATS user.
    #[arg(long, env = "UMSTORE_NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "UMSTORE_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// Subject prefix: events in on `<prefix>.in.>`, dead letters on `<prefix>.dlq`,
    /// events out on `<prefix>.out.>`.
    #[arg(
        long,
        env = "UMSTORE_EVENTS_SUBJECT_PREFIX",
        default_value = "umstore.events"
    )]
    events_subject_prefix: String,
    /// Stream prefix: `<prefix>_EVENTS_IN`, `_EVENTS_DLQ`, `_EVENTS_OUT`, consumer `<prefix>_INGEST`.
    #[arg(long, env = "UMSTORE_EVENTS_STREAM_PREFIX", default_value = "UMSTORE")]
    events_stream_prefix: String,
    /// Events applied at once by this process.
    #[arg(long, env = "UMSTORE_INGEST_WORKERS", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    ingest_workers: u16,
    /// How long the inbound and outbound streams keep messages (`7d`, `72h`).
    #[arg(long, env = "UMSTORE_EVENTS_MAX_AGE", default_value = "7d")]
    events_max_age: String,
    /// How long an eligibility result stays valid (`24h`, `90m`).
    #[arg(long, env = "UMSTORE_ELIGIBILITY_CACHE_TTL", default_value = "24h")]
    eligibility_cache_ttl: String,
}

impl EventArgs {
    fn apply_config(&self) -> Result<ApplyConfig> {
        let ttl = parse_duration(&self.eligibility_cache_ttl)
            .map_err(|e| anyhow::anyhow!("--eligibility-cache-ttl: {e}"))?;
        Ok(ApplyConfig {
            subject_prefix: self.events_subject_prefix.clone(),
            eligibility_ttl: chrono::Duration::from_std(ttl)
                .context("--eligibility-cache-ttl is too long")?,
        })
    }

    fn bus_config(&self) -> Result<Option<BusConfig>> {
        let Some(url) = &self.nats_url else {
            return Ok(None);
        };
        let max_age = parse_duration(&self.events_max_age)
            .map_err(|e| anyhow::anyhow!("--events-max-age: {e}"))?;
        let credentials = match (&self.nats_user, &self.nats_password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => bail!("give both --nats-user and --nats-password, or neither"),
        };
        Ok(Some(BusConfig {
            url: url.clone(),
            credentials,
            subject_prefix: self.events_subject_prefix.clone(),
            stream_prefix: self.events_stream_prefix.clone(),
            workers: usize::from(self.ingest_workers),
            max_age,
        }))
    }
}

/// Serves until SIGINT or SIGTERM. The listener is bound first; the database and the
/// key provider are reached in the background, and /readyz says what is missing.
pub async fn run(
    args: ServeArgs,
    database: &Database,
    layout: Option<Arc<Layout>>,
    data_dir: &Path,
    key_args: &KeyArgs,
    embedded: bool,
) -> Result<()> {
    let ServeArgs {
        listen,
        demo,
        no_migrate,
        engine,
        events,
        reads,
    } = args;
    let apply_config = events.apply_config()?;
    let bus_config = events.bus_config()?;
    let tokens = Arc::new(reads.tokens(data_dir)?);
    let max_lag = parse_duration(&reads.max_replica_lag)
        .map_err(|e| anyhow::anyhow!("--max-replica-lag: {e}"))?;
    let logins = reads.logins(database, embedded)?;
    let pool_size = usize::from(reads.read_pool_size);
    // Several clusters: every login moved onto each cluster, home first.
    let cluster_pools = match &layout {
        None => None,
        Some(layout) => Some(
            layout
                .logins(&logins)
                .iter()
                .zip(layout.clusters())
                .map(|(l, c)| {
                    ReadPools::new(l, pool_size, max_lag)
                        .with_context(|| format!("cluster {}", c.name))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let read_pools = match &cluster_pools {
        Some(pools) => pools[0].clone(),
        None => ReadPools::new(&logins, pool_size, max_lag)?,
    };
    info!(
        purposes = ?read_pools.purposes().iter().map(|p| p.slug()).collect::<Vec<_>>(),
        "read API logins"
    );
    let stats_max_age = duration_or_off("stats-max-age", &reads.stats_max_age)?;
    let stats_refresh = duration_or_off("stats-refresh-interval", &reads.stats_refresh_interval)?;
    let workers = usize::from(events.ingest_workers);
    let runner = Runner::default();
    // Refuse a forbidden local provider before anything starts.
    let provider_config = key_args.provider_config(data_dir)?;
    if let KeyProviderConfig::Local {
        require_vault: true,
        ..
    } = provider_config
    {
        bail!("--require-vault is set but no --vault-addr was given");
    }
    let metrics = Arc::new(Metrics::new());
    let engine_kind = select_engine(engine, &metrics)?;
    let stats_engine = stats_engine(engine_kind, reads.stats_engine_rows);
    // Several clusters: where each region is now, read from home through the
    // writer's login (every purpose may read it too) before events are
    // consumed or users looked up, then refreshed.
    let mut placement_task = None;
    let placement = match &layout {
        Some(layout) => {
            let every = parse_duration(&reads.placement_refresh)
                .map_err(|e| anyhow::anyhow!("--placement-refresh: {e}"))?;
            let placement = Arc::new(Placement::new(layout.clone()).with_metrics(metrics.clone()));
            // The writer's login first (the ingest path's), then each reading
            // purpose's (the read API's; every purpose may select it).
            let home = &layout.clusters()[0].primary;
            let sources = std::iter::once(home.apply(database))
                .chain(logins.primary.values().map(|login| home.apply(login)))
                .collect();
            placement_task = Some(tokio::spawn(placement.clone().run(sources, every)));
            Some(placement)
        }
        None => None,
    };
    let (probes, routing) = match (&layout, cluster_pools, &placement) {
        (Some(layout), Some(pools), Some(placement)) => {
            let probes = pools
                .iter()
                .zip(layout.clusters())
                .flat_map(|(p, c)| p.spawn_probes_in(metrics.clone(), Some(&c.name)))
                .collect();
            let routing = Routing::new(
                placement.clone(),
                pools,
                reads.route_cache_entries,
                metrics.clone(),
            );
            (probes, Some(routing))
        }
        _ => (read_pools.spawn_probes(metrics.clone()), None),
    };
    // The writer's login on each cluster (one: the URL as given).
    let writers: Vec<Database> = match &layout {
        Some(layout) => layout.writers(database),
        None => vec![database.clone()],
    };
    let read_cache = reads
        .read_cache(bus_config.as_ref())?
        .map(|config| ReadCache::new(config, metrics.clone()));
    let follower = match (&read_cache, &bus_config) {
        (Some(cache), Some(bus)) => {
            let config = cache.config();
            info!(
                entries = config.entries,
                ttl_ms = config.ttl.as_millis() as u64,
                verify = config.verify.as_str(),
                "read cache on"
            );
            Some(tokio::spawn(read_cache::events::follow(
                bus.clone(),
                cache.clone(),
            )))
        }
        (Some(_), None) => {
            warn!(
                "read cache on without --nats-url: every hit is checked against the \
                 user's row, and nothing drops changed users early"
            );
            None
        }
        (None, _) => None,
    };
    let refresher = (!stats_refresh.is_zero()).then(|| {
        info!(
            interval_ms = stats_refresh.as_millis() as u64,
            "refreshing the stats views on a schedule"
        );
        // Every cluster refreshes its own views.
        writers
            .iter()
            .map(|writer| {
                tokio::spawn(stats::refresher::run(
                    writer.clone(),
                    stats_refresh,
                    metrics.clone(),
                ))
            })
            .collect::<Vec<_>>()
    });
    let slot = DbSlot::empty("connecting to the database");
    let keys = KeysSlot::empty("opening the key provider");
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}: pass --listen with a free address"))?;
    info!(%listen, "serving /healthz, /readyz, /metrics");
    let supervisor = tokio::spawn(api::supervise_database(
        database.clone(),
        slot.clone(),
        metrics.clone(),
    ));
    let ingest_slot = Slot::empty("opening the key provider");
    let bus_slot = bus_config
        .as_ref()
        .map(|b| Slot::empty(&format!("connecting to NATS at {}", b.url)));
    let prepare = {
        let (database, runner, keys) = (database.clone(), runner.clone(), keys.clone());
        let (writers, placement) = (writers.clone(), placement.clone());
        let (ingest_slot, bus_slot) = (ingest_slot.clone(), bus_slot.clone());
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = prepare(
                &database,
                &writers[1..],
                &runner,
                provider_config,
                &keys,
                demo,
                no_migrate,
                embedded,
            )
            .await
            {
                let message = format!("{e:#}");
                error!(error = %message, "preparing the store failed");
                keys.set(Err(message)).await;
                return;
            }
            let Ok(keyring) = keys.get().await else {
                return;
            };
            // The pool serves the HTTP endpoint and the bus workers (each worker
            // holds one connection while it applies).
            let ingest = Ingest::new(&database, workers + 4, keyring, apply_config).and_then(|i| {
                match &placement {
                    Some(placement) => i.with_clusters(placement.clone(), &writers, workers + 4),
                    None => Ok(i),
                }
            });
            let ingest = match ingest {
                Ok(i) => Arc::new(i.with_metrics(metrics.clone())),
                Err(e) => {
                    ingest_slot.set(Err(e.to_string())).await;
                    return;
                }
            };
            ingest_slot.set(Ok(ingest.clone())).await;
            if let Some(placement) = &placement {
                // No event is consumed before the placement says where it goes.
                placement.wait_loaded().await;
            }
            if let (Some(config), Some(slot)) = (bus_config, bus_slot) {
                run_bus(&writers, &config, &ingest, &slot).await;
            }
        })
    };
    let state = AppState {
        db: slot,
        keys,
        runner: Arc::new(runner),
        no_migrate,
        metrics,
        ingest: ingest_slot,
        tokens,
        reads: read_pools,
        stats_min_group: i64::from(reads.stats_min_group),
        stats_max_age,
        stats_engine,
        bus: bus_slot,
        read_cache,
        routing,
    };
    let served = axum::serve(listener, api::router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await;
    supervisor.abort();
    prepare.abort();
    if let Some(task) = placement_task {
        task.abort();
    }
    if let Some(follower) = follower {
        follower.abort();
    }
    for refresher in refresher.into_iter().flatten() {
        refresher.abort();
    }
    for probe in probes {
        probe.abort();
    }
    served.context("HTTP server failed")?;
    info!("stopped");
    Ok(())
}

/// Selects the bulk engine for `--engine` (a whole-region scan's worth of
/// fields, so `auto` takes a usable GPU), logs the choice and its reason and
/// exports it; `gpu` without a usable GPU is a startup error.
fn select_engine(choice: EngineChoice, metrics: &Metrics) -> Result<bulk::EngineKind> {
    let selected = bulk::select(choice, bulk::GPU_CROSSOVER_FIELDS)
        .with_context(|| format!("--engine {choice} (UMSTORE_ENGINE)"))?;
    let engine = selected.engine.info();
    info!(
        engine = engine.name,
        device = %engine.device,
        threads = engine.parallelism,
        reason = %selected.reason,
        "bulk engine"
    );
    metrics.bulk_engine_selected(engine.name, &engine.device);
    Ok(engine.kind)
}

/// The stats endpoint's engine for scans of at least `min_rows` rows
/// (`--stats-engine-rows`; 0: none): the selected engine's aggregator, or
/// the CPU's when that engine cannot aggregate (said in the log).
fn stats_engine(kind: bulk::EngineKind, min_rows: u64) -> Option<api::StatsEngine> {
    if min_rows == 0 {
        return None;
    }
    let aggregator = aggregator(kind)
        .or_else(|error| {
            warn!(%error, "stats scans are grouped on the CPU engine instead");
            aggregator(bulk::EngineKind::Cpu)
        })
        .map_err(|error| warn!(%error, "stats scans are grouped by the database"))
        .ok()?;
    info!(
        engine = aggregator.name(),
        min_rows, "large stats scans are grouped on the bulk engine"
    );
    Some(api::StatsEngine {
        aggregator: Arc::from(aggregator),
        min_rows,
    })
}

/// Connects to the bus, creates the streams, and runs the consumer and the outbox
/// relay of each cluster (`writers`: the writer's login on each; every cluster
/// has its own outbox), starting over (with backoff) whenever the consumer
/// stops. Never returns.
async fn run_bus(writers: &[Database], config: &BusConfig, ingest: &Ingest, slot: &Slot<String>) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let js = match bus::connect(config).await {
            Ok(js) => js,
            Err(e) => {
                retry(slot, &mut backoff, e.to_string()).await;
                continue;
            }
        };
        if let Err(e) = bus::ensure_streams(&js, config).await {
            retry(slot, &mut backoff, e.to_string()).await;
            continue;
        }
        slot.set(Ok(Arc::new(config.url.clone()))).await;
        backoff.reset();
        let relays: Vec<_> = writers
            .iter()
            .map(|writer| tokio::spawn(outbox::relay(writer.clone(), js.clone())))
            .collect();
        let stopped = bus::consume(&js, config, ingest).await;
        for relay in relays {
            relay.abort();
        }
        if let Err(e) = stopped {
            retry(slot, &mut backoff, e.to_string()).await;
        }
    }
}

async fn retry(slot: &Slot<String>, backoff: &mut Backoff, reason: String) {
    let delay = backoff.next_delay();
    warn!(%reason, retry_in_ms = delay.as_millis() as u64, "event bus not available");
    slot.set(Err(format!(
        "{reason}; retrying in {} ms",
        delay.as_millis()
    )))
    .await;
    tokio::time::sleep(delay).await;
}

/// An event is acknowledged (to the bus, or to an HTTP caller) once its
/// transaction commits. With `synchronous_commit = off` a commit returns before
/// its WAL is written, and a server crash loses the last moments of accepted
/// events for good: say so, loudly, once.
async fn warn_unless_commits_are_durable(client: &tokio_postgres::Client) {
    match client.query_one("SHOW synchronous_commit", &[]).await {
        Ok(row) => {
            let setting: String = row.get(0);
            if setting == "off" {
                warn!(
                    synchronous_commit = %setting,
                    "synchronous_commit is off for this login: events acknowledged \
                     in the moments before a PostgreSQL crash are lost. Set it to on \
                     (ALTER ROLE ... SET synchronous_commit = on) for anything real"
                );
            }
        }
        Err(e) => debug!(error = %e, "cannot read synchronous_commit"),
    }
}

/// Applies migrations (unless told not to) and seeds demo data, retrying
/// until the database is reachable; /readyz reports progress meanwhile.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    database: &Database,
    others: &[Database],
    runner: &Runner,
    provider_config: KeyProviderConfig,
    keys: &KeysSlot,
    demo: bool,
    no_migrate: bool,
    embedded: bool,
) -> Result<()> {
    let mut client = loop {
        match database.connect_with_retry(Duration::from_secs(3600)).await {
            Ok(c) => break c,
            Err(e) => warn!(error = %e, "still waiting for the database"),
        }
    };
    warn_unless_commits_are_durable(&client).await;
    if no_migrate {
        wait_for_schema(&client, runner, keys).await;
    } else {
        let report = runner.up(&mut client).await?;
        info!(
            applied = report.applied.len(),
            version = runner.latest_version(),
            "schema migrated"
        );
    }
    // The other clusters of a store with several: the same schema in each.
    for other in others {
        let mut other_client = loop {
            match other.connect_with_retry(Duration::from_secs(3600)).await {
                Ok(c) => break c,
                Err(e) => warn!(error = %e, "still waiting for a cluster's database"),
            }
        };
        if no_migrate {
            wait_for_schema(&other_client, runner, keys).await;
        } else {
            runner
                .up(&mut other_client)
                .await
                .with_context(|| format!("migrating {}", other.describe()))?;
        }
    }
    if embedded {
        ensure_embedded_logins(&client).await?;
    }
    let keyring = Arc::new(open_keyring(provider_config, &client).await?);
    keys.set(Ok(keyring.clone())).await;
    if demo {
        let empty: bool = client
            .query_one(
                "SELECT NOT EXISTS (SELECT 1 FROM umstore.user_directory)",
                &[],
            )
            .await?
            .get(0);
        if empty {
            let report = seed::seed(&mut client, 10_000, 1, &keyring).await?;
            info!(
                users = report.users,
                secs = report.elapsed.as_secs_f64(),
                "demo users seeded"
            );
        } else {
            info!("store already has users; --demo seeds only an empty store");
        }
    }
    Ok(())
}

/// With `--no-migrate` someone else (the operator's migrate step) applies the
/// schema: wait until it is the one this binary was built for, saying so on /readyz.
async fn wait_for_schema(client: &tokio_postgres::Client, runner: &Runner, keys: &KeysSlot) {
    let version = runner.latest_version();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        let reason = match runner.verify(client).await {
            Ok(()) => return,
            Err(e) => format!(
                "waiting for schema version {version} (--no-migrate: the operator's migrate \
                 step applies it): {e}"
            ),
        };
        warn!(%reason, "schema not ready");
        keys.set(Err(reason)).await;
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
    info!("shutting down");
}
