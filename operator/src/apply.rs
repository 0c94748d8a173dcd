//! The thin layer between the pure builders and the API server: observe what the
//! store owns, server-side apply what differs (one field manager, `force`), create
//! once-only objects, and delete what is no longer wanted by owner uid.
//!
//! "Differs" compares the desired object with the live one listed at the start of
//! the reconcile: every field the operator sets must be there with the same value
//! ([`in_sync`]); fields the API server defaults or other managers own are
//! ignored, as server-side apply ignores them. So a steady-state reconcile writes
//! nothing, and a hand edit of a field the operator owns (a StatefulSet scaled by
//! hand, a ConfigMap edited, a Service's selector changed) is put back on the next
//! reconcile. The [`APPLIED_HASH`] annotation (the SHA-256 of the desired object)
//! tells the two apart: same hash but different content means the live object was
//! edited by hand.

use std::collections::{BTreeMap, BTreeSet};

use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::{Client, ResourceExt};

use k8s_openapi::api::core::v1::Pod;

use crate::builders::patroni::SCOPE_LABEL;
use crate::builders::{owned_kinds, Object};
use crate::error::Error;
use crate::meta::{hash_of, APPLIED_HASH, INSTANCE_LABEL, MANAGER};

/// `(kind, name)`.
pub type ObjectKey = (String, String);

/// What the store owns now, by kind and name (one LIST per owned kind).
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Objects by `(kind, name)`.
    pub objects: BTreeMap<ObjectKey, DynamicObject>,
}

impl Observed {
    /// The observed object of `kind` named `name`.
    pub fn get(&self, kind: &str, name: &str) -> Option<&DynamicObject> {
        self.objects.get(&(kind.to_string(), name.to_string()))
    }
}

/// Lists every owned kind in `namespace` with the store's label selector.
///
/// CronJobs (the backup schedules) are listed only for a store that has or had
/// backups (`backups`): the other stores own none, and at fleet scale every LIST
/// of a reconcile counts.
pub async fn observe(
    client: &Client,
    namespace: &str,
    selector: &str,
    backups: bool,
) -> Result<Observed, Error> {
    let mut observed = Observed::default();
    // Served from the API server's watch cache (resourceVersion 0) rather than a
    // consistent read: a LIST a moment behind is safe here (an absent object is
    // applied, which changes nothing if it exists; a credential Secret is created
    // only if absent and read back on a conflict; a stale drift is one no-op
    // apply), and a consistent read is what makes LISTs expensive at fleet scale.
    let params = ListParams::default().labels(selector).match_any();
    for ar in owned_kinds() {
        if !backups && ar.kind == "CronJob" {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
        let list = api
            .list(&params)
            .await
            .map_err(Error::kube(format!("listing {}", ar.plural)))?;
        for obj in list.items {
            observed
                .objects
                .insert((ar.kind.clone(), obj.name_any()), obj);
        }
    }
    Ok(observed)
}

/// Every pod of the store (its instance label): the database pods carry the state
/// Patroni publishes on them; the others are read only to say why a workload is
/// not ready.
pub async fn observe_pods(
    client: &Client,
    namespace: &str,
    store: &str,
) -> Result<Vec<Pod>, Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("{INSTANCE_LABEL}={store}");
    let list = api
        .list(&ListParams::default().labels(&selector).match_any())
        .await
        .map_err(Error::kube("listing the store's pods"))?;
    Ok(list.items)
}

/// The database pods among `pods` (those with a Patroni scope label).
pub fn database_pods(pods: &[Pod]) -> Vec<Pod> {
    pods.iter()
        .filter(|p| p.labels().contains_key(SCOPE_LABEL))
        .cloned()
        .collect()
}

/// The desired object as JSON with its [`APPLIED_HASH`] annotation set.
pub fn with_hash(object: &Object) -> Result<(serde_json::Value, String), Error> {
    let mut value = object.to_value().map_err(|source| Error::Serialize {
        what: object.key(),
        source,
    })?;
    let hash = hash_of(&value);
    if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
        let annotations = meta
            .entry("annotations")
            .or_insert_with(|| serde_json::json!({}));
        if let Some(map) = annotations.as_object_mut() {
            map.insert(
                APPLIED_HASH.to_string(),
                serde_json::Value::String(hash.clone()),
            );
        }
    }
    Ok((value, hash))
}

