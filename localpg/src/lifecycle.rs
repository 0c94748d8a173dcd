//! Starting and stopping the server process.

use std::io::{Read, Seek, SeekFrom};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{ChildSetup, LocalCluster, LocalPgError};

/// After a crash, the old server's children may hold its shared memory for a moment; a
/// new postmaster refuses to start until they are gone, so startup is retried.
const STALE_SHMEM_MARKER: &str = "pre-existing shared memory block";

/// How long `stop` waits after an immediate shutdown before killing outright.
const IMMEDIATE_STOP_GRACE: Duration = Duration::from_secs(5);

impl LocalCluster {
    /// Starts the server (`postgres -D <data_dir>` as a direct child of this process,
    /// stderr to [`LocalCluster::log_path`]) and waits until it accepts connections. Does
    /// nothing when it is already running. A `postmaster.pid` left by a killed server is
    /// handled: PostgreSQL ignores it when its pid is dead, and startup is retried while
    /// the dead server's children still hold its shared memory.
    pub fn start(&mut self) -> Result<(), LocalPgError> {
        if self.is_running() {
            return Ok(());
        }
        let deadline = Instant::now() + self.opts.start_timeout;
        loop {
            let log_offset = std::fs::metadata(&self.log_path).map_or(0, |m| m.len());
            let mut child = self.spawn_server()?;
            match self.wait_ready(&mut child, deadline) {
                Ok(()) => {
                    self.child = Some(child);
                    return Ok(());
                }
                Err(Startup::Exited(status)) => {
                    let tail = self.log_tail_since(log_offset);
                    if tail.contains(STALE_SHMEM_MARKER) && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    return Err(LocalPgError::ExitedDuringStartup {
                        data_dir: self.data_dir.clone(),
                        status,
                        log: self.log_path.clone(),
                        log_tail: tail,
                    });
                }
                Err(Startup::TimedOut) => {
                    stop_child(&mut child, Duration::from_secs(2));
                    return Err(LocalPgError::StartTimeout {
                        data_dir: self.data_dir.clone(),
                        seconds: self.opts.start_timeout.as_secs(),
                        log: self.log_path.clone(),
                        log_tail: self.log_tail_since(log_offset),
                    });
                }
                Err(Startup::Failed(e)) => {
                    stop_child(&mut child, Duration::from_secs(2));
                    return Err(e);
                }
            }
        }
    }

    fn spawn_server(&self) -> Result<Child, LocalPgError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| LocalPgError::io("could not open server log", &self.log_path, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| LocalPgError::io("could not open server log", &self.log_path, e))?;
        let program = self.bins.program("postgres");
        let mut cmd = Command::new(&program);
        cmd.arg("-D")
            .arg(&self.data_dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .envs(self.opts.env.iter().map(|(k, v)| (k, v)));
        let mut setup = ChildSetup::postgres();
        if let Some(signal) = self.opts.death_signal {
            setup = setup.death_signal(signal);
        }
        setup.apply(&mut cmd)?;
        let spawned = match &self.opts.spawner {
            Some(spawn) => spawn(cmd),
            None => cmd.spawn(),
        };
        spawned.map_err(|source| LocalPgError::Spawn { program, source })
    }

    fn wait_ready(&self, child: &mut Child, deadline: Instant) -> Result<(), Startup> {
        let mut pause = Duration::from_millis(10);
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Err(Startup::Exited(status)),
                Ok(None) => {}
                Err(e) => {
                    return Err(Startup::Failed(LocalPgError::io(
                        "could not check the server process for",
                        &self.data_dir,
                        e,
                    )))
                }
            }
            // pg_isready only once the server has created its socket: saves spawns.
            let socket = self.socket_dir.join(format!(".s.PGSQL.{}", self.opts.port));
            if socket.exists() && self.accepts_connections().map_err(Startup::Failed)? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Startup::TimedOut);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Whether the server answers `pg_isready` with "accepting connections".
    pub fn accepts_connections(&self) -> Result<bool, LocalPgError> {
        let program = self.bins.program("pg_isready");
        let status = Command::new(&program)
            .arg("-q")
            .arg("-h")
            .arg(&self.socket_dir)
            .arg("-p")
            .arg(self.opts.port.to_string())
            .args(["-U", &self.opts.superuser, "-d", "postgres", "-t", "1"])
            .stdin(Stdio::null())
            .status()
            .map_err(|source| LocalPgError::Spawn { program, source })?;
        Ok(status.success())
    }

    /// Whether the server process started by [`LocalCluster::start`] is still alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.child = None;
                false
            }
            None => false,
        }
    }

    /// The server's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Stops the server: fast shutdown (SIGINT), then immediate shutdown (SIGQUIT) after
    /// the stop timeout, then SIGKILL. Returns once the process has exited.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_child(&mut child, self.opts.stop_timeout);
        }
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        self.log_tail_since(0)
    }

    fn log_tail_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.log_path) {
            let len = file.metadata().map_or(0, |m| m.len());
            // Only the last 16 KiB matter for a tail.
            let from = offset.max(len.saturating_sub(16 * 1024));
            if file.seek(SeekFrom::Start(from)).is_ok() {
                let mut bytes = Vec::new();
                let _ = file.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
        }
        last_lines(&text, 30)
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

enum Startup {
    Exited(ExitStatus),
    TimedOut,
    Failed(LocalPgError),
}

/// Shuts a postmaster down: SIGINT, then SIGQUIT after `timeout`, then SIGKILL.
fn stop_child(child: &mut Child, timeout: Duration) {
    let pid = child.id() as libc::pid_t;
    for (signal, wait) in [
        (libc::SIGINT, timeout),
        (libc::SIGQUIT, IMMEDIATE_STOP_GRACE),
    ] {
        if matches!(child.try_wait(), Ok(Some(_)) | Err(_)) {
            return;
        }
        // SAFETY: kill with a pid we spawned and have not reaped yet.
        unsafe {
            libc::kill(pid, signal);
        }
        if wait_exit(child, wait) {
            return;
        }
        tracing::warn!(pid, signal, "PostgreSQL did not stop in time; escalating");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for `child` to exit; true when it did.
fn wait_exit(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(2);
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// The last `n` lines of `text`.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
