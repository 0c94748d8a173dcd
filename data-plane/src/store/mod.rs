//! SQL and typed rows, one module per table family.

pub mod users;
