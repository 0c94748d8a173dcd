//! Reading a store and sending one change to it.

use kube::api::{Patch, PatchParams};
use umstore_crds::UserMetadataStore;

use crate::connect::Stores;
use crate::error::{Call, Error};

/// The field manager of every change this plugin makes (it shows in the store's
/// `metadata.managedFields`, so each change can be traced to it).
pub const FIELD_MANAGER: &str = "kubectl-umstore";

impl Stores {
    /// The store `name`, or an error naming the namespace and the name.
    pub async fn get(&self, name: &str) -> Result<UserMetadataStore, Error> {
        self.api
            .get(name)
            .await
            .map_err(|e| Error::from_kube(e, Call::Read, &self.namespace, name, "read"))
    }

    /// Sends `patch` as a JSON merge patch of store `name`, under [`FIELD_MANAGER`];
    /// `what` describes the change for a refusal.
    pub async fn merge_patch(
        &self,
        name: &str,
        patch: &serde_json::Value,
        what: &str,
    ) -> Result<UserMetadataStore, Error> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PatchParams::default()
        };
        self.api
            .patch(name, &params, &Patch::Merge(patch))
            .await
            .map_err(|e| Error::from_kube(e, Call::Change, &self.namespace, name, what))
    }
}
