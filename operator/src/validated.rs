//! The spec checked once into a typed value ([`Validated`]), so that later steps and
//! the builders never see an unchecked spec. The checks repeat the CRD's CEL rules
//! (objects may predate a rule, or come from a cluster without CEL) and add what CEL
//! cannot express: name lengths, quantities, the tier floor recorded in status.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use umstore_crds::refusals;
use umstore_crds::rules::MAX_INGEST_WORKERS;
use umstore_crds::{
    EventsSpec, PlacementSpec, ReadCacheVerify, ReplicaPurpose, UserMetadataStore,
    UserMetadataStoreSpec, WorkerGroupSpec,
};
use umstore_migrations::regions;

use crate::meta::Owner;

/// Longest store name: child names (`<store>-worker-<group>-hl`) must stay DNS labels.
pub const MAX_STORE_NAME: usize = 30;
/// Longest store name plus worker-group name.
pub const MAX_STORE_AND_GROUP_NAME: usize = 40;

/// The Citus group ids of `groups`, keeping the ids already `recorded`.
pub fn citus_group_ids(
    groups: &[WorkerGroupSpec],
    recorded: &BTreeMap<String, i32>,
) -> BTreeMap<String, i32> {
    let mut ids = recorded.clone();
    for (i, group) in groups.iter().enumerate() {
        if ids.contains_key(&group.name) {
            continue;
        }
        let used: BTreeSet<i32> = ids.values().copied().collect();
        let by_position = i32::try_from(i + 1).unwrap_or(i32::MAX);
        let id = if used.contains(&by_position) {
            used.iter().max().map_or(1, |m| m + 1)
        } else {
            by_position
        };
        ids.insert(group.name.clone(), id);
    }
    ids
}

/// A store whose spec passed every check.
#[derive(Clone, Debug, PartialEq)]
pub struct Validated {
    /// Who owns the objects built for it.
    pub owner: Owner,
    /// `metadata.generation` that was validated.
    pub generation: Option<i64>,
    /// The tier to build: the spec's tier, or the tier already running if higher
    /// (the operator never demotes).
    pub tier: i32,
    /// The tier whose endpoints the connection Secrets and the data plane use: `tier`,
    /// except while a promotion into tier 2 waits for the pooler and the replica
    /// pools to be ready (the running tier's endpoints until then, so clients are
    /// never sent to a pooler that does not answer yet).
    pub endpoint_tier: i32,
    /// Set when the spec asks for a lower tier than the one running: what to tell the user.
    pub demotion_refused: Option<String>,
    /// The checked spec. Below tier 3 `worker_groups` is empty; below tier 2
    /// `replica_pools` is empty.
    pub spec: UserMetadataStoreSpec,
    /// `spec.events`, checked and parsed; `None`: the data plane ingests over HTTP only.
    pub events: Option<Events>,
    /// The Citus clusters (tier 4 with `spec.clusters`), home first; empty otherwise
    /// (one cluster, the store's own objects). With clusters, `spec.worker_groups`
    /// holds the home cluster's groups: every step that predates clusters runs on
    /// the home cluster as it ran on the tier-3 store.
    pub clusters: Vec<Cluster>,
    /// The cluster the builders build for: `None` for a store without clusters;
    /// with clusters, the home cluster in the store's own [`Validated`] and each
    /// other cluster in the one [`Validated::for_cluster`] gives.
    pub cluster: Option<Cluster>,
    /// The Citus group id of each worker group (tier 3 and up): the ids recorded in
    /// `status.workerGroupIds` (also of groups that left the spec and are still being
    /// drained), and for a new group its position in the spec counted from 1 when
    /// that is free, else one past the highest id.
    pub citus_groups: BTreeMap<String, i32>,
}

/// One Citus cluster of a tier-4 store, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// `spec.clusters[].name`.
    pub name: String,
    /// The first cluster: its objects keep the tier-3 names.
    pub home: bool,
    /// Its worker groups.
    pub worker_groups: Vec<WorkerGroupSpec>,
    /// The regions the spec gives it (its groups' regions), sorted.
    pub regions: Vec<String>,
    /// The regions it holds now, sorted: `regions`, except a region still
    /// in the cluster it is being moved from (recorded in status) is there
    /// until its move switches. What the data plane's layout and status say.
    pub holds: Vec<String>,
    /// Where its database pods may run.
    pub placement: PlacementSpec,
}

impl Cluster {
    /// The infix of its objects' names: none for the home cluster, `<name>` else.
    pub fn infix(&self) -> Option<&str> {
        (!self.home).then_some(self.name.as_str())
    }
}

/// `spec.events`, checked: how the data plane reaches the NATS JetStream bus.
#[derive(Clone, Debug, PartialEq)]
pub struct Events {
    /// The spec as written; every field passed its check.
    pub spec: EventsSpec,
    /// `maxAge`, parsed: whole seconds, at least one, within what JetStream can hold.
    pub max_age: Duration,
}

/// Longest `events.maxAge`: JetStream keeps a stream's max age in nanoseconds in a
/// signed 64-bit integer (about 292 years).
pub const MAX_EVENTS_MAX_AGE: Duration = Duration::from_secs(i64::MAX as u64 / 1_000_000_000);

