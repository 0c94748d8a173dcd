//! Golden files: every object the builders produce for each example in `examples/`,
//! so that every change to a manifest shows up in review. `UPDATE_GOLDEN=1`
//! regenerates them.

use std::path::PathBuf;

use umstore_crds::UserMetadataStore;
use umstore_operator::builders::credentials::Credentials;
use umstore_operator::builders::{topology, Env, Object};
use umstore_operator::validated::validate;

fn example(tier: i32) -> UserMetadataStore {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../examples/tier{tier}.yaml"));
    let text = std::fs::read_to_string(&path).expect("example exists");
    let mut store: UserMetadataStore = serde_yaml_ng::from_str(&text).expect("example parses");
    store.metadata.uid = Some(format!("00000000-0000-0000-0000-00000000000{tier}"));
    store.metadata.generation = Some(1);
    store
}

fn objects(tier: i32) -> Vec<Object> {
    let v = validate(&example(tier)).expect("example is valid");
    topology(
        &v,
        &Credentials::fixed_for_tests(),
        &Env {
            operator_namespace: "umstore-system".into(),
        },
    )
}

fn render(objects: &[Object]) -> String {
    objects
        .iter()
        .map(|o| serde_yaml_ng::to_string(&o.to_value().expect("json")).expect("yaml"))
        .collect::<Vec<_>>()
        .join("---\n")
}

fn check_golden(tier: i32) {
    let rendered = render(&objects(tier));
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/golden/tier{tier}.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(path.parent().expect("dir")).expect("mkdir");
        std::fs::write(&path, &rendered).expect("write golden");
    }
    let golden = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        golden == rendered,
        "{} differs from what the builders produce; rerun with UPDATE_GOLDEN=1 and review the diff",
        path.display()
    );
}

#[test]
fn tier1_objects_match_golden() {
    check_golden(1);
}

#[test]
fn tier2_objects_match_golden() {
    check_golden(2);
}

#[test]
fn tier3_objects_match_golden() {
    check_golden(3);
}

#[test]
fn tier4_objects_match_golden() {
    check_golden(4);
}

fn keys(objects: &[Object]) -> Vec<String> {
    objects.iter().map(Object::key).collect()
}

#[test]
fn tier1_is_one_postgres_and_the_data_plane() {
    let keys = keys(&objects(1));
    assert!(keys.contains(&"StatefulSet/pilot-coordinator".to_string()));
    assert!(keys.contains(&"Deployment/pilot-data-plane".to_string()));
    assert!(
        !keys
            .iter()
            .any(|k| k.contains("pgbouncer") || k.contains("replica") || k.contains("worker")),
        "{keys:?}"
    );
}

#[test]
fn tier2_adds_pgbouncer_and_two_replica_pools() {
    let keys = keys(&objects(2));
    for k in [
        "Deployment/state-rollout-pgbouncer",
        "Service/state-rollout-pgbouncer",
        "StatefulSet/state-rollout-replica-ai",
        "StatefulSet/state-rollout-replica-analytics",
        "PodDisruptionBudget/state-rollout-replica-ai",
    ] {
        assert!(keys.contains(&k.to_string()), "missing {k} in {keys:?}");
    }
    assert!(!keys.iter().any(|k| k.contains("worker")));
}

#[test]
fn tier3_has_one_statefulset_per_worker_group_and_gpu_limits() {
    let objects = objects(3);
    let keys = keys(&objects);
    for g in ["north", "west", "south", "east", "central"] {
        assert!(
            keys.contains(&format!("StatefulSet/national-worker-{g}")),
            "{g}"
        );
        assert!(
            keys.contains(&format!("Service/national-worker-{g}-hl")),
            "{g}"
        );
    }
    let dp = objects
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d) if d.metadata.name.as_deref() == Some("national-data-plane") => {
                Some(d)
            }
            _ => None,
        })
        .expect("data plane");
    let pod = dp.spec.template.spec.as_ref().expect("pod spec");
    let limits = pod.containers[0]
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .expect("limits");
    assert_eq!(
        limits.get("nvidia.com/gpu").map(|q| q.0.as_str()),
        Some("1")
    );
    assert!(pod.tolerations.as_ref().is_some_and(|t| t.len() == 1));
    assert!(pod
        .node_selector
        .as_ref()
        .is_some_and(|n| n.contains_key("nvidia.com/gpu.present")));
}

