//! The capability objects: one module per interface of the schema.
//!
//! All of them live on the server's `LocalSet` and never block: storage work
//! goes to the [`Ledger`](crate::ledger::Ledger), argon2 to the blocking pool.
//! Each object holds an [`Authority`](crate::ledger::Authority) that the ledger
//! re-checks on every call, which is what makes revocation immediate.

mod admin;
mod agent;
mod answer;
mod context;
pub(crate) mod fuzz;
mod gateway;
mod progress_listener;
mod shares;
mod subscription;
mod viewer;
mod wire;
mod writer;

pub use context::Context;
pub use gateway::GatewayImpl;
