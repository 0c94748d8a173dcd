//! The chart's monitoring objects (`monitoring.*` values, all off by default): every
//! metric an alert or a dashboard panel reads is one that the operator, the data plane
//! or the postgres_exporter sidecar really exports, with every label the expression
//! uses; and the ServiceMonitors and PodMonitor select Services, pods and ports that
//! the operator's rendered objects (tests/golden/) carry. The exported names come
//! from the code's own registries, so renaming a metric fails here. Needs `helm`
//! like tests/chart.rs.

#[path = "support/helm.rs"]
mod chart_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chart_support::{chart, helm, render, repo, try_render, NO_HELM};
use promql_parser::label::Matchers;
use promql_parser::parser::{self, Expr, LabelModifier};
use serde_yaml_ng::Value;
use umstore_e2e::skip::{skip_or_fail, Component};

/// Labels Prometheus gives every target of a ServiceMonitor or PodMonitor (the
/// Prometheus Operator's defaults), beside the relabelings' own.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "container",
    "service",
    "endpoint",
];

/// The postgres_exporter metrics the dashboard reads, with their own labels, as
/// exported by v0.17.1 (the CRD's default exporter image, checked below) with its
/// default collectors. Not from our code, so listed here, from the exporter's source
/// at tag v0.17.1:
/// - `pg_up`: cmd/postgres_exporter/postgres_exporter.go (`Namespace: "pg"`,
///   `Name: "up"`), no labels of its own;
/// - `pg_stat_database_numbackends`: collector/pg_stat_database.go (subsystem
///   `stat_database`, registered `defaultEnabled`), labels `datid`, `datname`.
const EXPORTER_METRICS: &[(&str, &[&str])] = &[
    ("pg_up", &[]),
    ("pg_stat_database_numbackends", &["datid", "datname"]),
];
const EXPORTER_VERSION: &str = ":v0.17.1";

/// Who exports a series, i.e. which monitor scrapes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    Operator,
    DataPlane,
    Exporter,
}

/// Every exported series name, its source and the labels its samples carry.
type Catalog = BTreeMap<String, (Source, BTreeSet<String>)>;

fn monitoring_values() -> PathBuf {
    chart().join("ci/monitoring-values.yaml")
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| str_of(s).to_owned())
        .collect()
}

/// The store status every operator gauge is observed from.
fn sample_status() -> umstore_crds::UserMetadataStoreStatus {
    serde_json::from_value(serde_json::json!({
        "tier": 2,
        "phase": "Ready",
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready",
                        "message": "", "lastTransitionTime": "2026-03-01T00:00:00Z"}],
        "keyVersion": 3,
        "keys": {"key": "transit/umstore-pii", "version": 3, "rotation": {
            "state": "Running", "trigger": "Schedule", "rewrapped": 42,
            "startedAt": "2026-03-01T00:00:00Z", "attempts": 1}},
        "replicaLag": [{"pool": "ai", "pod": "pilot-replica-ai-0", "lagBytes": 16384,
                        "lagSeconds": 0.012}],
        "backup": {"lastBackup": {"label": "20260301-010000F", "type": "full",
            "startedAt": "2026-03-01T01:00:00Z", "completedAt": "2026-03-01T01:02:03Z"}},
        "statsViews": [{"name": "stats_groups", "refreshedAt": "2026-03-01T01:50:00.000Z",
                        "durationMs": 840, "groups": 1234}],
    }))
    .expect("status")
}

/// What the operator's /metrics serves once it has reconciled a store.
fn operator_exposition() -> String {
    let metrics = umstore_operator::metrics::Metrics::new();
    metrics.set_leader(true);
    let store: umstore_crds::UserMetadataStore = serde_json::from_value(serde_json::json!({
        "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
        "metadata": {"name": "pilot", "namespace": "umstore", "uid": "u1"},
        "spec": {"tier": 2, "regions": ["KA"], "encryption": {}},
    }))
    .expect("store");
    metrics.observe_store(&store, &sample_status());
    let started = metrics.reconcile_started();
    metrics.reconcile_finished(started);
    metrics.reconcile_failed("kube");
    metrics.step_finished("status", Instant::now());
    metrics.objects_applied(1);
    metrics.api_request("get");
    metrics.encode()
}

