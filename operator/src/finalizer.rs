//! The `umstore.io/cleanup` finalizer: added before the first pipeline run, and
//! removed once [`cleanup`](crate::cleanup) has honoured the reclaim policy. Both
//! patches are written under the operator's field manager, like every other write
//! (kube-runtime's `finalizer` helper writes without one), and carry a JSON-patch
//! `test` so a concurrent change to the finalizer list fails instead of being
//! overwritten.

use std::future::Future;

use json_patch::jsonptr;
use json_patch::{
    AddOperation, Patch as JsonPatch, PatchOperation, RemoveOperation, TestOperation,
};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::ResourceExt;
use umstore_crds::UserMetadataStore;

use crate::error::Error;
use crate::meta::{FINALIZER, MANAGER};

fn pointer(path: &str) -> Result<jsonptr::PointerBuf, Error> {
    jsonptr::PointerBuf::parse(path).map_err(|e| Error::Finalizer(format!("pointer {path}: {e}")))
}

/// Runs `apply` or `cleanup` for `store` as its finalizer state asks, adding or
/// removing the finalizer around them.
pub async fn reconcile<A, C>(
    api: &Api<UserMetadataStore>,
    store: &UserMetadataStore,
    apply: impl FnOnce() -> A,
    cleanup: impl FnOnce() -> C,
) -> Result<Action, Error>
where
    A: Future<Output = Result<Action, Error>>,
    C: Future<Output = Result<Action, Error>>,
{
    let name = store.name_any();
    let index = store.finalizers().iter().position(|f| f == FINALIZER);
    let deleting = store.metadata.deletion_timestamp.is_some();
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    match (index, deleting) {
        (Some(_), false) => apply().await,
        (None, true) => Ok(Action::await_change()),
        (Some(i), true) => {
            // The finalizer stays if cleanup fails: it is retried with backoff.
            let action = cleanup().await?;
            let path = format!("/metadata/finalizers/{i}");
            let patch = JsonPatch(vec![
                PatchOperation::Test(TestOperation {
                    path: pointer(&path)?,
                    value: FINALIZER.into(),
                }),
                PatchOperation::Remove(RemoveOperation {
                    path: pointer(&path)?,
                }),
            ]);
            api.patch(&name, &params, &Patch::Json::<()>(patch))
                .await
                .map_err(Error::kube(format!("removing the finalizer of {name}")))?;
            Ok(action)
        }
        (None, false) => {
            let finalizers = store.finalizers();
            let patch = JsonPatch(if finalizers.is_empty() {
                vec![
                    PatchOperation::Test(TestOperation {
                        path: pointer("/metadata/finalizers")?,
                        value: serde_json::Value::Null,
                    }),
                    PatchOperation::Add(AddOperation {
                        path: pointer("/metadata/finalizers")?,
                        value: vec![FINALIZER].into(),
                    }),
                ]
            } else {
                vec![
                    PatchOperation::Test(TestOperation {
                        path: pointer("/metadata/finalizers")?,
                        value: finalizers.into(),
                    }),
                    PatchOperation::Add(AddOperation {
                        path: pointer("/metadata/finalizers/-")?,
                        value: FINALIZER.into(),
                    }),
                ]
            });
            api.patch(&name, &params, &Patch::Json::<()>(patch))
                .await
                .map_err(Error::kube(format!("adding the finalizer to {name}")))?;
            // The patch changes the object, which triggers the next reconcile.
            Ok(Action::await_change())
        }
    }
}
