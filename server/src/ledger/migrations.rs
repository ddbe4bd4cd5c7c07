//! What both engines' schema migrations agree on: which migration comes next after the
//! version a database has, and that a database newer than this build is refused.

use super::{LedgerError, LedgerResult};

/// The migration to apply to a database at version `current` (the number of
/// `migrations` already applied), `None` when it is up to date.
pub(crate) fn next<'m>(current: i64, migrations: &[&'m str]) -> LedgerResult<Option<&'m str>> {
    let applied = usize::try_from(current)
        .map_err(|_| LedgerError::Storage(format!("invalid schema version {current}")))?;
    if applied > migrations.len() {
        return Err(LedgerError::Storage(format!(
            "the database has schema version {current}, newer than this build's {}",
            migrations.len()
        )));
    }
    Ok(migrations.get(applied).copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_migration_follows_the_applied_ones_and_a_newer_database_is_refused() {
        let migrations = ["one", "two"];
        assert_eq!(next(0, &migrations).unwrap(), Some("one"));
        assert_eq!(next(1, &migrations).unwrap(), Some("two"));
        assert_eq!(next(2, &migrations).unwrap(), None);
        assert!(
            next(3, &migrations)
                .unwrap_err()
                .to_string()
                .contains("newer")
        );
        assert!(next(-1, &migrations).is_err());
    }
}
