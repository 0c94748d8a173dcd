//! The CEL rules (`x-kubernetes-validations`) the API server enforces at
//! admission. They are built here, from [`umstore_migrations::regions::REGIONS`],
//! so the list of region codes is written once in the workspace.

use kube::core::{Message, Rule};
use umstore_migrations::regions::REGIONS;

use crate::refusals::{TIER_NEVER_DECREASES, TIER_RANGE};

/// Largest number of worker groups; bounds the CEL cost of the overlap rule.
pub const MAX_WORKER_GROUPS: u32 = 12;

/// The 36 region codes as a CEL list literal: `['AN', 'AP', ...]`.
pub fn region_list_literal() -> String {
    let codes: Vec<String> = REGIONS.iter().map(|r| format!("'{}'", r.code)).collect();
    format!("[{}]", codes.join(", "))
}

/// The 36 region codes separated by spaces, for messages.
pub fn region_codes_text() -> String {
    REGIONS.iter().map(|r| r.code).collect::<Vec<_>>().join(" ")
}

/// On a list of region codes: every entry is one of the 36 codes.
pub fn regions_known() -> Rule {
    Rule::new(format!("self.all(r, r in {})", region_list_literal())).message(Message::Message(
        format!(
        "unknown region code; use the two-letter codes of the 36 states and union territories: {}",
        region_codes_text()
    ),
    ))
}

/// On `spec.tier`: 1 to 4.
pub fn tier_range() -> Rule {
    Rule::new("self >= 1 && self <= 4").message(TIER_RANGE)
}

/// On `spec.tier`: a transition rule, the tier never goes down.
pub fn tier_never_decreases() -> Rule {
    Rule::new("self >= oldSelf").message(TIER_NEVER_DECREASES)
}

/// On `spec.autoPromotion.thresholds`: each tier starts above the one before.
pub fn thresholds_increase() -> Rule {
    Rule::new("self.tier2Users < self.tier3Users && self.tier3Users < self.tier4Users")
        .message("autoPromotion.thresholds must increase: tier2Users < tier3Users < tier4Users")
}

/// On the spec: from tier 3 the regions live on Citus worker groups (from tier 4,
/// those of `spec.clusters` when it is set).
pub fn worker_groups_from_tier_3() -> Rule {
    Rule::new(
        "self.tier < 3 || (has(self.workerGroups) && size(self.workerGroups) > 0) || \
         (self.tier >= 4 && has(self.clusters) && size(self.clusters) > 0)",
    )
    .message(
        "tier 3 and 4 need spec.workerGroups (or, at tier 4, spec.clusters): at least one \
         group with the regions it holds",
    )
    .field_path(".workerGroups")
}

/// CEL: the regions of cluster `c` (its worker groups' regions) contain `r`.
fn in_cluster(c: &str, r: &str) -> String {
    format!("{c}.workerGroups.exists(h, {r} in h.regions)")
}

/// On the spec: several clusters are the tier-4 topology.
pub fn clusters_from_tier_4() -> Rule {
    Rule::new("!has(self.clusters) || size(self.clusters) == 0 || self.tier >= 4")
        .message("spec.clusters needs tier 4; set spec.tier: 4 or remove spec.clusters")
        .field_path(".clusters")
}

/// On the spec: with clusters, every worker group is listed under its cluster.
pub fn clusters_hold_the_worker_groups() -> Rule {
    Rule::new(
        "!has(self.clusters) || size(self.clusters) == 0 || !has(self.workerGroups) || \
         size(self.workerGroups) == 0",
    )
    .message(
        "with spec.clusters, list each worker group under its cluster \
         (spec.clusters[].workerGroups; the first cluster's are the groups spec.workerGroups \
         held) and leave spec.workerGroups empty",
    )
    .field_path(".workerGroups")
}

/// On the spec: no region is held by two clusters. Counted per served region
/// ([`cluster_regions_served`] keeps the clusters to those), which keeps the
/// rule's cost within the API server's budget.
pub fn region_in_one_cluster() -> Rule {
    Rule::new(format!(
        "!has(self.clusters) || self.regions.all(r, \
         self.clusters.filter(c, {}).size() <= 1)",
        in_cluster("c", "r")
    ))
    .message(
        "a region is listed in two clusters; each region must belong to exactly one cluster \
         (data residency: its rows live in one place)",
    )
    .field_path(".clusters")
}

/// On the spec: every region the store serves is held by a cluster.
pub fn every_region_in_a_cluster() -> Rule {
    Rule::new(format!(
        "!has(self.clusters) || size(self.clusters) == 0 || self.regions.all(r, \
         self.clusters.exists(c, {}))",
        in_cluster("c", "r")
    ))
    .message("every region in spec.regions must be held by a worker group of one of spec.clusters")
    .field_path(".clusters")
}

