//! **Test aid**: stopping a rotation for good at a named point, so a crash
//! test can kill the process exactly there (see [`PAUSE_ENV`]).

use tracing::warn;

/// **Test aid.** The environment variable that makes a rotation stop for good
/// at a named point, so a crash test can kill the process exactly there:
/// `<point>` or `<point>:<n>` (the n-th time the point is reached, for
/// batches), with the points of [`PausePoint`]. When the point is reached the
/// rotation logs `pausing the rotation at <point>` and waits forever: it never
/// continues, so it cannot change what a rotation does, only where a killed one
/// stops. Never set it outside tests.
pub const PAUSE_ENV: &str = "UMSTORE_ROTATION_PAUSE_AT";

/// Where [`PAUSE_ENV`] can stop a rotation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PausePoint {
    /// Vault rotated the transit key; no key is rewrapped yet.
    TransitRotated,
    /// A batch is rewrapped by Vault and updated in its open transaction, not
    /// yet committed.
    BatchRewrapped,
    /// Every data key is rewrapped; Vault rewrapped a store key, which is not
    /// stored yet.
    StoreKeyRewrapped,
    /// Vault's `min_decryption_version` is raised; the rotation is not yet
    /// recorded as finished.
    MinVersionRaised,
}

impl PausePoint {
    /// Every point.
    pub const ALL: [PausePoint; 4] = [
        PausePoint::TransitRotated,
        PausePoint::BatchRewrapped,
        PausePoint::StoreKeyRewrapped,
        PausePoint::MinVersionRaised,
    ];

    /// Its name in [`PAUSE_ENV`].
    pub const fn name(self) -> &'static str {
        match self {
            PausePoint::TransitRotated => "transit-rotated",
            PausePoint::BatchRewrapped => "batch-rewrapped",
            PausePoint::StoreKeyRewrapped => "store-key-rewrapped",
            PausePoint::MinVersionRaised => "min-version-raised",
        }
    }
}

/// The pause asked for through [`PAUSE_ENV`], and how often each point was
/// reached.
pub(super) struct Pause {
    at: Option<(PausePoint, usize)>,
    reached: [usize; 4],
}

impl Pause {
    /// The pause [`PAUSE_ENV`] asks for, if any.
    pub(super) fn from_env() -> Self {
        let at = std::env::var(PAUSE_ENV).ok().and_then(|value| {
            let (name, nth) = match value.split_once(':') {
                Some((name, n)) => (name.to_owned(), n.parse().ok()?),
                None => (value.clone(), 1),
            };
            let point = PausePoint::ALL.into_iter().find(|p| p.name() == name);
            if point.is_none() {
                warn!(value = %value, "{PAUSE_ENV} names no pause point; ignored");
            }
            point.map(|p| (p, nth))
        });
        Self {
            at,
            reached: [0; 4],
        }
    }

    /// Called at `point`: waits forever when this is where the test asked to stop.
    pub(super) async fn reached(&mut self, point: PausePoint) {
        let index = PausePoint::ALL
            .iter()
            .position(|p| *p == point)
            .unwrap_or(0);
        self.reached[index] += 1;
        if self.at == Some((point, self.reached[index])) {
            warn!(
                "pausing the rotation at {} ({PAUSE_ENV}, a test aid): waiting to be killed",
                point.name()
            );
            std::future::pending::<()>().await;
        }
    }
}
