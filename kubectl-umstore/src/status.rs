//! `status <store>`: the store's status as a readable page (the default), or the
//! status object itself as JSON or YAML.

use std::collections::BTreeMap;

use k8s_openapi::jiff::Timestamp;
use umstore_crds::{MigrationPolicy, UserMetadataStore, UserMetadataStoreStatus};

use crate::error::Error;
use crate::table::{age, bytes, table, time_and_age};

/// How `status` prints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A readable page: fields, then tables.
    #[default]
    Table,
    /// `.status` as JSON, exactly as stored (`{}` before the first reconcile).
    Json,
    /// `.status` as YAML, exactly as stored (`{}` before the first reconcile).
    Yaml,
}

/// The store's status in `format`.
pub fn print(store: &UserMetadataStore, format: Format, now: Timestamp) -> Result<String, Error> {
    let status = store.status.clone().unwrap_or_default();
    match format {
        Format::Table => Ok(render(store, now)),
        Format::Json => serde_json::to_string_pretty(&status)
            .map(|s| s + "\n")
            .map_err(|e| Error::Output {
                format: "json",
                message: e.to_string(),
            }),
        Format::Yaml => serde_yaml_ng::to_string(&status).map_err(|e| Error::Output {
            format: "yaml",
            message: e.to_string(),
        }),
    }
}

/// The width of the labels' column: the longest label (`Auto-promotion:`), so the
/// values line up the same way on every store's page.
const LABEL_WIDTH: usize = 15;

/// Label/value lines with the values lined up.
fn fields(lines: &[(&str, String)]) -> String {
    lines
        .iter()
        .map(|(label, value)| format!("{:<LABEL_WIDTH$}  {value}\n", format!("{label}:")))
        .collect()
}

fn or_dash(value: Option<&str>) -> String {
    value.filter(|v| !v.is_empty()).unwrap_or("-").to_string()
}

/// The readable page.
pub fn render(store: &UserMetadataStore, now: Timestamp) -> String {
    let meta = &store.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let mut head = vec![
        ("Name", name.clone()),
        ("Namespace", meta.namespace.clone().unwrap_or_default()),
    ];
    let Some(status) = store.status.as_ref() else {
        head.push(("Tier", format!("- (spec.tier {})", store.spec.tier)));
        head.push((
            "Status",
            "none yet: the operator has not reconciled this store (is it running, and does it \
             watch this namespace?)"
                .to_string(),
        ));
        return fields(&head);
    };
    head.extend(summary(store, status, &name, now));
    let mut out = fields(&head);
    out.push_str(&conditions(status, now));
    out.push_str(&components(status));
    out.push_str(&endpoints(status));
    out.push_str(&regions(store, status));
    out.push_str(&replica_lag(status));
    out.push_str(&groups(status));
    out
}

