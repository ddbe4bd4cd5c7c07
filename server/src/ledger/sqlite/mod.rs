//! Embedded SQLite backend of the ledger: one writer thread with group commit, plus read connections.

use std::path::PathBuf;

use super::{Ledger, LedgerError};

/// How hard a commit waits for the disk before the ack is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// `synchronous=FULL`: an acked batch survives power loss. The default,
    /// because the ack promises durability.
    #[default]
    Full,
    /// `synchronous=NORMAL`: in WAL mode an acked batch survives a process crash
    /// but the last commits may be lost on power loss or an OS crash.
    Normal,
}

/// Settings of the SQLite backend.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file; created with its parent directory if missing.
    pub path: PathBuf,
    pub durability: Durability,
    /// Read connections for snapshots, catch-up and token lookups.
    pub read_connections: usize,
    /// Most commands one group-commit transaction takes.
    pub max_group_commit: usize,
}

/// Opens (creating and migrating if needed) the database and starts the writer thread.
pub fn open(options: SqliteOptions) -> Result<Ledger, LedgerError> {
    let _ = options;
    Err(LedgerError::Storage(
        "the SQLite backend is being written".into(),
    ))
}