#[test]
fn pgbouncer_ini_pools_transactions_with_at_most_500_clients() {
    let objects = objects(2);
    let ini = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c)
                if c.metadata.name.as_deref() == Some("state-rollout-pgbouncer") =>
            {
                c.data
                    .as_ref()
                    .and_then(|d| d.get("pgbouncer.ini"))
                    .cloned()
            }
            _ => None,
        })
        .expect("pgbouncer.ini");
    assert!(ini.contains("pool_mode = transaction"));
    assert!(ini.contains("max_client_conn = 500"));
    assert!(ini.contains("auth_type = scram-sha-256"));
    assert!(
        ini.contains("client_tls_sslmode = require"),
        "tier 2 example sets a TLS secret"
    );
    // PgBouncer checks the primary's certificate against the Secret's CA.
    assert!(ini.contains("server_tls_sslmode = verify-full"), "{ini}");
    assert!(
        ini.contains("server_tls_ca_file = /etc/postgresql/tls/ca.crt"),
        "{ini}"
    );
}

#[test]
fn every_object_is_owned_by_the_store_and_labelled() {
    for tier in 1..=4 {
        for o in objects(tier) {
            let value = o.to_value().expect("json");
            let meta = &value["metadata"];
            assert_eq!(
                meta["ownerReferences"][0]["uid"],
                format!("00000000-0000-0000-0000-00000000000{tier}")
            );
            assert_eq!(meta["ownerReferences"][0]["controller"], true);
            assert_eq!(
                meta["labels"]["app.kubernetes.io/managed-by"],
                "umstore-operator",
                "{}",
                o.key()
            );
            assert!(o.name().len() <= 63, "{}", o.key());
        }
    }
}

#[test]
fn examples_from_tier_2_reach_the_bus_and_tier_1_ingests_over_http_only() {
    for tier in 1..=4 {
        let objects = objects(tier);
        let env = objects
            .iter()
            .find_map(|o| match o {
                Object::Deployment(d)
                    if d.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.ends_with("-data-plane")) =>
                {
                    d.spec.template.spec.as_ref()?.containers[0].env.clone()
                }
                _ => None,
            })
            .expect("data-plane env");
        let url = env.iter().find(|e| e.name == "UMSTORE_NATS_URL");
        if tier == 1 {
            assert!(url.is_none(), "tier 1 has no bus");
            continue;
        }
        assert_eq!(
            url.and_then(|e| e.value.as_deref()),
            Some("nats://nats.messaging.svc:4222"),
            "tier {tier}"
        );
        for name in ["UMSTORE_NATS_USER", "UMSTORE_NATS_PASSWORD"] {
            let secret = env
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref());
            assert_eq!(
                secret.map(|s| s.name.as_str()),
                Some("umstore-nats"),
                "tier {tier} {name}"
            );
        }
    }
}

