//! The data directory (its owner's only) and the lock that keeps one server
//! (or maintenance command) in it.

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
        create_private_dir(data_dir)?;
        let path = data_dir.join("lock");
        let mut options = File::options();
        options.create(true).truncate(false).write(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options.open(&path)?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(TryLockError::WouldBlock) => Err(StartError::DataDirInUse(data_dir.to_path_buf())),
            Err(TryLockError::Error(err)) => Err(err.into()),
        }
    }
}

/// Creates `dir` (and its parents) if missing, then makes it its owner's only
/// (0700): it holds the database and the admin token.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
            tracing::info!(dir = %dir.display(), "made the data directory its owner's only (0700)");
        }
    }
    Ok(())
}