/// What a data plane's /metrics serves once it has served and ingested.
fn data_plane_exposition() -> String {
    use umstore_data_plane::metrics::{HttpLabels, IngestLabels, Metrics};
    let metrics = Metrics::new();
    metrics.replica("ai", true, Duration::from_millis(12), 16384);
    metrics.eligibility_lookup(true);
    metrics
        .ingest_events
        .get_or_create(&IngestLabels { outcome: "applied" })
        .inc();
    metrics.ingest_apply_seconds.observe(0.002);
    metrics.ingest_dead_letters.inc();
    metrics.read_answered("/api/v1/user-metadata/{user_id}", Duration::from_millis(1));
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            route: "/readyz".into(),
            status: 200,
        })
        .inc();
    metrics.encode()
}

/// The sample lines of a Prometheus text exposition: series name and label names.
fn add_exposition(text: &str, source: Source, catalog: &mut Catalog) {
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..end];
        let mut labels = BTreeSet::new();
        if line[end..].starts_with('{') {
            let mut rest = &line[end + 1..];
            while let Some(eq) = rest.find('=') {
                labels.insert(rest[..eq].trim_start_matches(',').to_owned());
                // The quoted value, with backslash escapes.
                let value = &rest[eq + 2..];
                let mut escaped = false;
                let close = value
                    .char_indices()
                    .find(|&(_, c)| {
                        let done = c == '"' && !escaped;
                        escaped = c == '\\' && !escaped;
                        done
                    })
                    .map(|(i, _)| i)
                    .expect("closing quote");
                rest = &value[close + 1..];
                if rest.starts_with('}') {
                    break;
                }
            }
        }
        let entry = catalog
            .entry(name.to_owned())
            .or_insert((source, BTreeSet::new()));
        entry.1.extend(labels);
    }
}

fn catalog() -> Catalog {
    let mut catalog = Catalog::new();
    add_exposition(&operator_exposition(), Source::Operator, &mut catalog);
    add_exposition(&data_plane_exposition(), Source::DataPlane, &mut catalog);
    for (name, labels) in EXPORTER_METRICS {
        catalog.insert(
            (*name).to_owned(),
            (
                Source::Exporter,
                labels.iter().map(|l| (*l).to_owned()).collect(),
            ),
        );
    }
    catalog
}

/// The monitor that scrapes each source, from the rendered documents.
fn monitor_of(docs: &[Value], source: Source) -> &Value {
    let service_monitors = kind(docs, "ServiceMonitor");
    let found = match source {
        Source::Exporter => kind(docs, "PodMonitor").first().copied(),
        Source::DataPlane => service_monitors.iter().copied().find(|m| {
            m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "data-plane"
        }),
        Source::Operator => service_monitors.iter().copied().find(|m| {
            m["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "umstore-operator"
        }),
    };
    found.unwrap_or_else(|| panic!("no monitor scrapes the {source:?} metrics"))
}

fn endpoints(monitor: &Value) -> &Vec<Value> {
    let spec = &monitor["spec"];
    spec["endpoints"]
        .as_sequence()
        .or_else(|| spec["podMetricsEndpoints"].as_sequence())
        .expect("endpoints")
}

/// Labels a source's series have once scraped: their own, the target's, and what
/// its monitor's relabelings add.
fn scraped_labels(docs: &[Value]) -> BTreeMap<Source, BTreeSet<String>> {
    [Source::Operator, Source::DataPlane, Source::Exporter]
        .into_iter()
        .map(|source| {
            let mut labels: BTreeSet<String> =
                TARGET_LABELS.iter().map(|l| (*l).to_owned()).collect();
            for endpoint in endpoints(monitor_of(docs, source)) {
                for r in endpoint["relabelings"].as_sequence().into_iter().flatten() {
                    labels.insert(str_of(&r["targetLabel"]).to_owned());
                }
            }
            (source, labels)
        })
        .collect()
}

/// Checks one parsed expression against what is exported; returns the labels its
/// result may carry. Problems are pushed with `origin`.
struct Checker<'a> {
    catalog: &'a Catalog,
    scraped: &'a BTreeMap<Source, BTreeSet<String>>,
    used: BTreeSet<String>,
    problems: Vec<String>,
}

