//! The umstore operator: a kube-rs controller reconciling `UserMetadataStore`
//! resources through the fixed pipeline
//! `validate → credentials → topology → bootstrap → migrate → distribute → keys → status`.
//!
//! The migrate step uses [`umstore_migrations`], the same runner the data plane uses.
