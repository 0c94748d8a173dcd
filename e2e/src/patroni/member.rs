//! One member of a [`super::PatroniCluster`]: its directory, ports, Pod,
//! configuration and processes.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::dcs::{Admin, CONTEXT};
use crate::process::ServerProcess;
use crate::{free_port, HarnessError};

/// One member to start: its name (also its Pod's) and its `patroni.yml` as JSON.
#[derive(Debug, Clone)]
pub struct MemberSpec {
    /// Member and Pod name (a DNS label).
    pub name: String,
    /// The configuration before the harness fills in the per-member fields.
    pub config: Value,
    /// Environment variables Patroni (and so PostgreSQL and its commands) gets,
    /// as a pod's container would.
    pub env: Vec<(String, String)>,
}

impl MemberSpec {
    /// A member named `name` with `config`.
    pub fn new(name: impl Into<String>, config: Value) -> Self {
        Self {
            name: name.into(),
            config,
            env: Vec::new(),
        }
    }

    /// The member with `name=value` in its environment too.
    pub fn with_env(mut self, name: &str, value: &str) -> Self {
        self.env.push((name.to_string(), value.to_string()));
        self
    }
}

/// A running member.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) name: String,
    pub(super) pg_port: u16,
    pub(super) api_port: u16,
    pub(super) dir: PathBuf,
    pub(super) config: PathBuf,
    pub(super) log: PathBuf,
    pub(super) process: Option<ServerProcess>,
    pub(super) env: Vec<(String, String)>,
}

impl Member {
    /// Makes member `spec`'s directory under `parent`, its Pod in `namespace`, and
    /// its configuration file: `spec.config` with the per-member fields filled in.
    pub(super) fn prepare(
        spec: MemberSpec,
        parent: &Path,
        namespace: &str,
        bindir: &Path,
        admin: &Admin,
    ) -> Result<Self, HarnessError> {
        let MemberSpec {
            name,
            mut config,
            env,
        } = spec;
        let dir = parent.join(&name);
        std::fs::create_dir(&dir)
            .map_err(|e| HarnessError::io(format!("could not create {}", dir.display()), e))?;
        let (pg_port, api_port) = (free_port()?, free_port()?);
        admin.create_pod(namespace, &name, &pod_labels(&config))?;

        let pg_address = format!("127.0.0.1:{pg_port}");
        let api_address = format!("127.0.0.1:{api_port}");
        let fill: [(&[&str], Value); 11] = [
            (&["name"], json!(name)),
            (&["kubernetes", "namespace"], json!(namespace)),
            (&["kubernetes", "context"], json!(CONTEXT)),
            (&["restapi", "listen"], json!(api_address)),
            (&["restapi", "connect_address"], json!(api_address)),
            (&["postgresql", "listen"], json!(pg_address)),
            (&["postgresql", "connect_address"], json!(pg_address)),
            (&["postgresql", "data_dir"], json!(dir.join("data"))),
            (&["postgresql", "bin_dir"], json!(bindir)),
            (&["postgresql", "pgpass"], json!(dir.join("pgpass"))),
            (
                &["postgresql", "parameters", "unix_socket_directories"],
                json!(dir),
            ),
        ];
        for (path, value) in fill {
            set_path(&mut config, path, value);
        }
        let config_path = dir.join("patroni.yml");
        // JSON is YAML: Patroni reads it as its configuration file.
        let text = serde_json::to_string_pretty(&config).unwrap_or_default();
        std::fs::write(&config_path, text).map_err(|e| {
            HarnessError::io(format!("could not write {}", config_path.display()), e)
        })?;
        Ok(Self {
            log: dir.join("patroni.log"),
            name,
            pg_port,
            api_port,
            dir,
            config: config_path,
            process: None,
            env,
        })
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The postmaster's pid, from `postmaster.pid` (Patroni starts it detached, in a
    /// session of its own).
    fn postmaster_pid(&self) -> Option<libc::pid_t> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// SIGKILL to Patroni and to PostgreSQL's process group (postmaster and backends).
    pub(super) fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            if let Some(pid) = process.pid() {
                // SAFETY: signalling our own unreaped child.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGKILL);
                }
            }
            process.stop();
        }
        if let Some(pid) = self.postmaster_pid().filter(|&p| p > 1) {
            // SAFETY: kill(2) with a negative pid signals that process group; the
            // postmaster leads its own (Patroni calls setsid before starting it).
            unsafe {
                if libc::kill(-pid, libc::SIGKILL) != 0 {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
    }
}

/// The labels of a member's Pod: Patroni selects its members by
/// `kubernetes.labels` (default `application: patroni`) plus the scope label
/// (default `cluster-name`) set to the scope.
fn pod_labels(config: &Value) -> Value {
    let mut labels = match &config["kubernetes"]["labels"] {
        Value::Object(map) => map.clone(),
        _ => serde_json::Map::from_iter([("application".to_owned(), json!("patroni"))]),
    };
    let scope_label = config["kubernetes"]["scope_label"]
        .as_str()
        .unwrap_or("cluster-name");
    labels.insert(scope_label.to_owned(), config["scope"].clone());
    // A Citus group's pods carry the label Patroni selects the group's members by
    // (the StatefulSets' pod templates do).
    if let Some(group) = config["citus"]["group"].as_i64() {
        labels.insert("citus-group".to_owned(), json!(group.to_string()));
    }
    Value::Object(labels)
}

/// Sets `value` at `path` in `config`, making objects on the way (replacing non-objects).
fn set_path(config: &mut Value, path: &[&str], value: Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut node = config;
    for key in parents {
        if !node.is_object() {
            *node = json!({});
        }
        node = &mut node[*key];
    }
    if !node.is_object() {
        *node = json!({});
    }
    node[*last] = value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_path_fills_nested_fields_and_keeps_the_rest() {
        let mut config = json!({"postgresql": {"parameters": {"hba_file": "/x"}}, "tags": 1});
        set_path(
            &mut config,
            &["postgresql", "parameters", "port"],
            json!(5433),
        );
        set_path(&mut config, &["tags", "nofailover"], json!(true));
        set_path(&mut config, &["kubernetes", "context"], json!(CONTEXT));
        assert_eq!(
            config,
            json!({
                "postgresql": {"parameters": {"hba_file": "/x", "port": 5433}},
                "tags": {"nofailover": true},
                "kubernetes": {"context": CONTEXT},
            })
        );
    }

    #[test]
    fn a_pod_carries_the_configured_labels_and_the_scope() {
        let config =
            json!({"scope": "s", "kubernetes": {"labels": {"app": "db"}, "scope_label": "k"}});
        assert_eq!(pod_labels(&config), json!({"app": "db", "k": "s"}));
        assert_eq!(
            pod_labels(&json!({"scope": "s"})),
            json!({"application": "patroni", "cluster-name": "s"})
        );
    }
}
