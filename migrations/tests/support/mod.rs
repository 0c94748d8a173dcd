//! What the migrations crate's tests share.

pub mod moving;
