//! Rolling changes through Patroni. The PostgreSQL StatefulSets use the `OnDelete`
//! update strategy, so a changed pod template (image, configuration, resources)
//! reaches the pods only as this step replaces them, one Patroni cluster at a time
//! and one pod at a time:
//!
//! 1. while any member of the cluster is not ready, nothing (wait);
//! 2. an outdated replica is deleted (its StatefulSet recreates it from the new
//!    template, and Patroni re-joins it);
//! 3. once only the leader is outdated, Patroni switches over to an updated, ready
//!    member that may lead (not `nofailover`): the one short write pause of the
//!    rollout;
//! 4. the old leader, now a replica, is deleted like any other.
//!
//! A cluster of one member has no one to switch over to: its pod is deleted, and
//! the Event says that writes stop until it is back.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, Preconditions};
use kube::runtime::events::EventType;
use kube::ResourceExt;

use super::status::groups::pod_ready;
use super::switchover;
use super::{Journal, Reason};
use crate::apply::Observed;
use crate::builders::patroni::{GROUP_LABEL, PRIMARY, RESTAPI_PORT, ROLE_LABEL, SCOPE_LABEL};
use crate::context::Context;
use crate::error::Error;

/// The pod label naming the StatefulSet revision a pod was made from.
pub const REVISION_LABEL: &str = "controller-revision-hash";

/// One member as the rollout sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    /// Pod name.
    pub name: String,
    /// The pod's uid (the delete's precondition).
    pub uid: Option<String>,
    /// Whether Patroni labels it the leader.
    pub leader: bool,
    /// Whether the pod is Ready.
    pub ready: bool,
    /// Whether its template is older than its StatefulSet's.
    pub outdated: bool,
    /// Whether Patroni may promote it (no `nofailover` tag).
    pub may_lead: bool,
}

/// What to do next in one cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Everything is current, or a member is not ready yet.
    Nothing,
    /// Delete this member (a replica, or the only member).
    Delete(Member),
    /// Switch over from the leader to this updated member.
    Switchover {
        /// The current leader.
        leader: String,
        /// The updated member to hand over to.
        candidate: String,
    },
}

/// The next move in a cluster of `members` (pure; see the module's order).
pub fn next(members: &[Member]) -> Next {
    if members.is_empty() || members.iter().any(|m| !m.ready) {
        return Next::Nothing;
    }
    if let Some(replica) = members.iter().find(|m| m.outdated && !m.leader) {
        return Next::Delete(replica.clone());
    }
    let Some(leader) = members.iter().find(|m| m.leader && m.outdated) else {
        return Next::Nothing;
    };
    match members.iter().find(|m| !m.leader && m.may_lead) {
        Some(candidate) => Next::Switchover {
            leader: leader.name.clone(),
            candidate: candidate.name.clone(),
        },
        None => Next::Delete(leader.clone()),
    }
}

/// The members of each Patroni cluster, from the pods and their StatefulSets'
/// `status.updateRevision`. `nofailover` StatefulSets (analytics pools) are named
/// in `cannot_lead`.
pub fn clusters(
    pods: &[Pod],
    observed: &Observed,
    cannot_lead: &[String],
) -> BTreeMap<String, Vec<Member>> {
    let mut out: BTreeMap<String, Vec<Member>> = BTreeMap::new();
    for pod in pods {
        let Some(scope) = pod
            .labels()
            .get(GROUP_LABEL)
            .or_else(|| pod.labels().get(SCOPE_LABEL))
        else {
            continue;
        };
        let Some(owner) = pod
            .owner_references()
            .iter()
            .find(|o| o.kind == "StatefulSet")
            .map(|o| o.name.clone())
        else {
            continue;
        };
        let update_revision = observed
            .get("StatefulSet", &owner)
            .and_then(|s| s.data.pointer("/status/updateRevision"))
            .and_then(serde_json::Value::as_str);
        let outdated = match (update_revision, pod.labels().get(REVISION_LABEL)) {
            (Some(want), Some(have)) => want != have,
            _ => false,
        };
        out.entry(scope.clone()).or_default().push(Member {
            name: pod.name_any(),
            uid: pod.uid(),
            leader: pod.labels().get(ROLE_LABEL).map(String::as_str) == Some(PRIMARY),
            ready: pod_ready(pod),
            outdated,
            may_lead: !cannot_lead.contains(&owner),
        });
    }
    for members in out.values_mut() {
        members.sort_by(|a, b| a.name.cmp(&b.name));
    }
    out
}

