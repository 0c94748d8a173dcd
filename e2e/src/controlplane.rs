//! A control plane that acts on objects: kube-controller-manager, kube-scheduler and
//! kwok (the kubelet of fake nodes) beside a [`KubeApiServer`].

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use umstore_localpg::ChildSetup;

use crate::http::http;
use crate::kubeapi::{find_binary, workspace_bin};
use crate::process::{accepts_tcp, ServerProcess};
use crate::skip::{skip_or_fail, Component};
use crate::{free_port, keeper, HarnessError, KubeApiServer, KubeApiUnavailable};

/// The fake node every pod without a GPU lands on.
pub const NODE: &str = "kwok-node-0";
/// The fake GPU node: [`GPU_RESOURCE`] × [`GPUS_PER_NODE`], tainted
/// [`GPU_TAINT`]`=present:NoSchedule` as GPU node pools usually are, so only pods that
/// tolerate it land there.
pub const GPU_NODE: &str = "kwok-gpu-node-0";
/// The extended resource the GPU node offers.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// The key of the GPU node's taint.
pub const GPU_TAINT: &str = "nvidia.com/gpu";
/// How many GPUs a GPU node has.
pub const GPUS_PER_NODE: u32 = 8;
/// The default StorageClass: kwok provisions and binds a (fake, hostPath) volume for
/// each claim of it at once.
pub const STORAGE_CLASS: &str = "kwok-volume";
/// The annotation (`key=value`) that hands a node to kwok.
pub const KWOK_NODE_ANNOTATION: (&str, &str) = ("kwok.x-k8s.io/node", "fake");

/// How long the controller manager, the scheduler and kwok may take, after the API
/// server, to make the nodes Ready and schedulable (one to two seconds on 2 cores).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// Pod IPs kwok hands out (apart from the API server's service range, 10.96.0.0/16).
const POD_CIDR: &str = "10.244.0.0/16";

/// Why [`ControlPlane::start`] gave no control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneUnavailable {
    /// A binary (kube-apiserver, etcd, kube-controller-manager, kube-scheduler, kwok),
    /// kwok's stage files or openssl is not here: tests skip with the reason (see
    /// [`ControlPlane::start_or_skip`]).
    #[error("the kube control plane is not available here: {0}")]
    Skip(String),
    /// Everything is here but something failed to start.
    #[error(transparent)]
    Failed(#[from] HarnessError),
}

impl From<KubeApiUnavailable> for ControlPlaneUnavailable {
    fn from(e: KubeApiUnavailable) -> Self {
        match e {
            KubeApiUnavailable::Skip(reason) => Self::Skip(reason),
            KubeApiUnavailable::Failed(e) => Self::Failed(e),
        }
    }
}

/// A fake node for kwok to keep Ready: 32 CPUs, 256Gi of memory, 110 pods (unless
/// [`FakeNode::with_capacity`] says otherwise), labels `type: kwok` and
/// `kubernetes.io/hostname`, and optionally GPUs (see [`GPU_NODE`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeNode {
    /// The node's name.
    pub name: String,
    /// How many [`GPU_RESOURCE`] it offers; with any, it is tainted [`GPU_TAINT`].
    pub gpus: u32,
    /// CPUs, memory (a quantity) and pods it offers.
    capacity: (u32, String, u32),
    /// Labels beyond the ones every fake node has (a topology zone, say).
    labels: Vec<(String, String)>,
}

impl FakeNode {
    /// A node without GPUs.
    pub fn cpu(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            gpus: 0,
            capacity: (32, "256Gi".into(), 110),
            labels: Vec::new(),
        }
    }

    /// The same node offering `cpus` CPUs, `memory` (a quantity such as `4Ti`) and
    /// room for `pods` pods: a fleet of stores needs a few large nodes rather than
    /// hundreds of small ones.
    pub fn with_capacity(mut self, cpus: u32, memory: &str, pods: u32) -> Self {
        self.capacity = (cpus, memory.to_string(), pods);
        self
    }

    /// The same node with label `key: value` (`topology.kubernetes.io/zone`, a
    /// residency label a cluster's placement selects).
    pub fn with_label(mut self, key: &str, value: &str) -> Self {
        self.labels.push((key.to_string(), value.to_string()));
        self
    }

    /// A node with [`GPUS_PER_NODE`] GPUs.
    pub fn gpu(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            gpus: GPUS_PER_NODE,
            capacity: (32, "256Gi".into(), 110),
            labels: Vec::new(),
        }
    }

    /// The Node object (status included: kwok keeps the allocatable it finds).
    fn object(&self) -> Value {
        let (cpus, memory, pods) = &self.capacity;
        let mut resources =
            json!({"cpu": cpus.to_string(), "memory": memory, "pods": pods.to_string()});
        let mut labels = json!({
            "type": "kwok",
            "kubernetes.io/hostname": self.name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
        });
        for (key, value) in &self.labels {
            labels[key] = json!(value);
        }
        let mut taints = json!([]);
        if self.gpus > 0 {
            resources[GPU_RESOURCE] = json!(self.gpus.to_string());
            labels["nvidia.com/gpu.present"] = json!("true");
            taints = json!([{"key": GPU_TAINT, "value": "present", "effect": "NoSchedule"}]);
        }
        json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": labels,
                "annotations": {KWOK_NODE_ANNOTATION.0: KWOK_NODE_ANNOTATION.1},
            },
            "spec": {"taints": taints},
            "status": {"allocatable": resources, "capacity": resources},
        })
    }
}

