//! Rendered PostgreSQL configuration: `postgresql.conf` (Patroni's `custom_conf`)
//! and `pg_hba.conf` (its `hba_file`), in the ConfigMap `<store>-postgres`.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;

use crate::meta::{hash_of, PG_PORT};
use crate::validated::Validated;

/// Where the config ConfigMap is mounted in PostgreSQL pods.
pub const CONFIG_DIR: &str = "/etc/postgresql";
/// Where the TLS Secret is mounted in PostgreSQL pods.
pub const TLS_DIR: &str = "/etc/postgresql/tls";

/// `postgresql.conf` for every PostgreSQL pod of the store (primaries and standbys
/// share it; `hot_standby` only matters on standbys).
pub fn postgresql_conf(v: &Validated) -> String {
    let mut lines: Vec<String> = vec![
        "# Rendered by umstore-operator; edits are overwritten.".into(),
        "listen_addresses = '*'".into(),
        format!("port = {PG_PORT}"),
        "max_connections = 300".into(),
        "password_encryption = 'scram-sha-256'".into(),
    ];
    // Citus must be first in shared_preload_libraries; below tier 3 it is not loaded
    // (the Citus image runs as plain PostgreSQL).
    let preload = if v.citus() {
        "citus,pg_stat_statements"
    } else {
        "pg_stat_statements"
    };
    lines.push(format!("shared_preload_libraries = '{preload}'"));
    lines.push("pg_stat_statements.track = 'all'".into());
    lines.push("pg_stat_statements.max = 10000".into());
    // Citus moves shards with logical replication, so it needs wal_level = logical.
    lines.push(format!(
        "wal_level = {}",
        if v.citus() { "logical" } else { "replica" }
    ));
    lines.extend(
        [
            "max_wal_senders = 16",
            "max_replication_slots = 16",
            "wal_keep_size = '1GB'",
            "hot_standby = on",
            "hot_standby_feedback = on",
            "max_standby_streaming_delay = '30s'",
            "wal_log_hints = on",
            "log_destination = 'stderr'",
            "log_min_duration_statement = 250",
            "log_line_prefix = '%m [%p] %q%u@%d '",
            "track_io_timing = on",
        ]
        .map(String::from),
    );
    if v.spec.backup.is_some() {
        // Every WAL segment into the backup repository (builders/backup.rs); a
        // segment at least every minute, so the latest recoverable time stays
        // within a minute of now on a quiet store.
        lines.push("archive_mode = on".into());
        lines.push(format!(
            "archive_command = '{}'",
            super::backup::ARCHIVE_COMMAND.replace('\'', "''")
        ));
        lines.push("archive_timeout = 60".into());
    }
    if v.spec.postgres.tls.is_some() {
        lines.push("ssl = on".into());
        lines.push(format!("ssl_cert_file = '{TLS_DIR}/tls.crt'"));
        lines.push(format!("ssl_key_file = '{TLS_DIR}/tls.key'"));
        lines.push("ssl_min_protocol_version = 'TLSv1.2'".into());
    }
    if v.citus() {
        let mode = if v.spec.postgres.tls.is_some() {
            "require"
        } else {
            "prefer"
        };
        lines.push(format!("citus.node_conninfo = 'sslmode={mode}'"));
    }
    lines.join("\n") + "\n"
}

/// `pg_hba.conf`: SCRAM everywhere; with a TLS Secret, remote connections must use
/// TLS (`hostssl`, and `hostnossl ... reject`).
pub fn pg_hba_conf(v: &Validated) -> String {
    let remote = if v.spec.postgres.tls.is_some() {
        "hostssl"
    } else {
        "host"
    };
    let mut lines: Vec<String> = vec![
        "# Rendered by umstore-operator; edits are overwritten.".into(),
        "# TYPE    DATABASE     USER        ADDRESS       METHOD".into(),
        // Inside the pod only: Patroni (over the unix socket) and pg_isready.
        "local     all          all                       trust".into(),
        "host      all          all         127.0.0.1/32  scram-sha-256".into(),
        "host      all          all         ::1/128       scram-sha-256".into(),
        format!("{remote:<9} replication  replicator  0.0.0.0/0     scram-sha-256"),
        format!("{remote:<9} replication  replicator  ::/0          scram-sha-256"),
        format!("{remote:<9} all          all         0.0.0.0/0     scram-sha-256"),
        format!("{remote:<9} all          all         ::/0          scram-sha-256"),
    ];
    if v.spec.postgres.tls.is_some() {
        lines.push("hostnossl all          all         0.0.0.0/0     reject".into());
        lines.push("hostnossl all          all         ::/0          reject".into());
    }
    lines.join("\n") + "\n"
}

/// The ConfigMap `<store>-postgres` with `postgresql.conf` and `pg_hba.conf`.
pub fn config_map(v: &Validated) -> ConfigMap {
    let owner = &v.owner;
    ConfigMap {
        metadata: owner.object_meta(&owner.child("postgres"), owner.component_labels("postgres")),
        data: Some(BTreeMap::from([
            ("postgresql.conf".to_string(), postgresql_conf(v)),
            ("pg_hba.conf".to_string(), pg_hba_conf(v)),
        ])),
        ..ConfigMap::default()
    }
}

/// Hash of what PostgreSQL pods read at start, for their pod-template annotation.
pub fn config_hash(v: &Validated) -> String {
    hash_of(&(postgresql_conf(v), pg_hba_conf(v)))
}
