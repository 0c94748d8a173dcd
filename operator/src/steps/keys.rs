//! The keys step (`KeysReady`, `status.keys`): the transit key that wraps every
//! user's data key exists with the settings the data plane relies on
//! (`aes256-gcm96`, not exportable, deletion not allowed), and it is rotated when
//! `spec.encryption.rotationInterval` has passed since its latest version was
//! created, or when the annotation `umstore.io/rotate-keys` takes a new value. A
//! rotation rewraps every data key to the new version and then raises
//! `min_decryption_version` (the data plane's `rotate_and_rewrap`, see
//! docs/encryption.md), which is resumable from its record in
//! `umstore.key_rotations`.
//!
//! The rewrap runs in the operator, as a task beside the reconciles, not as a Job:
//! the operator already holds the store's admin connection and its own Vault
//! identity, the rewrap never sees a plaintext key (Vault's `rewrap` takes and
//! returns ciphertext), and a Job would need a second identity with `rotate`
//! rights inside the store's namespace, which the data plane must not have. The
//! reconcile never waits for it: each one reports its progress (`status.keys.
//! rotation`) and requeues in seconds until it ends. A failed attempt leaves
//! `Degraded` (`KeyRotationFailed`) and is retried with backoff (30 s doubling,
//! at most 10 minutes); the data plane keeps serving throughout: keys under the
//! old version unwrap until the last one is rewrapped. An operator restarted
//! mid-rotation finds it unfinished in the database and resumes it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::jiff::Timestamp;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tracing::{info, warn};
use umstore_crds::{KeysStatus, RotationStatus, UserMetadataStore};
use umstore_data_plane::crypto::rotation::{rotate_and_rewrap, RotationOptions, RotationReport};
use umstore_data_plane::crypto::{
    KekVersions, KeyProvider, VaultAuth, VaultConfig, VaultKeyProvider,
};
use umstore_data_plane::store::keys::SELECT_UNFINISHED_ROTATION;

use super::Reason;
use crate::db::Connector;
use crate::error::Error;
use crate::validated::{parse_duration_secs, Validated};

pub use umstore_crds::annotations::ROTATE_ANNOTATION;
/// How often a running rotation's progress is written to the status.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);
/// How soon the step looks again when Vault could not be reached.
pub const VAULT_RECHECK: Duration = Duration::from_secs(30);
/// Longest wait between attempts of a failed rotation.
pub const MAX_RETRY: Duration = Duration::from_secs(600);

/// How the operator logs in to Vault.
#[derive(Clone)]
pub enum VaultLogin {
    /// Kubernetes auth with the operator's ServiceAccount token, on the store's
    /// auth mount (`spec.encryption.auth.mountPath`), as this role.
    Kubernetes {
        /// The Vault role bound to the operator's ServiceAccount.
        role: String,
        /// The projected ServiceAccount token.
        token_path: PathBuf,
    },
    /// A Vault token (an operator run outside the cluster, tests).
    Token(String),
}

impl std::fmt::Debug for VaultLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Kubernetes { role, token_path } => f
                .debug_struct("Kubernetes")
                .field("role", role)
                .field("token_path", token_path)
                .finish(),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

/// How the operator reaches Vault for the keys step.
#[derive(Clone, Debug)]
pub struct VaultAccess {
    /// How it logs in.
    pub login: VaultLogin,
    /// CA to verify Vault's certificate with.
    pub ca_cert: Option<PathBuf>,
    /// Data keys per `rewrap` call and per transaction.
    pub batch_size: usize,
}

impl Default for VaultAccess {
    fn default() -> Self {
        Self {
            login: VaultLogin::Kubernetes {
                role: "umstore-operator".into(),
                token_path: PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token"),
            },
            ca_cert: None,
            batch_size: RotationOptions::default().batch_size,
        }
    }
}

