//! Replica lag for the status: how far each replica pool member is behind the
//! primary, read from the primary's `pg_stat_replication` on the connection the
//! bootstrap step opened. Patroni names each member's replication connection
//! after its pod (`application_name`), which is how a row finds its pool.
//!
//! A probe, not a step: it reports no condition and never stops the pipeline. It is
//! bounded by [`TIMEOUT`] (on the server by `statement_timeout`, and here by a
//! timer), so a slow primary costs a reconcile at most that much; a failed or
//! timed-out probe leaves the last measurement in the status.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use tokio_postgres::Client;
use tracing::warn;
use umstore_crds::ReplicaLag;

use crate::error::Error;
use crate::meta::REPLICA_POOL_LABEL;

/// How long the probe may take.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Each standby streaming from the primary: the member's name (its pod), the WAL
/// bytes it has not replayed, and PostgreSQL's `replay_lag` in seconds (0 once it
/// has replayed everything, NULL while PostgreSQL has no measurement).
const STANDBYS: &str = "\
    SELECT application_name, \
           greatest(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::int8, \
           CASE WHEN replay_lsn >= pg_current_wal_lsn() THEN 0::float8 \
                ELSE round(extract(epoch FROM replay_lag), 3)::float8 END \
      FROM pg_stat_replication \
     WHERE replay_lsn IS NOT NULL \
     ORDER BY application_name";

/// One row of [`STANDBYS`].
#[derive(Clone, Debug, PartialEq)]
pub struct Standby {
    /// `application_name`: the member's name, which Patroni sets to its pod's.
    pub name: String,
    /// WAL bytes not replayed yet.
    pub lag_bytes: i64,
    /// Seconds behind, when PostgreSQL has measured it.
    pub lag_seconds: Option<f64>,
}

/// Why the probe gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum LagError {
    /// The primary did not answer in time.
    #[error(
        "reading pg_stat_replication took longer than {0:?}; the primary is slow or overloaded"
    )]
    Timeout(Duration),
    /// The query failed.
    #[error(transparent)]
    Database(#[from] Error),
}

/// The replica pool members among `pods`: pod name → pool purpose.
pub fn pool_members(pods: &[Pod]) -> BTreeMap<String, String> {
    pods.iter()
        .filter_map(|pod| {
            let pool = pod.labels().get(REPLICA_POOL_LABEL)?;
            Some((pod.name_any(), pool.clone()))
        })
        .collect()
}

/// The standbys streaming from the primary `client` is connected to (as a role
/// that may see every column of `pg_stat_replication`: the superuser, or a member
/// of `pg_monitor`), within `timeout`.
pub async fn standbys(client: &mut Client, timeout: Duration) -> Result<Vec<Standby>, LagError> {
    let millis = timeout
        .as_millis()
        .clamp(1, u128::from(u32::MAX))
        .to_string();
    let query = async {
        let db = |action: &str| Error::db(action.to_string());
        let tx = client
            .transaction()
            .await
            .map_err(db("starting the replica lag probe"))?;
        // The server gives up by itself too, so a probe cut short here does not
        // leave the connection busy for the migrate step.
        tx.execute(
            "SELECT set_config('statement_timeout', $1, true)",
            &[&millis],
        )
        .await
        .map_err(db("bounding the replica lag probe"))?;
        let rows = tx
            .query(STANDBYS, &[])
            .await
            .map_err(db("reading pg_stat_replication"))?;
        tx.commit()
            .await
            .map_err(db("ending the replica lag probe"))?;
        Ok::<_, Error>(
            rows.iter()
                .map(|row| Standby {
                    name: row.get(0),
                    lag_bytes: row.get(1),
                    lag_seconds: row.get(2),
                })
                .collect(),
        )
    };
    match tokio::time::timeout(timeout, query).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(LagError::Timeout(timeout)),
    }
}

/// The lag of each pool member among `standbys`, ordered by pool and pod. Standbys
/// that are no pool member (the coordinator's own standbys) and members that are
/// not streaming are absent.
pub fn replica_lag(standbys: &[Standby], members: &BTreeMap<String, String>) -> Vec<ReplicaLag> {
    let mut lag: Vec<ReplicaLag> = standbys
        .iter()
        .filter_map(|s| {
            let pool = members.get(&s.name)?;
            Some(ReplicaLag {
                pool: pool.clone(),
                pod: s.name.clone(),
                lag_bytes: s.lag_bytes,
                lag_seconds: s.lag_seconds,
            })
        })
        .collect();
    lag.sort_by(|a, b| (&a.pool, &a.pod).cmp(&(&b.pool, &b.pod)));
    lag.dedup_by(|a, b| a.pod == b.pod);
    lag
}

/// Measures the lag of the replica pool members among `pods`; `None` when it
/// could not (logged), so the status keeps the last measurement. Asks the
/// database nothing when the store has no pool member.
pub async fn measure(
    client: &mut Client,
    pods: &[Pod],
    timeout: Duration,
) -> Option<Vec<ReplicaLag>> {
    let members = pool_members(pods);
    if members.is_empty() {
        return Some(Vec::new());
    }
    match standbys(client, timeout).await {
        Ok(standbys) => Some(replica_lag(&standbys, &members)),
        Err(error) => {
            warn!(%error, "replica lag not measured; the status keeps the last measurement");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(name: &str, pool: Option<&str>) -> Pod {
        let mut labels = json!({"umstore.io/patroni-scope": "s-coordinator"});
        if let Some(pool) = pool {
            labels[REPLICA_POOL_LABEL] = json!(pool);
        }
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).expect("pod")
    }

    fn standby(name: &str, lag_bytes: i64, lag_seconds: Option<f64>) -> Standby {
        Standby {
            name: name.into(),
            lag_bytes,
            lag_seconds,
        }
    }

    #[test]
    fn pool_members_are_the_pods_with_a_pool_label() {
        let members = pool_members(&[
            pod("s-coordinator-0", None),
            pod("s-replica-ai-0", Some("ai")),
            pod("s-replica-analytics-0", Some("analytics")),
        ]);
        assert_eq!(
            members.into_iter().collect::<Vec<_>>(),
            [
                ("s-replica-ai-0".to_string(), "ai".to_string()),
                ("s-replica-analytics-0".to_string(), "analytics".to_string()),
            ]
        );
    }

    #[test]
    fn each_streaming_member_gets_its_pool_and_the_others_are_absent() {
        let members = pool_members(&[
            pod("s-replica-analytics-0", Some("analytics")),
            pod("s-replica-ai-1", Some("ai")),
            pod("s-replica-ai-0", Some("ai")),
        ]);
        let lag = replica_lag(
            &[
                standby("s-replica-analytics-0", 4096, None),
                standby("s-coordinator-1", 0, Some(0.0)),
                standby("s-replica-ai-0", 0, Some(0.0)),
            ],
            &members,
        );
        assert_eq!(
            lag,
            [
                ReplicaLag {
                    pool: "ai".into(),
                    pod: "s-replica-ai-0".into(),
                    lag_bytes: 0,
                    lag_seconds: Some(0.0),
                },
                ReplicaLag {
                    pool: "analytics".into(),
                    pod: "s-replica-analytics-0".into(),
                    lag_bytes: 4096,
                    lag_seconds: None,
                },
            ],
            "s-replica-ai-1 does not stream; s-coordinator-1 is no pool member"
        );
    }
}