/// A [`KubeApiServer`] with kube-controller-manager (every default controller:
/// workloads, garbage collector, node lifecycle, service accounts, endpoints, volume
/// binding), kube-scheduler and kwok, all on loopback in the API server's directory,
/// and fake nodes ([`NODE`], [`GPU_NODE`]) that kwok keeps Ready.
///
/// kwok plays the kubelet: a scheduled pod becomes Running and Ready at once (its
/// containers never run, nor do probes), a Job's pod then Succeeded, a deleted pod
/// goes away, and a claim of the default StorageClass [`STORAGE_CLASS`] gets a volume
/// and binds. So StatefulSets and Deployments reach their ready replicas, Jobs
/// complete, owners' deletions cascade and volume claim templates give bound claims.
/// Nothing answers on a pod's IP: a test that needs a server behind a Service runs it
/// on loopback itself.
///
/// Two failures can be provoked through this crate's own stages (`e2e/kwok-stages/`):
/// a pod with a container image under `unpullable.invalid/` stays Pending with that
/// container in `ImagePullBackOff`, and a running pod labelled
/// `umstore.io/kwok-test=crash-loop` has its first container in `CrashLoopBackOff`
/// (4 restarts, last exit `Error` with code 1).
///
/// The three components authenticate with the admin token through
/// [`KubeApiServer::kubeconfig`]; the controller manager signs legacy service-account
/// tokens with the API server's key. Everything stops on drop, in reverse order of
/// start (kwok, scheduler, controller manager, API server, etcd).
#[derive(Debug)]
pub struct ControlPlane {
    // Field order is drop order: the components stop before the API server, whose
    // directory holds their logs.
    kwok: ServerProcess,
    scheduler: ServerProcess,
    controller_manager: ServerProcess,
    api: KubeApiServer,
    nodes: Mutex<Vec<FakeNode>>,
}

impl ControlPlane {
    /// Starts etcd and kube-apiserver ([`KubeApiServer::start`]), then
    /// kube-controller-manager, kube-scheduler and kwok; creates [`STORAGE_CLASS`],
    /// [`NODE`] and [`GPU_NODE`]; waits until both nodes are Ready without the
    /// `node.kubernetes.io/not-ready` taint, the `default` ServiceAccount of namespace
    /// `default` exists and the scheduler listens. Or says why it cannot run here.
    ///
    /// Binaries are looked for in `UMSTORE_KUBE_CONTROLLER_MANAGER`,
    /// `UMSTORE_KUBE_SCHEDULER` and `UMSTORE_KWOK` (and those of
    /// [`KubeApiServer::start`]), then in the workspace's `.bin/`, then on `PATH`;
    /// kwok's stage files (`*.yaml`, kind `Stage`) in `UMSTORE_KWOK_STAGES`, else
    /// `.bin/kwok-stages/` (both where `scripts/install-deps.sh --test` puts them).
    pub fn start() -> Result<Self, ControlPlaneUnavailable> {
        let controller_manager =
            find_binary("kube-controller-manager", "UMSTORE_KUBE_CONTROLLER_MANAGER")?;
        let scheduler = find_binary("kube-scheduler", "UMSTORE_KUBE_SCHEDULER")?;
        let kwok = find_binary("kwok", "UMSTORE_KWOK")?;
        let stages = kwok_stages()?;
        let mut api = KubeApiServer::start()?;
        let binaries = Binaries {
            controller_manager,
            scheduler,
            kwok,
            stages,
        };
        let nodes = vec![FakeNode::cpu(NODE), FakeNode::gpu(GPU_NODE)];
        match launch(&api, &binaries, &nodes) {
            Ok([controller_manager, scheduler, kwok]) => Ok(Self {
                kwok,
                scheduler,
                controller_manager,
                api,
                nodes: Mutex::new(nodes),
            }),
            Err(e) => {
                // The logs stay until the process exits (kept if the test panics).
                api.remove_dir_at_exit();
                Err(e.into())
            }
        }
    }