impl Validated {
    /// Members of the coordinator's Patroni cluster that may lead it:
    /// `spec.postgres.instances`, else 1 at tier 1 and 2 from tier 2.
    pub fn coordinator_instances(&self) -> i32 {
        self.spec
            .postgres
            .instances
            .unwrap_or(if self.tier >= 2 { 2 } else { 1 })
    }

    /// The store as the builders see one of its clusters: that cluster's worker
    /// groups, its name in the objects' names and labels.
    pub fn for_cluster(&self, cluster: &Cluster) -> Validated {
        let mut v = self.clone();
        v.spec.worker_groups = cluster.worker_groups.clone();
        v.cluster = Some(cluster.clone());
        v
    }

    /// `<cluster>-` for a cluster other than the home cluster, empty otherwise: the
    /// prefix of its objects' names after the store's.
    pub fn cluster_prefix(&self) -> String {
        self.cluster
            .as_ref()
            .and_then(Cluster::infix)
            .map(|c| format!("{c}-"))
            .unwrap_or_default()
    }

    /// Citus is in use (tier 3 and up).
    pub fn citus(&self) -> bool {
        self.tier >= 3
    }

    /// PgBouncer and replica pools are in use (tier 2 and up).
    pub fn pooled(&self) -> bool {
        self.tier >= 2
    }

    /// Replica pool purposes in use, sorted.
    pub fn pool_purposes(&self) -> Vec<ReplicaPurpose> {
        let mut purposes: Vec<_> = self.spec.replica_pools.iter().map(|p| p.purpose).collect();
        purposes.sort();
        purposes
    }
}

/// Why a spec was refused: one line per problem, each saying what to change.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{}", problems.join("; "))]
pub struct Invalid {
    /// The problems found.
    pub problems: Vec<String>,
}

/// Checks a store's spec (and the tier floor in its status) into a [`Validated`].
pub fn validate(store: &UserMetadataStore) -> Result<Validated, Invalid> {
    let mut problems = Vec::new();
    let meta = &store.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let namespace = meta.namespace.clone().unwrap_or_default();
    let uid = meta.uid.clone().unwrap_or_default();
    if name.is_empty() || namespace.is_empty() || uid.is_empty() {
        problems.push("metadata: name, namespace and uid are required".to_string());
    }
    if name.len() > MAX_STORE_NAME {
        problems.push(format!(
            "metadata.name: '{name}' has {} characters; use at most {MAX_STORE_NAME} so the names of \
             its StatefulSets and Services stay valid",
            name.len()
        ));
    }
    let mut spec = store.spec.clone();
    let events = spec
        .events
        .as_ref()
        .and_then(|e| check_events(e, &mut problems));

    let running = store.status.as_ref().and_then(|s| s.tier).unwrap_or(0);
    // The tier automatic promotion recorded: a floor like the running tier.
    let promoted = store
        .status
        .as_ref()
        .filter(|_| spec.auto_promotion.enabled)
        .and_then(|s| s.promotion.as_ref())
        .and_then(|p| p.target_tier)
        .unwrap_or(0);
    // A tier reached by automatic promotion is not a demotion of spec.tier.
    let (tier, demotion_refused) =
        if (1..=4).contains(&spec.tier) && spec.tier < running && promoted < running {
            (
                running,
                Some(refusals::demotion_refused(spec.tier, running)),
            )
        } else {
            (spec.tier, None)
        };
    let tier = if (1..=4).contains(&tier) {
        tier.max(promoted.min(4)).max(running.min(4))
    } else {
        tier
    };
    // Checked as the tier it will run (a promoted tier 3 needs its worker groups);
    // an out-of-range spec.tier is checked as written.
    if tier > spec.tier && demotion_refused.is_none() && (1..=4).contains(&spec.tier) {
        spec.tier = tier;
    }
    check_spec(&spec, &name, &mut problems);
    let clusters = if spec.clusters.is_empty() {
        Vec::new()
    } else {
        check_clusters(&spec, &name, store.status.as_ref(), &mut problems)
    };

    if !problems.is_empty() {
        return Err(Invalid { problems });
    }
    if tier < 3 {
        spec.worker_groups.clear();
    }
    if tier < 2 {
        spec.replica_pools.clear();
    }
    // Every cluster's groups get ids (home's first, as they had at tier 3).
    let all_groups: Vec<WorkerGroupSpec> = if clusters.is_empty() {
        spec.worker_groups.clone()
    } else {
        clusters
            .iter()
            .flat_map(|c| c.worker_groups.iter().cloned())
            .collect()
    };
    if let Some(home) = clusters.first() {
        spec.worker_groups = home.worker_groups.clone();
    }
    let citus_groups = if tier >= 3 {
        citus_group_ids(
            &all_groups,
            store
                .status
                .as_ref()
                .map(|s| &s.worker_group_ids)
                .unwrap_or(&BTreeMap::new()),
        )
    } else {
        BTreeMap::new()
    };
    Ok(Validated {
        citus_groups,
        owner: Owner {
            name,
            namespace,
            uid,
        },
        generation: meta.generation,
        tier,
        endpoint_tier: tier,
        demotion_refused,
        spec,
        events,
        cluster: clusters.first().cloned(),
        clusters,
    })
}

