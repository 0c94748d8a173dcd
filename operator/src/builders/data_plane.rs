//! The data plane: Deployment (with GPU scheduling from the spec), its Service and
//! ServiceAccount (the identity Vault's Kubernetes auth checks).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SecretKeySelector, SecretVolumeSource, SecurityContext, Service,
    ServiceAccount, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use umstore_crds::{
    DataPlaneSpec, EncryptionSpec, EventsSpec, GpuSpec, ReadCacheSpec, TlsSpec, VaultAuthSpec,
};

use super::api_tokens::{digests_hash, digests_secret_name, ApiTokens};
use super::credentials::{pool_of, Role, CLIENT_CA_DIR, PRIMARY_URI_KEY, URI_KEY};
use crate::meta::{API_PORT, CONFIG_HASH};
use crate::validated::{Events, Validated};

const COMPONENT: &str = "data-plane";

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// `name` from `key` of Secret `secret`, which must exist (the pod does not start
/// without it): the value never appears in the pod spec.
fn from_secret(name: &str, secret: String, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret,
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn uri_from(name: &str, secret: String) -> EnvVar {
    from_secret(name, secret, URI_KEY)
}

fn http_probe(path: &str, period: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        ..Probe::default()
    }
}

/// Environment of the data plane, in the names its CLI reads (`umstore-data-plane
/// serve`): the write URI from the writer's connection Secret and each reading
/// purpose's logins from its own (never in the pod spec), the directory of API
/// token digests, Vault with Kubernetes auth, and Vault required (no local key file
/// in a cluster). Tier, regions and eligibility TTL are passed as well.
fn environment(v: &Validated) -> Vec<EnvVar> {
    let owner = &v.owner;
    let EncryptionSpec {
        vault_address,
        auth,
        transit_mount,
        key_name,
        rotation_interval: _,
    } = &v.spec.encryption;
    let VaultAuthSpec {
        mount_path: _,
        role,
    } = auth;
    let mut vars = vec![
        uri_from(
            "UMSTORE_DATABASE_URL",
            Role::Writer.connection_secret_name(owner),
        ),
        env("UMSTORE_API_TOKENS_DIR", API_TOKENS_DIR),
    ];
    vars.extend(read_environment(v));
    vars.extend([
        env("UMSTORE_DATA_DIR", DATA_DIR),
        env("UMSTORE_REQUIRE_VAULT", "true"),
        env("UMSTORE_TRANSIT_MOUNT", transit_mount.clone()),
        env("UMSTORE_TRANSIT_KEY", key_name.clone()),
        env("UMSTORE_VAULT_K8S_ROLE", role.clone()),
        // The tier whose endpoints the Secrets name: a switch to the pooler rolls the pods.
        env("UMSTORE_TIER", v.endpoint_tier.to_string()),
        env("UMSTORE_REGIONS", v.spec.regions.join(",")),
        env(
            "UMSTORE_ELIGIBILITY_CACHE_TTL",
            v.spec.eligibility_cache_ttl.clone(),
        ),
    ]);
    vars.extend(read_cache_environment(v));
    // Several clusters: where each region's rows are (docs/operator.md).
    if let Some(layout) = super::clusters::env_value(v) {
        vars.push(env("UMSTORE_CLUSTERS", layout));
    }
    if let Some(views) = crate::steps::views::schedule(v) {
        vars.extend([
            env("UMSTORE_STATS_REFRESH_INTERVAL", views.refresh_interval),
            env("UMSTORE_STATS_MAX_AGE", views.max_age),
        ]);
    }
    if let Some(addr) = vault_address {
        vars.push(env("UMSTORE_VAULT_ADDR", addr.clone()));
    }
    if let Some(events) = &v.events {
        vars.extend(events_environment(events));
    }
    vars
}

/// The read cache's settings: `spec.dataPlane.readCache`, else on from tier 4 with
/// its defaults. Nothing when the cache is off, so the pods of a store without one
/// keep the environment they had.
fn read_cache_environment(v: &Validated) -> Vec<EnvVar> {
    let cache = match &v.spec.data_plane.read_cache {
        Some(cache) => cache.clone(),
        None if v.tier >= 4 => ReadCacheSpec::default(),
        None => return Vec::new(),
    };
    if cache.entries <= 0 {
        return Vec::new();
    }
    vec![
        env("UMSTORE_READ_CACHE_ENTRIES", cache.entries.to_string()),
        env("UMSTORE_READ_CACHE_TTL", cache.ttl),
        env("UMSTORE_READ_CACHE_VERIFY", cache.verify.as_arg()),
    ]
}