    /// [`Self::start`] for a test: `None` after [`skip_or_fail`] when something is
    /// missing (the test returns; under `UMSTORE_REQUIRE_COMPONENTS=1` it has failed
    /// already); panics when everything is here but does not start.
    #[track_caller]
    pub fn start_or_skip() -> Option<Self> {
        match Self::start() {
            Ok(control_plane) => Some(control_plane),
            Err(ControlPlaneUnavailable::Skip(reason)) => {
                skip_or_fail(Component::ControlPlane, reason);
                None
            }
            Err(e) => panic!("the kube control plane failed to start: {e}"),
        }
    }

    pub(crate) fn stop_at_exit(mut self) -> Self {
        // Registered in stop order: the components, then the API server and etcd.
        for pid in [
            self.kwok.pid(),
            self.scheduler.pid(),
            self.controller_manager.pid(),
        ]
        .into_iter()
        .flatten()
        {
            keeper::stop_at_exit(pid, libc::SIGKILL);
        }
        self.api = self.api.stop_at_exit();
        self
    }

    /// The API server: its URL, CA, tokens and kubeconfig.
    pub fn api(&self) -> &KubeApiServer {
        &self.api
    }

    /// The API server's kubeconfig (context `admin` current; see
    /// [`KubeApiServer::kubeconfig`]).
    pub fn kubeconfig(&self) -> &Path {
        self.api.kubeconfig()
    }

    /// The fake nodes: those made at start ([`NODE`], [`GPU_NODE`]) and by
    /// [`Self::add_node`].
    pub fn nodes(&self) -> Vec<FakeNode> {
        self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The directory of every log: `kube-apiserver.log`, `etcd.log`,
    /// `kube-controller-manager.log`, `kube-scheduler.log`, `kwok.log`.
    pub fn dir(&self) -> &Path {
        self.api.dir()
    }

    /// Adds a fake node and waits until it is Ready and schedulable. The node stays for
    /// as long as the control plane (other tests sharing it see it too).
    pub fn add_node(&self, node: FakeNode) -> Result<(), HarnessError> {
        create(&self.api, "/api/v1/nodes", &node.object())?;
        let deadline = Instant::now() + READY_TIMEOUT;
        let names = [node.name.as_str()];
        let timed_out = |what: &str, last: String| {
            format!(
                "did not get node {} {what} within {}s; last: {last}",
                node.name,
                READY_TIMEOUT.as_secs()
            )
        };
        poll_until(deadline, || nodes_ready(&self.api, &names))
            .map_err(|last| self.kwok.not_ready(timed_out("Ready", last)))?;
        poll_until(deadline, || nodes_untainted(&self.api, &names)).map_err(|last| {
            self.controller_manager
                .not_ready(timed_out("without the not-ready taint", last))
        })?;
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(node);
        Ok(())
    }
}

/// Where each program and kwok's stage files are.
struct Binaries {
    controller_manager: PathBuf,
    scheduler: PathBuf,
    kwok: PathBuf,
    stages: Vec<PathBuf>,
}

/// Indexes into the `[controller manager, scheduler, kwok]` array [`launch`] returns.
const CONTROLLER_MANAGER: usize = 0;
const SCHEDULER: usize = 1;
const KWOK: usize = 2;

/// Starts the three components against `api`, creates the StorageClass and `nodes`,
/// and waits until the cluster schedules and runs pods.
fn launch(
    api: &KubeApiServer,
    bin: &Binaries,
    nodes: &[FakeNode],
) -> Result<[ServerProcess; 3], HarnessError> {
    let dir = api.dir();
    let kubeconfig = api.kubeconfig();
    let (manager_port, scheduler_port, kwok_port) = (free_port()?, free_port()?, free_port()?);

    let mut cmd = Command::new(&bin.controller_manager);
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["--bind-address=127.0.0.1", "--leader-elect=false"])
        .arg(format!("--secure-port={manager_port}"))
        .arg(format!(
            "--cert-dir={}",
            dir.join("kube-controller-manager").display()
        ))
        // Every controller enabled by default (bootstrap-token ones stay off).
        .arg("--controllers=*")
        .arg(format!(
            "--service-account-private-key-file={}",
            api.service_account_key().display()
        ))
        .arg(format!("--root-ca-file={}", api.ca_cert().display()))
        // The default 20/s throttles a test creating dozens of pods.
        .args(["--kube-api-qps=100", "--kube-api-burst=200"]);
    let controller_manager = ServerProcess::spawn(
        "kube-controller-manager",
        cmd,
        ChildSetup::same_user(),
        dir.join("kube-controller-manager.log"),
    )?;

