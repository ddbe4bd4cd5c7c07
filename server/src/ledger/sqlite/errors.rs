//! Maps storage-engine errors onto [`LedgerError`]: lock contention is `Busy`,
//! a full disk (or database size limit) `StorageFull`, the rest is `Storage`.

use rusqlite::ErrorCode;

use crate::ledger::LedgerError;

impl From<rusqlite::Error> for LedgerError {
    fn from(error: rusqlite::Error) -> Self {
        match error.sqlite_error_code() {
            // Another process (or a stuck reader) held the lock past the busy timeout:
            // worth a retry, unlike everything else the engine can report.
            Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => LedgerError::Busy,
            // Nothing of the statement (or transaction) was stored: retry once there is room.
            Some(ErrorCode::DiskFull) => LedgerError::StorageFull,
            _ => LedgerError::Storage(error.to_string()),
        }
    }
}

/// A value read back from the database that our own writes could not have produced.
pub(super) fn corrupt(what: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(format!("unexpected stored data: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine_error(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None)
    }

    #[test]
    fn busy_and_locked_map_to_busy_and_the_rest_to_storage() {
        assert!(matches!(
            LedgerError::from(engine_error(rusqlite::ffi::SQLITE_BUSY)),
            LedgerError::Busy
        ));
        assert!(matches!(
            LedgerError::from(engine_error(rusqlite::ffi::SQLITE_LOCKED)),
            LedgerError::Busy
        ));
        assert!(matches!(
            LedgerError::from(engine_error(rusqlite::ffi::SQLITE_FULL)),
            LedgerError::StorageFull
        ));
        assert!(matches!(
            LedgerError::from(engine_error(rusqlite::ffi::SQLITE_IOERR)),
            LedgerError::Storage(_)
        ));
        assert!(matches!(
            LedgerError::from(rusqlite::Error::QueryReturnedNoRows),
            LedgerError::Storage(_)
        ));
    }
}
