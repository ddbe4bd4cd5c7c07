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
///
/// The ledger decides in one transaction ([`Ledger::create_first_admin_token`]):
/// of servers starting at once on one database, one creates the token, and
/// the others remove the file they wrote, which then holds a token no one stored.
pub async fn ensure(
    ledger: &Ledger,
    hasher: &SecretHasher,
    path: &Path,
) -> Result<bool, StartError> {
    if ledger.has_admin_token().await.map_err(StartError::Ledger)? {
        return Ok(false);
    }
    let (token, row) = mint(hasher).await?;
    // The file first: a token in the database that nobody can read is useless,
    // while a file whose token is not stored yet is simply replaced next start.
    write_private(path, &format!("{}\n", token.expose()))?;
    let created = ledger
        .create_first_admin_token(row)
        .await
        .map_err(StartError::Ledger)?;
    if !created {
        std::fs::remove_file(path)?;
    }
    Ok(created)
}

async fn mint(
    hasher: &SecretHasher,
) -> Result<(capsync_shared::SturdyRef, crate::ledger::NewToken), StartError> {
    hasher
        .mint(TokenKind::Admin, None, "admin".into())
        .await
        .map_err(|err: ServerError| StartError::Io(std::io::Error::other(err.to_string())))
}

/// Revokes every admin token and writes a new one to `path`.
pub async fn rotate(ledger: &Ledger, hasher: &SecretHasher, path: &Path) -> Result<(), StartError> {
    let (token, row) = mint(hasher).await?;
    // The file first, as in `ensure`.
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
