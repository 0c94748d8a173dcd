//! A real kube-apiserver with its own etcd, where both binaries are built.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use umstore_localpg::ChildSetup;

use crate::http::https;
use crate::process::{accepts_tcp, find_program, ServerProcess};
use crate::skip::{skip_or_fail, Component};
use crate::testdir::{random_hex, write_file};
use crate::{free_port, keeper, HarnessError, TestDir};

/// How long etcd and kube-apiserver together may take to answer `/readyz` (about 2.5 s
/// on an idle 2-core machine).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// The user name behind [`KubeApiServer::admin_token`] (group `system:masters`).
pub const ADMIN_USER: &str = "umstore-test-admin";
/// The user name behind [`KubeApiServer::user_token`]: authenticated, in no group, so
/// RBAC grants it nothing until a test binds a role to it.
pub const PLAIN_USER: &str = "umstore-test-user";

/// Why [`KubeApiServer::start`] gave no server.
#[derive(Debug, thiserror::Error)]
pub enum KubeApiUnavailable {
    /// kube-apiserver, etcd or openssl is not installed here: tests skip with the
    /// reason (see [`KubeApiServer::start_or_skip`]).
    #[error("kube-apiserver is not available here: {0}")]
    Skip(String),
    /// The binaries are here but the servers failed to start.
    #[error(transparent)]
    Failed(#[from] HarnessError),
}

/// etcd and kube-apiserver on free loopback ports, in one temporary directory.
///
/// kube-apiserver serves HTTPS on `127.0.0.1` with a self-signed certificate whose CA
/// is [`KubeApiServer::ca_cert`]; it authenticates static bearer tokens (an admin in
/// `system:masters` and an unprivileged user) and service-account tokens (it signs
/// them: TokenRequest works), authorizes with RBAC, and runs the default admission
/// plugins. No controller-manager, scheduler or kubelet runs: objects are stored and
/// validated, never acted on (no pods from Deployments, namespaces stay `Terminating`,
/// no `default` service account is created).
///
/// Both processes are stopped on drop, apiserver first.
#[derive(Debug)]
pub struct KubeApiServer {
    // Field order is drop order: the processes stop before their directory goes.
    running: Running,
    dir: TestDir,
}

#[derive(Debug)]
struct Running {
    // Field order is drop order: the apiserver stops before its etcd.
    apiserver: ServerProcess,
    etcd: ServerProcess,
    port: u16,
    admin_token: String,
    user_token: String,
    ca_cert: PathBuf,
    kubeconfig: PathBuf,
    service_account_key: PathBuf,
}

impl KubeApiServer {
    /// Starts etcd and kube-apiserver and waits until `/readyz` answers `ok`, or says
    /// why they cannot run here. On failure the directory (logs inside) stays until
    /// the process exits, and is kept if a test panicked.
    ///
    /// Binaries are looked for in `UMSTORE_KUBE_APISERVER` and `UMSTORE_ETCD`, then in
    /// the workspace's `.bin/` (where `scripts/install-deps.sh --test` builds them),
    /// then on `PATH`. The service-account signing key is made with the `openssl` CLI.
    pub fn start() -> Result<Self, KubeApiUnavailable> {
        let apiserver = find_binary("kube-apiserver", "UMSTORE_KUBE_APISERVER")?;
        let etcd = find_binary("etcd", "UMSTORE_ETCD")?;
        let openssl = find_program("openssl", &[]).ok_or_else(|| {
            KubeApiUnavailable::Skip(
                "openssl not found on PATH (it makes the service-account signing key): \
                 apt-get install openssl"
                    .to_owned(),
            )
        })?;
        let mut dir = TestDir::new("kubeapi")?;
        match launch(dir.path(), &apiserver, &etcd, &openssl) {
            Ok(running) => Ok(Self { running, dir }),
            Err(e) => {
                dir.remove_at_exit();
                Err(e.into())
            }
        }
    }

    /// [`Self::start`] for a test: `None` after [`skip_or_fail`] when the binaries are
    /// missing (the test returns; under `UMSTORE_REQUIRE_COMPONENTS=1` it has failed
    /// already); panics when they are here but do not start.
    #[track_caller]
    pub fn start_or_skip() -> Option<Self> {
        match Self::start() {
            Ok(server) => Some(server),
            Err(KubeApiUnavailable::Skip(reason)) => {
                skip_or_fail(Component::KubeApiServer, reason);
                None
            }
            Err(e) => panic!("kube-apiserver failed to start: {e}"),
        }
    }

    /// Leaves the directory (logs inside) until the process exits, instead of removing
    /// it on drop: for a caller that fails after the server started.
    pub(crate) fn remove_dir_at_exit(&mut self) {
        self.dir.remove_at_exit();
    }

    pub(crate) fn stop_at_exit(mut self) -> Self {
        // Registered in stop order: the apiserver, then etcd.
        for pid in [self.running.apiserver.pid(), self.running.etcd.pid()]
            .into_iter()
            .flatten()
        {
            keeper::stop_at_exit(pid, libc::SIGKILL);
        }
        self.dir.remove_at_exit();
        self
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.running.port)
    }