impl Checker<'_> {
    fn selector(
        &mut self,
        origin: &str,
        name: Option<&str>,
        matchers: &Matchers,
    ) -> BTreeSet<String> {
        let Some(name) = name else {
            self.problems
                .push(format!("{origin}: a selector without a metric name"));
            return BTreeSet::new();
        };
        self.used.insert(name.to_owned());
        let Some((source, own)) = self.catalog.get(name) else {
            self.problems.push(format!(
                "{origin}: `{name}` is not exported by the operator, the data plane or the \
                 exporter's listed metrics"
            ));
            return BTreeSet::new();
        };
        let mut labels = own.clone();
        // The operator's own `namespace` label wins (honorLabels); the target's
        // labels are there as well.
        labels.extend(self.scraped[source].iter().cloned());
        let matched = matchers
            .matchers
            .iter()
            .chain(matchers.or_matchers.iter().flatten())
            .map(|m| m.name.as_str())
            .filter(|n| *n != "__name__");
        for label in matched {
            if !labels.contains(label) {
                self.problems.push(format!(
                    "{origin}: `{name}` has no label `{label}` (it has {labels:?})"
                ));
            }
        }
        labels
    }

    fn check(&mut self, origin: &str, expr: &Expr) -> BTreeSet<String> {
        match expr {
            Expr::VectorSelector(vs) => self.selector(origin, vs.name.as_deref(), &vs.matchers),
            Expr::MatrixSelector(ms) => {
                self.selector(origin, ms.vs.name.as_deref(), &ms.vs.matchers)
            }
            Expr::Aggregate(agg) => {
                if let Some(param) = &agg.param {
                    self.check(origin, param);
                }
                let inner = self.check(origin, &agg.expr);
                match &agg.modifier {
                    Some(LabelModifier::Include(by)) => {
                        for label in &by.labels {
                            if !inner.contains(label) {
                                self.problems.push(format!(
                                    "{origin}: grouping by `{label}`, which none of the series \
                                     carries (they have {inner:?})"
                                ));
                            }
                        }
                        by.labels.iter().cloned().collect()
                    }
                    Some(LabelModifier::Exclude(without)) => inner
                        .into_iter()
                        .filter(|l| !without.labels.contains(l))
                        .collect(),
                    None => BTreeSet::new(),
                }
            }
            Expr::Binary(b) => {
                let lhs = self.check(origin, &b.lhs);
                let rhs = self.check(origin, &b.rhs);
                if let Some(LabelModifier::Include(on)) =
                    b.modifier.as_ref().and_then(|m| m.matching.as_ref())
                {
                    for label in &on.labels {
                        if !(lhs.is_empty() || lhs.contains(label))
                            || !(rhs.is_empty() || rhs.contains(label))
                        {
                            self.problems
                                .push(format!("{origin}: matching on `{label}`, missing a side"));
                        }
                    }
                }
                lhs.union(&rhs).cloned().collect()
            }
            Expr::Call(call) => {
                let mut labels = BTreeSet::new();
                for arg in &call.args.args {
                    labels.extend(self.check(origin, arg));
                }
                labels
            }
            Expr::Paren(p) => self.check(origin, &p.expr),
            Expr::Unary(u) => self.check(origin, &u.expr),
            Expr::Subquery(s) => self.check(origin, &s.expr),
            Expr::NumberLiteral(_) | Expr::StringLiteral(_) | Expr::Extension(_) => BTreeSet::new(),
        }
    }

    /// Parses `text` and checks it.
    fn expression(&mut self, origin: &str, text: &str) -> BTreeSet<String> {
        match parser::parse(text) {
            Ok(expr) => self.check(origin, &expr),
            Err(e) => {
                self.problems
                    .push(format!("{origin}: `{text}` is not PromQL: {e}"));
                BTreeSet::new()
            }
        }
    }
}

