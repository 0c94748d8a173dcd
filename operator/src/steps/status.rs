//! Last step, status: computes what is (tier, phase, conditions, components,
//! endpoints) and writes it through the status subresource with server-side apply,
//! only when it differs from what is there. Conditions keep `lastTransitionTime`
//! when their status did not change. Each step's condition (`Provisioned`,
//! `Bootstrapped`, `SchemaReady`) is true once the step finished and false with
//! the reason where the pipeline stopped. Fields later steps own (key versions,
//! replica lag, placement) are carried over untouched.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use umstore_crds::{
    condition, ComponentStatus, Endpoints, Phase, UserMetadataStore, UserMetadataStoreStatus,
};

use super::{Reconciliation, Step, StepOutcome};
use crate::builders::credentials::{read_write_endpoint, Role};
use crate::builders::Object;
use crate::context::Context;
use crate::error::Error;
use crate::meta::{API_PORT, MANAGER, PG_PORT};

/// Readiness of the desired workloads, from the objects observed at the start of the
/// reconcile (a workload created in this reconcile counts as not ready).
pub fn components(r: &Reconciliation<'_>) -> Vec<ComponentStatus> {
    let observed = r.observed_if_listed();
    let mut out: Vec<ComponentStatus> = r
        .desired
        .iter()
        .filter_map(|o| {
            let (kind, replicas) = match o {
                Object::StatefulSet(s) => ("StatefulSet", s.spec.replicas.unwrap_or(1)),
                Object::Deployment(d) => ("Deployment", d.spec.replicas.unwrap_or(1)),
                _ => return None,
            };
            let ready_replicas = observed
                .and_then(|obs| obs.get(kind, o.name()))
                .and_then(|obj| obj.data.get("status"))
                .and_then(|s| s.get("readyReplicas"))
                .and_then(serde_json::Value::as_i64)
                .and_then(|n| i32::try_from(n).ok())
                .unwrap_or(0);
            Some(ComponentStatus {
                name: o.name().to_string(),
                kind: kind.to_string(),
                replicas,
                ready_replicas,
                ready: ready_replicas >= replicas,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn endpoints(r: &Reconciliation<'_>) -> Option<Endpoints> {
    let v = r.validated.as_ref()?;
    let owner = &v.owner;
    let (host, port) = read_write_endpoint(v);
    Some(Endpoints {
        read_write: format!("{host}:{port}"),
        replica_pools: v
            .pool_purposes()
            .iter()
            .map(|p| {
                let service = owner.child(&format!("replica-{}", p.as_str()));
                (
                    p.as_str().to_string(),
                    format!("{}:{PG_PORT}", owner.service_host(&service)),
                )
            })
            .collect(),
        api: format!("{}:{API_PORT}", owner.service_host(&owner.child("api"))),
        secrets: Role::CLIENTS
            .iter()
            .map(|r| (r.slug().to_string(), r.connection_secret_name(owner)))
            .collect(),
    })
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Keeps each new condition's `lastTransitionTime` from the old one of the same type
/// when the status is unchanged; keeps old conditions of types this step does not
/// compute (later steps own them).
pub fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut merged: BTreeMap<String, Condition> =
        old.iter().map(|c| (c.type_.clone(), c.clone())).collect();
    for mut c in new {
        if let Some(prev) = merged.get(&c.type_) {
            if prev.status == c.status {
                c.last_transition_time = prev.last_transition_time.clone();
            }
        }
        merged.insert(c.type_.clone(), c);
    }
    merged.into_values().collect()
}

/// The status this reconcile observed, given the pipeline's final outcome.
pub fn compute(
    r: &Reconciliation<'_>,
    outcome: &StepOutcome,
    now: &Time,
) -> UserMetadataStoreStatus {
    let old = r.store.status.clone().unwrap_or_default();
    let generation = r.store.metadata.generation;
    let components = components(r);
    let all_ready = !components.is_empty() && components.iter().all(|c| c.ready);
    let invalid = matches!(
        outcome,
        StepOutcome::Waiting {
            reason: "InvalidSpec",
            ..
        }
    );

    let mut new_conditions = Vec::new();
    // Each step's condition: true once it finished, false with the pipeline's reason
    // where it stopped; the conditions of steps not reached are left as they were.
    let passed = |step: Step| r.passed.iter().find(|(s, _)| *s == step);
    let mut reached = true;
    for step in [Step::Provision, Step::Bootstrap, Step::Migrate] {
        if !reached {
            break;
        }
        match (passed(step), outcome) {
            (Some((_, message)), _) => {
                let (reason, message) = match step {
                    Step::Provision => (
                        "Applied",
                        format!(
                            "{} objects of tier {} are applied",
                            r.desired.len(),
                            r.validated.as_ref().map_or(0, |v| v.tier)
                        ),
                    ),
                    Step::Bootstrap => ("Bootstrapped", message.clone()),
                    Step::Migrate => ("Migrated", message.clone()),
                };
                new_conditions.push(condition(
                    step.condition(),
                    true,
                    reason,
                    message,
                    generation,
                    now,
                ));
            }
            (
                None,
                StepOutcome::Waiting {
                    reason, message, ..
                },
            ) => {
                new_conditions.push(condition(
                    step.condition(),
                    false,
                    reason,
                    message.clone(),
                    generation,
                    now,
                ));
                reached = false;
            }
            (None, StepOutcome::Done) => reached = false,
        }
    }
    let ready = if let StepOutcome::Waiting {
        reason, message, ..
    } = outcome
    {
        condition(
            condition::READY,
            false,
            reason,
            message.clone(),
            generation,
            now,
        )
    } else if all_ready {
        condition(
            condition::READY,
            true,
            "AllComponentsReady",
            format!("{} workloads ready", components.len()),
            generation,
            now,
        )
    } else {
        let waiting: Vec<String> = components
            .iter()
            .filter(|c| !c.ready)
            .map(|c| format!("{} {}/{}", c.name, c.ready_replicas, c.replicas))
            .collect();
        condition(
            condition::READY,
            false,
            "ComponentsNotReady",
            format!("waiting for {}", waiting.join(", ")),
            generation,
            now,
        )
    };
    new_conditions.push(ready);

    // A raised tier is a promotion until every component of the new tier is ready;
    // status.tier moves only then, so it always names the tier that is running.
    let target = r.validated.as_ref().map(|v| v.tier);
    let promoting_from = old.tier.filter(|t| target.is_some_and(|n| n > *t));
    // The tier's objects are in place once topology finished, even while later
    // steps (bootstrap, migrate) still wait.
    let provisioned = passed(Step::Provision).is_some();
    let promoted = provisioned && all_ready;
    let tier = match (provisioned, old.tier) {
        (true, None) => target,
        (true, Some(_)) if promoting_from.is_none() || promoted => target.or(old.tier),
        _ => old.tier,
    };
    if let (Some(from), Some(to)) = (promoting_from, target) {
        if !promoted {
            new_conditions.push(condition(
                condition::PROMOTING,
                true,
                "TierRaised",
                format!("promoting from tier {from} to tier {to}: waiting for the new components"),
                generation,
                now,
            ));
        } else {
            new_conditions.push(condition(
                condition::PROMOTING,
                false,
                "PromotionComplete",
                format!("running tier {to}"),
                generation,
                now,
            ));
        }
    }

    let mut degraded_reasons = Vec::new();
    if let Some(v) = &r.validated {
        if let Some(msg) = &v.demotion_refused {
            degraded_reasons.push(("DemotionRefused", msg.clone()));
        }
        if v.spec.encryption.vault_address.is_none() {
            degraded_reasons.push((
                "NoVault",
                "spec.encryption.vaultAddress is unset: the data plane refuses to start in Kubernetes \
                 without Vault (local keys are for development only); set a Vault or OpenBao address"
                    .to_string(),
            ));
        }
    }
    if !invalid {
        let degraded = match degraded_reasons.first() {
            Some((reason, _)) => {
                let message = degraded_reasons
                    .iter()
                    .map(|(_, m)| m.as_str())
                    .collect::<Vec<_>>()
                    .join("; ");
                condition(condition::DEGRADED, true, reason, message, generation, now)
            }
            None => condition(
                condition::DEGRADED,
                false,
                "AsExpected",
                "nothing needs attention",
                generation,
                now,
            ),
        };
        new_conditions.push(degraded);
    }

    let phase = if invalid {
        Phase::Invalid
    } else if !outcome.is_done() || !all_ready {
        Phase::Provisioning
    } else if !degraded_reasons.is_empty() {
        Phase::Degraded
    } else {
        Phase::Ready
    };

    UserMetadataStoreStatus {
        observed_generation: generation,
        tier,
        phase: Some(phase),
        conditions: merge_conditions(&old.conditions, new_conditions),
        components: if invalid {
            old.components.clone()
        } else {
            components
        },
        endpoints: endpoints(r).or(old.endpoints.clone()),
        schema_version: r.schema_version.or(old.schema_version),
        ..old
    }
}

/// Runs the step: computes the status, writes it if it changed, and queues an Event
/// for every condition whose status or reason changed.
pub async fn run(
    ctx: &Context,
    r: &mut Reconciliation<'_>,
    outcome: &StepOutcome,
) -> Result<bool, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = compute(r, outcome, &now);
    let old = r.store.status.clone().unwrap_or_default();
    if status == old {
        return Ok(false);
    }
    let mut announced: Vec<&str> = Vec::new();
    for c in &status.conditions {
        if announced.contains(&c.reason.as_str()) {
            continue; // Provisioned and Ready often fail for the same reason: one Event.
        }
        let before = old.conditions.iter().find(|o| o.type_ == c.type_);
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
        let type_ = if healthy {
            EventType::Normal
        } else {
            EventType::Warning
        };
        announced.push(&c.reason);
        r.event(
            type_,
            &c.reason,
            format!("{} {}: {}", c.type_, c.status, c.message),
        );
    }
    let name = r
        .store
        .metadata
        .name
        .clone()
        .ok_or(Error::MissingMetadata)?;
    let namespace = r
        .store
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(type_: &str, status: &str, reason: &str, time: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(
                k8s_openapi::jiff::Timestamp::from_second(time).unwrap_or_default(),
            ),
        }
    }

    #[test]
    fn unchanged_status_keeps_its_transition_time() {
        let old = vec![
            cond("Ready", "False", "ComponentsNotReady", 100),
            cond("SchemaReady", "True", "Migrated", 50),
        ];
        let merged = merge_conditions(&old, vec![cond("Ready", "False", "InvalidSpec", 200)]);
        let ready = merged.iter().find(|c| c.type_ == "Ready").expect("ready");
        assert_eq!(
            ready.last_transition_time, old[0].last_transition_time,
            "status unchanged"
        );
        assert_eq!(ready.reason, "InvalidSpec", "reason still updated");
        assert!(
            merged.iter().any(|c| c.type_ == "SchemaReady"),
            "other steps' conditions kept"
        );
    }

    #[test]
    fn changed_status_takes_the_new_transition_time() {
        let old = vec![cond("Ready", "False", "ComponentsNotReady", 100)];
        let merged = merge_conditions(&old, vec![cond("Ready", "True", "AllComponentsReady", 200)]);
        assert_eq!(
            merged[0].last_transition_time,
            cond("x", "", "", 200).last_transition_time
        );
    }
}