    /// The secure port.
    pub fn port(&self) -> u16 {
        self.running.port
    }

    /// A kubeconfig file: cluster `umstore-test` (this URL, [`Self::ca_cert`]), contexts
    /// `admin` (current; [`ADMIN_USER`]) and `user` ([`PLAIN_USER`]), both with bearer
    /// tokens. `kube::Config::from_custom_kubeconfig(Kubeconfig::read_from(path)?, ..)`
    /// reads it; `KubeConfigOptions { context: Some("user".into()), .. }` picks the user.
    pub fn kubeconfig(&self) -> &Path {
        &self.running.kubeconfig
    }

    /// The bearer token of [`ADMIN_USER`], in `system:masters` (allowed everything,
    /// including impersonation).
    pub fn admin_token(&self) -> &str {
        &self.running.admin_token
    }

    /// The bearer token of [`PLAIN_USER`], which RBAC allows only what every
    /// authenticated user may do.
    pub fn user_token(&self) -> &str {
        &self.running.user_token
    }

    /// The PEM file of the CA that signed the serving certificate (for `127.0.0.1`).
    pub fn ca_cert(&self) -> &Path {
        &self.running.ca_cert
    }

    /// The PEM file of the ECDSA key the server signs service-account tokens with (and
    /// verifies them against); a controller manager signs legacy tokens with it too.
    pub fn service_account_key(&self) -> &Path {
        &self.running.service_account_key
    }

    /// The directory holding the logs, certificates, tokens, etcd data and kubeconfig.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `GET <path>` with `token` over HTTPS (HTTP/1.0, so the body is never chunked):
    /// the status code and the body.
    pub fn get(&self, path: &str, token: &str) -> Result<(u16, String), HarnessError> {
        https(
            self.running.port,
            &self.running.ca_cert,
            token,
            "GET",
            path,
            None,
        )
        .map_err(|e| HarnessError::io(format!("GET {}{path}", self.url()), e))
    }

    /// `method path` as the admin with a JSON body: the status and the parsed answer
    /// (`null` when it is not JSON).
    pub(crate) fn admin_request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), HarnessError> {
        let body = body.map(serde_json::Value::to_string);
        let (status, text) = https(
            self.running.port,
            &self.running.ca_cert,
            &self.running.admin_token,
            method,
            path,
            body.as_deref(),
        )
        .map_err(|e| HarnessError::io(format!("{method} {}{path}", self.url()), e))?;
        Ok((
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        ))
    }
}

/// Starts etcd and kube-apiserver in `path` and waits for `/readyz`.
fn launch(
    path: &Path,
    apiserver_bin: &Path,
    etcd_bin: &Path,
    openssl: &Path,
) -> Result<Running, HarnessError> {
    let (etcd_port, peer_port, port) = (free_port()?, free_port()?, free_port()?);

    // etcd first; the apiserver retries its storage while etcd comes up, so both
    // start at once.
    let client_url = format!("http://127.0.0.1:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{peer_port}");
    let mut cmd = Command::new(etcd_bin);
    cmd.arg("--name=umstore-test")
        .arg(format!("--data-dir={}", path.join("etcd").display()))
        .arg(format!("--listen-client-urls={client_url}"))
        .arg(format!("--advertise-client-urls={client_url}"))
        .arg(format!("--listen-peer-urls={peer_url}"))
        .arg(format!("--initial-advertise-peer-urls={peer_url}"))
        .arg(format!("--initial-cluster=umstore-test={peer_url}"))
        .args(["--unsafe-no-fsync", "--log-level=warn"]);
    let etcd_log = path.join("etcd.log");
    let mut etcd = ServerProcess::spawn("etcd", cmd, ChildSetup::same_user(), etcd_log)?;

    let admin_token = random_hex(16)?;
    let user_token = random_hex(16)?;
    let tokens = path.join("tokens.csv");
    write_file(
        &tokens,
        &format!(
            "{admin_token},{ADMIN_USER},{ADMIN_USER},\"system:masters\"\n\
             {user_token},{PLAIN_USER},{PLAIN_USER}\n"
        ),
    )?;
    let sa_key = path.join("service-account.key");
    run_openssl(openssl, &sa_key)?;
    let cert_dir = path.join("certs");
    let mut cmd = Command::new(apiserver_bin);
    cmd.arg(format!("--etcd-servers={client_url}"))
        .args(["--bind-address=127.0.0.1", "--advertise-address=127.0.0.1"])
        .arg(format!("--secure-port={port}"))
        // A self-signed serving certificate and its CA, written there at start.
        .arg(format!("--cert-dir={}", cert_dir.display()))
        .arg(format!("--token-auth-file={}", tokens.display()))
        .arg("--authorization-mode=RBAC")
        .arg("--service-account-issuer=https://kubernetes.default.svc.cluster.local")
        .arg(format!("--service-account-key-file={}", sa_key.display()))
        .arg(format!(
            "--service-account-signing-key-file={}",
            sa_key.display()
        ))
        // Room for a fleet of stores: each has two or three Services with an IP.
        .arg("--service-cluster-ip-range=10.96.0.0/16")
        // The endpoints of the `kubernetes` Service may not be a loopback address.
        .arg("--endpoint-reconciler-type=none")
        .arg("--allow-privileged=true");
    let apiserver_log = path.join("kube-apiserver.log");
    let mut apiserver = ServerProcess::spawn(
        "kube-apiserver",
        cmd,
        ChildSetup::same_user(),
        apiserver_log,
    )?;

    // The apiserver writes apiserver.crt (its certificate, then the CA's) before it
    // listens.
    let bundle = cert_dir.join("apiserver.crt");
    let ca_cert = path.join("ca.crt");
    let mut last_answer = None;
    let mut etcd_failed = None;
    let waited = apiserver.wait_within(READY_TIMEOUT, || {
        if let Err(e) = etcd.check_alive() {
            etcd_failed = Some(e);
            return true;
        }
        if !accepts_tcp(port) || !(ca_cert.is_file() || extract_ca(&bundle, &ca_cert)) {
            return false;
        }
        match https(port, &ca_cert, &admin_token, "GET", "/readyz", None) {
            Ok((200, body)) if body.trim() == "ok" => true,
            Ok((status, body)) => {
                // The failing checks are the lines marked [-].
                let failing: Vec<&str> = body.lines().filter(|l| l.starts_with("[-]")).collect();
                let detail = if failing.is_empty() {
                    body.trim().to_owned()
                } else {
                    failing.join("; ")
                };
                last_answer = Some(format!("/readyz answered {status}: {detail}"));
                false
            }
            Err(e) => {
                last_answer = Some(format!("/readyz failed: {e}"));
                false
            }
        }
    });
    if let Some(e) = etcd_failed {
        return Err(e);
    }
    if let (
        Err(HarnessError::NotReady {
            server,
            problem,
            log,
            log_tail,
        }),
        Some(last_answer),
    ) = (&waited, last_answer)
    {
        return Err(HarnessError::NotReady {
            server,
            problem: format!("{problem}; last: {last_answer}"),
            log: log.clone(),
            log_tail: log_tail.clone(),
        });
    }
    waited?;

    let kubeconfig = path.join("kubeconfig");
    write_file(
        &kubeconfig,
        &kubeconfig_yaml(port, &ca_cert, &admin_token, &user_token),
    )?;
    Ok(Running {
        apiserver,
        etcd,
        port,
        admin_token,
        user_token,
        ca_cert,
        kubeconfig,
        service_account_key: sa_key,
    })
}

