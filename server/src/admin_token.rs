//! The admin token: created on first start, written to a file only its owner can read.

use std::io::Write;
use std::path::Path;

use capsync_shared::TokenKind;

use crate::StartError;
use crate::error::ServerError;
use crate::ledger::Ledger;
use crate::secret_hasher::SecretHasher;

/// Creates an admin token if the database has none, writing it to `path`.
/// Returns whether it created one.
pub async fn ensure(
    ledger: &Ledger,
    hasher: &SecretHasher,
    path: &Path,
) -> Result<bool, StartError> {
    if ledger.has_admin_token().await.map_err(StartError::Ledger)? {
        return Ok(false);
    }
    rotate(ledger, hasher, path).await?;
    Ok(true)
}

/// Revokes every admin token and writes a new one to `path`.
pub async fn rotate(ledger: &Ledger, hasher: &SecretHasher, path: &Path) -> Result<(), StartError> {
    let (token, row) = hasher
        .mint(TokenKind::Admin, None, "admin".into())
        .await
        .map_err(|err: ServerError| StartError::Io(std::io::Error::other(err.to_string())))?;
    // Write the file first: a token in the database that nobody can read is useless,
    // while a file whose token is not stored yet is simply retried on the next start.
    write_private(path, &format!("{}\n", token.expose()))?;
    ledger
        .replace_admin_token(row)
        .await
        .map_err(StartError::Ledger)?;
    Ok(())
}

/// Writes `contents` to `path`, readable and writable by the owner only.
fn write_private(path: &Path, contents: &str) -> Result<(), StartError> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(contents.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
