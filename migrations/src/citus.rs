//! The schema on Citus (tier 3 and up): which tables are distributed how, where each
//! region's shards live, and the steps that get there. The operator's distribute step
//! drives these functions over its admin connection to the coordinator; tests and the
//! benchmark call them directly.
//!
//! Every function is idempotent and reads the Citus catalog (`pg_dist_partition`,
//! `pg_dist_shard`, `pg_dist_placement`, `pg_dist_node`) before it changes anything,
//! so a run interrupted at any point (operator restart, connection cut, backend
//! killed) is finished by the next run. Only Citus's documented SQL functions are
//! called: `create_reference_table`, `create_distributed_table`,
//! `create_distributed_table_concurrently`, `citus_split_shard_by_split_points`,
//! `citus_move_shard_placement`, `citus_set_node_property`, `citus_remove_node`,
//! `citus_add_node` and `citus_cleanup_orphaned_resources`.
//!
//! How the schema is laid out:
//!
//! * `regions`, `key_material`, `key_rotations` become reference tables (a copy on
//!   every node);
//! * `user_directory` is distributed by `user_id` (one-user lookups by id go to one
//!   shard), and `user_routes` (migration 0012) by `user_id` colocated with it;
//! * every other table of the `umstore` schema with a `region` column is distributed
//!   by `region`, colocated with `user_metadata`, so one user's rows of every table
//!   are on one node and a one-user transaction is a single-shard transaction;
//! * each region the store serves gets a shard of its own (split off with
//!   `citus_split_shard_by_split_points`) placed on the node of the Citus group the
//!   spec assigns it to, and moved online (`citus_move_shard_placement`, logical
//!   replication, writes continue) when the assignment changes.
//!
//! A table that already holds rows (a tier-2 store being promoted) is distributed
//! with `create_distributed_table_concurrently`, so writes continue while its rows are
//! copied; an empty one with `create_distributed_table`, which is much faster.
//!
//! Citus accepts neither the per-partition foreign keys of the derived tables nor,
//! while it converts a populated partitioned table, the CHECK constraints of a
//! partitioned table (it names them per shard and the partitions then "miss" them).
//! Those constraints are set aside in `umstore_citus.set_aside` (recorded and dropped
//! in one transaction), and put back once every table is distributed: the
//! per-partition keys as one key on each parent, the rest as they were.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;
use tokio_postgres::Client;
use tracing::info;

/// Citus's group id of the coordinator.
pub const COORDINATOR_GROUP: i32 = 0;

/// Tables copied to every node.
pub const REFERENCE_TABLES: [&str; 3] = ["regions", "key_material", "key_rotations"];
/// The table every per-region table is colocated with.
pub const ANCHOR_TABLE: &str = "user_metadata";
/// The table distributed by `user_id`.
pub const DIRECTORY_TABLE: &str = "user_directory";
/// The routing index of a store with several clusters (migration 0012):
/// distributed by `user_id` too, colocated with [`DIRECTORY_TABLE`].
pub const ROUTES_TABLE: &str = "user_routes";
/// Tables that stay on the coordinator only: the migrations' record, and the
/// region-move tables of migration 0013 (a region's state, the catch-up log,
/// the placement and the journal), which writes read on the coordinator.
pub const LOCAL_TABLES: [&str; 5] = [
    "schema_migrations",
    "region_state",
    "region_move_log",
    "region_placement",
    "region_moves",
];

/// How shards are copied when they move or split: logical replication, so writes
/// continue (every distributed table has a primary key, its replica identity).
pub const TRANSFER_MODE: &str = "force_logical";

/// A failure talking to Citus, with what was being done.
#[derive(Debug, Error)]
pub enum CitusError {
    /// A statement failed.
    #[error("{what}: {source}")]
    Db {
        /// What was being done.
        what: String,
        /// The database error.
        #[source]
        source: tokio_postgres::Error,
    },
}

fn db(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> CitusError {
    let what = what.into();
    move |source| CitusError::Db { what, source }
}

/// Whether this server can run Citus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Availability {
    /// The extension is created in this database.
    Installed {
        /// Its version.
        version: String,
    },
    /// The image ships it but it is not created in this database.
    NotCreated,
    /// The image does not ship it.
    Missing,
}