/// The data plane's pod spec in every tier: each purpose's login comes from a key
/// that exists in a Secret the tier builds; a replica URL only where the tier has
/// that purpose's pool; the only Secret volumes are the digests one, which holds no
/// token, and with TLS the TLS Secret's `ca.crt` alone; no password or token appears
/// anywhere in the Deployment.
#[test]
fn every_tier_gives_the_data_plane_its_logins_by_reference_and_only_token_digests() {
    use umstore_migrations::roles::Purpose;
    let creds = Credentials::fixed_for_tests();
    for tier in 1..=4 {
        let objects = objects(tier);
        let secrets: Vec<&k8s_openapi::api::core::v1::Secret> = objects
            .iter()
            .filter_map(|o| match o {
                Object::Secret(s) => Some(s),
                _ => None,
            })
            .collect();
        let secret_has = |name: &str, key: &str| {
            secrets.iter().any(|s| {
                s.metadata.name.as_deref() == Some(name)
                    && s.data.as_ref().is_some_and(|d| d.contains_key(key))
            })
        };
        let deployment = objects
            .iter()
            .find_map(|o| match o {
                Object::Deployment(d)
                    if d.metadata
                        .name
                        .as_deref()
                        .is_some_and(|n| n.ends_with("-data-plane")) =>
                {
                    Some(d)
                }
                _ => None,
            })
            .expect("data-plane Deployment");
        let rendered = serde_json::to_string(deployment).expect("json");
        for secret in creds.passwords.values().map(String::as_str).chain(
            Purpose::ALL
                .iter()
                .filter_map(|p| creds.api_tokens.token(*p)),
        ) {
            assert!(
                !rendered.contains(secret),
                "tier {tier}: a secret in the pod spec"
            );
        }
        let pod = deployment.spec.template.spec.as_ref().expect("pod");
        let env = pod.containers[0].env.clone().unwrap_or_default();
        let reference = |name: &str| {
            env.iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
                .map(|s| (s.name.clone(), s.key.clone()))
        };
        let has_pool = |pool: &str| {
            objects.iter().any(|o| {
                o.key().ends_with(&format!("-replica-{pool}"))
                    && o.key().starts_with("StatefulSet/")
            })
        };
        for (prefix, pool) in [
            ("AI", Some("ai")),
            ("RULES", Some("ai")),
            ("JSON_GENERATOR", Some("ai")),
            ("DASHBOARD", Some("analytics")),
            ("ANALYTICS", Some("analytics")),
            ("ADMIN", None),
        ] {
            let (secret, key) = reference(&format!("UMSTORE_{prefix}_DATABASE_URL"))
                .unwrap_or_else(|| panic!("tier {tier}: UMSTORE_{prefix}_DATABASE_URL"));
            assert_eq!(key, "primary-uri");
            assert!(secret_has(&secret, &key), "tier {tier}: {secret}/{key}");
            let replica = reference(&format!("UMSTORE_{prefix}_REPLICA_URL"));
            if pool.is_some_and(has_pool) {
                let (r_secret, r_key) = replica.expect("replica URL where the pool exists");
                assert_eq!(
                    (r_secret.as_str(), r_key.as_str()),
                    (secret.as_str(), "uri")
                );
            } else {
                assert!(replica.is_none(), "tier {tier}: {prefix} has no pool");
            }
        }
        let secret_volumes: Vec<&k8s_openapi::api::core::v1::SecretVolumeSource> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref())
            .collect();
        let volumes: Vec<&str> = secret_volumes
            .iter()
            .filter_map(|s| s.secret_name.as_deref())
            .collect();
        let tls = example(tier).spec.postgres.tls.map(|t| t.secret_name);
        assert_eq!(
            volumes.len(),
            1 + usize::from(tls.is_some()),
            "tier {tier}: {volumes:?}"
        );
        assert!(volumes[0].ends_with("-api-token-digests"));
        if let Some(tls) = &tls {
            // The TLS Secret's CA certificate only, never its key.
            assert_eq!(volumes[1], tls.as_str(), "tier {tier}");
            let keys: Vec<&str> = secret_volumes[1]
                .items
                .iter()
                .flatten()
                .map(|i| i.key.as_str())
                .collect();
            assert_eq!(keys, ["ca.crt"], "tier {tier}");
        }
        let digests = secrets
            .iter()
            .find(|s| s.metadata.name.as_deref() == Some(volumes[0]))
            .expect("the digests Secret is built");
        let data = serde_json::to_string(&digests.data).expect("json");
        assert!(
            Purpose::ALL
                .iter()
                .filter_map(|p| creds.api_tokens.token(*p))
                .all(|t| !data.contains(t)),
            "tier {tier}: a token in the digests"
        );
        assert!(
            !objects.iter().any(|o| o.key().ends_with("-api-tokens")),
            "the tokens Secret is the credentials step's, not the topology's"
        );
    }
}