fn summary(
    store: &UserMetadataStore,
    status: &UserMetadataStoreStatus,
    name: &str,
    now: Timestamp,
) -> Vec<(&'static str, String)> {
    let spec_tier = store.spec.tier;
    let tier = match status.tier {
        Some(t) if t == spec_tier => format!("{t}"),
        Some(t) if t < spec_tier => format!("{t} (spec.tier {spec_tier}: promotion under way)"),
        Some(t) => format!("{t} (spec.tier {spec_tier})"),
        None => format!("- (spec.tier {spec_tier})"),
    };
    let mut lines = vec![
        ("Tier", tier),
        (
            "Phase",
            status.phase.map_or("-".to_string(), |p| format!("{p:?}")),
        ),
    ];
    let generation = match (store.metadata.generation, status.observed_generation) {
        (Some(g), Some(o)) if g == o => format!("{g} (observed)"),
        (Some(g), Some(o)) => format!("{g} (status describes {o}: a change is not reconciled yet)"),
        (g, _) => g.map_or("-".to_string(), |g| format!("{g} (not observed yet)")),
    };
    lines.push(("Generation", generation));
    lines.push(("Schema", schema(store, status, name)));
    lines.push(("Keys", keys(status, now)));
    if let Some(r) = status.keys.as_ref().and_then(|k| k.rotation.as_ref()) {
        let when = match &r.finished_at {
            Some(done) => format!("finished {}", time_and_age(done, now)),
            None => format!("started {}", time_and_age(&r.started_at, now)),
        };
        let mut line = format!(
            "{} ({}), {} data keys rewrapped, {when}",
            r.state, r.trigger, r.rewrapped
        );
        if r.attempts > 1 {
            line.push_str(&format!(", attempt {}", r.attempts));
        }
        if !r.message.is_empty() {
            line.push_str(&format!(": {}", r.message));
        }
        lines.push(("Key rotation", line));
    }
    if let Some(p) = &status.promotion {
        let mut line = format!(
            "{} users measured {}",
            p.measured_users,
            time_and_age(&p.measured_at, now)
        );
        if let Some(t) = p.target_tier {
            line.push_str(&format!(", calls for tier {t}"));
        }
        if !p.message.is_empty() {
            line.push_str(&format!(": {}", p.message));
        }
        lines.push(("Auto-promotion", line));
    }
    if let Some(s) = &status.switchover {
        lines.push(("Switchover", format!("to {s} (last acted on)")));
    }
    lines.push(("Backup", backup(store, status, now)));
    if !status.stats_views.is_empty() {
        let views: Vec<String> = status
            .stats_views
            .iter()
            .map(|v| {
                format!(
                    "{}{} refreshed {} in {} ms, {} groups",
                    v.name,
                    v.cluster
                        .as_ref()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default(),
                    time_and_age(&v.refreshed_at, now),
                    v.duration_ms,
                    v.groups
                )
            })
            .collect();
        lines.push(("Stats views", views.join("; ")));
    }
    if !status.clusters.is_empty() {
        let clusters: Vec<String> = status
            .clusters
            .iter()
            .map(|c| {
                let mut line = format!(
                    "{}{} [{}] {}",
                    c.name,
                    if c.home { " (home)" } else { "" },
                    c.regions.join(" "),
                    if c.ready { "ready" } else { "NOT READY" }
                );
                if let Some(v) = c.schema_version {
                    line.push_str(&format!(", schema {v}"));
                }
                if let Some(lag) = c.max_lag_bytes {
                    line.push_str(&format!(", replica lag {lag} B"));
                }
                if let Some(m) = &c.message {
                    line.push_str(&format!(": {m}"));
                }
                line
            })
            .collect();
        lines.push(("Clusters", clusters.join("; ")));
    }
    if !status.region_moves.is_empty() {
        let moves: Vec<String> = status
            .region_moves
            .iter()
            .map(|m| {
                let mut line = format!("{} {} → {} {}", m.region, m.from, m.to, m.phase);
                if let Some(f) = m.fence_ms {
                    line.push_str(&format!(", fence {f:.0} ms"));
                }
                match &m.finished_at {
                    Some(at) => line.push_str(&format!(", finished {at}")),
                    None => line.push_str(&format!(", since {}", m.started_at)),
                }
                line
            })
            .collect();
        lines.push(("Region moves", moves.join("; ")));
    }
    lines
}

/// The last backup, what can be restored, and what is wrong with backups.
fn backup(store: &UserMetadataStore, status: &UserMetadataStoreStatus, now: Timestamp) -> String {
    if store.spec.backup.is_none() {
        return "not configured (spec.backup)".to_string();
    }
    let Some(b) = &status.backup else {
        return "configured; nothing reported yet".to_string();
    };
    let mut line = match &b.last_backup {
        Some(last) => format!(
            "last {} {} completed {}",
            last.type_,
            last.label,
            time_and_age(&last.completed_at, now)
        ),
        None => "no backup completed yet".to_string(),
    };
    if let (Some(from), Some(to)) = (&b.earliest_recoverable_time, &b.latest_recoverable_time) {
        line.push_str(&format!("; recoverable {from} to {to}"));
    }
    if let Some(point) = &b.restore_point {
        line.push_str(&format!("; restore point {point}"));
    }
    if let Some(wal) = &b.archive_failing {
        line.push_str(&format!("; WAL ARCHIVING FAILS at {wal}"));
    }
    line
}