/// Checks `spec.events` (the CRD's rules again) and parses its `maxAge`; `None`
/// only with a problem recorded.
fn check_events(events: &EventsSpec, problems: &mut Vec<String>) -> Option<Events> {
    let EventsSpec {
        nats_url,
        subject_prefix,
        stream_prefix,
        credentials_secret,
        workers,
        max_age,
    } = events;
    let before = problems.len();
    if !is_nats_url(nats_url) {
        problems.push(format!(
            "spec.events.natsUrl: '{nats_url}' is not a nats:// or tls:// URL with a host and no \
             credentials; use e.g. nats://nats.messaging.svc:4222 and put credentials in \
             spec.events.credentialsSecret"
        ));
    }
    if !is_subject_prefix(subject_prefix) {
        problems.push(format!(
            "spec.events.subjectPrefix: '{subject_prefix}' is not NATS subject tokens (letters, \
             digits, '_' or '-') separated by dots; use e.g. umstore.events"
        ));
    }
    if !is_stream_prefix(stream_prefix) {
        problems.push(format!(
            "spec.events.streamPrefix: '{stream_prefix}' is not an uppercase letter followed by \
             at most 31 uppercase letters, digits or '_'; use e.g. UMSTORE"
        ));
    }
    if let Some(secret) = credentials_secret {
        if !is_dns_subdomain(secret) {
            problems.push(format!(
                "spec.events.credentialsSecret: '{secret}' is not a Secret name; use lowercase \
                 letters, digits, '-' and '.'"
            ));
        }
    }
    if !(1..=MAX_INGEST_WORKERS).contains(workers) {
        problems.push(format!(
            "spec.events.workers: {workers} is outside 1..{MAX_INGEST_WORKERS}"
        ));
    }
    let parsed = match parse_retention_secs(max_age) {
        Some(0) | None => {
            problems.push(format!(
                "spec.events.maxAge: '{max_age}' is not a positive duration; use e.g. 7d or 72h"
            ));
            None
        }
        Some(secs) if secs > MAX_EVENTS_MAX_AGE.as_secs() => {
            problems.push(format!(
                "spec.events.maxAge: '{max_age}' is longer than JetStream can keep; use at most {}d",
                MAX_EVENTS_MAX_AGE.as_secs() / 86_400
            ));
            None
        }
        Some(secs) => Some(Duration::from_secs(secs)),
    };
    match parsed {
        Some(max_age) if problems.len() == before => Some(Events {
            spec: events.clone(),
            max_age,
        }),
        _ => None,
    }
}

/// A `nats://` or `tls://` URL with a host, no user info, no spaces (one server;
/// what the CRD's rule accepts).
fn is_nats_url(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("nats://")
        .or_else(|| s.strip_prefix("tls://"))
    else {
        return false;
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // An IPv6 host is bracketed (`[fd00::7]:4222`); its colons are not the port's.
    let (host, port) = match authority.strip_prefix('[') {
        Some(bracketed) => match bracketed.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, after)) => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return false,
            },
            None => return false,
        },
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if port.is_some_and(|p| p.parse::<u16>().is_err()) {
        return false;
    }
    !host.is_empty() && !s.contains('@') && !s.contains(',') && !s.chars().any(char::is_whitespace)
}

/// NATS subject tokens of letters, digits, `_` and `-`, separated by single dots.
fn is_subject_prefix(s: &str) -> bool {
    s.split('.').all(|token| {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    })
}

/// `^[A-Z][A-Z0-9_]{0,31}$`.
fn is_stream_prefix(s: &str) -> bool {
    s.len() <= 32
        && s.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
        && s.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
}

/// A DNS subdomain (Secret names): dot-separated DNS labels, at most 253 characters.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn check_spec(spec: &UserMetadataStoreSpec, store_name: &str, problems: &mut Vec<String>) {
    if !(1..=4).contains(&spec.tier) {
        problems.push(format!(
            "spec.tier: {} is not a tier; use 1, 2, 3 or 4",
            spec.tier
        ));
    }
    check_regions("spec.regions", &spec.regions, problems);
    if spec.tier >= 3 && spec.clusters.is_empty() {
        check_worker_groups(spec, store_name, problems);
    }
    let mut purposes = BTreeSet::new();
    for pool in &spec.replica_pools {
        if !purposes.insert(pool.purpose) {
            problems.push(format!(
                "spec.replicaPools: purpose '{}' appears twice; keep one pool per purpose",
                pool.purpose.as_str()
            ));
        }
        positive(
            &format!("spec.replicaPools[{}].replicas", pool.purpose.as_str()),
            pool.replicas,
            problems,
        );
    }
    let pgb = &spec.pgbouncer;
    if !(1..=500).contains(&pgb.max_client_connections) {
        problems.push(format!(
            "spec.pgbouncer.maxClientConnections: {} is outside 1..500",
            pgb.max_client_connections
        ));
    }
    positive("spec.pgbouncer.replicas", pgb.replicas, problems);
    positive(
        "spec.pgbouncer.defaultPoolSize",
        pgb.default_pool_size,
        problems,
    );
    positive(
        "spec.dataPlane.replicas",
        spec.data_plane.replicas,
        problems,
    );
    if let Some(gpu) = &spec.data_plane.gpu {
        if gpu.count < 0 {
            problems.push(format!(
                "spec.dataPlane.gpu.count: {} is negative; use 0 or more",
                gpu.count
            ));
        }
        if gpu.resource_name.trim().is_empty() {
            problems.push("spec.dataPlane.gpu.resourceName: empty; use e.g. nvidia.com/gpu".into());
        }
    }
    for (field, image) in [
        ("spec.postgres.image", &spec.postgres.image),
        ("spec.postgres.exporterImage", &spec.postgres.exporter_image),
        ("spec.pgbouncer.image", &spec.pgbouncer.image),
        ("spec.dataPlane.image", &spec.data_plane.image),
    ] {
        if image.trim().is_empty() {
            problems.push(format!("{field}: empty; set an image reference"));
        }
    }
    for (field, size) in [
        (
            "spec.postgres.coordinator.storage.size",
            &spec.postgres.coordinator.storage.size,
        ),
        (
            "spec.postgres.workers.storage.size",
            &spec.postgres.workers.storage.size,
        ),
        (
            "spec.postgres.replicas.storage.size",
            &spec.postgres.replicas.storage.size,
        ),
    ] {
        if !is_quantity(size) {
            problems.push(format!(
                "{field}: '{size}' is not a quantity; use e.g. 10Gi"
            ));
        }
    }
    for (field, value) in [
        ("spec.eligibilityCacheTtl", &spec.eligibility_cache_ttl),
        (
            "spec.encryption.rotationInterval",
            &spec.encryption.rotation_interval,
        ),
    ] {
        if parse_duration_secs(value).is_none_or(|s| s == 0) {
            problems.push(format!(
                "{field}: '{value}' is not a positive duration; use e.g. 24h or 90m"
            ));
        }
    }
    check_data_plane_caches(spec, problems);
}

