//! nats-server with JetStream.

use std::io::{BufRead, BufReader};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use umstore_localpg::ChildSetup;

use crate::process::{find_program, ServerProcess};
use crate::{free_port, HarnessError, TestDir};

/// A `nats-server -js` on a free loopback port, storing JetStream data in its own
/// directory. Stopped on drop.
#[derive(Debug)]
pub struct Nats {
    process: ServerProcess,
    port: u16,
    dir: TestDir,
}

impl Nats {
    /// Starts the server and waits until its `INFO` line says JetStream is on.
    pub fn start() -> Result<Self, HarnessError> {
        let dir = TestDir::new("nats")?;
        let port = free_port()?;
        let process = launch(port, dir.path())?;
        Ok(Self { process, port, dir })
    }

    /// Kills the server (SIGKILL: whatever it had not written to its store is
    /// gone) and starts it again on the same port with the same store.
    pub fn restart(&mut self) -> Result<(), HarnessError> {
        if let Some(pid) = self.process.pid() {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
        self.process.stop();
        self.process = launch(self.port, self.dir.path())?;
        Ok(())
    }

    pub(crate) fn stop_at_exit(mut self) -> Self {
        if let Some(pid) = self.process.pid() {
            crate::keeper::stop_at_exit(pid, libc::SIGKILL);
        }
        self.dir.remove_at_exit();
        self
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
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

    /// The server's `INFO` line (JSON after `INFO `), read from a fresh connection.
    pub fn info(&self) -> Result<String, HarnessError> {
        info_line(self.port).ok_or_else(|| {
            self.process
                .not_ready("sent no INFO line on a new connection".to_owned())
        })
    }
}

/// Runs `nats-server -js` on `port` with its store and log in `dir`, and waits
/// for JetStream.
fn launch(port: u16, dir: &std::path::Path) -> Result<ServerProcess, HarnessError> {
    let program = find_program("nats-server", &[PathBuf::from("/usr/sbin")]).ok_or(
        HarnessError::ProgramNotFound {
            program: "nats-server",
            looked_in: "PATH, /usr/sbin".to_owned(),
            install: "install it with apt-get install nats-server",
        },
    )?;
    let mut cmd = Command::new(program);
    cmd.args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir.join("store"));
    let log = dir.join("nats-server.log");
    let mut process = ServerProcess::spawn("nats-server", cmd, ChildSetup::same_user(), log)?;
    process.wait_until(|| info_line(port).is_some_and(|l| l.contains("\"jetstream\":true")))?;
    Ok(process)
}

/// Connects and reads the first protocol line, which NATS servers send unasked.
fn info_line(port: u16) -> Option<String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).ok()?;
    line.starts_with("INFO ").then_some(line)
}
