//! Last step, status: computes what is (tier, phase, conditions, components,
//! endpoints) and writes it through the status subresource with server-side apply,
//! only when it differs from what is there. Conditions keep `lastTransitionTime`
//! when their status did not change. Each step's condition (`Provisioned`,
//! `Bootstrapped`, `SchemaReady`) is true once the step finished and false with
//! the reason where the pipeline stopped. The replica lag is the probe's when it
//! measured, else the last one; fields later steps own (key versions, placement)
//! are carried over untouched.

pub mod causes;
mod compute;
pub mod groups;

pub use compute::{clusters, components, compute, endpoints, merge_conditions};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::ResourceExt;
use umstore_crds::{condition, UserMetadataStore};

use super::{Journal, Note, Progress, Reason};
use crate::context::Context;
use crate::error::Error;
use crate::meta::MANAGER;

/// `components` with the cause of each one that is not ready (see [`causes`]); a
/// cause that is new since the last status is also a Warning Event.
pub async fn diagnose(
    ctx: &Context,
    store: &UserMetadataStore,
    mut components: Vec<umstore_crds::ComponentStatus>,
    pods: Vec<k8s_openapi::api::core::v1::Pod>,
    journal: &mut Journal,
) -> Vec<umstore_crds::ComponentStatus> {
    let (Some(namespace), Some(name)) = (store.namespace(), store.metadata.name.as_deref()) else {
        return components;
    };
    let selector = format!("{}={name}", crate::meta::INSTANCE_LABEL);
    let evidence = causes::gather(&ctx.client, &namespace, &selector, &components, pods).await;
    let old = store
        .status
        .as_ref()
        .map(|s| s.components.as_slice())
        .unwrap_or_default();
    for component in components.iter_mut() {
        let Some(cause) = causes::explain(component, &evidence) else {
            continue;
        };
        let before = old
            .iter()
            .find(|c| c.name == component.name)
            .and_then(|c| c.message.as_deref());
        if before != Some(cause.message.as_str()) {
            journal.event(
                EventType::Warning,
                cause.reason,
                format!("{} {}: {}", component.kind, component.name, cause.message),
            );
        }
        component.message = Some(cause.message);
    }
    components
}

/// The Events announcing the conditions whose status or reason changed from `old`
/// to `new`: one per reason (Provisioned and Ready often fail for the same one).
pub fn transitions(old: &[Condition], new: &[Condition]) -> Vec<Note> {
    let mut notes: Vec<Note> = Vec::new();
    for c in new {
        let Some(reason) = Reason::ALL.iter().find(|r| r.as_str() == c.reason) else {
            continue;
        };
        if notes.iter().any(|n| n.reason == *reason) {
            continue;
        }
        let before = old.iter().find(|o| o.type_ == c.type_);
        if before.is_some_and(|b| b.status == c.status && b.reason == c.reason) {
            continue;
        }
        let healthy = match c.type_.as_str() {
            condition::DEGRADED => c.status == "False",
            condition::PROMOTING => true,
            _ => c.status == "True",
        };
        if before.is_none() && healthy && c.type_ == condition::DEGRADED {
            continue;
        }
        notes.push(Note {
            type_: if healthy {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: *reason,
            note: format!("{} {}: {}", c.type_, c.status, c.message),
        });
    }
    notes
}

/// Runs the step: computes the status, writes it if it changed, and queues an Event
/// for every condition whose status or reason changed. Returns whether it wrote.
pub async fn run(
    ctx: &Context,
    store: &UserMetadataStore,
    progress: &Progress,
    journal: &mut Journal,
) -> Result<bool, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let old = store.status.clone().unwrap_or_default();
    let status = compute(&old, store.metadata.generation, progress, &now);
    ctx.metrics.observe_store(store, &status);
    if status == old {
        return Ok(false);
    }
    journal
        .events
        .extend(transitions(&old.conditions, &status.conditions));
    for (group, before, now) in groups::leader_changes(&old.groups, &status.groups) {
        journal.event(
            EventType::Warning,
            Reason::LeaderChanged,
            format!(
                "{group}: the leader moved from {before} to {now} (a failover or a switchover)"
            ),
        );
    }
    let name = store.metadata.name.clone().ok_or(Error::MissingMetadata)?;
    let namespace = store
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingMetadata)?;
    let status = serde_json::to_value(status).map_err(|source| Error::Serialize {
        what: format!("the status of {namespace}/{name}"),
        source,
    })?;
    apply_status(&ctx.client, &namespace, &name, status).await?;
    Ok(true)
}

/// Server-side applies `status` to the store's status subresource with the
/// operator's field manager. Untyped, so it serves the objects that do not
/// deserialize too (reported as malformed).
pub(crate) async fn apply_status(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    status: serde_json::Value,
) -> Result<(), Error> {
    let ar = ApiResource::erase::<UserMetadataStore>(&());
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &ar);
    let patch = serde_json::json!({
        "apiVersion": "umstore.io/v1alpha1",
        "kind": "UserMetadataStore",
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(Error::kube(format!(
        "writing the status of {namespace}/{name}"
    )))?;
    Ok(())
}