fn schema(store: &UserMetadataStore, status: &UserMetadataStoreStatus, name: &str) -> String {
    let mut line = status
        .schema_version
        .map_or("version unknown".to_string(), |v| format!("version {v}"));
    let migrations = status.migrations.as_ref();
    let pending = migrations.map(|m| m.pending.as_slice()).unwrap_or_default();
    if let Some(last) = pending.last() {
        let list: Vec<String> = pending.iter().map(i32::to_string).collect();
        line.push_str(&format!("; pending {}", list.join(", ")));
        if store.spec.migrations.policy == MigrationPolicy::Manual {
            line.push_str(&format!(
                " (policy Manual: kubectl umstore approve-migrations {name} {last})"
            ));
        }
    }
    if let Some(a) = migrations.and_then(|m| m.approved) {
        line.push_str(&format!("; approved up to {a}"));
    }
    line
}

fn keys(status: &UserMetadataStoreStatus, now: Timestamp) -> String {
    let keys = status.keys.as_ref();
    let version = keys.and_then(|k| k.version).or(status.key_version);
    let mut line = match (keys, version) {
        (Some(k), Some(v)) => format!("{} version {v}", k.key),
        (Some(k), None) => k.key.clone(),
        (None, Some(v)) => format!("version {v}"),
        (None, None) => return "-".to_string(),
    };
    if let Some(min) = keys.and_then(|k| k.min_decryption_version) {
        line.push_str(&format!(" (oldest usable {min})"));
    }
    let last = keys
        .and_then(|k| k.last_rotation.as_deref())
        .or(status.last_key_rotation.as_deref());
    if let Some(last) = last {
        line.push_str(&format!("; last rotation {}", time_and_age(last, now)));
    }
    if let Some(next) = keys.and_then(|k| k.next_rotation.as_deref()) {
        line.push_str(&format!("; next {}", time_and_age(next, now)));
    }
    line
}

fn section(title: &str, body: String) -> String {
    format!("\n{title}:\n{body}")
}

fn none(title: &str) -> String {
    format!("\n{title}:  none\n")
}

fn conditions(status: &UserMetadataStoreStatus, now: Timestamp) -> String {
    if status.conditions.is_empty() {
        return none("Conditions");
    }
    let rows: Vec<Vec<String>> = status
        .conditions
        .iter()
        .map(|c| {
            vec![
                c.type_.clone(),
                c.status.clone(),
                or_dash(Some(&c.reason)),
                age(c.last_transition_time.0, now),
                c.message.clone(),
            ]
        })
        .collect();
    section(
        "Conditions",
        table(2, &["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"], &rows),
    )
}

fn components(status: &UserMetadataStoreStatus) -> String {
    if status.components.is_empty() {
        return none("Components");
    }
    let rows: Vec<Vec<String>> = status
        .components
        .iter()
        .map(|c| {
            vec![
                c.name.clone(),
                c.kind.clone(),
                format!("{}/{}", c.ready_replicas, c.replicas),
                c.message.clone().unwrap_or_default(),
            ]
        })
        .collect();
    section(
        "Components",
        table(2, &["NAME", "KIND", "READY", "MESSAGE"], &rows),
    )
}

