//! Step 1, validate: checks the spec into a [`Validated`]. An invalid spec stops
//! the pipeline with a condition saying what to change and waits for the object to
//! change: no error, no retry loop.

use kube::runtime::events::EventType;
use umstore_crds::UserMetadataStore;

use super::{Journal, Outcome, Reason, Waiting};
use crate::validated::{self, Validated};

/// Runs the step.
pub fn run(store: &UserMetadataStore, journal: &mut Journal) -> Outcome<Validated> {
    match validated::validate(store) {
        Ok(v) => {
            if let Some(message) = &v.demotion_refused {
                let already = store.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.reason == Reason::DemotionRefused.as_str())
                });
                if !already {
                    journal.event(EventType::Warning, Reason::DemotionRefused, message.clone());
                }
            }
            Outcome::Done(v)
        }
        Err(invalid) => {
            Outcome::Waiting(Waiting::new(Reason::InvalidSpec, invalid.to_string(), None))
        }
    }
}
