//! A Patroni cluster: real PostgreSQL servers on loopback, each run by its own Patroni,
//! with a real kube-apiserver ([`KubeApiServer`]) as the DCS.
//!
//! Each member gets a directory (data, config, log), a PostgreSQL port and a REST API
//! port; Patroni runs as the `postgres` user (when we are root) from
//! `scripts/install-deps.sh --test`'s venv. On the API server the cluster gets a fresh
//! namespace, a ServiceAccount bound to a Role whose rules the test supplies (so RBAC
//! is exercised: Patroni is never admin), that account's token in a kubeconfig
//! (`KUBECONFIG`, context [`CONTEXT`]: how Patroni finds the API server outside a
//! pod), and one Pod object per member named after it, carrying the labels Patroni
//! selects its members by. No kubelet runs: the pods stay Pending, and Patroni keeps
//! its member state and role label on them as it would on the database pods.
//!
//! The configuration is a test's `patroni.yml` as JSON; the harness fills in what is
//! per member or per machine (name, addresses and ports, data and bin directories,
//! the socket directory, `kubernetes.namespace` and `context`) and leaves the rest.
//! Passwords are the harness's, handed to Patroni through `PATRONI_*_PASSWORD`.
//!
//! Dropping the cluster kills every Patroni and PostgreSQL (SIGKILL; PostgreSQL runs
//! in its own process group, which Patroni makes).

mod dcs;
mod member;
pub mod writer;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umstore_localpg::{chown_to_postgres_if_root, ChildSetup, PgBinaries};

pub use dcs::CONTEXT;
pub use member::MemberSpec;

use member::Member;

use crate::http::http;
use crate::process::{find_program, log_tail, ServerProcess};
use crate::skip::{skip_or_fail, Component};
use crate::testdir::{random_hex, write_file};
use crate::{HarnessError, KubeApiServer, TestDir};

/// Where `scripts/install-deps.sh --test` makes Patroni's venv.
pub const PATRONI_VENV: &str = "/opt/umstore-patroni";
/// The variable that points at another `patroni` executable.
pub const PATRONI_ENV: &str = "UMSTORE_PATRONI";

/// Why [`PatroniCluster::start`] gave no cluster.
#[derive(Debug, thiserror::Error)]
pub enum PatroniUnavailable {
    /// Patroni or PostgreSQL is not installed here (see
    /// [`PatroniCluster::start_or_skip`]).
    #[error("Patroni is not available here: {0}")]
    Skip(String),
    /// Everything is installed but the cluster could not be set up.
    #[error(transparent)]
    Failed(#[from] HarnessError),
}

/// A Patroni cluster on loopback with the kube-apiserver as its DCS. See the module
/// documentation.
#[derive(Debug)]
pub struct PatroniCluster {
    // Field order is drop order; `Drop` kills the members before the directory goes.
    members: Vec<Member>,
    admin: dcs::Admin,
    namespace: String,
    patroni: PathBuf,
    kubeconfig: PathBuf,
    superuser: String,
    passwords: Passwords,
    role_label: String,
    dir: TestDir,
}

#[derive(Debug, Clone)]
struct Passwords {
    superuser: String,
    replication: String,
}

impl PatroniCluster {
    /// Sets up the namespace, RBAC (`rules`: a JSON array of RBAC `PolicyRule`s for
    /// the members' Role), Pods and kubeconfig on `kube`, and starts one Patroni per
    /// member. Does not wait for anything: see [`Self::wait_for_leader`].
    ///
    /// `patroni` is looked for in `UMSTORE_PATRONI`, then `/opt/umstore-patroni/bin`,
    /// then on `PATH`; PostgreSQL's programs as [`PgBinaries::discover`] finds them.
    pub fn start(
        kube: &KubeApiServer,
        members: Vec<MemberSpec>,
        rules: &Value,
    ) -> Result<Self, PatroniUnavailable> {
        let patroni = find_patroni()?;
        let bins = PgBinaries::discover().map_err(|e| PatroniUnavailable::Skip(e.to_string()))?;
        let dir = TestDir::new("patroni")?;
        let admin = dcs::Admin::new(kube);
        let namespace = format!("patroni-{}", random_hex(4)?);
        let token = admin.set_up_namespace(&namespace, rules)?;

        // Copies readable by `postgres`, in a directory it owns.
        let ca = dir.path().join("ca.crt");
        std::fs::copy(admin.ca_cert(), &ca)
            .map_err(|e| HarnessError::io(format!("could not copy to {}", ca.display()), e))?;
        let kubeconfig = dir.path().join("kubeconfig");
        write_file(&kubeconfig, &admin.kubeconfig(&namespace, &token, &ca))?;

        let passwords = Passwords {
            superuser: random_hex(12)?,
            replication: random_hex(12)?,
        };
        let superuser = members
            .first()
            .and_then(|m| {
                m.config["postgresql"]["authentication"]["superuser"]["username"].as_str()
            })
            .unwrap_or("postgres")
            .to_owned();
        let role_label = members
            .first()
            .and_then(|m| m.config["kubernetes"]["role_label"].as_str())
            .unwrap_or("role")
            .to_owned();

        let mut cluster = Self {
            members: Vec::new(),
            admin,
            namespace,
            patroni,
            kubeconfig,
            superuser,
            passwords,
            role_label,
            dir,
        };
        for spec in members {
            let member = Member::prepare(
                spec,
                cluster.dir.path(),
                &cluster.namespace,
                &bins.bindir,
                &cluster.admin,
            )?;
            cluster.members.push(member);
        }
        chown_to_postgres_if_root(cluster.dir.path()).map_err(HarnessError::from)?;
        for index in 0..cluster.members.len() {
            cluster.spawn(index)?;
        }
        Ok(cluster)
    }