impl Availability {
    /// What to do about a missing or uncreated extension, for a condition message.
    pub fn remedy(&self) -> Option<String> {
        match self {
            Availability::Installed { .. } => None,
            Availability::NotCreated => Some(
                "the citus extension is not created in the store's database; the bootstrap \
                 step creates it from tier 3, so check that `citus` is first in \
                 shared_preload_libraries and the coordinator restarted"
                    .into(),
            ),
            Availability::Missing => Some(
                "the PostgreSQL image has no citus extension: tier 3 and up need an image \
                 with Citus (set spec.postgres.image to one, e.g. citusdata/citus:13.0)"
                    .into(),
            ),
        }
    }
}

/// Looks for the extension on the coordinator.
pub async fn availability(client: &Client) -> Result<Availability, CitusError> {
    let row = client
        .query_one(
            "SELECT (SELECT extversion FROM pg_extension WHERE extname = 'citus'), \
                    EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'citus')",
            &[],
        )
        .await
        .map_err(db("looking for the citus extension"))?;
    Ok(
        match (row.get::<_, Option<String>>(0), row.get::<_, bool>(1)) {
            (Some(version), _) => Availability::Installed { version },
            (None, true) => Availability::NotCreated,
            (None, false) => Availability::Missing,
        },
    )
}

/// One primary node of `pg_dist_node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// `nodeid`.
    pub id: i32,
    /// `groupid`: 0 for the coordinator, the worker group's number otherwise.
    pub group: i32,
    /// Host name.
    pub host: String,
    /// Port.
    pub port: i32,
    /// Whether Citus may place new shards there.
    pub should_have_shards: bool,
}

/// The active primary nodes, by group.
pub async fn nodes(client: &Client) -> Result<BTreeMap<i32, Node>, CitusError> {
    let rows = client
        .query(
            "SELECT nodeid, groupid, nodename, nodeport, shouldhaveshards FROM pg_dist_node \
             WHERE noderole = 'primary' AND isactive ORDER BY groupid",
            &[],
        )
        .await
        .map_err(db("reading pg_dist_node"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let node = Node {
                id: r.get(0),
                group: r.get(1),
                host: r.get(2),
                port: r.get(3),
                should_have_shards: r.get(4),
            };
            (node.group, node)
        })
        .collect())
}

/// A worker group as the spec has it: its name, its Citus group id and its regions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerGroup {
    /// The spec's name of the group.
    pub name: String,
    /// Its Citus group id (`pg_dist_node.groupid`, Patroni's `citus.group`).
    pub citus_group: i32,
    /// The regions whose shards it holds.
    pub regions: Vec<String>,
}

/// How `pg_dist_node` compares with the spec's worker groups.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registration {
    /// Groups of the spec with no active primary in `pg_dist_node` yet.
    pub missing: Vec<String>,
    /// Worker group ids in `pg_dist_node` that no group of the spec has.
    pub unknown: Vec<i32>,
}

impl Registration {
    /// Compares the spec's groups with the nodes.
    pub fn check(groups: &[WorkerGroup], nodes: &BTreeMap<i32, Node>) -> Self {
        let wanted: BTreeSet<i32> = groups.iter().map(|g| g.citus_group).collect();
        Self {
            missing: groups
                .iter()
                .filter(|g| !nodes.contains_key(&g.citus_group))
                .map(|g| format!("{} (Citus group {})", g.name, g.citus_group))
                .collect(),
            unknown: nodes
                .keys()
                .copied()
                .filter(|g| *g != COORDINATOR_GROUP && !wanted.contains(g))
                .collect(),
        }
    }
}

/// Registers `host:port` as the primary of Citus group `group`, unless that group
/// has an active primary already. Patroni's Citus integration registers the worker
/// groups' primaries itself (and follows failovers); this is for setups without it.
/// Returns whether it registered.
pub async fn register(
    client: &Client,
    group: i32,
    host: &str,
    port: i32,
) -> Result<bool, CitusError> {
    if nodes(client).await?.contains_key(&group) {
        return Ok(false);
    }
    client
        .execute(
            "SELECT citus_add_node($1, $2, groupid => $3, noderole => 'primary')",
            &[&host, &port, &group],
        )
        .await
        .map_err(db(format!(
            "registering {host}:{port} as Citus group {group}"
        )))?;
    Ok(true)
}

/// How a table is to be distributed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// A reference table.
    Reference,
    /// Distributed by `region`, colocated with [`ANCHOR_TABLE`].
    ByRegion,
    /// Distributed by `user_id` ([`DIRECTORY_TABLE`]).
    ByUser,
}