/// The read cache and the stats views, which the data plane would refuse at start.
fn check_data_plane_caches(spec: &UserMetadataStoreSpec, problems: &mut Vec<String>) {
    // In milliseconds: `500ms` is as good a TTL here as at admission and in the
    // data plane.
    let duration = |field: &str, value: &str, problems: &mut Vec<String>| {
        let ms = parse_duration_millis(value).filter(|ms| *ms > 0);
        if ms.is_none() {
            problems.push(format!(
                "{field}: '{value}' is not a positive duration; use e.g. 30s or 10m"
            ));
        }
        ms
    };
    if let Some(cache) = &spec.data_plane.read_cache {
        if !(0..=10_000_000).contains(&cache.entries) {
            problems.push(format!(
                "spec.dataPlane.readCache.entries: {} is outside 0 (no cache) to 10000000",
                cache.entries
            ));
        }
        duration("spec.dataPlane.readCache.ttl", &cache.ttl, problems);
        if cache.verify == ReadCacheVerify::None && spec.events.is_none() {
            problems.push(
                "spec.dataPlane.readCache.verify: None keeps the cache fresh by the outbound \
                 events only; set spec.events (NATS) or use verify Version"
                    .into(),
            );
        }
    }
    if let Some(views) = &spec.stats_views {
        let interval = duration(
            "spec.statsViews.refreshInterval",
            &views.refresh_interval,
            problems,
        );
        let max_age = duration("spec.statsViews.maxAge", &views.max_age, problems);
        if let (Some(interval), Some(max_age)) = (interval, max_age) {
            if max_age <= interval {
                problems.push(format!(
                    "spec.statsViews.maxAge: {} is not longer than refreshInterval {}; every \
                     view would be too old to read before its next refresh",
                    views.max_age, views.refresh_interval
                ));
            }
        }
    }
}

fn positive(field: &str, value: i32, problems: &mut Vec<String>) {
    if value < 1 {
        problems.push(format!("{field}: {value} must be at least 1"));
    }
}

fn check_regions(field: &str, codes: &[String], problems: &mut Vec<String>) {
    let mut seen = BTreeSet::new();
    for code in codes {
        if regions::region(code).is_none() {
            problems.push(format!(
                "{field}: '{code}' is not a region code; use one of the 36 two-letter codes (AN AP ... WB)"
            ));
        }
        if !seen.insert(code) {
            problems.push(format!("{field}: '{code}' is listed twice"));
        }
    }
}

/// Longest cluster name (it is part of the names of the cluster's objects).
pub const MAX_CLUSTER_NAME: usize = 12;