/// Whether every field of `desired` is in `live` with the same value. Objects are
/// compared key by key (keys only in `live` are the API server's defaults or other
/// managers' fields); lists element by element and of the same length; an empty
/// list or map, `false`, 0 or "" in `desired` matches an absent one (the API server
/// omits them); numbers by value.
pub fn in_sync(desired: &serde_json::Value, live: &serde_json::Value) -> bool {
    first_drift(desired, live).is_none()
}

/// The path (`spec.replicas`, `spec.ports[0].port`) of the first field where `live`
/// differs from `desired` under the rules of [`in_sync`], if any.
pub fn first_drift(desired: &serde_json::Value, live: &serde_json::Value) -> Option<String> {
    use serde_json::Value;
    let join = |prefix: &str, key: &str| {
        if prefix.is_empty() {
            key.to_string()
        } else {
            format!("{prefix}.{key}")
        }
    };
    fn walk(
        d: &Value,
        l: &Value,
        at: String,
        join: &dyn Fn(&str, &str) -> String,
    ) -> Option<String> {
        match (d, l) {
            (Value::Object(d), Value::Object(l)) => d.iter().find_map(|(k, dv)| match l.get(k) {
                Some(lv) => walk(dv, lv, join(&at, k), join),
                None if is_empty(dv) => None,
                None => Some(join(&at, k)),
            }),
            (Value::Array(d), Value::Array(l)) if d.len() == l.len() => d
                .iter()
                .zip(l)
                .enumerate()
                .find_map(|(i, (dv, lv))| walk(dv, lv, format!("{at}[{i}]"), join)),
            (Value::Number(dn), Value::Number(ln)) if dn == ln || dn.as_f64() == ln.as_f64() => {
                None
            }
            (Value::Null, _) => None,
            (d, Value::Null) if is_empty(d) => None,
            (d, l) if d == l => None,
            _ => Some(at),
        }
    }
    walk(desired, live, String::new(), &join)
}

/// Whether `v` is a value the API server omits (Go's `omitempty`: null, false,
/// 0, "", an empty list or map), so that its absence in the live object is no drift.
fn is_empty(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Null => true,
        serde_json::Value::Bool(b) => !b,
        serde_json::Value::Number(n) => n.as_f64() == Some(0.0),
        serde_json::Value::String(s) => s.is_empty(),
        serde_json::Value::Array(a) => a.is_empty(),
        serde_json::Value::Object(o) => o.is_empty(),
    }
}

/// What [`apply`] did with one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The live object already matched: no request.
    Unchanged,
    /// Created, or changed because the spec changed.
    Updated,
    /// The spec did not change but the live object had been edited: put back.
    /// Names the first field found edited.
    DriftCorrected(String),
}