/// One table still to be distributed, in the order it must be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Table name in the `umstore` schema.
    pub table: String,
    /// How.
    pub layout: Layout,
}

/// The tables of the `umstore` schema that are not distributed yet, in order:
/// reference tables, the anchor, the other per-region tables, the directory. A table
/// added by a later migration is picked up the same way (per-region when it has a
/// `region` column).
pub async fn pending(client: &Client) -> Result<Vec<Pending>, CitusError> {
    let rows = client
        .query(
            "SELECT c.relname::text, \
                    EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid \
                            AND a.attname = 'region' AND NOT a.attisdropped) \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = 'umstore' AND c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND NOT EXISTS (SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = c.oid \
                               AND (p.partmethod = 'h' OR p.repmodel = 't')) \
             ORDER BY c.relname",
            &[],
        )
        .await
        .map_err(db("listing the tables not distributed yet"))?;
    let mut out = Vec::new();
    for row in rows {
        let table: String = row.get(0);
        let has_region: bool = row.get(1);
        let layout = if REFERENCE_TABLES.contains(&table.as_str()) {
            Layout::Reference
        } else if table == DIRECTORY_TABLE || table == ROUTES_TABLE {
            Layout::ByUser
        } else if has_region && !LOCAL_TABLES.contains(&table.as_str()) {
            Layout::ByRegion
        } else {
            continue;
        };
        out.push(Pending { table, layout });
    }
    let rank = |p: &Pending| match p.layout {
        Layout::Reference => 0,
        Layout::ByRegion if p.table == ANCHOR_TABLE => 1,
        Layout::ByRegion => 2,
        Layout::ByUser if p.table == DIRECTORY_TABLE => 3,
        Layout::ByUser => 4,
    };
    out.sort_by_key(|p| (rank(p), p.table.clone()));
    Ok(out)
}

/// What [`distribute`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Distributed {
    /// Tables distributed (or made reference tables) by this run.
    pub tables: Vec<String>,
    /// Of those, the ones that held rows and were distributed without blocking writes.
    pub concurrently: Vec<String>,
    /// Constraints put back.
    pub restored: usize,
}

impl Distributed {
    /// Whether anything was changed.
    pub fn changed(&self) -> bool {
        !self.tables.is_empty() || self.restored > 0
    }
}

const SET_ASIDE_DDL: &str = "CREATE SCHEMA IF NOT EXISTS umstore_citus; \
     CREATE TABLE IF NOT EXISTS umstore_citus.set_aside ( \
         relname text NOT NULL, \
         conname text, \
         def text NOT NULL, \
         recorded_at timestamptz NOT NULL DEFAULT now(), \
         PRIMARY KEY (relname, def))";

/// Distributes every table of [`pending`] and puts the constraints set aside back.
/// Calls `progress` before each table (for a condition message).
pub async fn distribute(
    client: &Client,
    mut progress: impl FnMut(&Pending, usize, usize),
) -> Result<Distributed, CitusError> {
    let mut report = Distributed::default();
    // Names in constraint definitions are then always schema-qualified, so a
    // definition recorded by one run compares equal in the next.
    client
        .batch_execute("SET search_path TO pg_catalog")
        .await
        .map_err(db("setting the search path"))?;
    let todo = pending(client).await?;
    let recorded: bool = client
        .query_one(
            "SELECT to_regclass('umstore_citus.set_aside') IS NOT NULL",
            &[],
        )
        .await
        .map_err(db("looking for umstore_citus.set_aside"))?
        .get(0);
    if !recorded {
        // DDL on a Citus coordinator reaches every node: only when missing.
        client
            .batch_execute(SET_ASIDE_DDL)
            .await
            .map_err(db("creating umstore_citus.set_aside"))?;
    }
    if !todo.is_empty() {
        set_aside(client).await?;
    }
    // The history's append-only trigger goes with it to the workers.
    client
        .batch_execute("SET citus.enable_unsafe_triggers TO on")
        .await
        .map_err(db("enabling triggers on distributed tables"))?;
    if todo.iter().any(|p| p.table == "outbox") {
        // Its NOTIFY would fire on a worker, where nobody listens, and PostgreSQL
        // cannot PREPARE a transaction that notified, which breaks every event
        // transaction Citus commits on two nodes. The relay polls instead.
        client
            .batch_execute("DROP TRIGGER IF EXISTS outbox_notify ON umstore.outbox")
            .await
            .map_err(db("dropping the outbox's NOTIFY trigger"))?;
    }
    for (i, table) in todo.iter().enumerate() {
        progress(table, i, todo.len());
        let concurrently = distribute_one(client, table).await?;
        report.tables.push(table.table.clone());
        if concurrently {
            report.concurrently.push(table.table.clone());
        }
    }
    report.restored = restore(client).await?;
    client
        .batch_execute("RESET search_path; RESET citus.enable_unsafe_triggers")
        .await
        .map_err(db("resetting the session"))?;
    Ok(report)
}