fn endpoints(status: &UserMetadataStoreStatus) -> String {
    let Some(e) = &status.endpoints else {
        return none("Endpoints");
    };
    let mut rows = vec![
        vec!["read-write".to_string(), e.read_write.clone()],
        vec!["api".to_string(), e.api.clone()],
    ];
    for (purpose, address) in &e.replica_pools {
        rows.push(vec![format!("replica pool {purpose}"), address.clone()]);
    }
    let mut out = table(2, &["ENDPOINT", "ADDRESS"], &rows);
    if !e.secrets.is_empty() {
        let rows: Vec<Vec<String>> = e
            .secrets
            .iter()
            .map(|(purpose, secret)| vec![purpose.clone(), secret.clone()])
            .collect();
        out.push('\n');
        out.push_str(&table(2, &["PURPOSE", "CONNECTION SECRET"], &rows));
    }
    section("Endpoints", out)
}

fn regions(store: &UserMetadataStore, status: &UserMetadataStoreStatus) -> String {
    // Where the shards are (status.regions), else where the distribute step put
    // them (status.placement, by group).
    let mut by_region: BTreeMap<String, String> = status.regions.clone();
    if by_region.is_empty() {
        for (group, regions) in &status.placement {
            for region in regions {
                by_region.insert(region.clone(), group.clone());
            }
        }
    }
    if by_region.is_empty() {
        return format!(
            "\nRegions:  {} (all on the coordinator: worker groups start at tier 3)\n",
            store.spec.regions.join(" ")
        );
    }
    let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (region, group) in &by_region {
        groups.entry(group).or_default().push(region);
    }
    let rows: Vec<Vec<String>> = groups
        .iter()
        .map(|(group, regions)| {
            let draining = status.draining.get(*group).map_or(String::new(), |n| {
                format!("draining: {n} placements to move")
            });
            vec![group.to_string(), regions.join(" "), draining]
        })
        .collect();
    section(
        "Regions",
        table(2, &["WORKER GROUP", "REGIONS", "NOTE"], &rows),
    )
}

fn replica_lag(status: &UserMetadataStoreStatus) -> String {
    if status.replica_lag.is_empty() {
        return none("Replica lag");
    }
    let rows: Vec<Vec<String>> = status
        .replica_lag
        .iter()
        .map(|l| {
            vec![
                l.pool.clone(),
                l.pod.clone(),
                bytes(l.lag_bytes),
                l.lag_seconds
                    .map_or("-".to_string(), |s| format!("{s:.3}s")),
            ]
        })
        .collect();
    section(
        "Replica lag",
        table(2, &["POOL", "POD", "BEHIND", "REPLAY LAG"], &rows),
    )
}

