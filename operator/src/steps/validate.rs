//! Step 1, validate: checks the spec into a [`Validated`](crate::validated::Validated).
//! An invalid spec stops the pipeline with a condition saying what to change and
//! waits for the object to change: no error, no retry loop.

use kube::runtime::events::EventType;

use super::{Reconciliation, StepOutcome};
use crate::context::Context;
use crate::error::Error;
use crate::validated;

/// Runs the step.
pub async fn run(_ctx: &Context, r: &mut Reconciliation<'_>) -> Result<StepOutcome, Error> {
    match validated::validate(r.store) {
        Ok(v) => {
            if let Some(message) = &v.demotion_refused {
                let already =
                    r.store.status.as_ref().is_some_and(|s| {
                        s.conditions.iter().any(|c| c.reason == "DemotionRefused")
                    });
                if !already {
                    r.event(EventType::Warning, "DemotionRefused", message.clone());
                }
            }
            r.validated = Some(v);
            Ok(StepOutcome::Done)
        }
        Err(invalid) => Ok(StepOutcome::Waiting {
            reason: "InvalidSpec",
            message: invalid.to_string(),
            requeue_after: None,
        }),
    }
}