/// Every alert rule of the rendered PrometheusRule.
fn alert_rules(docs: &[Value]) -> Vec<&Value> {
    let rules = kind(docs, "PrometheusRule");
    assert_eq!(rules.len(), 1, "one PrometheusRule");
    rules[0]["spec"]["groups"]
        .as_sequence()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_sequence().expect("rules"))
        .collect()
}

/// The dashboard JSON from its rendered ConfigMap.
fn dashboard(docs: &[Value]) -> serde_json::Value {
    let maps: Vec<&Value> = kind(docs, "ConfigMap")
        .into_iter()
        .filter(|m| m["metadata"]["labels"]["grafana_dashboard"] == "1")
        .collect();
    assert_eq!(
        maps.len(),
        1,
        "one dashboard ConfigMap labelled grafana_dashboard: \"1\""
    );
    let json = str_of(&maps[0]["data"]["umstore.json"]);
    serde_json::from_str(json).expect("the dashboard is JSON")
}

/// A dashboard query with Grafana's variables replaced, so that it parses as PromQL.
fn without_variables(expr: &str, variables: &[String]) -> String {
    let mut out = expr
        .replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h");
    for v in variables {
        out = out
            .replace(&format!("${{{v}}}"), "x")
            .replace(&format!("${v}"), "x");
    }
    out
}

