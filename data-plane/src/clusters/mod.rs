//! A store of several Citus clusters (tier 4): the layout the operator passes
//! in `UMSTORE_CLUSTERS` (`--clusters`), each per-purpose login moved onto each
//! cluster's servers ([`Layout::logins`]). Where a user is found is the read
//! API's routing ([`crate::api::routing`]); docs/data-model.md, "Several
//! clusters: where a user is found".
//!
//! The layout is a JSON array; its first entry is the home cluster (the one
//! that holds the routing index `umstore.user_routes`):
//!
//! ```json
//! [{"name": "home", "regions": ["AP", "TS"],
//!   "primary": {"host": "users-pgbouncer", "port": 6432, "dbname": "umstore"},
//!   "replicas": {"ai": {"host": "users-ai", "port": 5432},
//!                "analytics": {"host": "users-analytics", "port": 5432}}},
//!  {"name": "south", "regions": ["KA", "KL"],
//!   "primary": {"host": "users-south-coordinator", "port": 5432}}]
//! ```
//!
//! Unset, or a list of one cluster: one cluster, exactly as before (the URLs
//! are used as given).
//!
//! Which cluster holds a region is the layout's answer until the home
//! cluster's `umstore.region_placement` says otherwise ([`placement`]).

pub mod fence;
pub mod placement;

use std::collections::BTreeMap;

use serde::Deserialize;
use umstore_migrations::regions::REGIONS;
use umstore_migrations::roles::Purpose;

use crate::db::Database;

/// The purposes that may have a replica pool in a cluster, by their slug (the
/// same slugs as the `UMSTORE_<P>_REPLICA_URL` variables).
pub const REPLICA_PURPOSES: [Purpose; 5] = [
    Purpose::Ai,
    Purpose::Rules,
    Purpose::JsonGenerator,
    Purpose::Dashboard,
    Purpose::Analytics,
];

/// A server: host, port and (optionally) the database name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// The database; absent: the URL's.
    #[serde(default)]
    pub dbname: Option<String>,
}

impl Endpoint {
    /// `login` on this server.
    pub fn apply(&self, login: &Database) -> Database {
        login.at(&self.host, self.port, self.dbname.as_deref())
    }
}

/// One cluster: its name, the regions it holds, its primary (or PgBouncer in
/// front of its coordinator) and its replica pools per purpose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// Its name (the `X-Cluster` header, metric labels, read-your-writes tokens).
    pub name: String,
    /// The region codes it holds.
    pub regions: Vec<String>,
    /// Where writes and primary reads go.
    pub primary: Endpoint,
    /// Each purpose's replica pool; a purpose without one reads the primary.
    pub replicas: BTreeMap<Purpose, Endpoint>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default)]
    regions: Vec<String>,
    primary: Endpoint,
    #[serde(default)]
    replicas: BTreeMap<String, Endpoint>,
}

/// Why a layout was refused: what is wrong and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--clusters (UMSTORE_CLUSTERS): {0}")]
pub struct LayoutError(String);

/// Every cluster of the store, home first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    clusters: Vec<Cluster>,
    /// Region code → index in `clusters`.
    by_region: BTreeMap<String, usize>,
}

impl Layout {
    /// Parses and checks the layout: valid JSON of the documented shape, at
    /// least one cluster, unique names of `a-z 0-9 -`, known region codes,
    /// each region in one cluster only, replica keys among the purposes'
    /// slugs.
    pub fn parse(text: &str) -> Result<Self, LayoutError> {
        let raw: Vec<RawCluster> = serde_json::from_str(text).map_err(|e| {
            LayoutError(format!(
                "not a JSON array of clusters ({e}); expected \
                 [{{\"name\":\"home\",\"regions\":[\"AP\"],\"primary\":{{\"host\":\"h\",\"port\":5432}},\
                 \"replicas\":{{\"ai\":{{\"host\":\"r\",\"port\":5432}}}}}}, ...]"
            ))
        })?;
        if raw.is_empty() {
            return Err(LayoutError(
                "the list is empty: give at least the home cluster, or leave it unset for one \
                 cluster"
                    .into(),
            ));
        }
        let mut clusters = Vec::with_capacity(raw.len());
        let mut by_region: BTreeMap<String, usize> = BTreeMap::new();
        for (i, c) in raw.into_iter().enumerate() {
            let valid_name = !c.name.is_empty()
                && c.name.len() <= 63
                && c.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !valid_name {
                return Err(LayoutError(format!(
                    "cluster #{} is named {:?}: a name is 1 to 63 of a-z, 0-9 and -",
                    i + 1,
                    c.name
                )));
            }
            if clusters.iter().any(|k: &Cluster| k.name == c.name) {
                return Err(LayoutError(format!(
                    "two clusters are named {:?}: give each its own name",
                    c.name
                )));
            }
            if c.primary.host.is_empty() || c.primary.port == 0 {
                return Err(LayoutError(format!(
                    "cluster {:?} has no primary host and port",
                    c.name
                )));
            }
            for region in &c.regions {
                if !REGIONS.iter().any(|r| r.code == region) {
                    return Err(LayoutError(format!(
                        "region {region:?} of cluster {:?} is none of the store's regions; use \
                         the two-letter codes ({})",
                        c.name,
                        REGIONS.map(|r| r.code).join(" ")
                    )));
                }
                if let Some(&other) = by_region.get(region) {
                    let other: &Cluster = &clusters[other];
                    return Err(LayoutError(format!(
                        "region {region} is in two clusters, {:?} and {:?}: a region lives in \
                         exactly one cluster; remove it from one of them",
                        other.name, c.name
                    )));
                }
                by_region.insert(region.clone(), i);
            }
            let mut replicas = BTreeMap::new();
            for (slug, endpoint) in c.replicas {
                let Some(purpose) = REPLICA_PURPOSES.iter().find(|p| p.slug() == slug) else {
                    return Err(LayoutError(format!(
                        "cluster {:?} names a replica pool for {slug:?}, which is not a reading \
                         purpose; use {}",
                        c.name,
                        REPLICA_PURPOSES.map(|p| p.slug()).join(", ")
                    )));
                };
                replicas.insert(*purpose, endpoint);
            }
            clusters.push(Cluster {
                name: c.name,
                regions: c.regions,
                primary: c.primary,
                replicas,
            });
        }
        Ok(Self {
            clusters,
            by_region,
        })
    }

