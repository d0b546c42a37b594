//! One module per command. Each takes validated inputs and returns what it
//! did; printing is in [`crate::output`] so that `--json` and the human form
//! show the same facts.

pub mod audit;
pub mod backup;
pub mod check;
pub mod erase;
pub mod forget;
pub mod keygen;
pub mod restore;
pub mod rewrap;
pub mod session;
pub mod snapshots;