/// Runs the step: one move per cluster. Returns whether a rollout is under way.
pub async fn run(
    ctx: &Context,
    namespace: &str,
    clusters: &BTreeMap<String, Vec<Member>>,
    journal: &mut Journal,
) -> Result<bool, Error> {
    let mut rolling = false;
    for (scope, members) in clusters {
        if members.iter().any(|m| m.outdated) {
            rolling = true;
        }
        match next(members) {
            Next::Nothing => {}
            Next::Delete(member) => {
                let api: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
                let params = DeleteParams {
                    preconditions: Some(Preconditions {
                        uid: member.uid.clone(),
                        resource_version: None,
                    }),
                    ..DeleteParams::default()
                };
                match api.delete(&member.name, &params).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => continue,
                    Err(source) => {
                        return Err(Error::Kube {
                            action: format!("deleting pod {} to update it", member.name),
                            source,
                        })
                    }
                }
                let note = if member.leader {
                    format!(
                        "{scope}: replacing {} with the new template; it is the only member \
                         that may lead, so writes stop until it is back",
                        member.name
                    )
                } else {
                    format!(
                        "{scope}: replacing replica {} with the new template",
                        member.name
                    )
                };
                journal.event(EventType::Normal, Reason::RollingUpdate, note);
            }
            Next::Switchover { leader, candidate } => {
                let port = u16::try_from(RESTAPI_PORT).unwrap_or(8008);
                let (host, port) = ctx
                    .connector
                    .address(&switchover::rest_api_host(&leader, namespace), port);
                match switchover::request(&host, port, &leader, &candidate).await {
                    Ok(_) => journal.event(
                        EventType::Normal,
                        Reason::RollingUpdate,
                        format!(
                            "{scope}: switched over from {leader} to the updated {candidate} \
                             before replacing {leader}"
                        ),
                    ),
                    Err(message) => journal.event(
                        EventType::Warning,
                        Reason::SwitchoverRefused,
                        format!("{scope}: rolling update: switchover to {candidate}: {message}"),
                    ),
                }
            }
        }
    }
    Ok(rolling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, leader: bool, ready: bool, outdated: bool) -> Member {
        Member {
            name: name.into(),
            uid: None,
            leader,
            ready,
            outdated,
            may_lead: true,
        }
    }

    #[test]
    fn replicas_first_then_a_switchover_then_the_old_leader() {
        let start = [m("c-0", true, true, true), m("c-1", false, true, true)];
        assert_eq!(
            next(&start),
            Next::Delete(start[1].clone()),
            "the replica first"
        );
        let replica_back = [m("c-0", true, true, true), m("c-1", false, true, false)];
        assert_eq!(
            next(&replica_back),
            Next::Switchover {
                leader: "c-0".into(),
                candidate: "c-1".into()
            }
        );
        let switched = [m("c-0", false, true, true), m("c-1", true, true, false)];
        assert_eq!(
            next(&switched),
            Next::Delete(switched[0].clone()),
            "then the old leader"
        );
        let done = [m("c-0", false, true, false), m("c-1", true, true, false)];
        assert_eq!(next(&done), Next::Nothing);
    }

    #[test]
    fn nothing_moves_while_a_member_is_not_ready() {
        let members = [m("c-0", true, true, true), m("c-1", false, false, false)];
        assert_eq!(next(&members), Next::Nothing);
    }

    #[test]
    fn a_nofailover_member_is_never_switched_to() {
        let mut analytics = m("a-0", false, true, false);
        analytics.may_lead = false;
        let members = [m("c-0", true, true, true), analytics];
        assert_eq!(
            next(&members),
            Next::Delete(members[0].clone()),
            "no member may lead: the leader is replaced in place"
        );
    }
}
