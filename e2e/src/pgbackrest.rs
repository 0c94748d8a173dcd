//! pgBackRest (Debian's `pgbackrest`): the backup tests run the files the operator
//! renders with it, a `pgbackrest server` as the database pods run one, and its
//! commands as the backup Jobs and a restore run them, as `postgres` when we are
//! root (like the harness's PostgreSQL, whose data directory it reads).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use umstore_localpg::ChildSetup;

use crate::process::{accepts_tcp, find_program, ServerProcess};
use crate::HarnessError;

/// The `pgbackrest` program.
#[derive(Clone, Debug)]
pub struct PgBackRest {
    program: PathBuf,
}

/// A running `pgbackrest server`, stopped on drop.
#[derive(Debug)]
pub struct PgBackRestServer {
    process: ServerProcess,
}

impl PgBackRest {
    /// Finds `pgbackrest` on the PATH or in /usr/bin.
    pub fn find() -> Result<Self, HarnessError> {
        let program = find_program("pgbackrest", &[PathBuf::from("/usr/bin")]).ok_or(
            HarnessError::ProgramNotFound {
                program: "pgbackrest",
                looked_in: "PATH, /usr/bin".to_owned(),
                install: "install it with apt-get install pgbackrest \
                          (scripts/install-deps.sh --test does)",
            },
        )?;
        Ok(Self { program })
    }

    /// A `pgbackrest` command with `env` set, run as `postgres` when we are root.
    pub fn command(&self, env: &[(&str, &str)]) -> Result<Command, HarnessError> {
        let mut cmd = Command::new(&self.program);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied());
        ChildSetup::postgres().apply(&mut cmd)?;
        Ok(cmd)
    }

    /// Runs `pgbackrest <args>` with `env` to completion.
    pub fn run(&self, env: &[(&str, &str)], args: &[&str]) -> Result<Output, HarnessError> {
        let mut cmd = self.command(env)?;
        cmd.args(args);
        cmd.output()
            .map_err(|e| HarnessError::io(format!("running pgbackrest {}", args.join(" ")), e))
    }

    /// Starts `pgbackrest server` with `env` (its configuration through
    /// `PGBACKREST_CONFIG`) and waits until it accepts connections on `port`.
    pub fn serve(
        &self,
        env: &[(&str, &str)],
        port: u16,
        log: &Path,
    ) -> Result<PgBackRestServer, HarnessError> {
        let mut cmd = Command::new(&self.program);
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .arg("server");
        let mut process =
            ServerProcess::spawn("pgbackrest server", cmd, ChildSetup::postgres(), log.into())?;
        process.wait_until(|| accepts_tcp(port))?;
        Ok(PgBackRestServer { process })
    }

    /// The program's path.
    pub fn program(&self) -> &Path {
        &self.program
    }
}

impl PgBackRestServer {
    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        self.process.log()
    }
}