async fn distribute_one(client: &Client, p: &Pending) -> Result<bool, CitusError> {
    let name = format!("umstore.{}", quote_ident(&p.table));
    if p.layout == Layout::Reference {
        client
            .execute(
                "SELECT create_reference_table($1::text::regclass)",
                &[&name],
            )
            .await
            .map_err(db(format!("making {name} a reference table")))?;
        info!(table = %p.table, "reference table created");
        return Ok(false);
    }
    let populated: bool = client
        .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {name})"), &[])
        .await
        .map_err(db(format!("checking whether {name} holds rows")))?
        .get(0);
    let (column, colocate, shards): (&str, String, Option<i32>) = match p.layout {
        Layout::ByRegion if p.table == ANCHOR_TABLE => ("region", "none".into(), Some(1)),
        Layout::ByRegion => ("region", format!("umstore.{ANCHOR_TABLE}"), None),
        Layout::ByUser if p.table == ROUTES_TABLE => {
            ("user_id", format!("umstore.{DIRECTORY_TABLE}"), None)
        }
        _ => ("user_id", "none".into(), None),
    };
    let function = if populated {
        "create_distributed_table_concurrently"
    } else {
        "create_distributed_table"
    };
    // Only the anchor chooses a shard count: one shard, which the placement splits
    // into a shard per region (every region's shards are split off it at once).
    let sql = match shards {
        Some(_) => {
            format!(
                "SELECT {function}($1::text::regclass, $2, colocate_with => $3, shard_count => $4)"
            )
        }
        None => format!("SELECT {function}($1::text::regclass, $2, colocate_with => $3)"),
    };
    let result = match shards {
        Some(n) => client.execute(&sql, &[&name, &column, &colocate, &n]).await,
        None => client.execute(&sql, &[&name, &column, &colocate]).await,
    };
    result.map_err(db(format!("{function} of {name} by {column}")))?;
    info!(table = %p.table, column, concurrently = populated, "table distributed");
    Ok(populated)
}

