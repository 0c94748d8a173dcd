//! Pure builders: from a [`Validated`] store and its [`Credentials`] to every object of
//! its tier. Nothing here talks to the API server; the golden-file tests cover it.

pub mod api_tokens;
pub mod backup;
pub mod clusters;
pub mod credentials;
pub mod data_plane;
pub mod patroni;
pub mod pgbouncer;
pub mod pgconfig;
pub mod policy;
pub mod postgres;
pub mod services;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Secret, Service, ServiceAccount,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{Role as RbacRole, RoleBinding};
use kube::api::ApiResource;
use kube::Resource;
use umstore_crds::UserMetadataStoreSpec;

use self::credentials::{Credentials, Role};
use self::postgres::PgRole;
use crate::validated::Validated;

/// What the builders need from outside the store.
#[derive(Clone, Debug, PartialEq)]
pub struct Env {
    /// Namespace the operator runs in (allowed through the NetworkPolicy).
    pub operator_namespace: String,
}

/// One desired object.
#[derive(Clone, Debug, PartialEq)]
#[allow(clippy::large_enum_variant)]
pub enum Object {
    /// A ConfigMap.
    ConfigMap(ConfigMap),
    /// A Secret.
    Secret(Secret),
    /// A Service.
    Service(Service),
    /// A ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// A StatefulSet.
    StatefulSet(StatefulSet),
    /// A Deployment.
    Deployment(Deployment),
    /// A PodDisruptionBudget.
    PodDisruptionBudget(PodDisruptionBudget),
    /// A NetworkPolicy.
    NetworkPolicy(NetworkPolicy),
    /// A namespaced RBAC Role.
    Role(RbacRole),
    /// A RoleBinding.
    RoleBinding(RoleBinding),
    /// A CronJob (scheduled backups).
    CronJob(CronJob),
    /// A Job (the first backup; created once, not in the topology).
    Job(Job),
    /// A PersistentVolumeClaim (a backup repository; created once, not in the
    /// topology).
    PersistentVolumeClaim(PersistentVolumeClaim),
}

/// The kinds the operator creates, in apply order; observed and garbage-collected
/// by the topology step.
pub fn owned_kinds() -> [ApiResource; 11] {
    [
        ApiResource::erase::<ServiceAccount>(&()),
        ApiResource::erase::<RbacRole>(&()),
        ApiResource::erase::<RoleBinding>(&()),
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<Secret>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<PodDisruptionBudget>(&()),
        ApiResource::erase::<NetworkPolicy>(&()),
        ApiResource::erase::<CronJob>(&()),
    ]
}

macro_rules! each_object {
    ($self:ident, $o:ident => $e:expr) => {
        match $self {
            Object::ConfigMap($o) => $e,
            Object::Secret($o) => $e,
            Object::Service($o) => $e,
            Object::ServiceAccount($o) => $e,
            Object::StatefulSet($o) => $e,
            Object::Deployment($o) => $e,
            Object::PodDisruptionBudget($o) => $e,
            Object::NetworkPolicy($o) => $e,
            Object::Role($o) => $e,
            Object::RoleBinding($o) => $e,
            Object::CronJob($o) => $e,
            Object::Job($o) => $e,
            Object::PersistentVolumeClaim($o) => $e,
        }
    };
}

fn api_resource_of<K: Resource<DynamicType = ()>>(_: &K) -> ApiResource {
    ApiResource::erase::<K>(&())
}

impl Object {
    /// The object's name.
    pub fn name(&self) -> &str {
        each_object!(self, o => o.meta().name.as_deref().unwrap_or_default())
    }

    /// Its API resource (group, version, kind, plural).
    pub fn api_resource(&self) -> ApiResource {
        each_object!(self, o => api_resource_of(o))
    }

    /// `Kind/name`, for logs and events.
    pub fn key(&self) -> String {
        format!("{}/{}", self.api_resource().kind, self.name())
    }

    /// The object as JSON, with apiVersion and kind.
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        each_object!(self, o => serde_json::to_value(o))
    }
}