impl VaultAccess {
    fn config(&self, v: &Validated, address: &str) -> VaultConfig {
        let enc = &v.spec.encryption;
        let auth = match &self.login {
            VaultLogin::Token(t) => VaultAuth::Token(t.clone()),
            VaultLogin::Kubernetes { role, token_path } => VaultAuth::Kubernetes {
                role: role.clone(),
                token_path: token_path.clone(),
                mount: enc.auth.mount_path.clone(),
            },
        };
        let mut config = VaultConfig::with_token(address, "");
        config.auth = auth;
        config.ca_cert = self.ca_cert.clone();
        config.transit_mount = enc.transit_mount.clone();
        config.key_name = enc.key_name.clone();
        config
    }
}

/// The Vault policy (HCL) the operator's identity needs for one store's transit
/// key: create and read it, rotate it, configure it (`min_decryption_version`),
/// rewrap (ciphertext in, ciphertext out). No encrypt or decrypt: it never sees a
/// data key. docs/encryption.md shows it for the default key.
pub fn operator_policy(mount: &str, key: &str) -> String {
    format!(
        "path \"{mount}/keys/{key}\"        {{ capabilities = [\"create\", \"read\", \"update\"] }}\n\
         path \"{mount}/keys/{key}/rotate\" {{ capabilities = [\"update\"] }}\n\
         path \"{mount}/keys/{key}/config\" {{ capabilities = [\"update\"] }}\n\
         path \"{mount}/rewrap/{key}\"      {{ capabilities = [\"update\"] }}\n"
    )
}

/// The Vault policy (HCL) the data plane's identity needs for one store's transit
/// key: encrypt (wrap new data keys), decrypt (unwrap), rewrap. It may not create,
/// read, rotate or configure the key.
pub fn data_plane_policy(mount: &str, key: &str) -> String {
    format!(
        "path \"{mount}/encrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"{mount}/decrypt/{key}\" {{ capabilities = [\"update\"] }}\n\
         path \"{mount}/rewrap/{key}\"  {{ capabilities = [\"update\"] }}\n"
    )
}

/// Why a rotation runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trigger {
    /// `rotationInterval` passed since the latest version was created.
    Schedule,
    /// `umstore.io/rotate-keys` took a new value.
    Annotation,
    /// An unfinished rotation was found in the database (an operator restart).
    Resumed,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Schedule => "Schedule",
            Trigger::Annotation => "Annotation",
            Trigger::Resumed => "Resumed",
        }
    }
}

enum RunState {
    Running(JoinHandle<Result<RotationReport, String>>),
    Succeeded(RotationReport),
    Failed { error: String, retry_at: Instant },
}

struct Run {
    trigger: Trigger,
    request: Option<String>,
    started_at: Timestamp,
    finished_at: Option<Timestamp>,
    attempts: i32,
    rewrapped: Arc<AtomicI64>,
    state: RunState,
}

impl Run {
    /// Moves a finished task's result into the state.
    fn settle(&mut self) {
        let RunState::Running(handle) = &mut self.state else {
            return;
        };
        if !handle.is_finished() {
            return;
        }
        let result = match futures_util::FutureExt::now_or_never(handle) {
            Some(Ok(result)) => result,
            Some(Err(join)) => Err(format!("the rotation task ended abnormally: {join}")),
            None => return,
        };
        self.finished_at = Some(Timestamp::now());
        self.state = match result {
            Ok(report) => {
                self.rewrapped
                    .store(report.rewrapped_total, Ordering::Relaxed);
                RunState::Succeeded(report)
            }
            Err(error) => {
                let wait = retry_delay(self.attempts);
                warn!(%error, attempt = self.attempts, retry_in_s = wait.as_secs(), "key rotation failed");
                RunState::Failed {
                    error,
                    retry_at: Instant::now() + wait,
                }
            }
        };
    }

    fn status(&self) -> RotationStatus {
        let (state, target_version, message) = match &self.state {
            RunState::Running(_) => ("Running", None, String::new()),
            RunState::Succeeded(r) => (
                "Succeeded",
                Some(r.version),
                format!(
                    "{} data keys rewrapped to version {}{}; older versions retired",
                    r.rewrapped_total,
                    r.version,
                    if r.resumed { " (resumed)" } else { "" }
                ),
            ),
            RunState::Failed { error, retry_at } => (
                "Failed",
                None,
                format!(
                    "{error}; retrying in {} s",
                    retry_at.saturating_duration_since(Instant::now()).as_secs()
                ),
            ),
        };
        RotationStatus {
            state: state.into(),
            trigger: self.trigger.as_str().into(),
            target_version,
            rewrapped: self.rewrapped.load(Ordering::Relaxed),
            started_at: self.started_at.to_string(),
            finished_at: self.finished_at.map(|t| t.to_string()),
            attempts: self.attempts,
            message,
        }
    }
}