#[test]
fn every_metric_an_alert_or_a_panel_reads_is_exported() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, Some(&monitoring_values()));
    let catalog = catalog();
    let scraped = scraped_labels(&docs);
    let mut checker = Checker {
        catalog: &catalog,
        scraped: &scraped,
        used: BTreeSet::new(),
        problems: Vec::new(),
    };

    let rules = alert_rules(&docs);
    for rule in &rules {
        let name = str_of(&rule["alert"]);
        checker.expression(&format!("alert {name}"), str_of(&rule["expr"]));
    }

    let board = dashboard(&docs);
    let variables: Vec<String> = board["templating"]["list"]
        .as_array()
        .expect("templating")
        .iter()
        .map(|v| v["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    let mut targets = 0;
    for panel in board["panels"].as_array().expect("panels") {
        let title = panel["title"].as_str().unwrap_or_default();
        let exprs: Vec<&str> = panel["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["expr"].as_str())
            .collect();
        assert!(!exprs.is_empty(), "panel {title:?} has no query");
        for expr in exprs {
            targets += 1;
            checker.expression(
                &format!("panel {title:?}"),
                &without_variables(expr, &variables),
            );
        }
    }
    // Variables: label_values(<selector>, <label>).
    for var in board["templating"]["list"].as_array().expect("templating") {
        let Some(query) = var["query"]["query"].as_str() else {
            continue;
        };
        let origin = format!("variable {}", var["name"]);
        let inner = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .unwrap_or_else(|| panic!("{origin}: not label_values(selector, label): {query}"));
        let labels = checker.expression(&origin, &without_variables(inner.0, &variables));
        let label = inner.1.trim();
        assert!(
            labels.contains(label),
            "{origin}: no label `{label}` in {labels:?}"
        );
    }

    assert!(
        checker.problems.is_empty(),
        "{} problems:\n{}",
        checker.problems.len(),
        checker.problems.join("\n")
    );
    // The check saw the rules and the panels, and each source's metrics.
    assert!(
        rules.len() >= 5 && targets >= 10,
        "{} rules, {targets} targets",
        rules.len()
    );
    let sources: BTreeSet<Source> = checker.used.iter().map(|n| catalog[n].0).collect();
    assert_eq!(
        sources,
        BTreeSet::from([Source::Operator, Source::DataPlane, Source::Exporter])
    );
    let default_image = umstore_crds::PostgresSpec::default().exporter_image;
    assert!(
        default_image.ends_with(EXPORTER_VERSION),
        "the default exporter image is now {default_image}: check EXPORTER_METRICS against \
         that version's source and update EXPORTER_VERSION"
    );
}

#[test]
fn alerts_say_what_to_look_at_and_take_their_thresholds_from_values() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, Some(&monitoring_values()));
    let rules = alert_rules(&docs);
    let names: BTreeSet<&str> = rules.iter().map(|r| str_of(&r["alert"])).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "UmstoreStoreNotReady",
            "UmstoreReplicaLagHigh",
            "UmstoreKeyRewrapStalled",
            "UmstoreDeadLettersGrowing",
            "UmstoreBackupTooOld",
            "UmstoreStatsViewsStale",
            "UmstoreReconcileErrors",
        ])
    );
    for rule in &rules {
        let name = str_of(&rule["alert"]);
        let severity = str_of(&rule["labels"]["severity"]);
        assert!(
            ["critical", "warning"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        let summary = str_of(&rule["annotations"]["summary"]);
        let description = str_of(&rule["annotations"]["description"]);
        assert!(!summary.is_empty() && !description.is_empty(), "{name}");
        assert!(
            description.contains("kubectl "),
            "{name} says what to run: {description}"
        );
        if name != "UmstoreReconcileErrors" {
            assert!(
                summary.contains("{{ $labels.namespace }}/{{ $labels.store }}")
                    && description.contains("{{ $labels.store }}"),
                "{name} names the store: {summary} / {description}"
            );
        }
    }

    let docs = try_render(
        &helm,
        &[
            "--values",
            &monitoring_values().display().to_string(),
            "--set",
            "monitoring.prometheusRule.replicaLag.seconds=3,\
             monitoring.prometheusRule.backupAge.maxHours=2,\
             monitoring.prometheusRule.statsViewsAge.maxMinutes=45,\
             monitoring.prometheusRule.storeNotReady.for=7m,\
             monitoring.prometheusRule.deadLetters.window=1h,\
             monitoring.prometheusRule.reconcileErrors.severity=critical,\
             monitoring.prometheusRule.alertLabels.team=platform",
        ],
    )
    .expect("render");
    let rules = alert_rules(&docs);
    let rule = |name: &str| -> &Value {
        rules
            .iter()
            .find(|r| r["alert"] == name)
            .unwrap_or_else(|| panic!("{name}"))
    };
    assert!(str_of(&rule("UmstoreReplicaLagHigh")["expr"]).ends_with("> 3"));
    assert!(str_of(&rule("UmstoreBackupTooOld")["expr"]).ends_with("> 7200"));
    assert!(str_of(&rule("UmstoreStatsViewsStale")["expr"]).ends_with("> 2700"));
    assert_eq!(rule("UmstoreStoreNotReady")["for"], "7m");
    assert!(str_of(&rule("UmstoreDeadLettersGrowing")["expr"]).contains("[1h]"));
    assert_eq!(
        rule("UmstoreReconcileErrors")["labels"]["severity"],
        "critical"
    );
    assert!(rules.iter().all(|r| r["labels"]["team"] == "platform"));
}

#[test]
fn the_dashboard_has_a_panel_for_each_store_fact() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let board = dashboard(&render(&helm, Some(&monitoring_values())));
    let titles: Vec<String> = board["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .map(|p| p["title"].as_str().unwrap_or_default().to_lowercase())
        .collect();
    for wanted in [
        "tier",
        "ready",
        "write latency",
        "read latency",
        "replica lag",
        "cache hit rate",
        "key version",
        "backup age",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no {wanted} panel in {titles:?}"
        );
    }
    let file = std::fs::read_to_string(chart().join("dashboards/umstore.json")).expect("file");
    let from_file: serde_json::Value = serde_json::from_str(&file).expect("JSON");
    assert_eq!(
        from_file, board,
        "the ConfigMap carries the chart's file as it is"
    );
}

#[test]
fn monitoring_is_off_by_default() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, None);
    for doc in &docs {
        let k = str_of(&doc["kind"]);
        assert!(
            !["ServiceMonitor", "PodMonitor", "PrometheusRule"].contains(&k),
            "default values render a {k}"
        );
        assert!(
            doc["metadata"]["labels"]["grafana_dashboard"].is_null(),
            "default values render the dashboard"
        );
    }
    let error = try_render(
        &helm,
        &[
            "--set",
            "monitoring.serviceMonitor.enabled=true,metrics.service.enabled=false",
        ],
    )
    .expect_err("a ServiceMonitor without the Service it selects");
    assert!(error.contains("needs metrics.service.enabled"), "{error}");
}