fn groups(status: &UserMetadataStoreStatus) -> String {
    if status.groups.is_empty() {
        return String::new();
    }
    let rows: Vec<Vec<String>> = status
        .groups
        .iter()
        .map(|g| {
            let ready = g.members.iter().filter(|m| m.ready).count();
            vec![
                g.name.clone(),
                or_dash(g.leader.as_deref()),
                format!("{ready}/{}", g.members.len()),
            ]
        })
        .collect();
    section(
        "Patroni groups",
        table(2, &["GROUP", "LEADER", "READY MEMBERS"], &rows),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store(status: serde_json::Value) -> UserMetadataStore {
        serde_json::from_value(json!({
            "apiVersion": "umstore.io/v1alpha1",
            "kind": "UserMetadataStore",
            "metadata": {"name": "pilot", "namespace": "umstore", "generation": 3},
            "spec": {"tier": 3, "regions": ["KA", "TN", "KL"], "migrations": {"policy": "Manual"},
                     "workerGroups": [{"name": "south", "regions": ["KA", "TN", "KL"]}]},
            "status": status,
        }))
        .expect("a store")
    }

    #[test]
    fn the_backup_line_shows_the_last_backup_the_window_and_a_failing_archive() {
        let mut s = store(json!({
            "backup": {
                "lastBackup": {"label": "20260310-010000F", "type": "full",
                               "startedAt": "2026-03-10T01:00:00Z", "completedAt": "2026-03-10T01:04:00Z"},
                "earliestRecoverableTime": "2026-03-03T01:04:00Z",
                "latestRecoverableTime": "2026-03-10T11:59:00Z",
                "archiveFailing": "00000001000000000000002A",
            },
        }));
        s.spec.backup = Some(
            serde_json::from_value(json!({"repository": {"volume": {}}})).expect("backup spec"),
        );
        let page = render(&s, now());
        let line = field(
            "Backup",
            "last full 20260310-010000F completed 2026-03-10T01:04:00Z (10h ago); recoverable \
             2026-03-03T01:04:00Z to 2026-03-10T11:59:00Z; WAL ARCHIVING FAILS at \
             00000001000000000000002A",
        );
        assert!(page.contains(&line), "{page}");
    }

    #[test]
    fn the_stats_views_line_shows_each_views_last_refresh() {
        let s = store(json!({
            "statsViews": [{"name": "stats_groups", "refreshedAt": "2026-03-10T11:50:00.000Z",
                            "durationMs": 840, "groups": 1234},
                           {"name": "stats_groups", "cluster": "south",
                            "refreshedAt": "2026-03-10T11:40:00.000Z",
                            "durationMs": 90, "groups": 12}],
        }));
        let page = render(&s, now());
        let line = field(
            "Stats views",
            "stats_groups refreshed 2026-03-10T11:50:00.000Z (10m ago) in 840 ms, 1234 groups; \
             stats_groups (south) refreshed 2026-03-10T11:40:00.000Z (20m ago) in 90 ms, 12 groups",
        );
        assert!(page.contains(&line), "{page}");
        assert!(
            !render(&store(json!({})), now()).contains("Stats views"),
            "no line where no refresh is scheduled"
        );
    }

    #[test]
    fn the_clusters_line_shows_each_cluster_its_regions_and_why_it_is_not_ready() {
        let s = store(json!({
            "clusters": [
                {"name": "north", "home": true, "ready": true, "regions": ["DL", "UP"],
                 "readWrite": "p:6432/umstore", "schemaVersion": 12, "maxLagBytes": 2048},
                {"name": "south", "ready": false, "regions": ["KA"],
                 "readWrite": "p:6432/umstore_south",
                 "message": "national-south-coordinator 0/2 (cannot be scheduled)"},
            ],
        }));
        let page = render(&s, now());
        let line = field(
            "Clusters",
            "north (home) [DL UP] ready, schema 12, replica lag 2048 B; south [KA] NOT READY: \
             national-south-coordinator 0/2 (cannot be scheduled)",
        );
        assert!(page.contains(&line), "{page}");
        assert!(!render(&store(json!({})), now()).contains("Clusters"));
    }

    #[test]
    fn the_region_moves_line_shows_the_move_under_way_and_the_fence_of_each_done() {
        let s = store(json!({
            "regionMoves": [
                {"region": "TN", "from": "north", "to": "south", "phase": "catching_up",
                 "startedAt": "2026-03-10T11:58:00Z"},
                {"region": "KA", "from": "north", "to": "south", "phase": "done",
                 "fenceMs": 212.4, "rowsCopied": 4000000,
                 "startedAt": "2026-03-10T11:50:00Z", "finishedAt": "2026-03-10T11:53:10Z"},
            ],
        }));
        let page = render(&s, now());
        let line = field(
            "Region moves",
            "TN north → south catching_up, since 2026-03-10T11:58:00Z; KA north → south done, \
             fence 212 ms, finished 2026-03-10T11:53:10Z",
        );
        assert!(page.contains(&line), "{page}");
        assert!(!render(&store(json!({})), now()).contains("Region moves"));
    }

    fn field(label: &str, value: &str) -> String {
        format!("{:<LABEL_WIDTH$}  {value}", format!("{label}:"))
    }

    fn now() -> Timestamp {
        "2026-03-10T12:00:00Z".parse().expect("time")
    }

    #[test]
    fn the_page_shows_every_part_of_the_status() {
        let store = store(json!({
            "observedGeneration": 3, "tier": 2, "phase": "Provisioning", "schemaVersion": 10,
            "conditions": [
                {"type": "Ready", "status": "False", "reason": "ComponentsNotReady",
                 "message": "waiting for pilot-worker-south", "lastTransitionTime": "2026-03-10T11:55:00Z"},
                {"type": "Promoting", "status": "True", "reason": "TierRaised",
                 "message": "tier 3: pilot-worker-south 0/2", "lastTransitionTime": "2026-03-10T11:55:00Z"},
            ],
            "components": [
                {"name": "pilot-coordinator", "kind": "StatefulSet", "replicas": 2, "readyReplicas": 2, "ready": true},
                {"name": "pilot-worker-south", "kind": "StatefulSet", "replicas": 2, "readyReplicas": 0,
                 "ready": false, "message": "PersistentVolumeClaim data-pilot-worker-south-0 is Pending"},
            ],
            "endpoints": {"readWrite": "pilot-pgbouncer.umstore.svc:6432", "api": "pilot-api.umstore.svc:8080",
                          "replicaPools": {"ai": "pilot-replica-ai.umstore.svc:5432"},
                          "secrets": {"writer": "pilot-conn-writer"}},
            "migrations": {"pending": [11, 12]},
            "keys": {"key": "transit/umstore-pii", "version": 3, "minDecryptionVersion": 2,
                     "lastRotation": "2026-03-05T12:00:00Z"},
            "regions": {"KA": "south", "TN": "south", "KL": "south"},
            "replicaLag": [{"pool": "ai", "pod": "pilot-replica-ai-0", "lagBytes": 2048, "lagSeconds": 0.25}],
        }));
        let page = render(&store, now());
        for expected in [
            field("Tier", "2 (spec.tier 3: promotion under way)"),
            field("Phase", "Provisioning"),
            field(
                "Schema",
                "version 10; pending 11, 12 (policy Manual: kubectl umstore approve-migrations \
                 pilot 12)",
            ),
            field(
                "Keys",
                "transit/umstore-pii version 3 (oldest usable 2); last rotation \
                 2026-03-05T12:00:00Z (5d ago)",
            ),
            field("Backup", "not configured (spec.backup)"),
            "  Ready       False    ComponentsNotReady   5m    waiting for pilot-worker-south\n"
                .into(),
            "  pilot-worker-south   StatefulSet   0/2     PersistentVolumeClaim \
             data-pilot-worker-south-0 is Pending\n"
                .into(),
            "  pilot-coordinator    StatefulSet   2/2\n".into(),
            "  read-write        pilot-pgbouncer.umstore.svc:6432\n".into(),
            "  replica pool ai   pilot-replica-ai.umstore.svc:5432\n".into(),
            "  writer    pilot-conn-writer\n".into(),
            "  south          KA KL TN\n".into(),
            "  ai     pilot-replica-ai-0   2.0 KiB   0.250s\n".into(),
        ] {
            assert!(page.contains(&expected), "missing {expected:?} in:\n{page}");
        }
    }

    #[test]
    fn a_store_never_reconciled_says_so() {
        let mut store = store(json!({}));
        store.status = None;
        let page = render(&store, now());
        assert!(
            page.contains(&field(
                "Status",
                "none yet: the operator has not reconciled this store"
            )),
            "{page}"
        );
    }

    #[test]
    fn json_and_yaml_are_the_status_object() {
        let store = store(json!({"tier": 1, "phase": "Ready"}));
        let json: serde_json::Value =
            serde_json::from_str(&print(&store, Format::Json, now()).expect("json"))
                .expect("parses");
        assert_eq!(json, json!({"tier": 1, "phase": "Ready"}));
        let yaml = print(&store, Format::Yaml, now()).expect("yaml");
        assert_eq!(yaml, "tier: 1\nphase: Ready\n");
    }
}
