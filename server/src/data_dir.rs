//! The data directory and the lock that keeps one server (or maintenance command) in it.

use std::fs::{File, TryLockError};
use std::path::Path;

use crate::StartError;

/// Held for as long as a server or maintenance command uses the data dir; the
/// OS releases it if the process dies.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> Result<Self, StartError> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(StartError::DataDirInUse(data_dir.to_path_buf())),
            Err(TryLockError::Error(err)) => Err(err.into()),
        }
    }
}