/// Records and drops the constraints Citus does not accept while distributing, in
/// one transaction.
async fn set_aside(client: &Client) -> Result<(), CitusError> {
    // Foreign keys of tables not distributed yet (and keys to them), and CHECK
    // constraints of partitioned tables not distributed yet. A partition's key to
    // another partition is recorded as its parent's key to the other's parent.
    let rows = client
        .query(
            "WITH undistributed AS ( \
                 SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = 'umstore' AND NOT EXISTS ( \
                     SELECT 1 FROM pg_dist_partition p WHERE p.logicalrelid = \
                         coalesce((SELECT i.inhparent FROM pg_inherits i WHERE i.inhrelid = c.oid), c.oid) \
                       AND (p.partmethod = 'h' OR p.repmodel = 't'))) \
             SELECT cl.relname::text, con.conname::text, pg_get_constraintdef(con.oid), \
                    con.contype::text, cl.relispartition, \
                    (SELECT pc.relname::text FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent \
                     WHERE i.inhrelid = cl.oid), \
                    fr.relname::text, \
                    (SELECT pc.relname::text FROM pg_inherits i JOIN pg_class pc ON pc.oid = i.inhparent \
                     WHERE i.inhrelid = fr.oid) \
             FROM pg_constraint con \
             JOIN pg_class cl ON cl.oid = con.conrelid \
             JOIN pg_namespace n ON n.oid = cl.relnamespace \
             LEFT JOIN pg_class fr ON fr.oid = con.confrelid \
             WHERE n.nspname = 'umstore' AND con.conparentid = 0 AND ( \
                 (con.contype = 'f' AND (con.conrelid IN (SELECT oid FROM undistributed) \
                                         OR con.confrelid IN (SELECT oid FROM undistributed))) \
              OR (con.contype = 'c' AND cl.relkind = 'p' AND con.conrelid IN (SELECT oid FROM undistributed)))",
            &[],
        )
        .await
        .map_err(db("reading the constraints to set aside"))?;
    if rows.is_empty() {
        return Ok(());
    }
    let mut drops = Vec::new();
    let mut records: Vec<(String, Option<String>, String)> = Vec::new();
    for row in &rows {
        let (table, name, def): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let is_partition: bool = row.get(4);
        let parent: Option<String> = row.get(5);
        let referenced: Option<String> = row.get(6);
        let referenced_parent: Option<String> = row.get(7);
        match (is_partition, parent, referenced, referenced_parent) {
            (true, Some(parent), Some(referenced), Some(referenced_parent)) => {
                let parent_def = def.replace(
                    &format!("REFERENCES umstore.{referenced}("),
                    &format!("REFERENCES umstore.{referenced_parent}("),
                );
                // Named: Citus sends a named key to the shards as written, while it
                // adds NOT VALID to an unnamed one, which PostgreSQL 15 refuses on a
                // partitioned table.
                let parent_name = name.replacen(&table, &parent, 1);
                records.push((parent, Some(parent_name), parent_def));
            }
            _ => records.push((table.clone(), Some(name.clone()), def)),
        }
        drops.push(format!(
            "ALTER TABLE umstore.{} DROP CONSTRAINT {}",
            quote_ident(&table),
            quote_ident(&name)
        ));
    }
    records.sort();
    records.dedup();
    // Recorded and dropped in one transaction: a crash keeps both or neither.
    let result = async {
        client.batch_execute("BEGIN").await?;
        for (table, name, def) in &records {
            client
                .execute(
                    "INSERT INTO umstore_citus.set_aside (relname, conname, def) \
                     VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                    &[table, name, def],
                )
                .await?;
        }
        client.batch_execute(&drops.join(";\n")).await?;
        client.batch_execute("COMMIT").await
    }
    .await;
    if let Err(e) = result {
        // The transaction is aborted either way; a failed ROLLBACK changes nothing.
        let _ = client.batch_execute("ROLLBACK").await;
        return Err(db("setting foreign keys and CHECK constraints aside")(e));
    }
    info!(
        constraints = rows.len(),
        "constraints set aside while tables are distributed"
    );
    Ok(())
}

/// Puts back what [`set_aside`] recorded, once nothing is left to distribute;
/// returns how many it put back.
async fn restore(client: &Client) -> Result<usize, CitusError> {
    if !pending(client).await?.is_empty() {
        return Ok(0);
    }
    let rows = client
        .query(
            "SELECT relname, conname, def FROM umstore_citus.set_aside \
             ORDER BY (def LIKE 'CHECK%') DESC, relname, def",
            &[],
        )
        .await
        .map_err(db("reading umstore_citus.set_aside"))?;
    // DDL on tables with foreign keys to reference tables must run sequentially.
    client
        .batch_execute("SET citus.multi_shard_modify_mode TO 'sequential'")
        .await
        .map_err(db("setting sequential mode"))?;
    let mut restored = 0;
    for row in rows {
        let (table, name, def): (String, Option<String>, String) =
            (row.get(0), row.get(1), row.get(2));
        let exists: bool = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = $1::text::regclass \
                 AND conparentid = 0 AND pg_get_constraintdef(oid) = $2)",
                &[&format!("umstore.{}", quote_ident(&table)), &def],
            )
            .await
            .map_err(db(format!("looking for {def} on {table}")))?
            .get(0);
        if !exists {
            let named = name
                .as_deref()
                .map_or(String::new(), |n| format!("CONSTRAINT {} ", quote_ident(n)));
            // `def` is PostgreSQL's own rendering of a constraint it held.
            client
                .batch_execute(&format!(
                    "ALTER TABLE umstore.{} ADD {named}{def}",
                    quote_ident(&table)
                ))
                .await
                .map_err(db(format!("putting back {def} on {table}")))?;
            restored += 1;
        }
        client
            .execute(
                "DELETE FROM umstore_citus.set_aside WHERE relname = $1 AND def = $2",
                &[&table, &def],
            )
            .await
            .map_err(db("clearing umstore_citus.set_aside"))?;
    }
    client
        .batch_execute("RESET citus.multi_shard_modify_mode")
        .await
        .map_err(db("resetting sequential mode"))?;
    Ok(restored)
}

