//! Helpers of the key-rotation crash tests: an observer of every committed
//! rewrap, concurrent readers, and waiting for a child's log line.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use tokio_postgres::Client;
use umstore_data_plane::crypto::Keyring;
use umstore_data_plane::store::users::read_user;
use uuid::Uuid;

use super::{connect, Store};

/// Observes every committed rewrite of a wrapped data key: a trigger (the
/// test's, installed by the superuser beside the schema, not part of it) logs
/// each update that replaces a live wrapped key with another. A batch rolled
/// back by a crash leaves no row, so "rewrapped exactly once" is one log row
/// per key.
pub async fn observe_rewraps(store: &Store) {
    connect(store.superuser())
        .await
        .batch_execute(
            "CREATE SCHEMA test_observer;
             CREATE TABLE test_observer.rewraps (
                 region char(2), user_id uuid, old_version int, new_version int);
             CREATE FUNCTION test_observer.log_rewrap() RETURNS trigger
                 LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $$
             BEGIN
                 INSERT INTO test_observer.rewraps
                     VALUES (NEW.region, NEW.user_id, OLD.kek_version, NEW.kek_version);
                 RETURN NEW;
             END $$;
             CREATE TRIGGER observe_rewraps AFTER UPDATE OF wrapped_key ON umstore.user_data_keys
                 FOR EACH ROW WHEN (OLD.wrapped_key IS NOT NULL AND NEW.wrapped_key IS NOT NULL
                                    AND OLD.wrapped_key IS DISTINCT FROM NEW.wrapped_key)
                 EXECUTE FUNCTION test_observer.log_rewrap();",
        )
        .await
        .expect("install the rewrap observer");
}

/// (keys rewrapped once, keys rewrapped more than once, log rows) from the observer.
pub async fn rewrap_counts(store: &Store) -> (i64, i64, i64) {
    let row = connect(store.superuser())
        .await
        .query_one(
            "SELECT count(*) FILTER (WHERE n = 1), count(*) FILTER (WHERE n > 1), coalesce(sum(n), 0)::bigint
             FROM (SELECT count(*) AS n FROM test_observer.rewraps GROUP BY region, user_id) k",
            &[],
        )
        .await
        .expect("rewrap log");
    (row.get(0), row.get(1), row.get(2))
}

/// Reads users' PII as the data plane does (`read_user`, decrypting), round
/// robin, on a task; counts successful reads and stops at the first failure.
pub struct Readers {
    reads: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<u64, String>>,
}

impl Readers {
    /// Starts reading `users` (id, pincode) through `client` and `keyring`.
    pub async fn start(client: Client, keyring: Keyring, users: Vec<(Uuid, String)>) -> Self {
        let (reads, stop) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicBool::new(false)),
        );
        let task = {
            let (reads, stop) = (reads.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let (user, pincode) = &users[i % users.len()];
                    i += 7;
                    let record = read_user(&client, &keyring, *user, true)
                        .await
                        .map_err(|e| format!("read {i} failed: {e}"))?;
                    let read = record.and_then(|r| r.pii).and_then(|p| p.pincode);
                    if read.as_ref() != Some(pincode) {
                        return Err(format!("user {user}: PII unreadable ({read:?})"));
                    }
                    reads.fetch_add(1, Ordering::Relaxed);
                }
                Ok(reads.load(Ordering::Relaxed))
            })
        };
        Self { reads, stop, task }
    }

    /// Reads that succeeded so far.
    pub fn count(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }

    /// Waits until `more` reads succeeded after this call (fails after 60 s).
    pub async fn wait_for_more(&self, more: u64) {
        let target = self.count() + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count() < target {
            assert!(!self.task.is_finished(), "the readers stopped");
            assert!(
                Instant::now() < deadline,
                "reads stalled at {}",
                self.count()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops the readers; the number of reads, or the first failure.
    pub async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.task
            .await
            .expect("reader task")
            .expect("no read failed")
    }
}

/// Waits for `line` on the child's stderr (what the rotation logs when it
/// reaches its pause point); panics with the output seen when the child exits
/// first or 120 s pass.
pub fn wait_for_stderr(child: &mut Child, line: &str) -> mpsc::Receiver<String> {
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains(line) => return rx,
            Ok(l) => seen.push(l),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("keys rotate ended before `{line}`: {}", seen.join("\n"))
            }
        }
        assert!(
            Instant::now() < deadline,
            "no `{line}`: {}",
            seen.join("\n")
        );
    }
}