    /// [`Self::start`] for a test: `None` after [`skip_or_fail`] when Patroni or
    /// PostgreSQL is missing; panics when the cluster could not be set up.
    #[track_caller]
    pub fn start_or_skip(
        kube: &KubeApiServer,
        members: Vec<MemberSpec>,
        rules: &Value,
    ) -> Option<Self> {
        match Self::start(kube, members, rules) {
            Ok(cluster) => Some(cluster),
            Err(PatroniUnavailable::Skip(reason)) => {
                skip_or_fail(Component::Patroni, reason);
                None
            }
            Err(e) => panic!("the Patroni cluster could not be set up: {e}"),
        }
    }

    /// Starts member `index`'s Patroni (again, after [`Self::kill_member`]).
    fn spawn(&mut self, index: usize) -> Result<(), HarnessError> {
        let member = &self.members[index];
        let mut cmd = Command::new(&self.patroni);
        cmd.arg(&member.config)
            .current_dir(&member.dir)
            .env("KUBECONFIG", &self.kubeconfig)
            // Outside a pod: never the in-cluster configuration of a machine that
            // happens to run in one.
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env("PATRONI_SUPERUSER_PASSWORD", &self.passwords.superuser)
            .env("PATRONI_REWIND_PASSWORD", &self.passwords.superuser)
            .env("PATRONI_REPLICATION_PASSWORD", &self.passwords.replication)
            .envs(member.env.iter().map(|(k, v)| (k, v)));
        let process =
            ServerProcess::spawn("Patroni", cmd, ChildSetup::postgres(), member.log.clone())?;
        self.members[index].process = Some(process);
        Ok(())
    }

    fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .unwrap_or_else(|| panic!("no Patroni member named {name}"))
    }

    fn index_of(&self, name: &str) -> usize {
        self.members
            .iter()
            .position(|m| m.name == name)
            .unwrap_or_else(|| panic!("no Patroni member named {name}"))
    }

    /// The members' names, in the order given.
    pub fn member_names(&self) -> Vec<String> {
        self.members.iter().map(|m| m.name.clone()).collect()
    }

