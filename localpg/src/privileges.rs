//! Running PostgreSQL's programs as the `postgres` user when this process is root, and
//! tying a child's life to its parent thread.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use crate::LocalPgError;

/// The unprivileged account PostgreSQL runs as when we are root (Debian creates it).
const POSTGRES_USER: &str = "postgres";

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// uid and gid of an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Account {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn postgres_account() -> Result<Account, LocalPgError> {
    let name = CString::new(POSTGRES_USER).map_err(|_| LocalPgError::NoPostgresUser)?;
    // SAFETY: getpwnam reads the passwd database; the returned pointer is valid until the
    // next getpw* call, and we copy the two integers out immediately. Called before fork.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(LocalPgError::NoPostgresUser);
    }
    // SAFETY: entry is non-null and points to a valid passwd struct (see above).
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Account { uid, gid })
}

/// The `postgres` user's home directory, when the passwd database has one.
fn postgres_home() -> Option<std::path::PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let name = CString::new(POSTGRES_USER).ok()?;
    // SAFETY: as in postgres_account; pw_dir is copied out before any other getpw* call.
    unsafe {
        let entry = libc::getpwnam(name.as_ptr());
        if entry.is_null() || (*entry).pw_dir.is_null() {
            return None;
        }
        let dir = std::ffi::CStr::from_ptr((*entry).pw_dir);
        Some(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
            dir.to_bytes(),
        )))
    }
}

/// How a child process is set up between `fork` and `exec`.
///
/// Credentials are changed first and the parent-death signal is set after, because
/// changing credentials clears `PR_SET_PDEATHSIG`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildSetup {
    as_postgres_if_root: bool,
    death_signal: Option<libc::c_int>,
}

impl ChildSetup {
    /// Runs the child as `postgres` when we are root; no death signal.
    pub fn postgres() -> Self {
        Self {
            as_postgres_if_root: true,
            death_signal: None,
        }
    }

    /// Keeps the child's user as ours (for servers that may run as root).
    pub fn same_user() -> Self {
        Self::default()
    }

    /// Sends `signal` to the child when the thread that spawned it exits (Linux
    /// `PR_SET_PDEATHSIG`). Spawn from a long-lived thread: the signal fires when the
    /// spawning *thread* ends, not only when the process does.
    pub fn death_signal(mut self, signal: libc::c_int) -> Self {
        self.death_signal = Some(signal);
        self
    }

    /// Installs this setup on `cmd` (a `pre_exec` hook). When the child is to run as
    /// `postgres` and no working directory was set, it starts in `/` so that it does
    /// not begin inside a directory it cannot read.
    pub fn apply(&self, cmd: &mut Command) -> Result<(), LocalPgError> {
        let account = if self.as_postgres_if_root && is_root() {
            Some(postgres_account()?)
        } else {
            None
        };
        if account.is_some() && cmd.get_current_dir().is_none() {
            cmd.current_dir("/");
        }
        if account.is_some() {
            // Our HOME is root's: libpq inside the server (Citus connecting to its
            // workers, postgres_fdw) would try to read root's ~/.postgresql and fail.
            match postgres_home() {
                Some(home) => cmd.env("HOME", home),
                None => cmd.env_remove("HOME"),
            };
        }
        let death_signal = self.death_signal;
        if account.is_none() && death_signal.is_none() {
            return Ok(());
        }
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        let hook = move || -> std::io::Result<()> {
            // Only async-signal-safe system calls below: this runs between fork and exec.
            if let Some(Account { uid, gid }) = account {
                let groups = [gid];
                // SAFETY: plain system calls with valid arguments.
                unsafe {
                    if libc::setgroups(1, groups.as_ptr()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
            }
            if let Some(signal) = death_signal {
                // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
                unsafe {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent may have died before the signal was armed.
                    if libc::getppid() != parent {
                        libc::raise(signal);
                    }
                }
            }
            Ok(())
        };
        // SAFETY: the hook only makes async-signal-safe system calls and allocates nothing.
        unsafe {
            cmd.pre_exec(hook);
        }
        Ok(())
    }
}

/// Makes `cmd` run as the `postgres` user when this process is root (PostgreSQL and
/// PgBouncer refuse to run as root). Does nothing for other users. Use [`ChildSetup`]
/// to also request a parent-death signal.
pub fn run_as_postgres_if_root(cmd: &mut Command) -> Result<(), LocalPgError> {
    ChildSetup::postgres().apply(cmd)
}

/// Hands `path` and everything below it to the `postgres` user when this process is root,
/// so that servers running as `postgres` can use directories we created. Symbolic links
/// are changed themselves, never followed. Does nothing for other users.
pub fn chown_to_postgres_if_root(path: &Path) -> Result<(), LocalPgError> {
    if !is_root() {
        return Ok(());
    }
    let account = postgres_account()?;
    chown_tree(path, account)
}

fn chown_tree(path: &Path, account: Account) -> Result<(), LocalPgError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        LocalPgError::io(
            "path contains a NUL byte",
            path,
            std::io::ErrorKind::InvalidInput.into(),
        )
    })?;
    // SAFETY: c_path is a valid NUL-terminated string.
    if unsafe { libc::lchown(c_path.as_ptr(), account.uid, account.gid) } != 0 {
        return Err(LocalPgError::io(
            "could not change the owner (to postgres) of",
            path,
            std::io::Error::last_os_error(),
        ));
    }
    let meta =
        std::fs::symlink_metadata(path).map_err(|e| LocalPgError::io("could not read", path, e))?;
    if meta.is_dir() {
        let entries =
            std::fs::read_dir(path).map_err(|e| LocalPgError::io("could not list", path, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| LocalPgError::io("could not list", path, e))?;
            chown_tree(&entry.path(), account)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_runs_as_postgres_when_root() {
        let mut cmd = Command::new("id");
        cmd.arg("-un");
        run_as_postgres_if_root(&mut cmd).unwrap();
        let out = cmd.output().unwrap();
        let user = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if is_root() {
            assert_eq!(user, POSTGRES_USER);
        } else {
            assert_ne!(user, "root");
        }
    }

    #[test]
    fn death_signal_survives_the_credential_change() {
        // A child spawned as postgres from a short-lived thread must get its signal when
        // that thread ends: proof the signal was armed after setuid cleared it.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut cmd = Command::new("sleep");
            cmd.arg("30");
            ChildSetup::postgres()
                .death_signal(libc::SIGKILL)
                .apply(&mut cmd)
                .unwrap();
            let child = cmd.spawn().unwrap();
            tx.send(child).unwrap();
        })
        .join()
        .unwrap();
        let mut child = rx.recv().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                use std::os::unix::process::ExitStatusExt;
                assert_eq!(status.signal(), Some(libc::SIGKILL));
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "child outlived its thread"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn chown_hands_a_tree_to_postgres() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/file"), "x").unwrap();
        chown_to_postgres_if_root(dir.path()).unwrap();
        if is_root() {
            use std::os::unix::fs::MetadataExt;
            let account = postgres_account().unwrap();
            let meta = std::fs::metadata(dir.path().join("sub/file")).unwrap();
            assert_eq!(meta.uid(), account.uid);
        }
    }
}
