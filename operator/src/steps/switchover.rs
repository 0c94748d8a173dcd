//! A manual switchover by annotation: `umstore.io/switchover-to: <pod>` on the
//! store asks Patroni (its REST API on the current leader, `POST /switchover`) to
//! hand the leadership of `<pod>`'s cluster to `<pod>`. The value acted on is
//! recorded in `status.switchover`, so it is done once: to switch to the same pod
//! again later, remove the annotation (or name another member) first.
//!
//! It runs after topology and before bootstrap, and never stops the pipeline: a
//! request Patroni refuses (the pod is not a healthy replica, a switchover is
//! already running) is reported as a Warning Event and not retried until the
//! annotation changes.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use kube::runtime::events::EventType;
use umstore_crds::{GroupStatus, UserMetadataStore};

use super::{Journal, Reason};
use crate::builders::patroni::RESTAPI_PORT;
use crate::context::Context;
use crate::error::Error;

/// The annotation naming the pod to switch over to.
pub const SWITCHOVER_ANNOTATION: &str = "umstore.io/switchover-to";

/// How long Patroni may take to answer a switchover (it waits for the candidate
/// to take over before it answers).
pub const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// What to ask Patroni, if anything: `(group, leader, candidate)`.
pub fn wanted(
    store: &UserMetadataStore,
    groups: &[GroupStatus],
) -> Result<Option<(String, String, String)>, String> {
    let Some(target) = store
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SWITCHOVER_ANNOTATION))
        .filter(|t| !t.is_empty())
    else {
        return Ok(None);
    };
    let handled = store.status.as_ref().and_then(|s| s.switchover.as_ref());
    if handled == Some(target) {
        return Ok(None);
    }
    let group = groups
        .iter()
        .find(|g| g.members.iter().any(|m| &m.name == target))
        .ok_or_else(|| {
            format!(
                "{SWITCHOVER_ANNOTATION}: {target} is not a member of any Patroni cluster of \
                 this store; name a pod listed in status.groups"
            )
        })?;
    let leader = group.leader.clone().ok_or_else(|| {
        format!(
            "{SWITCHOVER_ANNOTATION}: {} has no leader to switch over from; wait for one",
            group.name
        )
    })?;
    Ok(Some((group.name.clone(), leader, target.clone())))
}

/// The in-cluster address of a member's REST API: its stable DNS name through its
/// StatefulSet's headless Service (`<pod>.<statefulset>-hl.<namespace>.svc`).
pub fn rest_api_host(pod: &str, namespace: &str) -> String {
    let statefulset = pod.rsplit_once('-').map_or(pod, |(sts, _)| sts);
    format!("{pod}.{statefulset}-hl.{namespace}.svc")
}

/// Asks Patroni at `host:port` to switch `leader`'s cluster over to `candidate`.
/// Returns Patroni's answer.
pub async fn request(
    host: &str,
    port: u16,
    leader: &str,
    candidate: &str,
) -> Result<String, String> {
    let body = serde_json::json!({"leader": leader, "candidate": candidate}).to_string();
    let request = http::Request::post(format!("http://{host}:{port}/switchover"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))
        .map_err(|e| format!("building the request: {e}"))?;
    let client = HttpClient::builder(TokioExecutor::new()).build_http();
    let response = tokio::time::timeout(SWITCHOVER_TIMEOUT, client.request(request))
        .await
        .map_err(|_| format!("Patroni at {host}:{port} did not answer in {SWITCHOVER_TIMEOUT:?}"))?
        .map_err(|e| format!("reaching Patroni at {host}:{port}: {e}"))?;
    let status = response.status();
    let text = response
        .into_body()
        .collect()
        .await
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("Patroni answered {status}: {}", text.trim()))
    }
}

/// Runs the step: returns the annotation value acted on (done or refused), for
/// `status.switchover`.
pub async fn run(
    ctx: &Context,
    store: &UserMetadataStore,
    groups: &[GroupStatus],
    journal: &mut Journal,
) -> Result<Option<String>, Error> {
    let Some(target) = store
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SWITCHOVER_ANNOTATION))
        .filter(|t| !t.is_empty())
        .cloned()
    else {
        // No request: forget the last one, so the same pod can be asked for again.
        return Ok(None);
    };
    let (group, leader, candidate) = match wanted(store, groups) {
        Ok(Some(w)) => w,
        // Already acted on.
        Ok(None) => return Ok(Some(target)),
        Err(message) => {
            journal.event(EventType::Warning, Reason::SwitchoverRefused, message);
            return Ok(Some(target));
        }
    };
    if leader == candidate {
        return Ok(Some(candidate));
    }
    let namespace = store.metadata.namespace.clone().unwrap_or_default();
    let port = u16::try_from(RESTAPI_PORT).unwrap_or(8008);
    let (host, port) = ctx
        .connector
        .address(&rest_api_host(&leader, &namespace), port);
    match request(&host, port, &leader, &candidate).await {
        Ok(answer) => journal.event(
            EventType::Normal,
            Reason::Switchover,
            format!(
                "{group}: switched over from {leader} to {candidate} ({})",
                answer.trim()
            ),
        ),
        Err(message) => journal.event(
            EventType::Warning,
            Reason::SwitchoverRefused,
            format!("{group}: switchover from {leader} to {candidate} failed: {message}"),
        ),
    }
    Ok(Some(candidate))
}

#[cfg(test)]
mod tests {
    use umstore_crds::MemberStatus;

    use super::*;

    fn store(annotation: Option<&str>, handled: Option<&str>) -> UserMetadataStore {
        let mut value = serde_json::json!({
            "apiVersion": "umstore.io/v1alpha1", "kind": "UserMetadataStore",
            "metadata": {"name": "s", "namespace": "ns"},
            "spec": {},
        });
        if let Some(a) = annotation {
            value["metadata"]["annotations"] = serde_json::json!({SWITCHOVER_ANNOTATION: a});
        }
        if let Some(h) = handled {
            value["status"] = serde_json::json!({"switchover": h});
        }
        serde_json::from_value(value).expect("store")
    }

    fn group() -> Vec<GroupStatus> {
        let member = |name: &str, role: &str| MemberStatus {
            name: name.into(),
            role: role.into(),
            state: None,
            timeline: None,
            lag_bytes: None,
            ready: true,
        };
        vec![GroupStatus {
            name: "s-coordinator".into(),
            leader: Some("s-coordinator-0".into()),
            members: vec![
                member("s-coordinator-0", "primary"),
                member("s-coordinator-1", "replica"),
            ],
        }]
    }

    #[test]
    fn an_annotation_asks_once() {
        assert_eq!(wanted(&store(None, None), &group()), Ok(None));
        assert_eq!(
            wanted(&store(Some("s-coordinator-1"), None), &group()),
            Ok(Some((
                "s-coordinator".into(),
                "s-coordinator-0".into(),
                "s-coordinator-1".into()
            )))
        );
        assert_eq!(
            wanted(
                &store(Some("s-coordinator-1"), Some("s-coordinator-1")),
                &group()
            ),
            Ok(None),
            "already acted on"
        );
    }

    #[test]
    fn an_unknown_pod_is_refused_with_what_to_do() {
        let err = wanted(&store(Some("elsewhere-0"), None), &group()).expect_err("refused");
        assert!(err.contains("status.groups"), "{err}");
    }

    #[test]
    fn the_rest_api_is_reached_through_the_headless_service() {
        assert_eq!(
            rest_api_host("s-worker-east-2", "ns"),
            "s-worker-east-2.s-worker-east-hl.ns.svc"
        );
    }
}