/// 30 s doubling per failed attempt, at most [`MAX_RETRY`].
pub fn retry_delay(attempts: i32) -> Duration {
    let doublings = u32::try_from(attempts.saturating_sub(1).clamp(0, 5)).unwrap_or(5);
    Duration::from_secs(30 * (1u64 << doublings)).min(MAX_RETRY)
}

/// The rotations this operator runs, by store uid.
#[derive(Default)]
pub struct Rotations(Mutex<HashMap<String, Run>>);

impl std::fmt::Debug for Rotations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rotations")
    }
}

impl Rotations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Run>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a rotation of the store `uid` is running in this process.
    pub fn running(&self, uid: &str) -> bool {
        self.lock()
            .get(uid)
            .is_some_and(|r| matches!(&r.state, RunState::Running(h) if !h.is_finished()))
    }

    /// Stops and forgets the store's rotation (the store is being deleted).
    pub fn forget(&self, uid: &str) {
        if let Some(run) = self.lock().remove(uid) {
            if let RunState::Running(h) = run.state {
                h.abort();
            }
        }
    }
}

/// Where the rotation task connects: the store's coordinator as the admin role.
#[derive(Clone, Debug)]
pub struct Database {
    /// How Services are dialled.
    pub connector: Connector,
    /// The coordinator Service's host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The database.
    pub dbname: String,
    /// The admin login.
    pub user: String,
    /// Its password.
    pub password: String,
}

/// What the step found, for the status.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    /// `KeysReady`'s status, reason and message.
    pub ready: bool,
    /// The condition's reason.
    pub reason: Reason,
    /// The condition's message.
    pub message: String,
    /// `status.keys` (None: keep the last).
    pub status: Option<KeysStatus>,
    /// What makes the store `Degraded`, if anything.
    pub degraded: Option<(Reason, String)>,
    /// When to look again (a rotation's progress, a retry).
    pub requeue: Option<Duration>,
}

fn rfc3339(unix: u64) -> Option<String> {
    Timestamp::from_second(i64::try_from(unix).ok()?)
        .ok()
        .map(|t| t.to_string())
}