/// Where one region's rows are, from `pg_dist_shard` and `pg_dist_placement`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionShard {
    /// The region.
    pub region: String,
    /// The anchor table's shard that holds it.
    pub shard: i64,
    /// Whether that shard holds this region only.
    pub isolated: bool,
    /// The Citus group of the node holding it.
    pub group: i32,
    /// The shard's hash range.
    pub range: (i32, i32),
    /// The region's hash value.
    pub hash: i32,
}

/// Where each of `regions` is.
pub async fn region_shards(
    client: &Client,
    regions: &[String],
) -> Result<Vec<RegionShard>, CitusError> {
    let rows = client
        .query(
            "SELECT r, s.shardid, s.shardminvalue::int, s.shardmaxvalue::int, \
                    worker_hash(r::char(2)), p.groupid \
             FROM unnest($1::text[]) r \
             JOIN pg_dist_shard s ON s.shardid = get_shard_id_for_distribution_column( \
                  $2::text::regclass, r) \
             JOIN pg_dist_placement p ON p.shardid = s.shardid \
             ORDER BY 5",
            &[&regions, &format!("umstore.{ANCHOR_TABLE}")],
        )
        .await
        .map_err(db("reading where each region's shard is"))?;
    Ok(rows
        .iter()
        .map(|r| {
            let (min, max): (i32, i32) = (r.get(2), r.get(3));
            RegionShard {
                region: r.get(0),
                shard: r.get(1),
                isolated: min == max,
                range: (min, max),
                hash: r.get(4),
                group: r.get(5),
            }
        })
        .collect())
}

/// The region → Citus group map as `pg_dist_placement` shows it.
pub async fn observed_placement(
    client: &Client,
    regions: &[String],
) -> Result<BTreeMap<String, i32>, CitusError> {
    Ok(region_shards(client, regions)
        .await?
        .into_iter()
        .map(|r| (r.region, r.group))
        .collect())
}

/// One change to make the placement match the spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Split `shard` so each of `regions` has a shard of its own, each placed on its
    /// group's node (the rest of the range stays where it was).
    Isolate {
        /// The shard to split.
        shard: i64,
        /// `citus_split_shard_by_split_points`'s split points.
        points: Vec<i32>,
        /// The node of each resulting shard.
        nodes: Vec<i32>,
        /// The regions it isolates.
        regions: Vec<String>,
    },
    /// Move a region's shard (and its colocated shards) to its group's node.
    Move {
        /// The region.
        region: String,
        /// Its shard.
        shard: i64,
        /// From this node id.
        from: i32,
        /// To this node id.
        to: i32,
        /// The target group.
        group: i32,
    },
    /// Move a shard that holds no served region off a group being drained.
    Drain {
        /// The shard.
        shard: i64,
        /// From this node id.
        from: i32,
        /// To this node id.
        to: i32,
        /// The group being drained.
        group: i32,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Isolate { regions, .. } => {
                write!(f, "giving {} a shard of its own", regions.join(", "))
            }
            Action::Move { region, group, .. } => {
                write!(f, "moving region {region} to Citus group {group}")
            }
            Action::Drain { shard, group, .. } => {
                write!(f, "moving shard {shard} off Citus group {group}")
            }
        }
    }
}