/// Checks `spec.clusters` (the CRD's rules again, and what CEL cannot see: name
/// lengths with the store's name, and regions that would change cluster) into
/// [`Cluster`]s.
fn check_clusters(
    spec: &UserMetadataStoreSpec,
    store_name: &str,
    status: Option<&umstore_crds::UserMetadataStoreStatus>,
    problems: &mut Vec<String>,
) -> Vec<Cluster> {
    if spec.tier < 4 {
        problems
            .push("spec.clusters needs tier 4; set spec.tier: 4 or remove spec.clusters".into());
    }
    if !spec.worker_groups.is_empty() {
        problems.push(
            "spec.workerGroups: with spec.clusters, list each worker group under its cluster \
             (spec.clusters[].workerGroups) and leave spec.workerGroups empty"
                .into(),
        );
    }
    if spec.backup.is_some() {
        problems.push(
            "spec.backup: backups of a store with several clusters are not supported yet (each \
             cluster would need its own stanza); remove spec.backup or spec.clusters"
                .into(),
        );
    }
    let mut names = BTreeSet::new();
    let mut clusters = Vec::new();
    for (i, c) in spec.clusters.iter().enumerate() {
        let name = c.name.as_str();
        if !is_dns_label(name) || name.len() > MAX_CLUSTER_NAME {
            problems.push(format!(
                "spec.clusters: name '{name}' must be a lowercase DNS label of at most \
                 {MAX_CLUSTER_NAME} characters"
            ));
        }
        if !names.insert(name) {
            problems.push(format!("spec.clusters: name '{name}' appears twice"));
        }
        if c.worker_groups.is_empty() {
            problems.push(format!(
                "spec.clusters[{name}].workerGroups: a cluster needs at least one worker group \
                 listing the regions it holds"
            ));
        }
        let home = i == 0;
        for g in &c.worker_groups {
            let extra = if home { 0 } else { name.len() + 1 };
            if store_name.len() + extra + g.name.len() > MAX_STORE_AND_GROUP_NAME {
                problems.push(format!(
                    "spec.clusters[{name}].workerGroups: '{store_name}' plus cluster '{name}' and \
                     group '{}' is longer than {MAX_STORE_AND_GROUP_NAME} characters; shorten \
                     the cluster or group name",
                    g.name
                ));
            }
        }
        let mut regions: Vec<String> = c
            .worker_groups
            .iter()
            .flat_map(|g| g.regions.iter().cloned())
            .collect();
        regions.sort();
        regions.dedup();
        clusters.push(Cluster {
            name: c.name.clone(),
            home,
            worker_groups: c.worker_groups.clone(),
            holds: Vec::new(),
            regions,
            placement: c.placement.clone().unwrap_or_default(),
        });
    }
    // The groups of all clusters together: the tier-3 rules (each region in one
    // group, served, every region placed, names unique) say the rest.
    let mut flat = spec.clone();
    flat.worker_groups = clusters
        .iter()
        .flat_map(|c| c.worker_groups.iter().cloned())
        .collect();
    let before = problems.len();
    check_worker_groups(&flat, store_name, problems);
    for p in &mut problems[before..] {
        *p = p.replacen("spec.workerGroups", "spec.clusters[].workerGroups", 1);
    }
    // Where each region's rows are now: recorded in status, or all in the home
    // cluster for a store that ran before it had clusters.
    let recorded: BTreeMap<String, String> = match status {
        Some(s) if !s.clusters.is_empty() => s
            .clusters
            .iter()
            .flat_map(|c| c.regions.iter().map(move |r| (r.clone(), c.name.clone())))
            .collect(),
        Some(s) if s.schema_version.is_some() => {
            let home = spec
                .clusters
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_default();
            spec.regions
                .iter()
                .map(|r| (r.clone(), home.clone()))
                .collect()
        }
        _ => BTreeMap::new(),
    };
    // A region whose recorded cluster is another than the spec's moves there
    // (the moves step); until it has, it is held where it is.
    let spec_cluster: BTreeMap<String, String> = clusters
        .iter()
        .flat_map(|c| c.regions.iter().map(move |r| (r.clone(), c.name.clone())))
        .collect();
    let known: BTreeSet<String> = clusters.iter().map(|c| c.name.clone()).collect();
    for c in &mut clusters {
        c.holds = spec_cluster
            .iter()
            .filter(|(r, spec)| {
                let now = recorded
                    .get(*r)
                    .filter(|from| known.contains(*from))
                    .unwrap_or(spec);
                *now == c.name
            })
            .map(|(r, _)| r.clone())
            .collect();
    }
    for (r, from) in &recorded {
        if spec_cluster.contains_key(r) && !known.contains(from) {
            problems.push(format!(
                "spec.clusters: region {r} holds rows in cluster '{from}', which the spec no \
                 longer lists: keep '{from}' until its regions have moved to the others"
            ));
        }
    }
    clusters
}