/// Runs the step. `admin` is the migrate step's connection (for reading the
/// rotation record), `db` where a rotation task connects.
pub async fn run(
    access: &VaultAccess,
    rotations: &Rotations,
    store: &UserMetadataStore,
    v: &Validated,
    admin: &Client,
    db: Database,
) -> Result<Report, Error> {
    let enc = &v.spec.encryption;
    let Some(address) = enc.vault_address.as_deref() else {
        return Ok(Report {
            ready: false,
            reason: Reason::NoVault,
            message: "spec.encryption.vaultAddress is unset: no transit key to manage".into(),
            status: None,
            degraded: None,
            requeue: None,
        });
    };
    let key = format!("{}/{}", enc.transit_mount, enc.key_name);
    let old = store.status.as_ref().and_then(|s| s.keys.clone());
    let uid = v.owner.uid.clone();
    let config = access.config(v, address);
    // A rotation that ended since the last reconcile: its result first, so the
    // versions read below are those it left.
    if let Some(run) = rotations.lock().get_mut(&uid) {
        run.settle();
    }

    // Connecting creates the key when it is missing.
    let versions = match VaultKeyProvider::connect(config.clone()).await {
        Ok(p) => p.versions().await,
        Err(e) => Err(e),
    };
    let versions: KekVersions = match versions {
        Ok(v) => v,
        Err(e) => {
            let message = format!(
                "cannot manage transit key {key}: {e}; the data plane keeps serving with the \
                 keys it has cached; retrying"
            );
            return Ok(Report {
                ready: false,
                reason: Reason::VaultUnreachable,
                message: message.clone(),
                status: None,
                degraded: Some((Reason::VaultUnreachable, message)),
                requeue: Some(VAULT_RECHECK),
            });
        }
    };
    let interval = parse_duration_secs(&enc.rotation_interval).unwrap_or(30 * 24 * 3600);
    let now = Timestamp::now();
    let now_secs = u64::try_from(now.as_second()).unwrap_or(0);
    let next_due = versions.latest_created.map(|c| c.saturating_add(interval));
    let request = store
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROTATE_ANNOTATION))
        .cloned();
    let acted = old.as_ref().and_then(|k| k.rotate_request.clone());
    let unfinished = admin
        .query_opt(SELECT_UNFINISHED_ROTATION, &[&enc.key_name])
        .await
        .map_err(Error::db("looking for an unfinished key rotation"))?
        .is_some();
    let due = Due {
        unfinished,
        annotation: request.is_some() && request != acted,
        scheduled: next_due.is_some_and(|d| now_secs >= d),
    };
    // A rotation ends by retiring the old versions (min_decryption_version): with
    // several clusters it would have to rewrap every cluster's data keys first, which
    // this version does not do, so it does not start one.
    if v.clusters.len() > 1 && !due.unfinished && (due.annotation || due.scheduled) {
        let message = format!(
            "transit key {key} is due for rotation, but a store with several clusters is not \
             rotated yet (the rotation would retire versions the other clusters' data keys \
             still need); the key stays at version {}",
            versions.latest
        );
        return Ok(Report {
            ready: true,
            reason: Reason::KeyRotationHeld,
            message: message.clone(),
            status: old.clone(),
            degraded: Some((Reason::KeyRotationHeld, message)),
            requeue: None,
        });
    }
    let (rotation, state, retry_wait, run_request) = start_if_due(rotations, &uid, due, || {
        let (rewrapped, handle) = spawn_rotation(config.clone(), access.batch_size, db);
        Run {
            trigger: Trigger::Resumed,
            request: request.clone(),
            started_at: now,
            finished_at: None,
            attempts: 1,
            rewrapped,
            state: RunState::Running(handle),
        }
    });
    let rotation = rotation.or_else(|| old.as_ref().and_then(|k| k.rotation.clone()));
    let rotate_request = run_request.or(acted);
    let status = KeysStatus {
        key: key.clone(),
        version: Some(versions.latest),
        min_decryption_version: Some(versions.min_decryption),
        last_rotation: versions.latest_created.and_then(rfc3339),
        next_rotation: next_due.and_then(rfc3339),
        rotate_request,
        rotation: rotation.clone(),
    };
    let rewrapped = rotation.as_ref().map_or(0, |r| r.rewrapped);
    Ok(match state {
        Some(State::Running) => Report {
            ready: false,
            reason: Reason::RewrappingKeys,
            message: format!(
                "rotating transit key {key} ({}): {rewrapped} data keys rewrapped so far; \
                 reads and writes go on",
                rotation.as_ref().map_or("", |r| r.trigger.as_str())
            ),
            status: Some(status),
            degraded: None,
            requeue: Some(PROGRESS_INTERVAL),
        },
        Some(State::Failed) => {
            let message = format!(
                "rotating transit key {key} failed: {}; the data plane keeps serving with \
                 the current keys",
                rotation.as_ref().map_or("", |r| r.message.as_str())
            );
            Report {
                ready: false,
                reason: Reason::KeyRotationFailed,
                message: message.clone(),
                status: Some(status),
                degraded: Some((Reason::KeyRotationFailed, message)),
                requeue: Some(
                    retry_wait
                        .unwrap_or(VAULT_RECHECK)
                        .max(Duration::from_secs(1)),
                ),
            }
        }
        _ => Report {
            ready: true,
            reason: Reason::KeysCurrent,
            message: format!(
                "transit key {key} at version {} (versions below {} retired); next rotation \
                 due {}",
                versions.latest,
                versions.min_decryption,
                status
                    .next_rotation
                    .as_deref()
                    .unwrap_or("when the key reports its age")
            ),
            status: Some(status),
            degraded: None,
            requeue: next_due.map(|d| {
                Duration::from_secs(d.saturating_sub(now_secs)).max(Duration::from_secs(1))
            }),
        },
    })
}