    /// The names of the members whose Patroni was not killed.
    pub fn live_members(&self) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| m.process.is_some())
            .map(|m| m.name.clone())
            .collect()
    }

    /// The namespace holding the Pods and Patroni's ConfigMaps.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The directory holding every member's data, configuration and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Member `name`'s Patroni log (PostgreSQL's output is in it too).
    pub fn log(&self, name: &str) -> &Path {
        &self.member(name).log
    }

    /// Member `name`'s PostgreSQL port.
    pub fn pg_port(&self, name: &str) -> u16 {
        self.member(name).pg_port
    }

    /// Member `name`'s REST API port.
    pub fn api_port(&self, name: &str) -> u16 {
        self.member(name).api_port
    }

    /// The superuser's name (from the configuration's `postgresql.authentication`).
    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    /// The superuser's password.
    pub fn superuser_password(&self) -> &str {
        &self.passwords.superuser
    }

    /// `dbname` on member `name` as the superuser, over TCP.
    pub fn member_conninfo(&self, name: &str, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} password={} dbname={dbname} connect_timeout=2",
            self.pg_port(name),
            self.superuser,
            self.passwords.superuser
        )
    }

    /// `dbname` on whichever member accepts writes: every member's address with
    /// `target_session_attrs=read-write`, so the client tries them in turn and keeps
    /// the primary. What the read-write Service gives inside a cluster.
    pub fn read_write_conninfo(&self, dbname: &str) -> String {
        let hosts = vec!["127.0.0.1"; self.members.len()].join(",");
        let ports = self
            .members
            .iter()
            .map(|m| m.pg_port.to_string())
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "host={hosts} port={ports} user={} password={} dbname={dbname} \
             target_session_attrs=read-write connect_timeout=2",
            self.superuser, self.passwords.superuser
        )
    }

    /// `GET path` on member `name`'s REST API: the status and the parsed body
    /// (`null` when not JSON).
    pub fn rest_get(&self, name: &str, path: &str) -> Result<(u16, Value), HarnessError> {
        let port = self.api_port(name);
        let (status, body) = http(port, "GET", path, None, Duration::from_secs(5))
            .map_err(|e| HarnessError::io(format!("GET http://127.0.0.1:{port}{path}"), e))?;
        Ok((status, serde_json::from_str(&body).unwrap_or(Value::Null)))
    }

    /// The member that holds the leader lock and runs as primary (its REST API answers
    /// `GET /primary` with 200), if any.
    pub fn leader(&self) -> Option<String> {
        self.leader_of(&self.member_names())
    }

    /// The leader among `names` (one Citus group's members: several groups share a
    /// scope, each with a leader of its own), if any.
    pub fn leader_of(&self, names: &[String]) -> Option<String> {
        self.members
            .iter()
            .filter(|m| m.process.is_some() && names.contains(&m.name))
            .find(|m| matches!(self.rest_get(&m.name, "/primary"), Ok((200, _))))
            .map(|m| m.name.clone())
    }

    /// Waits for a leader among `names` other than `old`; returns its name.
    pub fn wait_for_new_leader_of(
        &self,
        names: &[String],
        old: Option<&str>,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let mut leader = None;
        self.wait_until(timeout, &format!("a new leader among {names:?}"), || {
            leader = self.leader_of(names).filter(|l| Some(l.as_str()) != old);
            leader.is_some()
        })?;
        Ok(leader.unwrap_or_default())
    }

    /// Waits for a leader; returns its name.
    pub fn wait_for_leader(&self, timeout: Duration) -> Result<String, HarnessError> {
        self.wait_for_new_leader(None, timeout)
    }

    /// Waits for a leader other than `old`; returns its name.
    pub fn wait_for_new_leader(
        &self,
        old: Option<&str>,
        timeout: Duration,
    ) -> Result<String, HarnessError> {
        let mut leader = None;
        self.wait_until(timeout, "a new leader", || {
            leader = self.leader().filter(|l| Some(l.as_str()) != old);
            leader.is_some()
        })?;
        Ok(leader.unwrap_or_default())
    }

    /// Patroni's view of the cluster (`GET /cluster` on the first live member that
    /// answers): `{"members": [{"name", "role", "state", "lag", "tags", ...}], ...}`.
    pub fn cluster_state(&self) -> Result<Value, HarnessError> {
        let mut last = None;
        for member in self.members.iter().filter(|m| m.process.is_some()) {
            match self.rest_get(&member.name, "/cluster") {
                Ok((200, state)) => return Ok(state),
                Ok((status, body)) => {
                    last = Some(HarnessError::CommandFailed {
                        command: format!("GET /cluster on {}", member.name),
                        output: format!("{status}: {body}"),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| HarnessError::CommandFailed {
            command: "GET /cluster".into(),
            output: "no live member".into(),
        }))
    }

    /// Member `name`'s role in [`Self::cluster_state`] (`leader`, `replica`,
    /// `sync_standby`, ...) and state (`running`, `streaming`, ...).
    pub fn member_state(&self, name: &str) -> Option<(String, String)> {
        let state = self.cluster_state().ok()?;
        let member = state["members"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == name)?;
        Some((
            member["role"].as_str()?.to_owned(),
            member["state"].as_str()?.to_owned(),
        ))
    }

    /// Waits until every live member other than the leader streams from it, and, when
    /// `sync_standbys` is above 0, that many are synchronous standbys.
    pub fn wait_for_replication(
        &self,
        sync_standbys: usize,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let live = self.live_members().len();
        self.wait_until(timeout, "every replica streaming", || {
            let Ok(state) = self.cluster_state() else {
                return false;
            };
            let Some(members) = state["members"].as_array() else {
                return false;
            };
            let live_in_state = members
                .iter()
                .filter(|m| self.live_members().iter().any(|n| m["name"] == n.as_str()))
                .collect::<Vec<_>>();
            let leaders = live_in_state
                .iter()
                .filter(|m| m["role"] == "leader" && m["state"] == "running")
                .count();
            let streaming = live_in_state
                .iter()
                .filter(|m| m["role"] != "leader" && m["state"] == "streaming")
                .count();
            let sync = live_in_state
                .iter()
                .filter(|m| m["role"] == "sync_standby" && m["state"] == "streaming")
                .count();
            leaders == 1 && leaders + streaming == live && sync >= sync_standbys
        })
    }

    /// SIGKILL to member `name`'s Patroni and its PostgreSQL (postmaster and
    /// backends): a crash, nothing is shut down cleanly.
    pub fn kill_member(&mut self, name: &str) {
        let index = self.index_of(name);
        self.members[index].kill();
    }

    /// Starts a killed member's Patroni again on its data directory.
    pub fn restart_member(&mut self, name: &str) -> Result<(), HarnessError> {
        let index = self.index_of(name);
        if self.members[index].process.is_some() {
            return Ok(());
        }
        self.spawn(index)
    }

    /// `POST /switchover` on the leader's REST API (`{"leader", "candidate"}`):
    /// Patroni answers once the switchover is done (200) or refused. Returns the status
    /// and Patroni's message.
    pub fn switchover(&self, leader: &str, candidate: &str) -> Result<(u16, String), HarnessError> {
        let port = self.api_port(leader);
        let body = json!({"leader": leader, "candidate": candidate}).to_string();
        http(
            port,
            "POST",
            "/switchover",
            Some(&body),
            Duration::from_secs(60),
        )
        .map_err(|e| HarnessError::io(format!("POST http://127.0.0.1:{port}/switchover"), e))
    }

    /// Member `name`'s Pod as the API server holds it.
    pub fn pod(&self, name: &str) -> Result<Value, HarnessError> {
        self.admin.pod(&self.namespace, name)
    }

    /// Every member's Pod as the API server holds it (what the operator lists).
    pub fn pods(&self) -> Result<Vec<Value>, HarnessError> {
        let list = self
            .admin
            .get(&format!("/api/v1/namespaces/{}/pods", self.namespace))?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    /// The role label Patroni keeps on member `name`'s Pod (the configuration's
    /// `kubernetes.role_label`), if set.
    pub fn pod_role(&self, name: &str) -> Result<Option<String>, HarnessError> {
        let pod = self.pod(name)?;
        Ok(pod["metadata"]["labels"][&self.role_label]
            .as_str()
            .map(str::to_owned))
    }

    /// Polls `done` every 200 ms until it is true; after `timeout` an error naming
    /// `what`, with the end of every member's log.
    pub fn wait_until(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if done() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("gave no {what} within {}s", timeout.as_secs())));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn not_ready(&self, problem: String) -> HarnessError {
        let tails = self
            .members
            .iter()
            .map(|m| {
                let tail = log_tail(&m.log);
                let lines: Vec<&str> = tail.lines().collect();
                format!(
                    "--- {} ({}):\n{}",
                    m.name,
                    m.log.display(),
                    lines[lines.len().saturating_sub(8)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        HarnessError::NotReady {
            server: "Patroni cluster",
            problem,
            log: self.dir.path().to_path_buf(),
            log_tail: tails,
        }
    }
}

impl Drop for PatroniCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            member.kill();
        }
    }
}

/// `$UMSTORE_PATRONI`, else the install script's venv, else `patroni` on `PATH`.
fn find_patroni() -> Result<PathBuf, PatroniUnavailable> {
    if let Some(path) = std::env::var_os(PATRONI_ENV).map(PathBuf::from) {
        if path.is_file() {
            return Ok(path);
        }
        return Err(HarnessError::ProgramNotFound {
            program: "patroni",
            looked_in: format!("{PATRONI_ENV}={}", path.display()),
            install: "point it at the patroni executable, or unset it",
        }
        .into());
    }
    let in_venv = Path::new(PATRONI_VENV).join("bin/patroni");
    if in_venv.is_file() {
        return Ok(in_venv);
    }
    find_program("patroni", &[]).ok_or_else(|| {
        PatroniUnavailable::Skip(format!(
            "patroni not found ({PATRONI_ENV}, {}, PATH): scripts/install-deps.sh --test \
             installs it",
            in_venv.display()
        ))
    })
}