/// From tier 3 every PostgreSQL pod is in one Patroni cluster (Patroni's Citus
/// integration finds the coordinator and every group's primary within a scope),
/// its group set apart by `citus.group`, and each read-write Service selects its
/// own group's primary only.
#[test]
fn tier3_groups_share_one_patroni_scope_and_services_select_their_own_group() {
    use umstore_operator::builders::patroni::{
        CITUS_GROUP_LABEL, GROUP_LABEL, ROLE_LABEL, SCOPE_LABEL,
    };
    let objects = objects(3);
    let config_map = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) if c.metadata.name.as_deref() == Some("national-patroni") => {
                Some(c)
            }
            _ => None,
        })
        .expect("the Patroni ConfigMap");
    let mut groups = Vec::new();
    for (key, text) in config_map.data.iter().flatten() {
        let config: serde_json::Value = serde_yaml_ng::from_str(text).expect("patroni.yml");
        assert_eq!(config["scope"], "national-citus", "{key}");
        assert_eq!(
            config["kubernetes"]["labels"][SCOPE_LABEL],
            "national-citus"
        );
        assert!(
            config["kubernetes"]["labels"].get(GROUP_LABEL).is_none(),
            "{key}: Patroni would not see the other groups"
        );
        groups.push((
            key.clone(),
            config["citus"]["group"].as_i64().expect("citus group"),
        ));
    }
    groups.sort();
    assert!(groups.contains(&("national-coordinator.yml".into(), 0)));
    let mut worker_groups: Vec<i64> = groups
        .iter()
        .filter(|(k, _)| k.starts_with("national-worker-"))
        .map(|(_, g)| *g)
        .collect();
    worker_groups.sort();
    assert_eq!(worker_groups, [1, 2, 3, 4, 5]);

    for o in &objects {
        let Object::StatefulSet(s) = o else { continue };
        let name = s.metadata.name.clone().unwrap_or_default();
        if !name.starts_with("national-coordinator") && !name.starts_with("national-worker") {
            continue;
        }
        let labels = s
            .spec
            .template
            .metadata
            .as_ref()
            .and_then(|m| m.labels.clone())
            .unwrap_or_default();
        assert_eq!(
            labels.get(GROUP_LABEL),
            Some(&name),
            "{name}'s pods name their group"
        );
        // Patroni's Citus integration finds a group's members by this label.
        let citus_group = groups
            .iter()
            .find(|(key, _)| *key == format!("{name}.yml"))
            .map(|(_, g)| g.to_string())
            .unwrap_or_else(|| panic!("no patroni.yml for {name}"));
        assert_eq!(
            labels.get(CITUS_GROUP_LABEL),
            Some(&citus_group),
            "{name}'s pods carry the Citus group of their patroni.yml"
        );
    }
    for o in &objects {
        let Object::Service(s) = o else { continue };
        let name = s.metadata.name.clone().unwrap_or_default();
        let selector = s
            .spec
            .as_ref()
            .and_then(|spec| spec.selector.clone())
            .unwrap_or_default();
        if selector.get(ROLE_LABEL).map(String::as_str) != Some("primary") {
            continue;
        }
        assert!(
            selector.contains_key(GROUP_LABEL)
                || selector.contains_key("app.kubernetes.io/component"),
            "{name} would select every group's primary: {selector:?}"
        );
    }
}

/// The pod labels of every database StatefulSet, by name.
fn database_pods(objects: &[Object]) -> Vec<(String, std::collections::BTreeMap<String, String>)> {
    objects
        .iter()
        .filter_map(|o| match o {
            Object::StatefulSet(s) => Some((
                s.metadata.name.clone().unwrap_or_default(),
                s.spec
                    .template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.labels.clone())
                    .unwrap_or_default(),
            )),
            _ => None,
        })
        .collect()
}