/// The roles the read API reads as, one per reading purpose (SPEC §7).
const READERS: [Role; 6] = [
    Role::Ai,
    Role::Rules,
    Role::JsonGenerator,
    Role::Dashboard,
    Role::Analytics,
    Role::AdminLogin,
];

/// `UMSTORE_<P>_DATABASE_URL` for each reading purpose P: its own login on the
/// read-write endpoint (`primary-uri` of its connection Secret); and
/// `UMSTORE_<P>_REPLICA_URL`, the same login on its replica pool (`uri`), where
/// this tier has that pool.
fn read_environment(v: &Validated) -> Vec<EnvVar> {
    let owner = &v.owner;
    let mut vars = Vec::new();
    for role in READERS {
        let prefix = role.purpose_slug().to_uppercase().replace('-', "_");
        let secret = role.connection_secret_name(owner);
        vars.push(from_secret(
            &format!("UMSTORE_{prefix}_DATABASE_URL"),
            secret.clone(),
            PRIMARY_URI_KEY,
        ));
        if pool_of(v, role).is_some() {
            vars.push(from_secret(
                &format!("UMSTORE_{prefix}_REPLICA_URL"),
                secret,
                URI_KEY,
            ));
        }
    }
    vars
}

/// Keys of the NATS credentials Secret (`spec.events.credentialsSecret`).
pub const NATS_USERNAME_KEY: &str = "username";
/// See [`NATS_USERNAME_KEY`].
pub const NATS_PASSWORD_KEY: &str = "password";

/// The bus settings of SPEC §5, in the names the data plane reads. Every setting is
/// passed, defaults included, so the pod spec says what the data plane runs with.
/// Without `spec.events` none is set and the data plane ingests over HTTP only.
fn events_environment(events: &Events) -> Vec<EnvVar> {
    let Events {
        spec:
            EventsSpec {
                nats_url,
                subject_prefix,
                stream_prefix,
                credentials_secret,
                workers,
                max_age: _, // as parsed by validate, below
            },
        max_age,
    } = events;
    let mut vars = vec![env("UMSTORE_NATS_URL", nats_url.clone())];
    if let Some(secret) = credentials_secret {
        vars.push(from_secret(
            "UMSTORE_NATS_USER",
            secret.clone(),
            NATS_USERNAME_KEY,
        ));
        vars.push(from_secret(
            "UMSTORE_NATS_PASSWORD",
            secret.clone(),
            NATS_PASSWORD_KEY,
        ));
    }
    vars.extend([
        env("UMSTORE_EVENTS_SUBJECT_PREFIX", subject_prefix.clone()),
        env("UMSTORE_EVENTS_STREAM_PREFIX", stream_prefix.clone()),
        env("UMSTORE_INGEST_WORKERS", workers.to_string()),
        env("UMSTORE_EVENTS_MAX_AGE", duration_text(*max_age)),
    ]);
    vars
}

/// A duration in its largest whole unit (`7d`, `36h`, `90m`, `45s`), so the data
/// plane reads one number and one unit whatever form the spec used (`1d12h`).
fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    match [(86_400, "d"), (3_600, "h"), (60, "m")]
        .into_iter()
        .find(|(unit, _)| secs > 0 && secs.is_multiple_of(*unit))
    {
        Some((unit, suffix)) => format!("{}{suffix}", secs / unit),
        None => format!("{secs}s"),
    }
}

/// The bulk engine of the worker (docs/operator.md, "GPU"): a store with
/// `spec.dataPlane.gpu` runs `--engine auto`, which takes the GPU when the pod
/// can use one and says on /metrics (`umstore_bulk_engine_info`) when it
/// could not, rather than `gpu`, which would keep the API down on a node whose
/// driver or runtime class is wrong. Without a GPU nothing is added (the
/// default, `auto`, is the CPU there), so those pods are not rolled.
fn engine_args(gpu: Option<&GpuSpec>) -> Vec<String> {
    match gpu {
        Some(_) => vec!["--engine".into(), "auto".into()],
        None => Vec::new(),
    }
}

/// Writable scratch directory of the data plane (the root filesystem is read-only).
const DATA_DIR: &str = "/var/lib/umstore";

/// Where the API token digests are mounted (read-only): `UMSTORE_API_TOKENS_DIR`.
pub const API_TOKENS_DIR: &str = "/etc/umstore/api-tokens";

