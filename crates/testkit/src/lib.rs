//! Test and demo kit for zonevault: local Garage servers (one per region) and
//! a two-zone fleet with its configuration files.
//!
//! Tests and `scripts/demo` use the same code, so what the demo shows is what
//! the tests prove.

pub mod delay;
pub mod fixture;
pub mod fleet;
pub mod garage;
pub mod postgres;
pub mod tmpfs;

pub use fleet::Fleet;
pub use garage::Garage;