    let mut cmd = Command::new(&bin.scheduler);
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(["--bind-address=127.0.0.1", "--leader-elect=false"])
        .arg(format!("--secure-port={scheduler_port}"))
        .arg(format!(
            "--cert-dir={}",
            dir.join("kube-scheduler").display()
        ));
    let scheduler = ServerProcess::spawn(
        "kube-scheduler",
        cmd,
        ChildSetup::same_user(),
        dir.join("kube-scheduler.log"),
    )?;

    let mut cmd = Command::new(&bin.kwok);
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(
            bin.stages
                .iter()
                .map(|s| format!("--config={}", s.display())),
        )
        .arg("--manage-all-nodes=false")
        .arg(format!(
            "--manage-nodes-with-annotation-selector={}={}",
            KWOK_NODE_ANNOTATION.0, KWOK_NODE_ANNOTATION.1
        ))
        // Its health endpoint (plain HTTP); without it kwok serves nothing.
        .arg(format!("--server-address=127.0.0.1:{kwok_port}"))
        .arg(format!("--cidr={POD_CIDR}"))
        // kwok also reads ~/.kwok/kwok.yaml when it exists: not a developer's.
        .env("HOME", dir);
    let kwok = ServerProcess::spawn("kwok", cmd, ChildSetup::same_user(), dir.join("kwok.log"))?;

    let mut processes = [controller_manager, scheduler, kwok];
    create(
        api,
        "/apis/storage.k8s.io/v1/storageclasses",
        &json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {
                "name": STORAGE_CLASS,
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
            // kwok's volume stages act on the claims of this provisioner's class.
            "provisioner": "kwok.x-k8s.io/volume",
            "reclaimPolicy": "Delete",
            "volumeBindingMode": "Immediate",
        }),
    )?;
    for node in nodes {
        create(api, "/api/v1/nodes", &node.object())?;
    }

    let deadline = Instant::now() + READY_TIMEOUT;
    wait(
        &mut processes,
        KWOK,
        deadline,
        "/healthz answering 200",
        || match http(kwok_port, "GET", "/healthz", None, Duration::from_secs(2)) {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status}: {}", body.trim())),
            Err(e) => Err(e.to_string()),
        },
    )?;
    let names: Vec<&str> = nodes.iter().map(|n| n.name.as_str()).collect();
    wait(&mut processes, KWOK, deadline, "nodes Ready", || {
        nodes_ready(api, &names)
    })?;
    // The node-lifecycle controller lifts the taint the API server put on the new
    // nodes; the service-account controller makes every namespace's `default`
    // account, without which no pod is admitted.
    wait(
        &mut processes,
        CONTROLLER_MANAGER,
        deadline,
        "nodes without the not-ready taint",
        || nodes_untainted(api, &names),
    )?;
    wait(
        &mut processes,
        CONTROLLER_MANAGER,
        deadline,
        "the default ServiceAccount of namespace default",
        || match api.admin_request(
            "GET",
            "/api/v1/namespaces/default/serviceaccounts/default",
            None,
        ) {
            Ok((200, _)) => Ok(()),
            Ok((status, body)) => Err(format!("{status}: {body}")),
            Err(e) => Err(e.to_string()),
        },
    )?;
    wait(
        &mut processes,
        SCHEDULER,
        deadline,
        "its secure port open",
        || {
            if accepts_tcp(scheduler_port) {
                Ok(())
            } else {
                Err(format!("127.0.0.1:{scheduler_port} refuses connections"))
            }
        },
    )?;
    Ok(processes)
}

