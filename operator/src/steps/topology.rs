//! Step 3, topology: server-side applies every desired object that differs from
//! its live copy (a spec change, or a hand edit put back) and deletes, by owner
//! uid, the objects no longer wanted. A removed worker group is kept until it
//! holds no regions (`status.placement`), and the step says so.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::{Journal, Outcome, Reason, Waiting};
use crate::apply::{self, Applied, ObjectKey, Observed};
use crate::builders::api_tokens::tokens_secret_name;
use crate::builders::credentials::Role;
use crate::builders::Object;
use crate::context::Context;
use crate::error::Error;
use crate::meta::WORKER_GROUP_LABEL;
use crate::validated::Validated;

/// How often a store whose objects the API server refused is looked at again.
pub const REJECTED_RECHECK: Duration = Duration::from_secs(300);
/// How often a store with a draining worker group is looked at again.
pub const DRAINING_RECHECK: Duration = Duration::from_secs(60);

/// What the next steps learn from the topology step.
#[derive(Clone, Debug, PartialEq)]
pub struct Provisioned {
    /// How many objects the tier has.
    pub objects: usize,
    /// The coordinator StatefulSet's name.
    pub coordinator: String,
    /// Whether it had a ready replica when the reconcile started.
    pub coordinator_ready: bool,
}

/// Runs the step. `placement` is the regions each worker group held at the last
/// status (`status.placement`).
pub async fn run(
    ctx: &Context,
    v: &Validated,
    desired: &[Object],
    observed: &Observed,
    placement: &BTreeMap<String, Vec<String>>,
    journal: &mut Journal,
) -> Result<Outcome<Provisioned>, Error> {
    let namespace = &v.owner.namespace;

    // An object the API server refuses as invalid (typically an immutable StatefulSet
    // field such as the storage size) is reported, not retried in a hot loop; the
    // others are still applied.
    let mut rejected = Vec::new();
    let mut applied = Vec::new();
    let mut corrected = Vec::new();
    for object in desired {
        match apply::apply(&ctx.client, namespace, object, observed).await {
            Ok(Applied::Unchanged) => {}
            Ok(Applied::Updated) => applied.push(object.key()),
            Ok(Applied::DriftCorrected(field)) => corrected.push((object.key(), field)),
            Err(Error::Kube {
                source: kube::Error::Api(status),
                ..
            }) if status.code == 422 => {
                rejected.push(format!("{}: {}", object.key(), status.message));
            }
            Err(e) => return Err(e),
        }
    }

    let mut wanted: BTreeSet<ObjectKey> = desired
        .iter()
        .map(|o| (o.api_resource().kind, o.name().to_string()))
        .collect();
    // Role Secrets and the API tokens are the credentials step's; they are never
    // garbage-collected here.
    wanted.extend(
        Role::ALL
            .iter()
            .map(|role| ("Secret".to_string(), role.secret_name(&v.owner))),
    );
    wanted.insert(("Secret".to_string(), tokens_secret_name(&v.owner)));
    // Nor the backup passphrase and TLS material, even once spec.backup is gone:
    // the backups already made can only be read with that passphrase.
    wanted.insert((
        "Secret".to_string(),
        crate::builders::backup::passphrase_secret_name(&v.owner),
    ));
    wanted.insert((
        "Secret".to_string(),
        crate::builders::backup::tls_secret_name(&v.owner),
    ));

    let mut draining: BTreeMap<&str, &[String]> = BTreeMap::new();
    let mut deleted = Vec::new();
    for (kind, obj) in apply::unwanted(observed, &wanted, &v.owner.uid) {
        let held = obj.labels().get(WORKER_GROUP_LABEL).and_then(|group| {
            placement
                .get_key_value(group)
                .filter(|(_, regions)| !regions.is_empty())
        });
        if let Some((group, regions)) = held {
            draining.insert(group, regions);
            continue;
        }
        apply::delete(&ctx.client, namespace, kind, obj).await?;
        deleted.push(format!("{kind}/{}", obj.name_any()));
    }

    if !applied.is_empty() {
        journal.event(
            EventType::Normal,
            Reason::Applied,
            format!("applied {}", applied.join(", ")),
        );
    }
    if !corrected.is_empty() {
        journal.event(
            EventType::Warning,
            Reason::DriftCorrected,
            format!(
                "put back {}: edited by hand, they differed from what the spec asks for \
                 (change the UserMetadataStore instead)",
                corrected
                    .iter()
                    .map(|(key, field)| format!("{key} ({field})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
    }
    if !deleted.is_empty() {
        journal.event(
            EventType::Normal,
            Reason::Deleted,
            format!("deleted {} (no longer in the spec)", deleted.join(", ")),
        );
    }
    journal.applied.extend(applied);
    journal
        .applied
        .extend(corrected.into_iter().map(|(key, _)| key));
    journal.deleted.extend(deleted);

    if !rejected.is_empty() {
        return Ok(Outcome::Waiting(Waiting::new(
            Reason::ApplyRejected,
            format!(
                "the API server refused {}; a StatefulSet's storage size, storage class and \
                 volume templates cannot change in place: revert that field",
                rejected.join("; ")
            ),
            Some(REJECTED_RECHECK),
        )));
    }
    if !draining.is_empty() {
        let groups: Vec<String> = draining
            .iter()
            .map(|(g, regions)| format!("'{g}' still holds {}", regions.join(", ")))
            .collect();
        return Ok(Outcome::Waiting(Waiting::new(
            Reason::WorkerGroupDraining,
            format!(
                "removed worker groups are kept until their regions move to other groups: {}",
                groups.join("; ")
            ),
            Some(DRAINING_RECHECK),
        )));
    }
    let coordinator = v.owner.child("coordinator");
    let coordinator_ready = ready_replicas(observed, "StatefulSet", &coordinator) >= 1;
    Ok(Outcome::Done(Provisioned {
        objects: desired.len(),
        coordinator,
        coordinator_ready,
    }))
}

/// `status.readyReplicas` of an observed workload (0 when absent).
pub fn ready_replicas(observed: &Observed, kind: &str, name: &str) -> i32 {
    observed
        .get(kind, name)
        .and_then(|obj| obj.data.get("status"))
        .and_then(|s| s.get("readyReplicas"))
        .and_then(serde_json::Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(0)
}