/// `$<env>`, else `<workspace>/.bin/<program>`, else `<program>` on `PATH`.
pub(crate) fn find_binary(program: &'static str, env: &str) -> Result<PathBuf, KubeApiUnavailable> {
    if let Some(path) = std::env::var_os(env).map(PathBuf::from) {
        if path.is_file() {
            return Ok(path);
        }
        return Err(HarnessError::ProgramNotFound {
            program,
            looked_in: format!("{env}={}", path.display()),
            install: "point it at the binary, or unset it",
        }
        .into());
    }
    let workspace_bin = workspace_bin();
    let in_workspace = workspace_bin.join(program);
    if in_workspace.is_file() {
        return Ok(in_workspace);
    }
    find_program(program, &[]).ok_or_else(|| {
        KubeApiUnavailable::Skip(format!(
            "{program} not found ({env}, {}, PATH): scripts/install-deps.sh --test \
             builds it with Go",
            workspace_bin.display()
        ))
    })
}

/// The workspace's `.bin/`, where `scripts/install-deps.sh --test` builds the Go
/// programs.
pub(crate) fn workspace_bin() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).join(".bin")
}

/// An ECDSA P-256 service-account signing key (ES256; milliseconds, unlike RSA).
fn run_openssl(openssl: &Path, key: &Path) -> Result<(), HarnessError> {
    let out = Command::new(openssl)
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| HarnessError::io("could not run openssl", e))?;
    if out.status.success() {
        return Ok(());
    }
    Err(HarnessError::CommandFailed {
        command: format!("openssl ecparam -genkey -out {}", key.display()),
        output: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Writes the last certificate of `bundle` (the self-signed CA) to `ca`; false while
/// `bundle` is not complete yet.
fn extract_ca(bundle: &Path, ca: &Path) -> bool {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    let Ok(text) = std::fs::read_to_string(bundle) else {
        return false;
    };
    if text.matches(BEGIN).count() < 2 || !text.trim_end().ends_with("-----END CERTIFICATE-----") {
        return false;
    }
    let last = &text[text.rfind(BEGIN).unwrap_or(0)..];
    let tmp = ca.with_extension("tmp");
    std::fs::write(&tmp, last).is_ok() && std::fs::rename(&tmp, ca).is_ok()
}

fn kubeconfig_yaml(port: u16, ca: &Path, admin_token: &str, user_token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: umstore-test
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority: {ca}
users:
- name: admin
  user:
    token: {admin_token}
- name: user
  user:
    token: {user_token}
contexts:
- name: admin
  context:
    cluster: umstore-test
    user: admin
    namespace: default
- name: user
  context:
    cluster: umstore-test
    user: user
    namespace: default
current-context: admin
",
        ca = ca.display()
    )
}