/// On the spec: clusters hold only regions the store serves.
pub fn cluster_regions_served() -> Rule {
    Rule::new(
        "!has(self.clusters) || self.clusters.all(c, c.workerGroups.all(g, \
         g.regions.all(r, r in self.regions)))",
    )
    .message("a cluster's worker group lists a region that is not in spec.regions")
    .field_path(".clusters")
}

/// On the spec: a transition rule, the home cluster (the first) keeps its name: it
/// holds the objects of the tier-3 store and the global user routes.
pub fn home_cluster_stays() -> Rule {
    Rule::new(
        "!has(oldSelf.clusters) || size(oldSelf.clusters) == 0 || \
         (has(self.clusters) && size(self.clusters) > 0 && \
         self.clusters[0].name == oldSelf.clusters[0].name)",
    )
    .message(
        "the first cluster of spec.clusters is the home cluster and cannot be renamed, \
         reordered or removed; add and remove the other clusters after it",
    )
    .field_path(".clusters")
}

/// On the spec: no region is held by two worker groups.
pub fn region_in_one_worker_group() -> Rule {
    Rule::new(
        "!has(self.workerGroups) || self.workerGroups.all(g, self.workerGroups.all(h, \
         g.name == h.name || !g.regions.exists(r, r in h.regions)))",
    )
    .message(
        "a region is listed in two worker groups; each region must belong to exactly one group",
    )
    .field_path(".workerGroups")
}

/// On the spec: from tier 3, every region of `spec.regions` is held by a worker group.
pub fn every_region_placed() -> Rule {
    Rule::new(
        "self.tier < 3 || !has(self.workerGroups) || \
         (has(self.clusters) && size(self.clusters) > 0) || self.regions.all(r, \
         self.workerGroups.exists(g, r in g.regions))",
    )
    .message("from tier 3 every region in spec.regions must be assigned to a worker group")
    .field_path(".workerGroups")
}

/// On the spec: worker groups hold only regions the store serves.
pub fn worker_regions_served() -> Rule {
    Rule::new(
        "!has(self.workerGroups) || self.workerGroups.all(g, g.regions.all(r, r in self.regions))",
    )
    .message("a worker group lists a region that is not in spec.regions")
    .field_path(".workerGroups")
}

/// On a Go-style duration string (`24h`, `90m`, `1h30m`): well-formed and positive.
pub fn duration_well_formed() -> Rule {
    Rule::new("self.matches('^([0-9]+(h|m|s|ms))+$') && duration(self) > duration('0s')")
        .message("must be a positive duration such as 24h, 90m or 1h30m")
}

/// On `dataPlane.readCache.entries`: 0 (off) to ten million.
pub fn read_cache_entries() -> Rule {
    Rule::new("self >= 0 && self <= 10000000")
        .message("readCache.entries must be between 0 (no cache) and 10000000")
}

/// On the spec: a read cache whose hits are not checked is kept fresh by the
/// outbound events alone, so it needs the event bus.
pub fn memory_only_cache_needs_events() -> Rule {
    Rule::new(
        "!has(self.dataPlane) || !has(self.dataPlane.readCache) || \
         !has(self.dataPlane.readCache.verify) || self.dataPlane.readCache.verify != 'None' || \
         has(self.events)",
    )
    .message(
        "dataPlane.readCache.verify None keeps the cache fresh by the outbound events only: \
         set spec.events (NATS), or use verify Version",
    )
    .field_path(".dataPlane.readCache.verify")
}

/// On `spec.statsViews`: a view must outlive its refresh interval, or it would be
/// too old to read before it is refreshed again.
pub fn stats_views_max_age_above_interval() -> Rule {
    Rule::new(
        "!has(self.maxAge) || !has(self.refreshInterval) || \
         !self.maxAge.matches('^([0-9]+(h|m|s|ms))+$') || \
         !self.refreshInterval.matches('^([0-9]+(h|m|s|ms))+$') || \
         duration(self.maxAge) > duration(self.refreshInterval)",
    )
    .message(
        "statsViews.maxAge must be longer than statsViews.refreshInterval, or every view \
         would be too old to read before its next refresh",
    )
    .field_path(".maxAge")
}

/// On a GPU count: zero or more.
pub fn non_negative() -> Rule {
    Rule::new("self >= 0").message("must be zero or more")
}

/// On a replica count: at least one.
pub fn at_least_one() -> Rule {
    Rule::new("self >= 1").message("must be at least 1")
}