/// The next actions that bring the placement to `desired` (region → Citus group),
/// isolations first, then moves, then drains of groups no region is assigned to.
/// Empty when the placement matches. Every group of `desired` must have a node.
pub async fn plan(
    client: &Client,
    desired: &BTreeMap<String, i32>,
) -> Result<Vec<Action>, CitusError> {
    let nodes = nodes(client).await?;
    let node_of = |group: i32| nodes.get(&group).map(|n| n.id);
    let regions: Vec<String> = desired.keys().cloned().collect();
    let shards = region_shards(client, &regions).await?;
    let mut actions = Vec::new();

    // Isolation: one split per shard that holds a region not isolated yet.
    let mut by_shard: BTreeMap<i64, Vec<&RegionShard>> = BTreeMap::new();
    for s in shards.iter().filter(|s| !s.isolated) {
        by_shard.entry(s.shard).or_default().push(s);
    }
    for (shard, mut members) in by_shard {
        members.sort_by_key(|m| m.hash);
        members.dedup_by_key(|m| m.hash);
        let (min, max) = members[0].range;
        let Some(here) = node_of(members[0].group) else {
            continue;
        };
        let mut points = Vec::new();
        let mut targets = Vec::new();
        let mut names = Vec::new();
        let mut lower = i64::from(min);
        for m in &members {
            let h = i64::from(m.hash);
            let Some(target) = desired.get(&m.region).and_then(|g| node_of(*g)) else {
                continue;
            };
            if h > lower {
                points.push(h - 1);
                targets.push(here);
            }
            points.push(h);
            targets.push(target);
            names.push(m.region.clone());
            lower = h + 1;
        }
        // The last piece ends at the shard's end: its end is no split point.
        if lower > i64::from(max) {
            points.pop();
        } else {
            targets.push(here);
        }
        let points: Vec<i32> = points
            .into_iter()
            .filter_map(|p| i32::try_from(p).ok())
            .collect();
        if points.is_empty() {
            continue;
        }
        actions.push(Action::Isolate {
            shard,
            points,
            nodes: targets,
            regions: names,
        });
    }
    if !actions.is_empty() {
        return Ok(actions);
    }

    for s in &shards {
        let Some(&group) = desired.get(&s.region) else {
            continue;
        };
        if s.group == group {
            continue;
        }
        if let (Some(from), Some(to)) = (node_of(s.group), node_of(group)) {
            actions.push(Action::Move {
                region: s.region.clone(),
                shard: s.shard,
                from,
                to,
                group,
            });
        }
    }
    if !actions.is_empty() {
        return Ok(actions);
    }
    actions.extend(drains(client, desired, &nodes).await?);
    Ok(actions)
}

/// Shards on worker groups that no region is assigned to, to move to the assigned
/// groups (round-robin): the leftover hash ranges and the directory's shards.
async fn drains(
    client: &Client,
    desired: &BTreeMap<String, i32>,
    nodes: &BTreeMap<i32, Node>,
) -> Result<Vec<Action>, CitusError> {
    let keep: BTreeSet<i32> = desired.values().copied().collect();
    let leaving: Vec<&Node> = nodes
        .values()
        .filter(|n| n.group != COORDINATOR_GROUP && !keep.contains(&n.group))
        .collect();
    let targets: Vec<&Node> = nodes.values().filter(|n| keep.contains(&n.group)).collect();
    if leaving.is_empty() || targets.is_empty() {
        return Ok(Vec::new());
    }
    let mut actions = Vec::new();
    for node in leaving {
        if node.should_have_shards {
            client
                .execute(
                    "SELECT citus_set_node_property($1, $2, 'shouldhaveshards', false)",
                    &[&node.host, &node.port],
                )
                .await
                .map_err(db(format!(
                    "marking Citus group {} as taking no new shards",
                    node.group
                )))?;
        }
        // One shard per colocation group per shard index: moving it moves the rest.
        let rows = client
            .query(
                "SELECT DISTINCT ON (s.colocationid, sh.shardminvalue) sh.shardid \
                 FROM pg_dist_shard sh \
                 JOIN pg_dist_partition s ON s.logicalrelid = sh.logicalrelid \
                 JOIN pg_dist_placement p ON p.shardid = sh.shardid \
                 WHERE p.groupid = $1 AND s.partmethod = 'h' \
                 ORDER BY s.colocationid, sh.shardminvalue, sh.shardid",
                &[&node.group],
            )
            .await
            .map_err(db(format!(
                "listing the shards on Citus group {}",
                node.group
            )))?;
        for (i, row) in rows.iter().enumerate() {
            let to = targets[i % targets.len()];
            actions.push(Action::Drain {
                shard: row.get(0),
                from: node.id,
                to: to.id,
                group: node.group,
            });
        }
    }
    Ok(actions)
}

/// Carries out one action (a split or a move runs until its rows are copied and
/// caught up; writes continue meanwhile).
pub async fn apply(client: &Client, action: &Action) -> Result<(), CitusError> {
    let what = action.to_string();
    info!(action = %what, "placing shards");
    match action {
        Action::Isolate {
            shard,
            points,
            nodes,
            ..
        } => {
            let points: Vec<String> = points.iter().map(i32::to_string).collect();
            client
                .execute(
                    "SELECT citus_split_shard_by_split_points($1::bigint, $2::text[], $3::int[], \
                     shard_transfer_mode => $4::text::citus.shard_transfer_mode)",
                    &[shard, &points, nodes, &TRANSFER_MODE],
                )
                .await
                .map_err(db(what))?;
        }
        Action::Move {
            shard, from, to, ..
        }
        | Action::Drain {
            shard, from, to, ..
        } => {
            client
                .execute(
                    "SELECT citus_move_shard_placement($1::bigint, $2::int, $3::int, \
                     $4::text::citus.shard_transfer_mode)",
                    &[shard, from, to, &TRANSFER_MODE],
                )
                .await
                .map_err(db(what))?;
        }
    }
    Ok(())
}

