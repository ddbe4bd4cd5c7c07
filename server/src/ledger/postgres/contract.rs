//! The backend contract suite ([`crate::ledger::contract`]) run on PostgreSQL.

use std::path::Path;

use super::PostgresOptions;
use super::test_database::{available, options_for};
use crate::clock::Clock;
use crate::ledger::Ledger;
use crate::ledger::contract::{Engine, ledger_contract};

/// PostgreSQL as the contract opens it: a schema per store directory.
pub(super) const POSTGRES: Engine = Engine {
    available,
    open,
    open_without_reclaim,
};

fn open(dir: &Path, clock: Clock) -> Ledger {
    super::open(options_for(dir, clock)).unwrap()
}

fn open_without_reclaim(dir: &Path, clock: Clock) -> Ledger {
    super::open(PostgresOptions {
        reclaim_compacted: false,
        ..options_for(dir, clock)
    })
    .unwrap()
}

ledger_contract!(POSTGRES);
