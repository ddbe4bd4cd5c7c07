//! capsync server library.
pub mod ledger;