/// One label selector (matchLabels, matchExpressions) against `labels`.
fn selects(selector: &Value, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector["matchLabels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(str_of(k)).map(String::as_str) == v.as_str());
    let by_expression = selector["matchExpressions"]
        .as_sequence()
        .into_iter()
        .flatten()
        .all(|e| {
            let value = labels.get(str_of(&e["key"]));
            let values = strings(&e["values"]);
            match str_of(&e["operator"]) {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                other => panic!("operator {other}"),
            }
        });
    by_label && by_expression
}

fn labels_of(meta: &Value) -> BTreeMap<String, String> {
    meta["labels"]
        .as_mapping()
        .into_iter()
        .flatten()
        .map(|(k, v)| (str_of(k).to_owned(), str_of(v).to_owned()))
        .collect()
}

/// A workload's pods, as its template renders them.
struct Pods {
    workload: String,
    labels: BTreeMap<String, String>,
    ports: Vec<(String, i64)>,
}

fn pods(docs: &[Value]) -> Vec<Pods> {
    docs.iter()
        .filter(|d| d["kind"] == "StatefulSet" || d["kind"] == "Deployment")
        .map(|d| {
            let template = &d["spec"]["template"];
            Pods {
                workload: str_of(&d["metadata"]["name"]).to_owned(),
                labels: labels_of(&template["metadata"]),
                ports: template["spec"]["containers"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .flat_map(|c| c["ports"].as_sequence().into_iter().flatten())
                    .map(|p| {
                        (
                            str_of(&p["name"]).to_owned(),
                            p["containerPort"].as_i64().unwrap_or_default(),
                        )
                    })
                    .collect(),
            }
        })
        .collect()
}

/// `__meta_kubernetes_pod_label_<name>`: the pod label a relabeling reads.
fn pod_label(source: &str, labels: &BTreeMap<String, String>) -> Option<String> {
    let sanitized = source.strip_prefix("__meta_kubernetes_pod_label_")?;
    labels
        .iter()
        .find(|(k, _)| {
            k.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect::<String>()
                == sanitized
        })
        .map(|(_, v)| v.clone())
}

/// The relabelings give every sample the store's name as `store`.
fn assert_store_label(monitor: &Value, pods: &Pods, store: &str) {
    for endpoint in endpoints(monitor) {
        let relabel = endpoint["relabelings"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|r| r["targetLabel"] == "store")
            .expect("a relabeling to `store`");
        let source = strings(&relabel["sourceLabels"]);
        assert_eq!(source.len(), 1);
        assert_eq!(
            pod_label(&source[0], &pods.labels).as_deref(),
            Some(store),
            "{} {}: `store` from {}",
            str_of(&monitor["metadata"]["name"]),
            pods.workload,
            source[0]
        );
    }
}

#[test]
fn store_monitors_select_the_ports_the_operator_renders() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, Some(&monitoring_values()));
    let data_plane = monitor_of(&docs, Source::DataPlane);
    let postgres = monitor_of(&docs, Source::Exporter);
    assert_eq!(data_plane["kind"], "ServiceMonitor");
    assert_eq!(postgres["kind"], "PodMonitor");
    for monitor in [data_plane, postgres] {
        assert_eq!(
            monitor["spec"]["namespaceSelector"]["any"], true,
            "stores live in any namespace"
        );
    }

    for tier in 1..=4 {
        let path = repo().join(format!("operator/tests/golden/tier{tier}.yaml"));
        let text = std::fs::read_to_string(&path).expect("golden");
        let objects: Vec<Value> = text
            .split("\n---")
            .map(|d| serde_yaml_ng::from_str::<Value>(d).expect("YAML"))
            .filter(|v| !v.is_null())
            .collect();
        let store = str_of(&objects[0]["metadata"]["ownerReferences"][0]["name"]).to_owned();
        let workloads = pods(&objects);

        // The data plane: one Service, its port, and through it the data plane's pods.
        let services: Vec<&Value> = objects
            .iter()
            .filter(|o| o["kind"] == "Service")
            .filter(|o| selects(&data_plane["spec"]["selector"], &labels_of(&o["metadata"])))
            .collect();
        assert_eq!(services.len(), 1, "tier {tier}: the data plane's Service");
        assert_eq!(
            services[0]["metadata"]["name"],
            format!("{store}-api").as_str()
        );
        for endpoint in endpoints(data_plane) {
            let port = services[0]["spec"]["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == endpoint["port"])
                .unwrap_or_else(|| panic!("tier {tier}: no port {:?}", endpoint["port"]));
            let selector: BTreeMap<String, String> = services[0]["spec"]["selector"]
                .as_mapping()
                .into_iter()
                .flatten()
                .map(|(k, v)| (str_of(k).to_owned(), str_of(v).to_owned()))
                .collect();
            let backing: Vec<&Pods> = workloads
                .iter()
                .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                .collect();
            assert_eq!(backing.len(), 1, "tier {tier}: the data plane's pods");
            assert_eq!(backing[0].workload, format!("{store}-data-plane"));
            let target = port["targetPort"].as_str().expect("a named targetPort");
            assert!(
                backing[0].ports.iter().any(|(name, _)| name == target),
                "tier {tier}: the data plane's pods have no port {target}"
            );
            assert_eq!(str_of(&endpoint["path"]), "/metrics");
            assert_store_label(data_plane, backing[0], &store);
        }

        // The exporters: every pod with the `metrics` port, and only those.
        let endpoint = &endpoints(postgres)[0];
        let port = str_of(&endpoint["port"]);
        let with_port: BTreeSet<&str> = workloads
            .iter()
            .filter(|p| {
                p.ports
                    .iter()
                    .any(|(n, number)| n == port && *number == 9187)
            })
            .map(|p| p.workload.as_str())
            .collect();
        let selected: Vec<&Pods> = workloads
            .iter()
            .filter(|p| selects(&postgres["spec"]["selector"], &p.labels))
            .collect();
        let selected_names: BTreeSet<&str> = selected.iter().map(|p| p.workload.as_str()).collect();
        assert!(
            selected_names.contains(format!("{store}-coordinator").as_str()),
            "tier {tier}: {selected_names:?}"
        );
        assert_eq!(selected_names, with_port, "tier {tier}: exporters scraped");
        for pods in selected {
            assert_store_label(postgres, pods, &store);
        }
    }
}

#[test]
fn the_operator_service_monitor_keeps_the_stores_namespace_label() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let docs = render(&helm, Some(&monitoring_values()));
    let monitor = monitor_of(&docs, Source::Operator);
    let service = kind(&docs, "Service")
        .into_iter()
        .find(|s| selects(&monitor["spec"]["selector"], &labels_of(&s["metadata"])))
        .expect("the ServiceMonitor selects the metrics Service");
    assert_eq!(
        strings(&monitor["spec"]["namespaceSelector"]["matchNames"]),
        [str_of(&service["metadata"]["namespace"])]
    );
    let endpoint = &endpoints(monitor)[0];
    assert!(
        service["spec"]["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .any(|p| p["name"] == endpoint["port"]),
        "{service:?}"
    );
    // umstore_operator_store_* carry the store's namespace: without honorLabels
    // Prometheus would rename it exported_namespace and put the operator's there.
    assert_eq!(endpoint["honorLabels"], true);
    for monitor in kind(&docs, "ServiceMonitor")
        .into_iter()
        .chain(kind(&docs, "PodMonitor"))
        .chain(kind(&docs, "PrometheusRule"))
    {
        assert_eq!(
            monitor["metadata"]["labels"]["release"], "kube-prometheus-stack",
            "monitoring.labels on {:?}",
            monitor["metadata"]["name"]
        );
    }
}

#[test]
fn store_monitors_watch_only_the_watched_namespace() {
    let Some(helm) = helm() else {
        skip_or_fail(Component::Helm, NO_HELM);
        return;
    };
    let values = monitoring_values().display().to_string();
    let docs = try_render(
        &helm,
        &["--values", &values, "--set", "watchNamespace=stores"],
    )
    .expect("render");
    for source in [Source::DataPlane, Source::Exporter] {
        let selector = &monitor_of(&docs, source)["spec"]["namespaceSelector"];
        assert_eq!(strings(&selector["matchNames"]), ["stores"], "{source:?}");
        assert!(selector["any"].is_null(), "{source:?}");
    }
}