/// The Deployment `<store>-data-plane`. Its pod template carries a hash of the API
/// token digests: the data plane reads them at start, so new tokens roll its pods.
pub fn deployment(v: &Validated, tokens: &ApiTokens) -> Deployment {
    let owner = &v.owner;
    let labels = owner.component_labels(COMPONENT);
    let DataPlaneSpec {
        image,
        replicas,
        resources,
        gpu,
        read_cache: _, // environment
    } = &v.spec.data_plane;
    let mut resources = resources.clone().unwrap_or_else(|| ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity("250m".into())),
            ("memory".to_string(), Quantity("256Mi".into())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_string(),
            Quantity("1Gi".into()),
        )])),
        ..ResourceRequirements::default()
    });
    let mut node_selector = None;
    let mut tolerations = None;
    let mut runtime_class_name = None;
    if let Some(GpuSpec {
        count,
        resource_name,
        node_selector: ns,
        tolerations: t,
        runtime_class_name: rc,
    }) = gpu
    {
        if *count > 0 {
            resources
                .limits
                .get_or_insert_with(BTreeMap::new)
                .insert(resource_name.clone(), Quantity(count.to_string()));
        }
        node_selector = (!ns.is_empty()).then(|| ns.clone());
        tolerations = (!t.is_empty()).then(|| t.clone());
        runtime_class_name = rc.clone();
    }
    let mut mounts = vec![
        VolumeMount {
            name: "data".into(),
            mount_path: DATA_DIR.into(),
            ..VolumeMount::default()
        },
        VolumeMount {
            name: "api-tokens".into(),
            mount_path: API_TOKENS_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        },
    ];
    let mut volumes = vec![
        Volume {
            name: "data".into(),
            empty_dir: Some(EmptyDirVolumeSource::default()),
            ..Volume::default()
        },
        // The digests only: a pod never holds a usable token.
        Volume {
            name: "api-tokens".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(digests_secret_name(owner)),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        },
    ];
    // The CA its connection URIs name as `sslrootcert`: only `ca.crt` of the TLS
    // Secret, never the server's key.
    if let Some(TlsSpec { secret_name }) = &v.spec.postgres.tls {
        mounts.push(VolumeMount {
            name: "postgres-tls".into(),
            mount_path: CLIENT_CA_DIR.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
        volumes.push(Volume {
            name: "postgres-tls".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret_name.clone()),
                items: Some(vec![KeyToPath {
                    key: "ca.crt".into(),
                    path: "ca.crt".into(),
                    ..KeyToPath::default()
                }]),
                optional: Some(false),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
    }
    let mut args = vec![
        "serve".into(),
        "--listen".into(),
        format!("0.0.0.0:{API_PORT}"),
        // The operator's migrate step applies migrations as the admin role; the
        // data plane waits for the schema it was built for.
        "--no-migrate".into(),
    ];
    args.extend(engine_args(gpu.as_ref()));
    let container = Container {
        name: "data-plane".into(),
        image: Some(image.clone()),
        args: Some(args),
        env: Some(environment(v)),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: API_PORT,
            ..ContainerPort::default()
        }]),
        resources: Some(resources),
        readiness_probe: Some(http_probe("/readyz", 5)),
        liveness_probe: Some(http_probe("/healthz", 15)),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        ..Container::default()
    };
    Deployment {
        metadata: owner.object_meta(&owner.child("data-plane"), labels.clone()),
        spec: DeploymentSpec {
            replicas: Some(*replicas),
            selector: LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    annotations: Some(BTreeMap::from([(
                        CONFIG_HASH.to_string(),
                        digests_hash(tokens),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(owner.child("data-plane")),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        ..PodSecurityContext::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    node_selector,
                    tolerations,
                    runtime_class_name,
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        status: None,
    }
}

/// The Service `<store>-api`: the data plane's HTTP API.
pub fn service(v: &Validated) -> Service {
    super::services::component_service(v, "api", COMPONENT, "http", API_PORT)
}

/// The ServiceAccount `<store>-data-plane`.
pub fn service_account(v: &Validated) -> ServiceAccount {
    let owner = &v.owner;
    ServiceAccount {
        metadata: owner.object_meta(
            &owner.child("data-plane"),
            owner.component_labels(COMPONENT),
        ),
        ..ServiceAccount::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validated::validate;
    use serde_json::{json, Value};
    use umstore_crds::UserMetadataStore;

    fn validated(spec: Value) -> Validated {
        let store: UserMetadataStore = serde_json::from_value(json!({
            "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
            "metadata": {"name": "s", "namespace": "ns", "uid": "u1", "generation": 1},
            "spec": spec,
        }))
        .expect("store");
        validate(&store).expect("valid")
    }

    fn container_env(v: &Validated) -> Vec<EnvVar> {
        let deployment = deployment(v, &ApiTokens::fixed_for_tests());
        let pod = deployment.spec.template.spec.expect("pod");
        pod.containers[0].env.clone().expect("env")
    }

    fn value<'a>(vars: &'a [EnvVar], name: &str) -> Option<&'a str> {
        vars.iter()
            .find(|e| e.name == name)
            .and_then(|e| e.value.as_deref())
    }

    /// `(secret, key)` of a variable read from a Secret; fails if it carries a value.
    fn secret_ref<'a>(vars: &'a [EnvVar], name: &str) -> Option<(&'a str, &'a str)> {
        let var = vars.iter().find(|e| e.name == name)?;
        assert_eq!(var.value, None, "{name} must not carry the value");
        let selector = var.value_from.as_ref()?.secret_key_ref.as_ref()?;
        assert_eq!(selector.optional, Some(false), "{name}");
        Some((selector.name.as_str(), selector.key.as_str()))
    }

    const READ_PURPOSES: [(&str, &str); 6] = [
        ("AI", "ai"),
        ("RULES", "rules"),
        ("JSON_GENERATOR", "json-generator"),
        ("DASHBOARD", "dashboard"),
        ("ANALYTICS", "analytics"),
        ("ADMIN", "admin"),
    ];

    /// A tier-4 spec (one worker group holding every region).
    fn tier4(data_plane: Value) -> Value {
        json!({
            "tier": 4,
            "regions": ["KA", "TN"],
            "workerGroups": [{"name": "south", "regions": ["KA", "TN"]}],
            "dataPlane": data_plane,
        })
    }

    fn container_args(v: &Validated) -> Vec<String> {
        let deployment = deployment(v, &ApiTokens::fixed_for_tests());
        let pod = deployment.spec.template.spec.expect("pod");
        pod.containers[0].args.clone().expect("args")
    }

    #[test]
    fn a_store_with_a_gpu_runs_its_worker_with_the_engine_on_auto() {
        let gpu = validated(tier4(json!({"gpu": {"count": 1}})));
        let args = container_args(&gpu);
        let at = args.iter().position(|a| a == "--engine").expect("--engine");
        assert_eq!(
            args.get(at + 1).map(String::as_str),
            Some("auto"),
            "{args:?}"
        );
        assert_eq!(args[0], "serve");
        // Without a GPU: no flag (serve's default, auto, is the CPU there).
        let cpu = validated(tier4(json!({})));
        assert!(!container_args(&cpu).iter().any(|a| a == "--engine"));
    }

    #[test]
    fn the_read_cache_is_on_from_tier_4_unless_the_spec_turns_it_off() {
        let cache = |spec: Value| {
            let vars = container_env(&validated(spec));
            ["ENTRIES", "TTL", "VERIFY"]
                .map(|k| value(&vars, &format!("UMSTORE_READ_CACHE_{k}")).map(str::to_owned))
        };
        let on = |entries: &str, ttl: &str, verify: &str| {
            [entries, ttl, verify].map(|v| Some(v.to_owned()))
        };
        assert_eq!(cache(tier4(json!({}))), on("20000", "30s", "version"));
        assert_eq!(cache(json!({})), [None, None, None], "off below tier 4");
        assert_eq!(
            cache(json!({"dataPlane": {"readCache": {"entries": 500}}})),
            on("500", "30s", "version"),
            "asked for below tier 4"
        );
        assert_eq!(
            cache(tier4(json!({"readCache": {"entries": 0}}))),
            [None, None, None],
            "turned off at tier 4"
        );
        let mut memory_only = tier4(json!({"readCache": {"ttl": "5m", "verify": "None"}}));
        memory_only["events"] = json!({"natsUrl": "nats://nats.messaging.svc:4222"});
        assert_eq!(cache(memory_only), on("20000", "5m", "none"));
    }

    #[test]
    fn the_stats_views_are_refreshed_from_tier_4_or_when_the_spec_asks() {
        let views = |spec: Value| {
            let vars = container_env(&validated(spec));
            ["REFRESH_INTERVAL", "MAX_AGE"]
                .map(|k| value(&vars, &format!("UMSTORE_STATS_{k}")).map(str::to_owned))
        };
        let on = |interval: &str, max_age: &str| [interval, max_age].map(|v| Some(v.to_owned()));
        assert_eq!(views(tier4(json!({}))), on("10m", "30m"));
        assert_eq!(views(json!({})), [None, None], "not below tier 4");
        assert_eq!(
            views(json!({"statsViews": {"refreshInterval": "2m", "maxAge": "5m"}})),
            on("2m", "5m"),
            "asked for below tier 4"
        );
    }

    #[test]
    fn each_reading_purpose_reads_as_its_own_login_on_the_primary() {
        let vars = container_env(&validated(json!({})));
        assert_eq!(
            secret_ref(&vars, "UMSTORE_DATABASE_URL"),
            Some(("s-conn-writer", "uri"))
        );
        for (prefix, slug) in READ_PURPOSES {
            let name = format!("UMSTORE_{prefix}_DATABASE_URL");
            let secret = format!("s-conn-{slug}");
            assert_eq!(
                secret_ref(&vars, &name),
                Some((secret.as_str(), "primary-uri")),
                "{name}"
            );
            let replica = format!("UMSTORE_{prefix}_REPLICA_URL");
            assert_eq!(secret_ref(&vars, &replica), None, "tier 1 has no pools");
        }
        assert!(
            !vars
                .iter()
                .any(|e| e.name.ends_with("_DATABASE_URL") && e.name.starts_with("UMSTORE_READ_")),
            "no variables the data plane does not read"
        );
    }

    #[test]
    fn a_purpose_with_a_pool_in_the_tier_also_gets_its_replica_url() {
        let vars = container_env(&validated(json!({
            "tier": 2,
            "replicaPools": [{"purpose": "ai", "replicas": 2}],
        })));
        for (prefix, slug) in READ_PURPOSES {
            let secret = format!("s-conn-{slug}");
            let replica = secret_ref(&vars, &format!("UMSTORE_{prefix}_REPLICA_URL"));
            match slug {
                "ai" | "rules" | "json-generator" => {
                    assert_eq!(replica, Some((secret.as_str(), "uri")), "{slug}")
                }
                _ => assert_eq!(replica, None, "{slug}: no analytics pool, admin has none"),
            }
            assert_eq!(
                secret_ref(&vars, &format!("UMSTORE_{prefix}_DATABASE_URL")),
                Some((secret.as_str(), "primary-uri")),
                "{slug}"
            );
        }
    }

    #[test]
    fn the_pod_mounts_only_the_token_digests_read_only() {
        let v = validated(json!({}));
        let tokens = ApiTokens::fixed_for_tests();
        let pod = deployment(&v, &tokens).spec.template.spec.expect("pod");
        let container = &pod.containers[0];
        let vars = container.env.clone().expect("env");
        assert_eq!(value(&vars, "UMSTORE_API_TOKENS_DIR"), Some(API_TOKENS_DIR));
        let mount = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == API_TOKENS_DIR)
            .expect("tokens mount");
        assert_eq!(mount.read_only, Some(true));
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .expect("tokens volume");
        let secret = volume.secret.as_ref().expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("s-api-token-digests"));
        let secret_volumes: Vec<&str> = pod
            .volumes
            .iter()
            .flatten()
            .filter_map(|v| v.secret.as_ref()?.secret_name.as_deref())
            .collect();
        assert_eq!(secret_volumes, ["s-api-token-digests"], "never the tokens");
        assert!(
            !vars.iter().any(|e| e
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
                .is_some_and(|s| s.name == "s-api-tokens")),
            "no token in the environment"
        );
    }

    #[test]
    fn with_tls_the_pod_mounts_only_the_ca_certificate_read_only() {
        let v = validated(json!({"postgres": {"tls": {"secretName": "s-tls"}}}));
        let pod = deployment(&v, &ApiTokens::fixed_for_tests())
            .spec
            .template
            .spec
            .expect("pod");
        let mount = pod.containers[0]
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == CLIENT_CA_DIR)
            .expect("CA mount");
        assert_eq!(mount.read_only, Some(true));
        let secret = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mount.name)
            .and_then(|v| v.secret.clone())
            .expect("a Secret volume");
        assert_eq!(secret.secret_name.as_deref(), Some("s-tls"));
        let keys: Vec<&str> = secret
            .items
            .iter()
            .flatten()
            .map(|i| i.key.as_str())
            .collect();
        assert_eq!(keys, ["ca.crt"], "never tls.key");
    }

    #[test]
    fn new_tokens_roll_the_pods() {
        let v = validated(json!({}));
        let template = |tokens: &ApiTokens| deployment(&v, tokens).spec.template.metadata;
        let fixed = ApiTokens::fixed_for_tests();
        let fresh = ApiTokens::generate().expect("entropy");
        assert_eq!(template(&fixed), template(&fixed.clone()));
        assert_ne!(template(&fixed), template(&fresh));
    }

    const BUS_VARS: [&str; 7] = [
        "UMSTORE_NATS_URL",
        "UMSTORE_NATS_USER",
        "UMSTORE_NATS_PASSWORD",
        "UMSTORE_EVENTS_SUBJECT_PREFIX",
        "UMSTORE_EVENTS_STREAM_PREFIX",
        "UMSTORE_INGEST_WORKERS",
        "UMSTORE_EVENTS_MAX_AGE",
    ];

    #[test]
    fn without_events_the_data_plane_gets_no_bus_settings() {
        let vars = container_env(&validated(json!({})));
        let bus: Vec<&str> = vars
            .iter()
            .map(|e| e.name.as_str())
            .filter(|n| BUS_VARS.contains(n))
            .collect();
        assert!(bus.is_empty(), "{bus:?}");
    }

    #[test]
    fn events_reach_the_data_plane_with_their_defaults() {
        let vars = container_env(&validated(
            json!({"events": {"natsUrl": "nats://nats.messaging.svc:4222"}}),
        ));
        for (name, expected) in [
            ("UMSTORE_NATS_URL", "nats://nats.messaging.svc:4222"),
            ("UMSTORE_EVENTS_SUBJECT_PREFIX", "umstore.events"),
            ("UMSTORE_EVENTS_STREAM_PREFIX", "UMSTORE"),
            ("UMSTORE_INGEST_WORKERS", "4"),
            ("UMSTORE_EVENTS_MAX_AGE", "7d"),
        ] {
            assert_eq!(value(&vars, name), Some(expected), "{name}");
        }
        assert!(
            !vars
                .iter()
                .any(|e| e.name == "UMSTORE_NATS_USER" || e.name == "UMSTORE_NATS_PASSWORD"),
            "no credentials without a Secret"
        );
    }

    #[test]
    fn events_settings_are_passed_as_written() {
        let vars = container_env(&validated(json!({"events": {
            "natsUrl": "tls://nats.example.org:4443",
            "subjectPrefix": "prod.umstore",
            "streamPrefix": "PROD_UMSTORE",
            "workers": 16,
            "maxAge": "72h",
        }})));
        for (name, expected) in [
            ("UMSTORE_NATS_URL", "tls://nats.example.org:4443"),
            ("UMSTORE_EVENTS_SUBJECT_PREFIX", "prod.umstore"),
            ("UMSTORE_EVENTS_STREAM_PREFIX", "PROD_UMSTORE"),
            ("UMSTORE_INGEST_WORKERS", "16"),
            ("UMSTORE_EVENTS_MAX_AGE", "3d"),
        ] {
            assert_eq!(value(&vars, name), Some(expected), "{name}");
        }
    }

    #[test]
    fn nats_credentials_come_from_the_secret_by_reference() {
        let vars = container_env(&validated(json!({"events": {
            "natsUrl": "nats://nats.messaging.svc:4222",
            "credentialsSecret": "umstore-nats",
        }})));
        for (name, key) in [
            ("UMSTORE_NATS_USER", "username"),
            ("UMSTORE_NATS_PASSWORD", "password"),
        ] {
            let var = vars.iter().find(|e| e.name == name).expect(name);
            assert_eq!(var.value, None, "{name} must not carry the value");
            let selector = var
                .value_from
                .as_ref()
                .and_then(|f| f.secret_key_ref.as_ref())
                .expect("secretKeyRef");
            assert_eq!(selector.name, "umstore-nats");
            assert_eq!(selector.key, key);
            assert_eq!(selector.optional, Some(false));
        }
    }

    #[test]
    fn max_age_is_passed_in_its_largest_whole_unit() {
        for (spec, rendered) in [
            ("7d", "7d"),
            ("1d12h", "36h"),
            ("48h", "2d"),
            ("90m", "90m"),
            ("120s", "2m"),
            ("1m30s", "90s"),
        ] {
            let vars = container_env(&validated(json!({"events": {
                "natsUrl": "nats://nats:4222", "maxAge": spec,
            }})));
            assert_eq!(
                value(&vars, "UMSTORE_EVENTS_MAX_AGE"),
                Some(rendered),
                "{spec}"
            );
        }
    }
}