/// Server-side applies `object` unless the live copy already carries every field
/// it sets.
pub async fn apply(
    client: &Client,
    namespace: &str,
    object: &Object,
    observed: &Observed,
) -> Result<Applied, Error> {
    let ar = object.api_resource();
    let (value, hash) = with_hash(object)?;
    let live = observed.get(&ar.kind, object.name());
    let drifted = match live {
        Some(live) => {
            let live_value = serde_json::to_value(live).map_err(|source| Error::Serialize {
                what: object.key(),
                source,
            })?;
            let mut desired = value.clone();
            // List items carry no apiVersion/kind.
            if let Some(map) = desired.as_object_mut() {
                map.remove("apiVersion");
                map.remove("kind");
            }
            let Some(field) = first_drift(&desired, &live_value) else {
                return Ok(Applied::Unchanged);
            };
            tracing::debug!(object = %object.key(), %field, "differs from the desired object");
            (live.annotations().get(APPLIED_HASH) == Some(&hash)).then_some(field)
        }
        None => None,
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    api.patch(
        object.name(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&value),
    )
    .await
    .map_err(Error::kube(format!("applying {}", object.key())))?;
    Ok(drifted.map_or(Applied::Updated, Applied::DriftCorrected))
}

/// Creates `object` if absent; an existing one is left exactly as it is.
/// Returns whether it was created.
pub async fn create_if_absent(
    client: &Client,
    namespace: &str,
    object: &Object,
) -> Result<bool, Error> {
    let ar = object.api_resource();
    let value = object.to_value().map_err(|source| Error::Serialize {
        what: object.key(),
        source,
    })?;
    let obj: DynamicObject = serde_json::from_value(value).map_err(|source| Error::Serialize {
        what: object.key(),
        source,
    })?;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    match api
        .create(
            &PostParams {
                field_manager: Some(MANAGER.into()),
                ..PostParams::default()
            },
            &obj,
        )
        .await
    {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(source) => Err(Error::Kube {
            action: format!("creating {}", object.key()),
            source,
        }),
    }
}

/// Whether `obj` is controlled by the store with uid `owner_uid`.
pub fn owned_by(obj: &DynamicObject, owner_uid: &str) -> bool {
    obj.owner_references()
        .iter()
        .any(|r| r.uid == owner_uid && r.controller == Some(true))
}

/// Observed objects controlled by `owner_uid` that are not in `desired`, in reverse
/// apply order (workloads before the configuration they read).
pub fn unwanted<'a>(
    observed: &'a Observed,
    desired: &BTreeSet<ObjectKey>,
    owner_uid: &str,
) -> Vec<(&'a str, &'a DynamicObject)> {
    let kinds = owned_kinds();
    let mut out: Vec<(usize, &str, &DynamicObject)> = observed
        .objects
        .iter()
        .filter(|(key, obj)| !desired.contains(*key) && owned_by(obj, owner_uid))
        .map(|((kind, _), obj)| {
            (
                kinds.iter().position(|k| &k.kind == kind).unwrap_or(0),
                kind.as_str(),
                obj,
            )
        })
        .collect();
    out.sort_by_key(|(pos, _, obj)| (std::cmp::Reverse(*pos), obj.name_any()));
    out.into_iter().map(|(_, kind, o)| (kind, o)).collect()
}

/// The [`ApiResource`] of an observed object's kind.
pub fn api_resource_of_kind(kind: &str) -> Option<ApiResource> {
    owned_kinds().into_iter().find(|k| k.kind == kind)
}

/// Deletes an observed object, on condition that its uid is still the one observed
/// (a same-named object created since is left alone).
pub async fn delete(
    client: &Client,
    namespace: &str,
    kind: &str,
    obj: &DynamicObject,
) -> Result<(), Error> {
    let Some(ar) = api_resource_of_kind(kind) else {
        return Ok(());
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: obj.uid(),
            resource_version: None,
        }),
        ..DeleteParams::background()
    };
    match api.delete(&obj.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(source) => Err(Error::Kube {
            action: format!("deleting {kind}/{}", obj.name_any()),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::in_sync;

    #[test]
    fn defaults_and_foreign_fields_are_in_sync() {
        let desired = json!({"spec": {"replicas": 2, "ports": [{"port": 5432}], "args": [],
                                      "readOnly": false}});
        let live = json!({"spec": {"replicas": 2, "ports": [{"port": 5432, "protocol": "TCP"}],
                                   "clusterIP": "10.0.0.1"}, "status": {"readyReplicas": 2}});
        assert!(in_sync(&desired, &live));
    }

    #[test]
    fn a_changed_or_missing_field_or_element_is_drift() {
        let desired = json!({"spec": {"replicas": 2, "ports": [{"port": 5432}]}});
        for live in [
            json!({"spec": {"replicas": 3, "ports": [{"port": 5432}]}}),
            json!({"spec": {"ports": [{"port": 5432}]}}),
            json!({"spec": {"replicas": 2, "ports": [{"port": 5433}]}}),
            json!({"spec": {"replicas": 2, "ports": []}}),
            json!({"spec": {"replicas": 2, "ports": [{"port": 5432}, {"port": 1}]}}),
        ] {
            assert!(!in_sync(&desired, &live), "{live}");
        }
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(in_sync(&json!({"a": 1}), &json!({"a": 1.0})));
    }
}
