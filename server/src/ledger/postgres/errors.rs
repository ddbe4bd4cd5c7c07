//! Maps PostgreSQL errors onto [`LedgerError`], and tells which ones mean "run the
//! transaction again" or "this connection is gone".

use postgres::error::SqlState;

use crate::ledger::LedgerError;

/// What a failed statement says about its transaction and connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// Another transaction got in the way (a serialization failure or a deadlock):
    /// the same work run again is expected to succeed.
    Conflict,
    /// The connection is closed or broken: it goes, and a new one is opened.
    Connection,
    /// Anything else: the statement's own error.
    Other,
}

pub(super) fn classify(error: &postgres::Error) -> Failure {
    match error.code() {
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE => Failure::Conflict,
        Some(code) if *code == SqlState::T_R_DEADLOCK_DETECTED => Failure::Conflict,
        // The server is going away or refusing new work (a restart, a failover).
        Some(code) if code.code().starts_with("08") || code.code().starts_with("57P") => {
            Failure::Connection
        }
        Some(_) => Failure::Other,
        None if error.is_closed() => Failure::Connection,
        // No SQLSTATE: an I/O error or a protocol error on the socket.
        None => Failure::Connection,
    }
}

/// The error a caller sees: a lost connection or a lost race is worth a retry
/// (`Busy`, "try again"); a full disk is `StorageFull`; the rest is for the log only.
pub(super) fn to_ledger(error: &postgres::Error) -> LedgerError {
    match classify(error) {
        Failure::Conflict | Failure::Connection => LedgerError::Busy,
        Failure::Other if error.code() == Some(&SqlState::DISK_FULL) => LedgerError::StorageFull,
        Failure::Other => LedgerError::Storage(error.to_string()),
    }
}

/// A storage error with what was being done, for the log.
pub(super) fn storage(doing: &str, error: &postgres::Error) -> LedgerError {
    match to_ledger(error) {
        LedgerError::Storage(detail) => LedgerError::Storage(format!("{doing}: {detail}")),
        other => other,
    }
}

/// A value read back from the database that our own writes could not have produced.
pub(super) fn corrupt(what: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("unexpected stored data: {what}"))
}
