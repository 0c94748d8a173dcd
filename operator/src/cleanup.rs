//! What the finalizer does before the store goes: honour `reclaimPolicy`.
//!
//! - `Retain` (default): PVCs stay (StatefulSets set `whenDeleted: Retain`) and the
//!   credential and connection Secrets are orphaned (owner reference removed) so
//!   garbage collection keeps them: the data and its passwords survive.
//! - `Delete`: nothing is orphaned; garbage collection removes every owned object
//!   and the StatefulSets' `whenDeleted: Delete` removes the PVCs.

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use tracing::info;
use umstore_crds::{ReclaimPolicy, UserMetadataStore};

use crate::context::Context;
use crate::error::Error;
use crate::meta::{Owner, MANAGER};
use crate::steps::Reason;

/// Removes `kind/name`'s owner references, so garbage collection keeps it, under
/// the operator's field manager like every other write.
async fn orphan<K>(api: &Api<K>, kind: &str, name: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = serde_json::json!({"metadata": {"ownerReferences": null}});
    api.patch(
        name,
        &PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        },
        &Patch::Merge(&patch),
    )
    .await
    .map_err(Error::kube(format!("orphaning {kind}/{name}")))?;
    Ok(())
}

/// Runs the cleanup of `store`.
pub async fn run(ctx: &Context, store: &UserMetadataStore) -> Result<Action, Error> {
    let name = store.metadata.name.clone().ok_or(Error::MissingMetadata)?;
    let namespace = store
        .metadata
        .namespace
        .clone()
        .ok_or(Error::MissingMetadata)?;
    let uid = store.metadata.uid.clone().unwrap_or_default();
    // A rotation still running for it stops here (its record in the database lets
    // a store restored from the same data resume it).
    ctx.rotations.forget(&uid);
    ctx.metrics.forget_store(&namespace, &name);
    let owner = Owner {
        name: name.clone(),
        namespace: namespace.clone(),
        uid: uid.clone(),
    };
    let note = match store.spec.reclaim_policy {
        ReclaimPolicy::Retain => {
            let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
            let secrets = api
                .list(&ListParams::default().labels(&owner.selector_string()))
                .await
                .map_err(Error::kube("listing Secrets to retain"))?;
            let mut kept = Vec::new();
            for secret in secrets.items {
                if !secret.owner_references().iter().any(|r| r.uid == uid) {
                    continue;
                }
                orphan(&api, "Secret", &secret.name_any()).await?;
                kept.push(secret.name_any());
            }
            // The backup repository volume, when there is one: the backups outlive
            // the store (it is created without an owner under Retain; one made
            // while the policy was Delete has one to remove).
            let claims: Api<PersistentVolumeClaim> =
                Api::namespaced(ctx.client.clone(), &namespace);
            let claim = crate::builders::backup::repo_claim_name(&name);
            let volume_repo = store
                .spec
                .backup
                .as_ref()
                .is_some_and(|b| b.repository.volume.is_some());
            let pvc = if volume_repo {
                claims.get_opt(&claim).await.map_err(Error::kube(format!(
                    "reading PersistentVolumeClaim/{claim}"
                )))?
            } else {
                None
            };
            if let Some(pvc) = pvc {
                if pvc.owner_references().iter().any(|r| r.uid == uid) {
                    orphan(&claims, "PersistentVolumeClaim", &claim).await?;
                }
                kept.push(format!("PersistentVolumeClaim/{claim}"));
            }
            format!(
                "reclaimPolicy Retain: PersistentVolumeClaims and Secrets {} are kept",
                if kept.is_empty() {
                    "(none)".to_string()
                } else {
                    kept.join(", ")
                }
            )
        }
        ReclaimPolicy::Delete => {
            "reclaimPolicy Delete: every owned object and PersistentVolumeClaim is deleted".into()
        }
    };
    info!(%namespace, %name, "{note}");
    let event = Event {
        type_: EventType::Normal,
        reason: Reason::Deleting.as_str().into(),
        note: Some(note),
        action: "Cleanup".into(),
        secondary: None,
    };
    if let Err(error) = ctx.recorder.publish(&event, &store.object_ref(&())).await {
        tracing::warn!(%error, "could not publish the Deleting Event");
    }
    Ok(Action::await_change())
}