/// Every object of the store's tier, in apply order (configuration before the
/// workloads that read it). Role Secrets and the API tokens Secret are not here: the
/// credentials step creates them once.
pub fn topology(v: &Validated, creds: &Credentials, env: &Env) -> Vec<Object> {
    // Exhaustive: a new spec field fails to compile here until someone decides where it goes.
    let UserMetadataStoreSpec {
        tier: _,                  // v.tier, the effective tier, decides
        auto_promotion: _,        // read by the promotion logic (bootstrap issue)
        postgres: _,              // postgres::statefulset, pgconfig
        regions: _,               // data_plane env; distribution (distribute issue)
        worker_groups: _,         // each cluster view's, below
        replica_pools,            // below
        pgbouncer: _,             // pgbouncer
        data_plane,               // data_plane
        encryption: _,            // data_plane env; keys step (keys issue)
        migrations: _,            // migrate step (migrate issue)
        events: _,                // v.events (checked): data_plane env
        eligibility_cache_ttl: _, // data_plane env
        reclaim_policy: _,        // postgres PVC retention, finalizer
        backup: _,                // backup: ConfigMap, CronJobs, pod sidecar; backup step
        bootstrap: _,             // patroni bootstrap method, backup::restore_conf
        stats_views: _,           // data_plane env; views probe
        clusters: _,              // v.clusters (checked): the database workloads per cluster
    } = &v.spec;

    // The database workloads of each cluster, each built with its cluster's view of
    // the store (`v` itself for the home cluster or a store without clusters).
    let views: Vec<Validated> = v
        .clusters
        .iter()
        .filter(|c| !c.home)
        .map(|c| v.for_cluster(c))
        .collect();
    let mut workloads: Vec<(&Validated, PgRole<'_>)> = Vec::new();
    for view in std::iter::once(v).chain(views.iter()) {
        workloads.push((view, PgRole::Coordinator));
        workloads.extend(view.spec.worker_groups.iter().map(|g| {
            (
                view,
                PgRole::Worker {
                    group: &g.name,
                    replicas: g.replicas,
                },
            )
        }));
        let mut pools: Vec<_> = replica_pools.iter().collect();
        pools.sort_by_key(|p| p.purpose);
        workloads.extend(pools.iter().map(|p| {
            (
                view,
                PgRole::Replica {
                    purpose: p.purpose,
                    replicas: p.replicas,
                },
            )
        }));
    }

    let mut objects = vec![
        Object::ServiceAccount(data_plane::service_account(v)),
        Object::ServiceAccount(patroni::service_account(v)),
        Object::Role(patroni::role(v)),
        Object::RoleBinding(patroni::role_binding(v)),
        Object::ConfigMap(pgconfig::config_map(v)),
        Object::ConfigMap(patroni::config_map(v, &workloads)),
    ];
    objects.extend(backup::config_map(v).map(Object::ConfigMap));
    if v.pooled() {
        objects.push(Object::ConfigMap(pgbouncer::config_map(v)));
        objects.push(Object::Secret(pgbouncer::auth_secret(v, creds)));
    }
    objects.extend(
        Role::CLIENTS
            .iter()
            .map(|r| Object::Secret(credentials::connection_secret(v, *r, creds))),
    );
    objects.push(Object::Secret(api_tokens::digests_secret(
        &v.owner,
        &creds.api_tokens,
    )));
    for (view, role) in &workloads {
        objects.push(Object::Service(services::headless_service(view, role)));
        objects.push(Object::Service(services::client_service(view, role)));
    }
    if v.pooled() {
        objects.push(Object::Service(pgbouncer::service(v)));
    }
    objects.push(Object::Service(data_plane::service(v)));
    objects.extend(
        workloads
            .iter()
            .map(|(view, r)| Object::StatefulSet(postgres::statefulset(view, r))),
    );
    if v.pooled() {
        objects.push(Object::Deployment(pgbouncer::deployment(v, creds)));
    }
    objects.push(Object::Deployment(data_plane::deployment(
        v,
        &creds.api_tokens,
    )));
    for (view, role) in &workloads {
        if role.replicas(view) > 1 {
            objects.push(Object::PodDisruptionBudget(policy::pdb(
                view,
                &role.name(view),
                role.labels(view),
                role.selector(view),
            )));
        }
    }
    if v.pooled() && v.spec.pgbouncer.replicas > 1 {
        let o = &v.owner;
        objects.push(Object::PodDisruptionBudget(policy::pdb(
            v,
            &o.child("pgbouncer"),
            o.component_labels("pgbouncer"),
            o.component_labels("pgbouncer"),
        )));
    }
    if data_plane.replicas > 1 {
        let o = &v.owner;
        objects.push(Object::PodDisruptionBudget(policy::pdb(
            v,
            &o.child("data-plane"),
            o.component_labels("data-plane"),
            o.component_labels("data-plane"),
        )));
    }
    objects.extend(backup::cron_jobs(v).into_iter().map(Object::CronJob));
    objects.push(Object::NetworkPolicy(policy::postgres_network_policy(
        v,
        &env.operator_namespace,
    )));
    objects
}
