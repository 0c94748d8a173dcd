//! A non-PostgreSQL server process (PgBouncer, NATS, OpenBao) owned by a handle.

use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use umstore_localpg::ChildSetup;

use crate::{keeper, HarnessError};

/// How long a server may take to become ready.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running server process, stopped (SIGTERM, then SIGKILL) on drop.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl ServerProcess {
    /// Spawns `cmd` from the keeper thread with stdout and stderr appended to `log` and
    /// SIGKILL as its parent-death signal.
    pub(crate) fn spawn(
        name: &'static str,
        mut cmd: Command,
        setup: ChildSetup,
        log: PathBuf,
    ) -> Result<Self, HarnessError> {
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .map_err(|e| HarnessError::io(format!("could not open {}", log.display()), e))
        };
        cmd.stdin(Stdio::null()).stdout(open()?).stderr(open()?);
        setup.death_signal(libc::SIGKILL).apply(&mut cmd)?;
        let program = cmd.get_program().to_string_lossy().into_owned();
        let child = keeper::spawn(cmd)
            .map_err(|e| HarnessError::io(format!("could not start {name} ({program})"), e))?;
        Ok(Self {
            name,
            child: Some(child),
            log,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log file.
    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// An error when the process has exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), HarnessError> {
        let status = match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => return Ok(()),
            Some(Ok(Some(status))) => format!("exited ({status})"),
            Some(Err(e)) => format!("could not be checked ({e})"),
            None => "was stopped".to_owned(),
        };
        Err(self.not_ready(status))
    }

    pub(crate) fn not_ready(&self, problem: String) -> HarnessError {
        HarnessError::NotReady {
            server: self.name,
            problem,
            log: self.log.clone(),
            log_tail: log_tail(&self.log),
        }
    }

    /// Polls `ready` every few milliseconds until it is true, the process exits, or
    /// [`READY_TIMEOUT`] passes.
    pub(crate) fn wait_until(&mut self, ready: impl FnMut() -> bool) -> Result<(), HarnessError> {
        self.wait_within(READY_TIMEOUT, ready)
    }

    /// [`ServerProcess::wait_until`] with another timeout.
    pub(crate) fn wait_within(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(5);
        loop {
            self.check_alive()?;
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(format!("not ready within {}s", timeout.as_secs())));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Stops the process: SIGTERM, then SIGKILL after 5 s. Waits for it to exit.
    pub(crate) fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            // SAFETY: signalling our own unreaped child.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = child.try_wait() {
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether something accepts TCP connections on 127.0.0.1:`port`.
pub(crate) fn accepts_tcp(port: u16) -> bool {
    TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    )
    .is_ok()
}

/// The last 30 lines of a log file.
pub(crate) fn log_tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Finds `program` on `PATH`, then in `extra` directories.
pub(crate) fn find_program(program: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra.iter().cloned())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}