fn selects(
    selector: &std::collections::BTreeMap<String, String>,
    labels: &std::collections::BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn tier4_clusters_each_run_their_own_citus_in_their_zones_and_select_only_their_own_pods() {
    use umstore_operator::builders::patroni::ROLE_LABEL;
    let tier3 = objects(3);
    let objects = objects(4);
    let pods = database_pods(&objects);
    // Home keeps the tier-3 names; the others are named after their cluster.
    for name in [
        "nationwide-coordinator",
        "nationwide-worker-north-1",
        "nationwide-worker-central",
        "nationwide-replica-ai",
        "nationwide-south-coordinator",
        "nationwide-south-worker-south",
        "nationwide-south-replica-ai",
        "nationwide-east-coordinator",
        "nationwide-west-replica-analytics",
    ] {
        assert!(pods.iter().any(|(n, _)| n == name), "no StatefulSet {name}");
    }
    // Each cluster its own Patroni scope (its own Citus), and its zones.
    let config_map = objects
        .iter()
        .find_map(|o| match o {
            Object::ConfigMap(c) if c.metadata.name.as_deref() == Some("nationwide-patroni") => {
                Some(c)
            }
            _ => None,
        })
        .expect("the Patroni ConfigMap");
    let scope_of = |key: &str| -> String {
        let text = &config_map.data.as_ref().expect("data")[key];
        let config: serde_json::Value = serde_yaml_ng::from_str(text).expect("patroni.yml");
        config["scope"].as_str().expect("scope").to_string()
    };
    assert_eq!(scope_of("nationwide-coordinator.yml"), "nationwide-citus");
    assert_eq!(
        scope_of("nationwide-worker-central.yml"),
        "nationwide-citus"
    );
    assert_eq!(
        scope_of("nationwide-south-coordinator.yml"),
        "nationwide-south-citus"
    );
    assert_eq!(
        scope_of("nationwide-south-worker-south.yml"),
        "nationwide-south-citus"
    );
    for o in &objects {
        let Object::StatefulSet(s) = o else { continue };
        let name = s.metadata.name.clone().unwrap_or_default();
        let spec = s.spec.template.spec.as_ref().expect("pod spec");
        let zones: Vec<String> = spec
            .affinity
            .as_ref()
            .and_then(|a| a.node_affinity.as_ref())
            .and_then(|n| {
                n.required_during_scheduling_ignored_during_execution
                    .as_ref()
            })
            .map(|s| {
                s.node_selector_terms
                    .iter()
                    .flat_map(|t| t.match_expressions.iter().flatten())
                    .flat_map(|e| e.values.iter().flatten().cloned())
                    .collect()
            })
            .unwrap_or_default();
        let want: &[&str] = if name.starts_with("nationwide-south-") {
            &["ap-south-1a", "ap-south-1b"]
        } else if name.starts_with("nationwide-east-") {
            &["ap-east-1a"]
        } else if name.starts_with("nationwide-west-") {
            &["ap-west-1a", "ap-west-1b"]
        } else if name.starts_with("nationwide-data-plane") {
            &[]
        } else {
            &["ap-south-2a", "ap-south-2b"]
        };
        assert_eq!(zones, want, "{name} runs in its cluster's zones");
        if name.starts_with("nationwide-south-") {
            assert_eq!(
                spec.node_selector
                    .as_ref()
                    .and_then(|n| n.get("umstore.io/residency")),
                Some(&"south".to_string()),
                "{name}"
            );
            assert!(
                spec.tolerations.is_some(),
                "{name} tolerates the south nodes"
            );
        }
    }
    // Home's StatefulSets keep the tier-3 selectors (immutable); no Service or
    // PodDisruptionBudget of one cluster selects another cluster's pods.
    let cluster_of = |name: &str| -> &str {
        ["south", "east", "west"]
            .into_iter()
            .find(|c| name.starts_with(&format!("nationwide-{c}-")))
            .unwrap_or("north")
    };
    for o in &objects {
        let (name, selector) = match o {
            Object::Service(s) => (
                s.metadata.name.clone().unwrap_or_default(),
                s.spec.as_ref().and_then(|s| s.selector.clone()),
            ),
            Object::PodDisruptionBudget(p) => (
                p.metadata.name.clone().unwrap_or_default(),
                p.spec
                    .as_ref()
                    .and_then(|s| s.selector.as_ref())
                    .and_then(|s| s.match_labels.clone()),
            ),
            _ => continue,
        };
        let Some(mut selector) = selector else {
            continue;
        };
        selector.remove(ROLE_LABEL);
        if !(name.contains("coordinator") || name.contains("worker") || name.contains("replica")) {
            continue;
        }
        let selected: Vec<&String> = pods
            .iter()
            .filter(|(_, labels)| selects(&selector, labels))
            .map(|(n, _)| n)
            .collect();
        assert!(!selected.is_empty(), "{name} selects no pods");
        for pod in selected {
            assert_eq!(
                cluster_of(pod),
                cluster_of(&name),
                "{name} selects {pod}'s pods, of another cluster"
            );
        }
    }
    let home_selector = |objects: &[Object], name: &str| {
        objects.iter().find_map(|o| match o {
            Object::StatefulSet(s) if s.metadata.name.as_deref() == Some(name) => {
                s.spec.selector.match_labels.clone()
            }
            _ => None,
        })
    };
    let mut t3 = home_selector(&tier3, "national-coordinator").expect("tier-3 coordinator");
    let t4 = home_selector(&objects, "nationwide-coordinator").expect("home coordinator");
    t3.insert("app.kubernetes.io/instance".into(), "nationwide".into());
    assert_eq!(t3, t4, "the home coordinator's selector is the tier-3 one");
}

#[test]
fn tier4_data_plane_gets_a_cluster_layout_it_accepts_with_each_region_in_its_cluster() {
    let tier4 = objects(4);
    let deployment = tier4
        .iter()
        .find_map(|o| match o {
            Object::Deployment(d)
                if d.metadata.name.as_deref() == Some("nationwide-data-plane") =>
            {
                Some(d)
            }
            _ => None,
        })
        .expect("the data plane");
    let pod = deployment.spec.template.spec.as_ref().expect("pod spec");
    let value = pod.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "UMSTORE_CLUSTERS")
        .and_then(|e| e.value.clone())
        .expect("UMSTORE_CLUSTERS");
    // The data plane's own parser: the contract between the two.
    let layout = umstore_data_plane::clusters::Layout::parse(&value).expect("the layout parses");
    assert!(layout.is_multi());
    let names: Vec<&str> = layout.clusters().iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["north", "west", "south", "east"], "home first");
    let south = layout.index_of("south").expect("south");
    assert_eq!(layout.cluster_of("KA"), Some(south));
    assert_eq!(layout.cluster_of("DL"), Some(0));
    let c = &layout.clusters()[south];
    assert_eq!(c.primary.host, "nationwide-pgbouncer.umstore.svc");
    assert_eq!(c.primary.dbname.as_deref(), Some("umstore_south"));
    assert!(c
        .replicas
        .values()
        .all(|e| e.host.starts_with("nationwide-south-replica-")));
    // Every region of the store in exactly one cluster.
    assert_eq!(
        layout
            .clusters()
            .iter()
            .map(|c| c.regions.len())
            .sum::<usize>(),
        36
    );
    // Below tier 4 (and at tier 4 without clusters) nothing is added.
    for tier in 1..=3 {
        assert!(
            !render(&objects(tier)).contains("UMSTORE_CLUSTERS"),
            "tier {tier}"
        );
    }
}
