//! The `UserMetadataStore` custom resource (group `umstore.io`, version `v1alpha1`).
//!
//! The Rust types, their validation and the generated CRD YAML land here; see
//! `../shared/SPEC.md` §3 for what the resource describes.
