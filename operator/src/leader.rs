//! Leader election with a `coordination.k8s.io/v1` Lease: only the replica holding
//! the Lease writes. Acquire and renew use the Lease's resourceVersion (optimistic
//! concurrency), so two replicas can never both believe they renewed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use tracing::{info, warn};

use crate::error::Error;

/// Whether this replica is the leader. Cloning shares the flag.
#[derive(Clone, Debug, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    /// A flag that starts as `leader`.
    pub fn new(leader: bool) -> Self {
        Self(Arc::new(AtomicBool::new(leader)))
    }

    /// Whether this replica may write.
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Sets the flag.
    pub fn set(&self, leader: bool) {
        self.0.store(leader, Ordering::Release);
    }
}

/// One Lease and this replica's identity.
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

impl LeaseLock {
    /// The Lease `name` in `api`'s namespace, held as `identity` for `duration`.
    pub fn new(
        api: Api<Lease>,
        name: impl Into<String>,
        identity: impl Into<String>,
        duration: Duration,
    ) -> Self {
        Self {
            api,
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    fn spec(&self, now: Timestamp, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Acquires or renews the Lease at `now`. `Ok(false)`: someone else holds it
    /// (or won a race for it).
    pub async fn try_acquire(&self, now: Timestamp) -> Result<bool, Error> {
        let current = match self.api.get(&self.name).await {
            Ok(lease) => lease,
            Err(e) if is_status(&e, 404) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(self.spec(now, 0, None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_status(&e, 409) => Ok(false),
                    Err(source) => Err(Error::Kube {
                        action: "creating the leader Lease".into(),
                        source,
                    }),
                };
            }
            Err(source) => {
                return Err(Error::Kube {
                    action: "reading the leader Lease".into(),
                    source,
                })
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if holder == self.identity {
            self.spec(now, transitions, spec.acquire_time.clone())
        } else {
            let duration =
                SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(15)));
            let expired = spec
                .renew_time
                .as_ref()
                .is_none_or(|t| t.0 + duration < now);
            if !holder.is_empty() && !expired {
                return Ok(false);
            }
            self.spec(now, transitions + 1, None)
        };
        let mut lease = current;
        lease.spec = Some(next);
        // `replace` carries the resourceVersion we read: a concurrent writer makes it 409.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(source) => Err(Error::Kube {
                action: "renewing the leader Lease".into(),
                source,
            }),
        }
    }

    /// Gives the Lease up (on shutdown), so another replica takes over at once.
    pub async fn release(&self) -> Result<(), Error> {
        let mut lease = match self.api.get(&self.name).await {
            Ok(lease) => lease,
            Err(e) if is_status(&e, 404) => return Ok(()),
            Err(source) => {
                return Err(Error::Kube {
                    action: "reading the leader Lease".into(),
                    source,
                })
            }
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(source) => Err(Error::Kube {
                action: "releasing the leader Lease".into(),
                source,
            }),
        }
    }

    /// Tries to acquire or renew every `renew_every` (a third of the Lease duration is
    /// usual) and keeps `leadership` in step. Any failure to renew drops leadership at
    /// once: better no writer for a moment than two.
    pub async fn run(self, leadership: Leadership, renew_every: Duration) {
        loop {
            let was = leadership.is_leader();
            let now = leadership_result(self.try_acquire(Timestamp::now()).await);
            leadership.set(now);
            if now != was {
                info!(identity = %self.identity, leader = now, "leadership changed");
            }
            tokio::time::sleep(renew_every).await;
        }
    }
}

fn leadership_result(result: Result<bool, Error>) -> bool {
    result.unwrap_or_else(|error| {
        warn!(%error, "leader election failed; not writing until the Lease is renewed");
        false
    })
}
