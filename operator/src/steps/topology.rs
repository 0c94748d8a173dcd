//! Step 3, topology: server-side applies every object of the tier that changed and
//! deletes, by owner uid, the objects no longer wanted. A removed worker group is
//! kept until it holds no regions (`status.placement`), and the step says so.

use std::collections::BTreeSet;
use std::time::Duration;

use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::{Reconciliation, StepOutcome};
use crate::apply::{self, ObjectKey};
use crate::builders::credentials::Role;
use crate::builders::{self};
use crate::context::Context;
use crate::error::Error;
use crate::meta::WORKER_GROUP_LABEL;

/// Runs the step.
pub async fn run(ctx: &Context, r: &mut Reconciliation<'_>) -> Result<StepOutcome, Error> {
    let v = r.validated.clone().ok_or(Error::MissingMetadata)?;
    let desired = builders::topology(&v, &r.credentials, &ctx.env);
    let observed = r.observed(ctx).await?.clone();
    let namespace = &v.owner.namespace;

    // An object the API server refuses as invalid (typically an immutable StatefulSet
    // field such as the storage size) is reported, not retried in a hot loop; the
    // others are still applied.
    let mut rejected = Vec::new();
    for object in &desired {
        match apply::apply(&ctx.client, namespace, object, &observed).await {
            Ok(true) => r.applied.push(object.key()),
            Ok(false) => {}
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
    // Role Secrets are the credentials step's; they are never garbage-collected here.
    wanted.extend(
        Role::ALL
            .iter()
            .map(|role| ("Secret".to_string(), role.secret_name(&v.owner))),
    );

    let placement = r
        .store
        .status
        .as_ref()
        .map(|s| s.placement.clone())
        .unwrap_or_default();
    for (kind, obj) in apply::unwanted(&observed, &wanted, &v.owner.uid) {
        let held = obj.labels().get(WORKER_GROUP_LABEL).and_then(|group| {
            placement
                .get(group)
                .filter(|regions| !regions.is_empty())
                .map(|rs| (group, rs))
        });
        if let Some((group, regions)) = held {
            r.draining.insert(group.clone(), regions.clone());
            continue;
        }
        apply::delete(&ctx.client, namespace, kind, obj).await?;
        r.deleted.push(format!("{kind}/{}", obj.name_any()));
    }

    if !r.applied.is_empty() {
        r.event(
            EventType::Normal,
            "Applied",
            format!("applied {}", r.applied.join(", ")),
        );
    }
    if !r.deleted.is_empty() {
        r.event(
            EventType::Normal,
            "Deleted",
            format!("deleted {} (no longer in the spec)", r.deleted.join(", ")),
        );
    }
    r.desired = desired;

    if !rejected.is_empty() {
        return Ok(StepOutcome::Waiting {
            reason: "ApplyRejected",
            message: format!(
                "the API server refused {}; a StatefulSet's storage size, storage class and \
                 volume templates cannot change in place: revert that field",
                rejected.join("; ")
            ),
            requeue_after: Some(Duration::from_secs(300)),
        });
    }
    if r.draining.is_empty() {
        return Ok(StepOutcome::Done);
    }
    let groups: Vec<String> = r
        .draining
        .iter()
        .map(|(g, regions)| format!("'{g}' still holds {}", regions.join(", ")))
        .collect();
    Ok(StepOutcome::Waiting {
        reason: "WorkerGroupDraining",
        message: format!(
            "removed worker groups are kept until their regions move to other groups: {}",
            groups.join("; ")
        ),
        requeue_after: Some(Duration::from_secs(60)),
    })
}