fn check_worker_groups(spec: &UserMetadataStoreSpec, store_name: &str, problems: &mut Vec<String>) {
    if spec.worker_groups.is_empty() {
        problems.push(
            "spec.workerGroups: tier 3 and 4 need at least one worker group listing the regions it holds"
                .into(),
        );
        return;
    }
    let mut holder: BTreeMap<&str, &str> = BTreeMap::new();
    let mut names = BTreeSet::new();
    for group in &spec.worker_groups {
        let name = group.name.as_str();
        if !is_dns_label(name) {
            problems.push(format!(
                "spec.workerGroups: name '{name}' is not a lowercase DNS label"
            ));
        }
        if store_name.len() + name.len() > MAX_STORE_AND_GROUP_NAME {
            problems.push(format!(
                "spec.workerGroups: '{store_name}' plus group '{name}' is longer than \
                 {MAX_STORE_AND_GROUP_NAME} characters; shorten the group name"
            ));
        }
        if !names.insert(name) {
            problems.push(format!("spec.workerGroups: name '{name}' appears twice"));
        }
        positive(
            &format!("spec.workerGroups[{name}].replicas"),
            group.replicas,
            problems,
        );
        check_regions(
            &format!("spec.workerGroups[{name}].regions"),
            &group.regions,
            problems,
        );
        for code in &group.regions {
            if let Some(other) = holder.insert(code, name) {
                if other != name {
                    problems.push(format!(
                        "spec.workerGroups: region {code} is in groups '{other}' and '{name}'; keep it in one"
                    ));
                }
            }
            if !spec.regions.contains(code) {
                problems.push(format!(
                    "spec.workerGroups[{name}]: region {code} is not in spec.regions; add it there or remove it"
                ));
            }
        }
    }
    let unplaced: Vec<&str> = spec
        .regions
        .iter()
        .map(String::as_str)
        .filter(|c| !holder.contains_key(c))
        .collect();
    if !unplaced.is_empty() {
        problems.push(format!(
            "spec.workerGroups: regions {} are in spec.regions but in no worker group; assign each to one",
            unplaced.join(", ")
        ));
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// A Kubernetes quantity of the forms the storage fields use (`10Gi`, `500M`, `1.5Ti`).
fn is_quantity(s: &str) -> bool {
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok_and(|n| n > 0.0)
        && [
            "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "k", "M", "G", "T", "P", "E",
        ]
        .contains(&suffix)
}

/// Parses a Go-style duration of `h`, `m`, `s` and `ms` parts (`1h30m`, `500ms`)
/// into milliseconds. `None` when malformed.
pub fn parse_duration_millis(s: &str) -> Option<u64> {
    // `ms` before `m`: the first unit that matches is taken.
    parse_duration_ms(
        s,
        &[("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)],
    )
}

/// Parses a Go-style duration (`24h`, `90m`, `1h30m`, `500ms`) into whole seconds
/// (rounded down). `None` when malformed.
pub fn parse_duration_secs(s: &str) -> Option<u64> {
    // `ms` before `m`: the first unit that matches is taken.
    parse_duration_ms(
        s,
        &[("ms", 1), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)],
    )
    .map(|ms| ms / 1000)
}

/// Parses a retention duration of `d`, `h`, `m` and `s` parts (`7d`, `1d12h`) into
/// seconds. `None` when malformed. Days are what a retention is usually said in;
/// CEL and Go durations have none, hence a parser of its own.
pub fn parse_retention_secs(s: &str) -> Option<u64> {
    parse_duration_ms(
        s,
        &[
            ("d", 86_400_000),
            ("h", 3_600_000),
            ("m", 60_000),
            ("s", 1_000),
        ],
    )
    .map(|ms| ms / 1000)
}

/// Sums `<digits><unit>` parts, each unit given with its length in milliseconds.
fn parse_duration_ms(s: &str, units: &[(&str, u64)]) -> Option<u64> {
    let mut total_ms: u64 = 0;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit())?;
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, unit_ms) = units.iter().find(|(unit, _)| rest.starts_with(unit))?;
        total_ms = total_ms.checked_add(value.checked_mul(*unit_ms)?)?;
        rest = &rest[unit.len()..];
    }
    Some(total_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(spec: serde_json::Value, status_tier: Option<i32>) -> UserMetadataStore {
        let mut value = json!({
            "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
            "metadata": {"name": "s", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": spec,
        });
        if let Some(t) = status_tier {
            value["status"] = json!({"tier": t});
        }
        serde_json::from_value(value).expect("store")
    }

    fn two_clusters() -> serde_json::Value {
        json!({"tier": 4, "regions": ["KA", "TN", "DL"], "clusters": [
            {"name": "north", "workerGroups": [{"name": "n1", "regions": ["DL"]}]},
            {"name": "south", "workerGroups": [
                {"name": "s1", "regions": ["KA"]}, {"name": "s2", "regions": ["TN"]}]},
        ]})
    }

    #[test]
    fn clusters_give_home_its_groups_and_every_group_an_id() {
        let v = validate(&store(two_clusters(), None)).expect("valid");
        assert_eq!(v.clusters.len(), 2);
        assert!(v.clusters[0].home && !v.clusters[1].home);
        assert_eq!(v.clusters[1].regions, ["KA", "TN"]);
        let home: Vec<&str> = v
            .spec
            .worker_groups
            .iter()
            .map(|g| g.name.as_str())
            .collect();
        assert_eq!(home, ["n1"], "the store's own groups are home's");
        assert_eq!(
            v.citus_groups,
            BTreeMap::from([("n1".into(), 1), ("s1".into(), 2), ("s2".into(), 3)])
        );
        assert_eq!(v.for_cluster(&v.clusters[1]).cluster_prefix(), "south-");
        assert_eq!(v.cluster_prefix(), "");
    }

    #[test]
    fn clusters_refuse_what_admission_would_and_a_region_changing_cluster() {
        let mut spec = two_clusters();
        spec["clusters"][1]["workerGroups"][0]["regions"] = json!(["KA", "DL"]);
        spec["backup"] = json!({"repository": {"volume": {"size": "10Gi"}}});
        let problems = validate(&store(spec, None)).expect_err("invalid").problems;
        assert!(
            problems
                .iter()
                .any(|p| p.contains("region DL is in groups 'n1' and 's1'")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p.starts_with("spec.backup: backups of a store with several clusters")),
            "{problems:?}"
        );
        let mut spec = two_clusters();
        spec["clusters"][1]["workerGroups"][0]["name"] = json!("n1");
        let problems = validate(&store(spec, None)).expect_err("invalid").problems;
        assert!(
            problems
                .iter()
                .any(|p| p == "spec.clusters[].workerGroups: name 'n1' appears twice"),
            "{problems:?}"
        );
        // A store that ran with every region at home: KA and TN are held in
        // north until the moves step has moved them to south.
        let mut running = store(two_clusters(), Some(3));
        running.status.as_mut().expect("status").schema_version = Some(11);
        let v = validate(&running).expect("a move is accepted");
        assert_eq!(v.clusters[0].holds, ["DL", "KA", "TN"]);
        assert!(v.clusters[1].holds.is_empty());
        assert_eq!(v.clusters[1].regions, ["KA", "TN"]);
        // A cluster dropped from the spec while it still holds a region: refused.
        let mut gone = store(two_clusters(), Some(4));
        let status = gone.status.as_mut().expect("status");
        status.clusters = vec![umstore_crds::ClusterStatus {
            name: "west".into(),
            regions: vec!["KA".into()],
            ..Default::default()
        }];
        let problems = validate(&gone).expect_err("west still holds KA").problems;
        assert!(
            problems
                .iter()
                .any(|p| p.contains("region KA holds rows in cluster 'west', which the spec")),
            "{problems:?}"
        );
        // Recorded in status as already in south: accepted.
        let mut placed = store(two_clusters(), Some(4));
        let status = placed.status.as_mut().expect("status");
        status.schema_version = Some(11);
        status.clusters = vec![
            umstore_crds::ClusterStatus {
                name: "north".into(),
                regions: vec!["DL".into()],
                ..Default::default()
            },
            umstore_crds::ClusterStatus {
                name: "south".into(),
                regions: vec!["KA".into(), "TN".into()],
                ..Default::default()
            },
        ];
        let v = validate(&placed).expect("valid");
        assert_eq!(v.clusters[1].holds, ["KA", "TN"]);
    }

    #[test]
    fn citus_group_ids_survive_a_removed_group() {
        let groups = |names: &[&str]| -> Vec<WorkerGroupSpec> {
            names
                .iter()
                .map(|n| serde_json::from_value(json!({"name": n, "regions": []})).expect("group"))
                .collect()
        };
        let first = citus_group_ids(&groups(&["north", "south", "east"]), &BTreeMap::new());
        assert_eq!(
            first,
            BTreeMap::from([("north".into(), 1), ("south".into(), 2), ("east".into(), 3)])
        );
        // north leaves the spec: south and east keep their ids (their pods' Patroni
        // citus.group), north's stays reserved while it drains.
        let after = citus_group_ids(&groups(&["south", "east"]), &first);
        assert_eq!(after, first);
        // A new group at the front takes no id in use.
        let recorded = BTreeMap::from([("south".into(), 2), ("east".into(), 3)]);
        let added = citus_group_ids(&groups(&["west", "south", "east"]), &recorded);
        assert_eq!(added.get("west"), Some(&1));
        let crowded = citus_group_ids(&groups(&["south", "west", "east"]), &recorded);
        assert_eq!(
            crowded.get("west"),
            Some(&4),
            "position 2 is south's: one past the highest"
        );
    }

    #[test]
    fn citus_group_ids_come_from_the_status() {
        let mut s = store(
            json!({"tier": 3, "regions": ["KA", "DL"], "workerGroups": [
                {"name": "south", "regions": ["KA"]}, {"name": "north", "regions": ["DL"]}]}),
            Some(3),
        );
        if let Some(status) = s.status.as_mut() {
            status.worker_group_ids = BTreeMap::from([("north".into(), 1), ("south".into(), 2)]);
        }
        let v = validate(&s).expect("valid");
        assert_eq!(
            v.citus_groups,
            BTreeMap::from([("north".into(), 1), ("south".into(), 2)])
        );
    }

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration_secs("24h"), Some(86_400));
        assert_eq!(parse_duration_secs("1h30m"), Some(5_400));
        assert_eq!(parse_duration_secs("1500ms"), Some(1));
        for bad in ["", "24", "1d", "h", "-1h", "1h 30m"] {
            assert_eq!(parse_duration_secs(bad), None, "{bad}");
        }
    }

    #[test]
    fn quantities() {
        assert!(is_quantity("10Gi") && is_quantity("1.5Ti") && is_quantity("500M"));
        assert!(!is_quantity("Gi") && !is_quantity("10GB") && !is_quantity("0"));
    }

    #[test]
    fn tier_one_drops_pools_and_groups() {
        let v = validate(&store(json!({"tier": 1}), None)).expect("valid");
        assert!(v.spec.replica_pools.is_empty() && v.spec.worker_groups.is_empty());
        assert!(!v.pooled() && !v.citus());
    }

    #[test]
    fn demotion_keeps_the_running_tier_and_says_why() {
        let v = validate(&store(json!({"tier": 1}), Some(2))).expect("valid");
        assert_eq!(v.tier, 2);
        let msg = v.demotion_refused.expect("refused");
        assert!(
            msg.contains("never demotes") && msg.contains("set spec.tier to 2"),
            "{msg}"
        );
    }

    #[test]
    fn invalid_spec_lists_every_problem_with_a_fix() {
        let err = validate(&store(
            json!({"tier": 3, "regions": ["KA", "TN", "DL", "XX"],
                   "workerGroups": [{"name": "a", "regions": ["KA", "TN"]},
                                    {"name": "b", "regions": ["TN"]}],
                   "eligibilityCacheTtl": "1d"}),
            None,
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "'XX' is not a region code",
            "region TN is in groups 'a' and 'b'",
            "regions DL, XX are in spec.regions but in no worker group",
            "spec.eligibilityCacheTtl: '1d' is not a positive duration",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in {text}");
        }
    }

    #[test]
    fn read_cache_and_stats_views_settings_are_checked() {
        let err = validate(&store(
            json!({"dataPlane": {"readCache": {"entries": -5, "ttl": "soon", "verify": "None"}},
                   "statsViews": {"refreshInterval": "30m", "maxAge": "10m"}}),
            None,
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "spec.dataPlane.readCache.entries: -5 is outside 0 (no cache) to 10000000",
            "spec.dataPlane.readCache.ttl: 'soon' is not a positive duration",
            "spec.dataPlane.readCache.verify: None keeps the cache fresh by the outbound events only",
            "spec.statsViews.maxAge: 10m is not longer than refreshInterval 30m",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in {text}");
        }
        validate(&store(
            json!({"dataPlane": {"readCache": {"entries": 0}},
                   "statsViews": {"refreshInterval": "5m", "maxAge": "1h"}}),
            None,
        ))
        .expect("valid");
        // Sub-second, as admission and the data plane take it.
        validate(&store(
            json!({"dataPlane": {"readCache": {"entries": 100, "ttl": "500ms"}},
                   "statsViews": {"refreshInterval": "1500ms", "maxAge": "2s"}}),
            None,
        ))
        .expect("a 500ms TTL and a 1.5 s interval are valid");
    }

    #[test]
    fn retention_durations_take_days() {
        assert_eq!(parse_retention_secs("7d"), Some(604_800));
        assert_eq!(parse_retention_secs("1d12h"), Some(129_600));
        assert_eq!(parse_retention_secs("72h"), Some(259_200));
        assert_eq!(parse_retention_secs("1m30s"), Some(90));
        for bad in ["", "7", "d", "1w", "1500ms", "-7d", "7 d"] {
            assert_eq!(parse_retention_secs(bad), None, "{bad}");
        }
    }

    #[test]
    fn events_are_checked_and_their_max_age_parsed() {
        let v = validate(&store(json!({}), None)).expect("valid");
        assert_eq!(v.events, None);
        let v = validate(&store(
            json!({"events": {"natsUrl": "nats://nats.messaging.svc:4222", "maxAge": "1d12h",
                              "credentialsSecret": "umstore-nats"}}),
            None,
        ))
        .expect("valid");
        let events = v.events.expect("events");
        assert_eq!(events.max_age, Duration::from_secs(129_600));
        assert_eq!(
            events.spec.credentials_secret.as_deref(),
            Some("umstore-nats")
        );
        assert_eq!(events.spec.workers, 4);
    }

    #[test]
    fn nats_urls() {
        for good in [
            "nats://nats.messaging.svc:4222",
            "tls://nats.example.org",
            "nats://10.0.0.7:4222",
            "nats://[fd00::7]:4222",
        ] {
            assert!(is_nats_url(good), "{good}");
        }
        for bad in [
            "nats.messaging.svc:4222",
            "http://nats:4222",
            "nats://",
            "nats://:4222",
            "nats://nats:port",
            "nats://nats:99999",
            "nats://user:pw@nats:4222",
            "nats://a:4222,nats://b:4222",
            "nats://[fd00::7]x",
            "nats://nats :4222",
        ] {
            assert!(!is_nats_url(bad), "{bad}");
        }
    }

    #[test]
    fn invalid_events_are_refused_with_a_fix_each() {
        let err = validate(&store(
            json!({"events": {"natsUrl": "http://nats:4222", "subjectPrefix": "umstore.>",
                              "streamPrefix": "umstore", "credentialsSecret": "NATS_Creds",
                              "workers": 65, "maxAge": "1w"}}),
            None,
        ))
        .expect_err("invalid");
        let text = err.to_string();
        for needle in [
            "spec.events.natsUrl: 'http://nats:4222' is not a nats:// or tls:// URL",
            "spec.events.subjectPrefix: 'umstore.>'",
            "spec.events.streamPrefix: 'umstore'",
            "spec.events.credentialsSecret: 'NATS_Creds' is not a Secret name",
            "spec.events.workers: 65 is outside 1..64",
            "spec.events.maxAge: '1w' is not a positive duration",
        ] {
            assert!(text.contains(needle), "missing `{needle}` in {text}");
        }
        for (workers, max_age) in [(0, "7d"), (4, "0d")] {
            let err = validate(&store(
                json!({"events": {"natsUrl": "nats://nats:4222", "workers": workers,
                                  "maxAge": max_age}}),
                None,
            ))
            .expect_err("invalid");
            assert_eq!(err.problems.len(), 1, "{err}");
        }
    }

    #[test]
    fn events_max_age_must_fit_jetstream() {
        let days = MAX_EVENTS_MAX_AGE.as_secs() / 86_400;
        let spec = |age: String| json!({"events": {"natsUrl": "nats://nats:4222", "maxAge": age}});
        assert!(validate(&store(spec(format!("{days}d")), None)).is_ok());
        let err = validate(&store(spec(format!("{}d", days + 1)), None)).expect_err("too long");
        assert!(
            err.to_string().contains("longer than JetStream can keep"),
            "{err}"
        );
        assert!(validate(&store(spec("99999999999999999999d".into()), None)).is_err());
    }

    #[test]
    fn long_names_are_refused() {
        let mut s = store(json!({}), None);
        s.metadata.name = Some("x".repeat(31));
        assert!(validate(&s)
            .expect_err("too long")
            .to_string()
            .contains("at most 30"));
    }
}