/// A shard operation another session is running now (an interrupted reconcile's
/// backend still at work), as `pg_stat_activity` shows it.
pub async fn in_progress(client: &Client) -> Result<Option<String>, CitusError> {
    let row = client
        .query_opt(
            "SELECT pid, substring(query for 200) FROM pg_stat_activity \
             WHERE pid <> pg_backend_pid() AND state <> 'idle' \
               AND query ~ '(citus_move_shard_placement|citus_split_shard_by_split_points|\
create_distributed_table_concurrently|isolate_tenant_to_new_shard)\\(' \
             LIMIT 1",
            &[],
        )
        .await
        .map_err(db("looking for shard operations in progress"))?;
    Ok(row.map(|r| {
        let pid: i32 = r.get(0);
        let query: String = r.get(1);
        format!("backend {pid} is running {query}")
    }))
}

/// Drops what an interrupted split or move left behind (Citus records it in
/// `pg_dist_cleanup`), so the next attempt starts clean.
pub async fn cleanup(client: &Client) -> Result<(), CitusError> {
    client
        .batch_execute("CALL citus_cleanup_orphaned_resources()")
        .await
        .map_err(db("cleaning up after an interrupted shard operation"))
}

/// How many shard placements of distributed tables each Citus group holds (the
/// reference tables' copies, on every node, do not count: `citus_remove_node`
/// drops them itself).
pub async fn placement_counts(client: &Client) -> Result<BTreeMap<i32, i64>, CitusError> {
    let rows = client
        .query(
            "SELECT p.groupid, count(*) FROM pg_dist_placement p \
             JOIN pg_dist_shard s ON s.shardid = p.shardid \
             JOIN pg_dist_partition t ON t.logicalrelid = s.logicalrelid \
             WHERE t.repmodel <> 't' GROUP BY p.groupid",
            &[],
        )
        .await
        .map_err(db("counting shard placements per group"))?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// Removes from `pg_dist_node` each worker group of `gone` (left the spec, its pods
/// deleted) that holds no shard placement any more; returns the groups removed.
pub async fn remove_drained(client: &Client, gone: &[i32]) -> Result<Vec<i32>, CitusError> {
    let mut removed = Vec::new();
    for node in nodes(client).await?.values() {
        if node.group == COORDINATOR_GROUP || !gone.contains(&node.group) {
            continue;
        }
        let placements: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_dist_placement p \
                 JOIN pg_dist_shard s ON s.shardid = p.shardid \
                 JOIN pg_dist_partition t ON t.logicalrelid = s.logicalrelid \
                 WHERE p.groupid = $1 AND t.repmodel <> 't'",
                &[&node.group],
            )
            .await
            .map_err(db("counting placements"))?
            .get(0);
        if placements > 0 {
            continue;
        }
        client
            .execute(
                "SELECT citus_remove_node($1, $2)",
                &[&node.host, &node.port],
            )
            .await
            .map_err(db(format!("removing Citus group {}", node.group)))?;
        removed.push(node.group);
    }
    Ok(removed)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registration_reports_missing_and_unknown_groups() {
        let node = |group: i32| Node {
            id: group + 10,
            group,
            host: "h".into(),
            port: 5432,
            should_have_shards: true,
        };
        let nodes: BTreeMap<i32, Node> = [0, 1, 3].into_iter().map(|g| (g, node(g))).collect();
        let groups = vec![
            WorkerGroup {
                name: "south".into(),
                citus_group: 1,
                regions: vec!["KA".into()],
            },
            WorkerGroup {
                name: "north".into(),
                citus_group: 2,
                regions: vec!["DL".into()],
            },
        ];
        let r = Registration::check(&groups, &nodes);
        assert_eq!(r.missing, vec!["north (Citus group 2)".to_string()]);
        assert_eq!(r.unknown, vec![3]);
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
