//! The backend contract suite ([`crate::ledger::contract`]) run on SQLite.

use std::path::{Path, PathBuf};

use super::{Durability, SqliteOptions};
use crate::clock::Clock;
use crate::ledger::Ledger;
use crate::ledger::contract::{Engine, ledger_contract};

/// SQLite as the contract and the engine's own tests open it.
pub(super) const SQLITE: Engine = Engine {
    available: || true,
    open,
    open_without_reclaim,
};

/// The database file of a store in `dir`.
pub(super) fn database(dir: &Path) -> PathBuf {
    dir.join("ledger.db")
}

/// Full durability, two readers, groups of at most `max_group_commit`, the system clock.
pub(super) fn options(path: PathBuf, max_group_commit: usize) -> SqliteOptions {
    SqliteOptions {
        durability: Durability::Full,
        read_connections: 2,
        max_group_commit,
        ..SqliteOptions::new(path)
    }
}

fn open(dir: &Path, clock: Clock) -> Ledger {
    super::open(SqliteOptions {
        clock,
        ..options(database(dir), 64)
    })
    .unwrap()
}

fn open_without_reclaim(dir: &Path, clock: Clock) -> Ledger {
    super::open(SqliteOptions {
        clock,
        reclaim_compacted: false,
        ..options(database(dir), 64)
    })
    .unwrap()
}

ledger_contract!(SQLITE);