/// `POST path body` as the admin, which must answer 201.
fn create(api: &KubeApiServer, path: &str, body: &Value) -> Result<(), HarnessError> {
    match api.admin_request("POST", path, Some(body))? {
        (200 | 201, _) => Ok(()),
        (status, answer) => Err(HarnessError::CommandFailed {
            command: format!("POST {path} ({})", body["metadata"]["name"]),
            output: format!("{status}: {answer}"),
        }),
    }
}

/// Ok when every node in `names` has condition Ready True; else what one has.
fn nodes_ready(api: &KubeApiServer, names: &[&str]) -> Result<(), String> {
    for name in names {
        let node = get_node(api, name)?;
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["type"] == "Ready");
        match ready {
            Some(c) if c["status"] == "True" => {}
            Some(c) => return Err(format!("{name}: Ready is {}", c["status"])),
            None => return Err(format!("{name}: no Ready condition yet")),
        }
    }
    Ok(())
}

/// Ok when no node in `names` has the `not-ready` or `unreachable` taint.
fn nodes_untainted(api: &KubeApiServer, names: &[&str]) -> Result<(), String> {
    for name in names {
        let node = get_node(api, name)?;
        let blocking: Vec<&str> = node["spec"]["taints"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t["key"].as_str())
            .filter(|k| {
                matches!(
                    *k,
                    "node.kubernetes.io/not-ready" | "node.kubernetes.io/unreachable"
                )
            })
            .collect();
        if !blocking.is_empty() {
            return Err(format!("{name} tainted {}", blocking.join(", ")));
        }
    }
    Ok(())
}

fn get_node(api: &KubeApiServer, name: &str) -> Result<Value, String> {
    match api.admin_request("GET", &format!("/api/v1/nodes/{name}"), None) {
        Ok((200, node)) => Ok(node),
        Ok((status, body)) => Err(format!("GET node {name}: {status}: {body}")),
        Err(e) => Err(e.to_string()),
    }
}

/// Polls `check` (`Err` carries what it saw) until it is Ok, one of `processes`
/// exits, or `deadline` passes; then the error shows the log of `processes[blame]`.
fn wait(
    processes: &mut [ServerProcess; 3],
    blame: usize,
    deadline: Instant,
    what: &str,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), HarnessError> {
    let mut exited = None;
    let waited = poll_until(deadline, || {
        for process in processes.iter_mut() {
            if let Err(e) = process.check_alive() {
                exited = Some(e);
                return Ok(());
            }
        }
        check()
    });
    if let Some(e) = exited {
        return Err(e);
    }
    waited.map_err(|last| {
        processes[blame].not_ready(format!(
            "did not get {what} within {}s; last: {last}",
            READY_TIMEOUT.as_secs()
        ))
    })
}

/// Polls `check` until it is Ok or `deadline` passes: then its last `Err`.
fn poll_until(
    deadline: Instant,
    mut check: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    let mut pause = Duration::from_millis(10);
    loop {
        let last = match check() {
            Ok(()) => return Ok(()),
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            return Err(last);
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The `*.yaml` files in `dir`, sorted (none if it cannot be read).
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// kwok's stage files: every `*.yaml` in `$UMSTORE_KWOK_STAGES`, else in
/// `.bin/kwok-stages/` (kwok's own), then this crate's `kwok-stages/` (the failures
/// tests provoke); a skip when kwok's are missing.
fn kwok_stages() -> Result<Vec<PathBuf>, ControlPlaneUnavailable> {
    let (dir, from_env) = match std::env::var_os("UMSTORE_KWOK_STAGES") {
        Some(dir) => (PathBuf::from(dir), true),
        None => (workspace_bin().join("kwok-stages"), false),
    };
    let mut stages = yaml_files(&dir);
    if !stages.is_empty() {
        // The failures tests provoke (an image that cannot be pulled, a crash loop),
        // from this crate's own stage files.
        stages.extend(yaml_files(
            &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kwok-stages"),
        ));
        return Ok(stages);
    }
    let reason = format!(
        "no kwok stage files (*.yaml) in {}{}: scripts/install-deps.sh --test copies \
         them from kwok's Go module",
        dir.display(),
        if from_env {
            " (UMSTORE_KWOK_STAGES)"
        } else {
            ""
        }
    );
    if from_env {
        // A variable pointing at nothing is a mistake, not a missing component.
        return Err(HarnessError::ProgramNotFound {
            program: "kwok stage files",
            looked_in: dir.display().to_string(),
            install: "point UMSTORE_KWOK_STAGES at a directory of kwok Stage YAMLs, or unset it",
        }
        .into());
    }
    Err(ControlPlaneUnavailable::Skip(reason))
}
