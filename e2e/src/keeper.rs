//! Making sure test servers never outlive the test process.
//!
//! Two mechanisms, because shared servers live in statics that are never dropped:
//!
//! 1. Every server is spawned from one dedicated, never-ending thread with
//!    `PR_SET_PDEATHSIG` (SIGQUIT for PostgreSQL, SIGKILL for the rest). The signal fires
//!    when the *spawning thread* ends, so spawning from a test thread would kill the
//!    server when that test's thread exits; the keeper thread ends only with the
//!    process, including when it is killed outright.
//! 2. Shared servers are registered with [`stop_at_exit`]; an `atexit` hook stops them,
//!    waits for them to be gone and removes their directories (kept, with the path
//!    printed, when a test thread panicked or `UMSTORE_KEEP_TEST_DIRS=1`).

use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use umstore_localpg::Spawner;

use crate::testdir::keep_requested;

type Job = Box<dyn FnOnce() + Send>;

fn keeper() -> &'static Mutex<mpsc::Sender<Job>> {
    static KEEPER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        let spawned = std::thread::Builder::new()
            .name("umstore-e2e-keeper".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            });
        if let Err(e) = spawned {
            // Jobs sent to a dead keeper fail in `spawn` below with this reason logged.
            tracing::error!("could not start the umstore-e2e keeper thread: {e}");
        }
        Mutex::new(tx)
    })
}

/// Spawns `cmd` from the keeper thread, so a parent-death signal set on it fires only
/// when the whole test process ends.
pub fn spawn(cmd: Command) -> std::io::Result<Child> {
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let mut cmd = cmd;
        let _ = reply_tx.send(cmd.spawn());
    });
    let sent = keeper().lock().unwrap_or_else(|p| p.into_inner()).send(job);
    if sent.is_err() {
        return Err(std::io::Error::other(
            "the umstore-e2e keeper thread is gone",
        ));
    }
    reply_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the keeper thread dropped a spawn")))
}

/// A [`Spawner`] for [`umstore_localpg::ClusterOptions`] that uses [`spawn`].
pub fn spawner() -> Spawner {
    Arc::new(spawn)
}

struct ExitEntry {
    pid: libc::pid_t,
    signal: libc::c_int,
}

#[derive(Default)]
struct ExitRegistry {
    processes: Vec<ExitEntry>,
    dirs: Vec<PathBuf>,
}

static REGISTRY: Mutex<ExitRegistry> = Mutex::new(ExitRegistry {
    processes: Vec::new(),
    dirs: Vec::new(),
});
static PANICKED: AtomicBool = AtomicBool::new(false);

fn install_hooks() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: registering a plain extern "C" fn that never unwinds.
        unsafe {
            libc::atexit(run_at_exit);
        }
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            // libtest runs each test on a thread named after it (or on `main`); panics
            // on unnamed helper threads only matter if they reach a test thread.
            if std::thread::current().name().is_some() {
                PANICKED.store(true, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

/// Stops process `pid` with `signal` when this process exits (and waits for it).
pub fn stop_at_exit(pid: u32, signal: libc::c_int) {
    install_hooks();
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    registry.processes.push(ExitEntry {
        pid: pid as libc::pid_t,
        signal,
    });
}

/// Removes `dir` when this process exits, after the registered processes are gone;
/// keeps it (printing its path) when a test panicked or `UMSTORE_KEEP_TEST_DIRS=1`.
pub fn remove_at_exit(dir: PathBuf) {
    install_hooks();
    REGISTRY
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .dirs
        .push(dir);
}

extern "C" fn run_at_exit() {
    // Never unwind across the C boundary.
    let _ = std::panic::catch_unwind(cleanup);
}

fn cleanup() {
    let Ok(mut registry) = REGISTRY.try_lock() else {
        return; // someone holds it mid-registration: the death signals still apply
    };
    let registry = std::mem::take(&mut *registry);
    for entry in &registry.processes {
        // SAFETY: signalling a pid we spawned; harmless if it already exited.
        unsafe {
            libc::kill(entry.pid, entry.signal);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for entry in &registry.processes {
        while !reaped(entry.pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !reaped(entry.pid) {
            // SAFETY: as above.
            unsafe {
                libc::kill(entry.pid, libc::SIGKILL);
            }
            let _ = reaped(entry.pid);
        }
    }
    let keep = keep_requested() || PANICKED.load(Ordering::SeqCst);
    for dir in &registry.dirs {
        if keep {
            eprintln!(
                "umstore-e2e: kept shared server directory {} (server logs inside)",
                dir.display()
            );
        } else {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Whether `pid` (our child) has exited; reaps it if so.
fn reaped(pid: libc::pid_t) -> bool {
    let mut status = 0;
    // SAFETY: waitpid on a specific pid with WNOHANG.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    // r == pid: reaped now; r < 0: not our child any more (already reaped).
    r == pid || r < 0
}