/// On `pgbouncer.maxClientConnections`: 1 to 500 (SPEC §2).
pub fn max_client_connections() -> Rule {
    Rule::new("self >= 1 && self <= 500").message("must be between 1 and 500 (SPEC §2)")
}

/// On names that become parts of object names: a DNS label of at most 30 characters.
pub fn dns_label() -> Rule {
    Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$') && size(self) <= 30")
        .message("must be a lowercase DNS label (a-z, 0-9, '-') of at most 30 characters")
}

/// On a storage size: a Kubernetes quantity above zero (`20Gi`), what a
/// PersistentVolumeClaim would otherwise refuse only when the operator creates it.
pub fn storage_quantity() -> Rule {
    Rule::new("isQuantity(self) && quantity(self).isGreaterThan(quantity('0'))").message(
        "storage.size must be a Kubernetes quantity above zero such as 20Gi \
         (a number with an optional suffix: Ki Mi Gi Ti, k M G T, m)",
    )
}

/// On `resources` (a ResourceRequirements): every request and limit is a
/// non-negative Kubernetes quantity, what the pod would otherwise be refused for.
/// The values are int-or-string, so each is read through `string()`.
pub fn resource_quantities() -> Rule {
    Rule::new(
        "(!has(self.requests) || self.requests.all(k, isQuantity(string(self.requests[k])) \
         && !quantity(string(self.requests[k])).isLessThan(quantity('0')))) \
         && (!has(self.limits) || self.limits.all(k, isQuantity(string(self.limits[k])) \
         && !quantity(string(self.limits[k])).isLessThan(quantity('0'))))",
    )
    .message(
        "resources requests and limits must be non-negative Kubernetes quantities \
         such as 500m, 2 or 8Gi",
    )
}

/// Pattern of an extended resource name: a DNS subdomain prefix, `/`, and a name
/// (`nvidia.com/gpu`, `amd.com/gpu`); Kubernetes requires the prefix for extended
/// resources.
pub const EXTENDED_RESOURCE_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$";

/// On `dataPlane.gpu.resourceName`: a qualified extended resource name.
pub fn extended_resource_name() -> Rule {
    Rule::new(format!("self.matches('{EXTENDED_RESOURCE_PATTERN}')")).message(
        "gpu.resourceName must be an extended resource name such as nvidia.com/gpu \
         (a DNS domain, '/', then a name)",
    )
}

/// On `encryption.vaultAddress`: an absolute `http` or `https` URL with a host, what
/// the data plane's Vault client would otherwise fail on at start.
pub fn vault_address_url() -> Rule {
    Rule::new(
        "isURL(self) && (self.startsWith('https://') || self.startsWith('http://')) \
         && url(self).getHostname() != ''",
    )
    .message(
        "encryption.vaultAddress must be an http:// or https:// URL with a host, \
         such as https://vault.vault.svc:8200",
    )
}

/// Longest NATS URL in `events.natsUrl`; bounds the rule's cost.
pub const MAX_NATS_URL_LENGTH: u32 = 2048;

/// On `events.natsUrl`: a `nats://` or `tls://` URL with a host and no user info,
/// what the data plane's NATS client would otherwise fail on at start. Credentials
/// in the URL would end up in the Deployment; they belong in `credentialsSecret`.
pub fn nats_url() -> Rule {
    Rule::new(
        "isURL(self) && (self.startsWith('nats://') || self.startsWith('tls://')) \
         && url(self).getHostname() != '' && !self.contains('@')",
    )
    .message(
        "events.natsUrl must be a nats:// or tls:// URL with a host and no credentials, \
         such as nats://nats.messaging.svc:4222 (credentials go in events.credentialsSecret)",
    )
}

/// Pattern of a NATS subject prefix: tokens of letters, digits, `_` and `-`
/// separated by dots; no wildcards (`*`, `>`), no `$` (NATS's own subjects).
pub const SUBJECT_PREFIX_PATTERN: &str = "^[A-Za-z0-9_-]+([.][A-Za-z0-9_-]+)*$";

/// On `events.subjectPrefix`.
pub fn subject_prefix() -> Rule {
    Rule::new(format!("self.matches('{SUBJECT_PREFIX_PATTERN}')")).message(
        "events.subjectPrefix must be NATS subject tokens (letters, digits, '_' or '-') \
         separated by dots, without wildcards, such as umstore.events",
    )
}

/// Pattern of a JetStream name prefix: the streams and the consumer are named
/// `<prefix>_EVENTS_IN`, `<prefix>_INGEST`, ...
pub const STREAM_PREFIX_PATTERN: &str = "^[A-Z][A-Z0-9_]{0,31}$";

