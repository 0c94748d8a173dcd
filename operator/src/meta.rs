//! Names, labels and owner references shared by every builder, so that an object's
//! identity is decided in one place.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

/// The field manager of every server-side apply, and the `managed-by` label value.
pub const MANAGER: &str = "umstore-operator";
/// The finalizer that runs the reclaim policy.
pub const FINALIZER: &str = "umstore.io/cleanup";
/// Annotation holding the SHA-256 of the object as last applied; equal means skip.
pub const APPLIED_HASH: &str = "umstore.io/applied-hash";
/// Pod-template annotation with the hash of the configuration the pods read, so a
/// configuration change rolls the pods.
pub const CONFIG_HASH: &str = "umstore.io/config-hash";
/// Label on generated per-role credential Secrets: created once, never re-applied,
/// never deleted by the topology step.
pub const CREDENTIAL_LABEL: &str = "umstore.io/credential";
/// Label naming the worker group an object belongs to.
pub const WORKER_GROUP_LABEL: &str = "umstore.io/worker-group";
/// Label on the database pods of a tier-4 cluster other than the home cluster:
/// the cluster's name.
pub const CLUSTER_LABEL: &str = "umstore.io/cluster";
/// Label naming the replica pool (its purpose) a replica pod belongs to.
pub const REPLICA_POOL_LABEL: &str = "umstore.io/replica-pool";
/// Label naming the component (coordinator, worker, replica, pgbouncer, data-plane).
pub const COMPONENT_LABEL: &str = "app.kubernetes.io/component";
/// Label naming the store.
pub const INSTANCE_LABEL: &str = "app.kubernetes.io/instance";
/// Label naming the application.
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
/// Label naming who manages the object.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";

/// PostgreSQL port.
pub const PG_PORT: i32 = 5432;
/// PgBouncer port.
pub const PGBOUNCER_PORT: i32 = 6432;
/// postgres_exporter port.
pub const EXPORTER_PORT: i32 = 9187;
/// Data-plane HTTP port.
pub const API_PORT: i32 = 8080;
/// The application database.
pub use umstore_migrations::roles::DATABASE;

/// The identity of the store that owns an object: what every builder needs to name
/// and label it.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    /// Store name.
    pub name: String,
    /// Store namespace.
    pub namespace: String,
    /// Store uid.
    pub uid: String,
}

impl Owner {
    /// `<store>-<suffix>`.
    pub fn child(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }

    /// The selector labels every owned object carries.
    pub fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (NAME_LABEL.to_string(), "umstore".to_string()),
            (INSTANCE_LABEL.to_string(), self.name.clone()),
            (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
        ])
    }

    /// The label selector string listing every owned object.
    pub fn selector_string(&self) -> String {
        format!(
            "{NAME_LABEL}=umstore,{INSTANCE_LABEL}={},{MANAGED_BY_LABEL}={MANAGER}",
            self.name
        )
    }

    /// Labels of one component's objects.
    pub fn component_labels(&self, component: &str) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert(COMPONENT_LABEL.to_string(), component.to_string());
        labels
    }

    /// The controller owner reference to the store.
    pub fn owner_reference(&self) -> OwnerReference {
        OwnerReference {
            api_version: "umstore.io/v1alpha1".into(),
            kind: "UserMetadataStore".into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    /// Metadata for an owned object named `name` with `labels`.
    pub fn object_meta(&self, name: &str, labels: BTreeMap<String, String>) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner_reference()]),
            ..ObjectMeta::default()
        }
    }

    /// In-cluster DNS name of a Service of this store.
    pub fn service_host(&self, service: &str) -> String {
        format!("{service}.{}.svc", self.namespace)
    }
}

/// Hex SHA-256 of a serializable value (its JSON form).
pub fn hash_of<T: serde::Serialize>(value: &T) -> String {
    use sha2::{Digest, Sha256};
    // Serializing plain data structures to JSON cannot fail (string keys only).
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(bytes))
}
