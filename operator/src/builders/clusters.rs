//! The layout of a tier-4 store with several Citus clusters, as the data plane
//! gets it (`UMSTORE_CLUSTERS`) and as status reports it: for each cluster, home
//! first, the regions it holds, its read-write endpoint and the replica endpoint of
//! each reading purpose. Credentials are not here: every login is the same in
//! every cluster, so the connection Secrets stay one per purpose and the data plane
//! swaps only host, port and database name.

use std::collections::BTreeMap;

use serde::Serialize;

use super::credentials::{pool_of, Role};
use super::postgres::PgRole;
use crate::meta::{DATABASE, PGBOUNCER_PORT, PG_PORT};
use crate::validated::{Cluster, Validated};

/// Where one endpoint is.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Endpoint {
    /// Service host.
    pub host: String,
    /// Port.
    pub port: i32,
    /// Database name, where it is not the URL's (`umstore`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dbname: Option<String>,
}

impl Endpoint {
    /// `host:port/dbname`.
    pub fn display(&self) -> String {
        format!(
            "{}:{}/{}",
            self.host,
            self.port,
            self.dbname.as_deref().unwrap_or(DATABASE)
        )
    }
}

/// One cluster as the data plane routes to it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ClusterLayout {
    /// `spec.clusters[].name`.
    pub name: String,
    /// The regions it holds, sorted.
    pub regions: Vec<String>,
    /// Its read-write endpoint.
    pub primary: Endpoint,
    /// The replica endpoint of each reading purpose that reads from a pool, by
    /// purpose slug (`ai`, `rules`, ...); a purpose not here reads the primary.
    pub replicas: BTreeMap<String, Endpoint>,
}

/// The database name PgBouncer gives a cluster other than home
/// (`umstore_<cluster>`, dashes as underscores).
pub fn pooler_database(cluster: &Cluster) -> Option<String> {
    cluster
        .infix()
        .map(|c| format!("{DATABASE}_{}", c.replace('-', "_")))
}

/// The read-write endpoint of a cluster: from tier 2 PgBouncer (one pooler for the
/// store, a database per cluster), below that its coordinator.
fn primary(v: &Validated, cluster: &Cluster) -> Endpoint {
    let owner = &v.owner;
    if v.endpoint_tier >= 2 {
        Endpoint {
            host: owner.service_host(&owner.child("pgbouncer")),
            port: PGBOUNCER_PORT,
            dbname: pooler_database(cluster),
        }
    } else {
        Endpoint {
            host: owner.service_host(&PgRole::Coordinator.name(&v.for_cluster(cluster))),
            port: PG_PORT,
            dbname: None,
        }
    }
}

/// The reading purposes (SPEC §7), as the data plane names them.
const READERS: [Role; 5] = [
    Role::Ai,
    Role::Rules,
    Role::JsonGenerator,
    Role::Dashboard,
    Role::Analytics,
];

/// Every cluster's layout, home first; empty for a store without clusters.
pub fn layout(v: &Validated) -> Vec<ClusterLayout> {
    v.clusters
        .iter()
        .map(|c| {
            let view = v.for_cluster(c);
            let replicas = READERS
                .iter()
                .filter_map(|role| {
                    let pool = pool_of(&view, *role)?;
                    let service = PgRole::Replica {
                        purpose: pool,
                        replicas: 1,
                    }
                    .name(&view);
                    Some((
                        role.purpose_slug().to_string(),
                        Endpoint {
                            host: v.owner.service_host(&service),
                            port: PG_PORT,
                            dbname: None,
                        },
                    ))
                })
                .collect();
            ClusterLayout {
                name: c.name.clone(),
                regions: c.holds.clone(),
                primary: primary(v, c),
                replicas,
            }
        })
        .collect()
}

/// `UMSTORE_CLUSTERS`: the layout as JSON, or `None` without clusters.
pub fn env_value(v: &Validated) -> Option<String> {
    if v.clusters.is_empty() {
        return None;
    }
    serde_json::to_string(&layout(v)).ok()
}