/// On `events.streamPrefix`.
pub fn stream_prefix() -> Rule {
    Rule::new(format!("self.matches('{STREAM_PREFIX_PATTERN}')")).message(
        "events.streamPrefix must be an uppercase letter followed by at most 31 uppercase \
         letters, digits or '_', such as UMSTORE",
    )
}

/// Pattern of a Secret name (a DNS subdomain; the length is bounded by the schema).
pub const SECRET_NAME_PATTERN: &str =
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// On `events.credentialsSecret`: a name the pod's `secretKeyRef` can carry.
pub fn credentials_secret_name() -> Rule {
    Rule::new(format!("self.matches('{SECRET_NAME_PATTERN}')")).message(
        "events.credentialsSecret must be a Secret name: lowercase letters, digits, '-' and '.'",
    )
}

/// Most ingest workers per data-plane pod.
pub const MAX_INGEST_WORKERS: i32 = 64;

/// On `events.workers`: 1 to [`MAX_INGEST_WORKERS`].
pub fn ingest_workers() -> Rule {
    Rule::new(format!("self >= 1 && self <= {MAX_INGEST_WORKERS}")).message(Message::Message(
        format!("events.workers must be between 1 and {MAX_INGEST_WORKERS}"),
    ))
}

/// On a retention duration (`7d`, `72h`, `1d12h`): days, hours, minutes and seconds,
/// positive. CEL's `duration()` has no days, so the check is the pattern plus a
/// non-zero digit (units hold no digits, so one means a non-zero part).
pub fn retention_duration() -> Rule {
    Rule::new("self.matches('^([0-9]+(d|h|m|s))+$') && self.matches('[1-9]')").message(
        "must be a positive duration in days, hours, minutes or seconds such as 7d, 72h or 1d12h",
    )
}

/// On `backup.repository`: exactly one of `s3` and `volume`.
pub fn one_repository() -> Rule {
    Rule::new("has(self.s3) != has(self.volume)").message(
        "backup.repository needs exactly one of s3 (an S3-compatible bucket) and volume \
         (a ReadWriteMany PersistentVolumeClaim the operator creates)",
    )
}

/// On a backup schedule: a five-field cron expression (`0 1 * * 0`), what a CronJob
/// takes.
pub fn cron_schedule() -> Rule {
    Rule::new("self.matches('^\\\\s*[^\\\\s]+(\\\\s+[^\\\\s]+){4}\\\\s*$')").message(
        "must be a cron schedule of five fields: minute hour day-of-month month day-of-week \
         (`0 1 * * 0` is Sundays at 01:00)",
    )
}

/// On `bootstrap.recovery.targetTime`: an RFC 3339 time with a zone (`2026-12-01T10:00:00Z`).
pub fn rfc3339_time() -> Rule {
    Rule::new("self.matches('^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\\\.[0-9]+)?(Z|[+-][0-9]{2}:[0-9]{2})$') && timestamp(self) > timestamp('1970-01-01T00:00:00Z')")
        .message("targetTime must be an RFC 3339 time with a zone, such as 2026-12-01T10:00:00Z")
}

/// On `spec` (a transition rule): `bootstrap`, how the databases were created cannot change afterwards.
pub fn bootstrap_immutable() -> Rule {
    Rule::new(
        "has(self.bootstrap) == has(oldSelf.bootstrap) && \
         (!has(self.bootstrap) || self.bootstrap == oldSelf.bootstrap)",
    )
    .message(
        "spec.bootstrap cannot change once the store exists: it says how the databases were \
         created; create a new store to restore again",
    )
}

/// On `spec`: a store restored from a backup starts below tier 3 (Citus restores
/// are not supported yet).
pub fn recovery_below_tier_3() -> Rule {
    Rule::new("!has(self.bootstrap) || !has(self.bootstrap.recovery) || self.tier <= 2").message(
        "spec.bootstrap.recovery restores a tier 1 or 2 store; restore with tier 1 or 2 and \
         promote afterwards",
    )
}

/// On a name that becomes a Secret's or a store's name: `what` says which field.
pub fn object_name(what: &str) -> Rule {
    Rule::new(format!("self.matches('{SECRET_NAME_PATTERN}')")).message(Message::Message(format!(
        "{what} must be an object name: lowercase letters, digits, '-' and '.'"
    )))
}

/// On a backup retention count: 1 to 100.
pub fn backups_kept() -> Rule {
    Rule::new("self >= 1 && self <= 100").message("must keep between 1 and 100 backups")
}
