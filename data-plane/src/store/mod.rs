//! SQL and typed rows, one module per table family.

pub mod erasure;
pub mod keys;
pub mod query;
pub mod reader;
pub mod reads;
pub mod users;
