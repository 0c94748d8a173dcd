//! PgBouncer in transaction pooling mode in front of a harness primary.

use std::path::PathBuf;
use std::process::Command;

use umstore_localpg::{quote_conninfo_value, ChildSetup};

use crate::process::{accepts_tcp, find_program, ServerProcess};
use crate::{free_port, HarnessError, Postgres, TestDir};

/// A PgBouncer (`pool_mode = transaction`, `max_client_conn = 500`, trust auth) on a
/// free loopback port, forwarding every database name to a primary's unix socket. Runs
/// as `postgres` when we are root. Stopped on drop.
///
/// Transaction pooling means a named prepared statement may meet a different server
/// connection in its next transaction: use `simple_query`/`batch_execute`, or statements
/// prepared and executed within one transaction.
#[derive(Debug)]
pub struct PgBouncer {
    process: ServerProcess,
    port: u16,
    user: String,
    dir: TestDir,
}

impl PgBouncer {
    /// Starts PgBouncer in front of `postgres`'s primary.
    pub fn start(postgres: &Postgres) -> Result<Self, HarnessError> {
        Self::start_with_logins(postgres, &[])
    }

    /// Starts PgBouncer in front of `postgres`'s primary that also knows the
    /// login users `logins` (name, password): it accepts them and logs in to
    /// the primary as them, with their passwords, as a cluster's PgBouncer does.
    pub fn start_with_logins(
        postgres: &Postgres,
        logins: &[(&str, &str)],
    ) -> Result<Self, HarnessError> {
        let program = find_program("pgbouncer", &[PathBuf::from("/usr/sbin")]).ok_or(
            HarnessError::ProgramNotFound {
                program: "pgbouncer",
                looked_in: "PATH, /usr/sbin".to_owned(),
                install: "install it with apt-get install pgbouncer",
            },
        )?;
        let dir = TestDir::new("pgbouncer")?;
        let port = free_port()?;
        let primary = postgres.primary();
        let user = primary.superuser().to_owned();

        let auth_file = dir.path().join("userlist.txt");
        let mut users = format!("\"{user}\" \"\"\n");
        for (name, password) in logins {
            users.push_str(&format!(
                "\"{}\" \"{}\"\n",
                name.replace('"', "\"\""),
                password.replace('"', "\"\"")
            ));
        }
        write(&auth_file, &users)?;
        let ini = dir.path().join("pgbouncer.ini");
        let backend = format!(
            "host={} port={}",
            quote_conninfo_value(&primary.socket_dir().display().to_string()),
            primary.port()
        );
        write(
            &ini,
            &format!(
                "[databases]\n\
                 * = {backend}\n\
                 \n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = trust\n\
                 auth_file = {auth}\n\
                 admin_users = {user}\n\
                 pool_mode = transaction\n\
                 max_client_conn = 500\n\
                 default_pool_size = 20\n\
                 ignore_startup_parameters = extra_float_digits,options\n",
                auth = auth_file.display(),
            ),
        )?;
        umstore_localpg::chown_to_postgres_if_root(dir.path())?;

        let mut cmd = Command::new(program);
        cmd.arg(&ini);
        let log = dir.path().join("pgbouncer.log");
        let mut process = ServerProcess::spawn("PgBouncer", cmd, ChildSetup::postgres(), log)?;
        process.wait_until(|| accepts_tcp(port))?;
        Ok(Self {
            process,
            port,
            user,
            dir,
        })
    }

    pub(crate) fn stop_at_exit(mut self) -> Self {
        if let Some(pid) = self.process.pid() {
            crate::keeper::stop_at_exit(pid, libc::SIGKILL);
        }
        self.dir.remove_at_exit();
        self
    }

    /// Connection string for `dbname` through PgBouncer.
    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={} dbname={}",
            self.port,
            quote_conninfo_value(&self.user),
            quote_conninfo_value(dbname)
        )
    }

    /// The loopback port.
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

    /// PgBouncer's log file.
    pub fn log_path(&self) -> &std::path::Path {
        self.process.log()
    }
}

fn write(path: &std::path::Path, text: &str) -> Result<(), HarnessError> {
    std::fs::write(path, text)
        .map_err(|e| HarnessError::io(format!("could not write {}", path.display()), e))
}