/// What asks for a rotation now.
#[derive(Clone, Copy, Debug)]
struct Due {
    unfinished: bool,
    annotation: bool,
    scheduled: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Running,
    Succeeded,
    Failed,
}

/// Starts a rotation when one is due and none runs (a failed one once its backoff
/// passed); returns the run's status, state, time left before a retry, and the
/// annotation value it acted on.
fn start_if_due(
    rotations: &Rotations,
    uid: &str,
    due: Due,
    start: impl FnOnce() -> Run,
) -> (
    Option<RotationStatus>,
    Option<State>,
    Option<Duration>,
    Option<String>,
) {
    let mut runs = rotations.lock();
    let existing = runs.get(uid);
    let retry_wait = existing.and_then(|r| match &r.state {
        RunState::Failed { retry_at, .. } => {
            Some(retry_at.saturating_duration_since(Instant::now()))
        }
        _ => None,
    });
    let trigger = match existing {
        Some(r) if matches!(r.state, RunState::Running(_)) => None,
        // A failed rotation is retried, whatever asked for it, once its backoff passed.
        Some(r) if retry_wait.is_some() => {
            retry_wait.is_some_and(|w| w.is_zero()).then_some(r.trigger)
        }
        _ if due.unfinished => Some(Trigger::Resumed),
        _ if due.annotation => Some(Trigger::Annotation),
        _ if due.scheduled => Some(Trigger::Schedule),
        _ => None,
    };
    if let Some(trigger) = trigger {
        let attempts = match existing {
            Some(r) if retry_wait.is_some() => r.attempts + 1,
            _ => 1,
        };
        let mut run = start();
        run.trigger = trigger;
        run.attempts = attempts;
        info!(
            uid,
            trigger = trigger.as_str(),
            attempts,
            "rotating the transit key and rewrapping every data key"
        );
        runs.insert(uid.to_string(), run);
    }
    match runs.get(uid) {
        None => (None, None, retry_wait, None),
        Some(run) => (
            Some(run.status()),
            Some(match run.state {
                RunState::Running(_) => State::Running,
                RunState::Succeeded(_) => State::Succeeded,
                RunState::Failed { .. } => State::Failed,
            }),
            retry_wait.filter(|_| trigger.is_none()),
            run.request.clone(),
        ),
    }
}

fn spawn_rotation(
    config: VaultConfig,
    batch_size: usize,
    db: Database,
) -> (Arc<AtomicI64>, JoinHandle<Result<RotationReport, String>>) {
    let rewrapped = Arc::new(AtomicI64::new(0));
    let counter = rewrapped.clone();
    let handle = tokio::spawn(async move {
        let mut client = db
            .connector
            .connect(&db.host, db.port, &db.dbname, &db.user, &db.password)
            .await
            .map_err(|e| e.to_string())?;
        let provider = KeyProvider::Vault(Box::new(
            VaultKeyProvider::connect(config)
                .await
                .map_err(|e| e.to_string())?,
        ));
        let opts = RotationOptions { batch_size };
        rotate_and_rewrap(&mut client, &provider, opts, |n| {
            counter.store(n, Ordering::Relaxed);
        })
        .await
        .map_err(|e| e.to_string())
    });
    (rewrapped, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_to_ten_minutes() {
        assert_eq!(retry_delay(1), Duration::from_secs(30));
        assert_eq!(retry_delay(2), Duration::from_secs(60));
        assert_eq!(retry_delay(5), Duration::from_secs(480));
        assert_eq!(retry_delay(6), MAX_RETRY);
        assert_eq!(retry_delay(60), MAX_RETRY);
    }

    #[test]
    fn the_policies_in_the_docs_are_the_ones_the_tests_use() {
        let docs = include_str!("../../../docs/encryption.md");
        for policy in [
            operator_policy("transit", "umstore-pii"),
            data_plane_policy("transit", "umstore-pii"),
        ] {
            assert!(
                docs.contains(&policy),
                "docs/encryption.md lacks:\n{policy}"
            );
        }
    }

    #[test]
    fn a_token_is_never_printed() {
        let login = VaultLogin::Token("s.secret-token".into());
        assert!(!format!("{login:?}").contains("secret-token"));
    }
}
