//! The umstore operator: a kube-rs controller reconciling `UserMetadataStore`
//! resources through the fixed pipeline of SPEC §3
//! (`validate → credentials → topology → bootstrap → migrate → … → status`, see [`pipeline`]).
//!
//! - [`validated`]: the spec checked once into a typed value.
//! - [`builders`]: pure functions from a validated store to every Kubernetes object of its tier.
//! - [`apply`]: the thin layer that server-side applies them and deletes what is no longer wanted.
//! - [`steps`] and [`pipeline`]: the reconcile steps, in order; [`db`]: how the
//!   bootstrap and migrate steps reach the store's PostgreSQL.
//! - [`controller`]: the kube-runtime `Controller`, events and error policy;
//!   [`finalizer`]: adds and removes the finalizer; [`cleanup`]: what it does first.
//! - [`leader`]: leader election with a `coordination.k8s.io` Lease.
//! - [`metrics`]: Prometheus metrics and the health endpoints.

pub mod apply;
pub mod builders;
pub mod cleanup;
pub mod context;
pub mod controller;
pub mod db;
pub mod error;
pub mod finalizer;
pub mod leader;
pub mod meta;
pub mod metrics;
pub mod pipeline;
pub mod steps;
pub mod validated;

pub use context::Context;
pub use error::Error;