    /// Checks the layout against the regions the store serves (the
    /// operator's `UMSTORE_REGIONS`): every region of a cluster is one of
    /// them, and every one of them is in a cluster.
    pub fn require_regions(&self, store: &[String]) -> Result<(), LayoutError> {
        for c in &self.clusters {
            if let Some(r) = c.regions.iter().find(|r| !store.contains(r)) {
                return Err(LayoutError(format!(
                    "region {r} of cluster {:?} is not one of the store's regions ({}): \
                     remove it from the cluster, or add it to the store's regions",
                    c.name,
                    store.join(" ")
                )));
            }
        }
        let missing: Vec<&str> = store
            .iter()
            .filter(|r| !self.by_region.contains_key(*r))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            return Err(LayoutError(format!(
                "the store's region(s) {} are in no cluster: every region lives in exactly one \
                 cluster; add each to the cluster that holds its data",
                missing.join(" ")
            )));
        }
        Ok(())
    }

    /// Whether the store has more than one cluster (else: today's single
    /// database, the URLs as given).
    pub fn is_multi(&self) -> bool {
        self.clusters.len() > 1
    }

    /// The clusters, home first.
    pub fn clusters(&self) -> &[Cluster] {
        &self.clusters
    }

    /// The index of the cluster holding `region`.
    pub fn cluster_of(&self, region: &str) -> Option<usize> {
        self.by_region.get(region).copied()
    }

    /// The index of the cluster named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.clusters.iter().position(|c| c.name == name)
    }

    /// The writer's login on each cluster's primary, in order.
    pub fn writers(&self, writer: &Database) -> Vec<Database> {
        self.clusters
            .iter()
            .map(|c| c.primary.apply(writer))
            .collect()
    }

    /// The reading logins moved onto each cluster, in order: every purpose's
    /// login on the cluster's primary, and on the cluster's replica pool where
    /// the layout names one (the purpose's replica URL, else its primary URL,
    /// supplies the login).
    pub fn logins(&self, logins: &crate::api::pools::Logins) -> Vec<crate::api::pools::Logins> {
        self.clusters
            .iter()
            .map(|c| {
                let primary: BTreeMap<Purpose, Database> = logins
                    .primary
                    .iter()
                    .map(|(p, login)| (*p, c.primary.apply(login)))
                    .collect();
                let replica = c
                    .replicas
                    .iter()
                    .filter_map(|(p, endpoint)| {
                        let login = logins.replica.get(p).or_else(|| logins.primary.get(p))?;
                        Some((*p, endpoint.apply(login)))
                    })
                    .collect();
                crate::api::pools::Logins { primary, replica }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str = r#"[
        {"name":"home","regions":["AP","TS"],
         "primary":{"host":"users-pgbouncer","port":6432,"dbname":"umstore"},
         "replicas":{"ai":{"host":"users-ai","port":5432},
                     "analytics":{"host":"users-analytics","port":5432}}},
        {"name":"south","regions":["KA","KL"],
         "primary":{"host":"users-south-coordinator","port":5432},
         "replicas":{"ai":{"host":"users-south-ai","port":5432}}}]"#;

    fn refused(text: &str) -> String {
        match Layout::parse(text) {
            Ok(l) => panic!("accepted: {l:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_operators_layout_parses_home_first() {
        let layout = Layout::parse(TWO).expect("parses");
        assert!(layout.is_multi());
        assert_eq!(layout.clusters()[0].name, "home");
        assert_eq!(layout.cluster_of("KL"), Some(1));
        assert_eq!(layout.cluster_of("AP"), Some(0));
        assert_eq!(layout.cluster_of("DL"), None);
        assert_eq!(layout.index_of("south"), Some(1));
        assert_eq!(
            layout.clusters()[0].replicas.keys().collect::<Vec<_>>(),
            [&Purpose::Ai, &Purpose::Analytics]
        );
        let one = Layout::parse(
            r#"[{"name":"home","regions":["KA"],"primary":{"host":"h","port":5432}}]"#,
        )
        .expect("parses");
        assert!(!one.is_multi());
    }

    #[test]
    fn bad_layouts_say_what_is_wrong() {
        let e = refused("{not json");
        assert!(
            e.contains("not a JSON array") && e.contains("UMSTORE_CLUSTERS"),
            "{e}"
        );
        let e = refused("[]");
        assert!(e.contains("empty"), "{e}");
        let e = refused(
            r#"[{"name":"a","regions":["KA"],"primary":{"host":"h","port":1}},
                {"name":"b","regions":["KA"],"primary":{"host":"h","port":1}}]"#,
        );
        assert!(
            e.contains("region KA is in two clusters, \"a\" and \"b\""),
            "{e}"
        );
        let e = refused(r#"[{"name":"a","regions":["XX"],"primary":{"host":"h","port":1}}]"#);
        assert!(
            e.contains("\"XX\"") && e.contains("none of the store's regions"),
            "{e}"
        );
        let e = refused(
            r#"[{"name":"a","regions":["KA"],"primary":{"host":"h","port":1},
                 "replicas":{"writer":{"host":"r","port":1}}}]"#,
        );
        assert!(
            e.contains("\"writer\"") && e.contains("json-generator"),
            "{e}"
        );
        let e = refused(
            r#"[{"name":"a","regions":["KA"],"primary":{"host":"h","port":1}},
                {"name":"a","regions":["KL"],"primary":{"host":"h","port":1}}]"#,
        );
        assert!(e.contains("two clusters are named \"a\""), "{e}");
        let e = refused(r#"[{"name":"Home","primary":{"host":"h","port":1}}]"#);
        assert!(e.contains("a-z"), "{e}");
        let e = refused(r#"[{"name":"a","primary":{"host":"h","port":1},"extra":1}]"#);
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn the_layout_covers_exactly_the_stores_regions() {
        let layout = Layout::parse(TWO).expect("parses");
        let store = |r: &[&str]| r.iter().map(|r| (*r).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            layout.require_regions(&store(&["AP", "TS", "KA", "KL"])),
            Ok(())
        );
        let e = layout
            .require_regions(&store(&["AP", "TS", "KA", "KL", "DL", "GA"]))
            .expect_err("DL and GA in no cluster")
            .to_string();
        assert!(e.contains("DL GA are in no cluster"), "{e}");
        let e = layout
            .require_regions(&store(&["AP", "TS", "KA"]))
            .expect_err("KL is not served")
            .to_string();
        assert!(
            e.contains("region KL of cluster \"south\" is not one of the store's regions"),
            "{e}"
        );
    }

    #[test]
    fn each_login_moves_to_each_cluster_keeping_user_password_and_tls() {
        let layout = Layout::parse(TWO).expect("parses");
        let writer = Database::parse(
            "postgres://umstore_writer_login:w-secret@users-pgbouncer:6432/umstore?sslmode=require",
        )
        .expect("url");
        let writers = layout.writers(&writer);
        assert_eq!(
            writers[1].describe(),
            "umstore_writer_login@users-south-coordinator:5432/umstore"
        );
        assert_eq!(
            writers[1].pg_config().get_password(),
            Some(&b"w-secret"[..])
        );
        assert!(writers[1].tls().is_some());
        let ai =
            Database::parse("host=users-pgbouncer port=6432 user=ai password=a dbname=umstore")
                .expect("url");
        let dash = Database::parse("host=users-pgbouncer port=6432 user=dash password=d dbname=x")
            .expect("url");
        let ai_replica =
            Database::parse("host=users-ai port=5432 user=ai_r password=a dbname=umstore")
                .expect("url");
        let logins = crate::api::pools::Logins {
            primary: [(Purpose::Ai, ai), (Purpose::Dashboard, dash)].into(),
            replica: [(Purpose::Ai, ai_replica)].into(),
        };
        let per = layout.logins(&logins);
        assert_eq!(per.len(), 2);
        let south = &per[1];
        assert_eq!(
            south.primary[&Purpose::Ai].describe(),
            "ai@users-south-coordinator:5432/umstore"
        );
        // The dbname is the URL's when the layout gives none.
        assert_eq!(
            south.primary[&Purpose::Dashboard].describe(),
            "dash@users-south-coordinator:5432/x"
        );
        // The replica login (its own URL) on the cluster's replica pool.
        assert_eq!(
            south.replica[&Purpose::Ai].describe(),
            "ai_r@users-south-ai:5432/umstore"
        );
        // No replica pool named for the dashboard: it reads the primary.
        assert!(!south.replica.contains_key(&Purpose::Dashboard));
        // Home's analytics pool without an analytics login: nothing to move.
        assert!(!per[0].replica.contains_key(&Purpose::Analytics));
        // Home's dbname is the layout's.
        assert_eq!(
            per[0].primary[&Purpose::Dashboard].describe(),
            "dash@users-pgbouncer:6432/umstore"
        );
    }
}
