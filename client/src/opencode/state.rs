//! The shipper's state file (`shipper.db` in its directory): how far each journal
//! segment has been read, and each session it has seen with the share it ships to.
//!
//! Holds the writer and viewer token of every share it created, so the file is
//! created readable by its user only (its directory too, by the installer). Only the
//! shipper writes it (it holds the directory's lock); `capsync opencode status` reads.

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, params};

/// Schema versions, in order: `MIGRATIONS[i]` takes `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[V1_INITIAL];

const V1_INITIAL: &str = r#"
-- How far each journal segment has been read and queued (a byte offset after a whole line).
CREATE TABLE segments (
    name   TEXT PRIMARY KEY,
    offset INTEGER NOT NULL CHECK (offset >= 0)
) STRICT;

CREATE TABLE sessions (
    session_id   TEXT PRIMARY KEY,
    project_id   TEXT NOT NULL DEFAULT '',
    -- '' for a session that no other started.
    parent_id    TEXT NOT NULL DEFAULT '',
    title        TEXT NOT NULL DEFAULT '',
    -- The newest share link opencode showed for it (`share.url` of its journaled info).
    opencode_share_url TEXT NOT NULL DEFAULT '',
    share_id     TEXT,
    writer_token TEXT,
    viewer_token TEXT,
    -- The outbox file is outbox/<session>.<generation>.db; a new share gets a new one.
    generation   INTEGER NOT NULL DEFAULT 0,
    -- Why shipping this session stopped for good (the share was revoked or deleted).
    stopped      TEXT,
    -- opencode deleted the session.
    deleted      INTEGER NOT NULL DEFAULT 0
) STRICT;
"#;

/// One session the shipper has seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionRow {
    pub session_id: String,
    pub project_id: String,
    pub parent_id: String,
    pub title: String,
    /// The newest share link opencode showed for the session ("" for none yet).
    pub opencode_share_url: String,
    pub share: Option<ShareTokens>,
    pub generation: u32,
    pub stopped: Option<String>,
    pub deleted: bool,
}

/// The share a session ships to, and the tokens the shipper holds for it.
#[derive(Clone, PartialEq, Eq)]
pub struct ShareTokens {
    pub share_id: String,
    pub writer_token: String,
    pub viewer_token: String,
}

impl std::fmt::Debug for ShareTokens {
    /// Hides the tokens, so they never land in a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShareTokens")
            .field("share_id", &self.share_id)
            .finish_non_exhaustive()
    }
}

/// A handle on the state file. Cheap to clone.
#[derive(Clone)]
pub struct ShipperState {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for ShipperState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShipperState").finish_non_exhaustive()
    }
}

impl ShipperState {
    /// Opens or creates the state file (mode 0600), migrated to this build's schema.
    /// Blocking; call it at startup.
    pub fn open(path: &Path) -> Result<Self, StateError> {
        if !path.exists() {
            // Created empty with the right mode first: SQLite would use the umask's (and
            // gives its -wal and -shm files the database file's mode).
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(path)?;
        }
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        loop {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
            let applied = usize::try_from(version).unwrap_or(usize::MAX);
            if applied > MIGRATIONS.len() {
                return Err(StateError::Newer(version));
            }
            let Some(sql) = MIGRATIONS.get(applied) else {
                break;
            };
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version + 1)?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn blocking<T, F>(&self, work: F) -> Result<T, StateError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StateError> + Send + 'static,
    {
        let conn = self.conn.clone();
        let task = tokio::task::spawn_blocking(move || {
            let conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            work(&conn)
        });
        match task.await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(StateError::Io(std::io::Error::other(e.to_string()))),
        }
    }

    /// Where reading `segment` resumes (0 for a segment not read yet).
    pub async fn offset(&self, segment: &str) -> Result<u64, StateError> {
        let segment = segment.to_owned();
        self.blocking(move |conn| {
            let offset: Option<i64> = conn
                .query_row(
                    "SELECT offset FROM segments WHERE name = ?1",
                    [segment],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(offset.map_or(0, |o| o.max(0) as u64))
        })
        .await
    }

    /// Records that `segment` has been read and queued up to `offset`.
    pub async fn set_offset(&self, segment: &str, offset: u64) -> Result<(), StateError> {
        let segment = segment.to_owned();
        let offset = i64::try_from(offset).unwrap_or(i64::MAX);
        self.blocking(move |conn| {
            conn.execute(
                "INSERT INTO segments (name, offset) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET offset = excluded.offset",
                params![segment, offset],
            )?;
            Ok(())
        })
        .await
    }

    /// Forgets a segment that was read to its end and deleted.
    pub async fn forget_segment(&self, segment: &str) -> Result<(), StateError> {
        let segment = segment.to_owned();
        self.blocking(move |conn| {
            conn.execute("DELETE FROM segments WHERE name = ?1", [segment])?;
            Ok(())
        })
        .await
    }

    /// Every session, by id.
    pub async fn sessions(&self) -> Result<Vec<SessionRow>, StateError> {
        self.blocking(|conn| {
            let mut statement = conn.prepare(
                "SELECT session_id, project_id, parent_id, title, opencode_share_url, share_id,
                        writer_token, viewer_token, generation, stopped, deleted
                 FROM sessions ORDER BY session_id",
            )?;
            let rows = statement.query_map([], |r| {
                let share = match (r.get(5)?, r.get(6)?, r.get(7)?) {
                    (Some(share_id), Some(writer_token), Some(viewer_token)) => Some(ShareTokens {
                        share_id,
                        writer_token,
                        viewer_token,
                    }),
                    _ => None,
                };
                Ok(SessionRow {
                    session_id: r.get(0)?,
                    project_id: r.get(1)?,
                    parent_id: r.get(2)?,
                    title: r.get(3)?,
                    opencode_share_url: r.get(4)?,
                    share,
                    generation: r.get(8)?,
                    stopped: r.get(9)?,
                    deleted: r.get(10)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Stores `row` whole (the shipper keeps every row in memory and writes each change
    /// through).
    pub async fn save(&self, row: &SessionRow) -> Result<(), StateError> {
        let row = row.clone();
        self.blocking(move |conn| {
            let share = row.share.as_ref();
            conn.execute(
                "INSERT INTO sessions (session_id, project_id, parent_id, title, opencode_share_url,
                                       share_id, writer_token, viewer_token, generation, stopped, deleted)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                 ON CONFLICT (session_id) DO UPDATE SET
                    project_id = excluded.project_id, parent_id = excluded.parent_id,
                    title = excluded.title, opencode_share_url = excluded.opencode_share_url,
                    share_id = excluded.share_id, writer_token = excluded.writer_token,
                    viewer_token = excluded.viewer_token, generation = excluded.generation,
                    stopped = excluded.stopped, deleted = excluded.deleted",
                params![
                    row.session_id,
                    row.project_id,
                    row.parent_id,
                    row.title,
                    row.opencode_share_url,
                    share.map(|s| s.share_id.as_str()),
                    share.map(|s| s.writer_token.as_str()),
                    share.map(|s| s.viewer_token.as_str()),
                    row.generation,
                    row.stopped,
                    row.deleted,
                ],
            )?;
            Ok(())
        })
        .await
    }
}

/// Why the state file failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("the shipper's state file: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the shipper's state file: {0}")]
    Io(#[from] std::io::Error),
    #[error(
        "the shipper's state file has schema version {0}, newer than this build's; use a newer capsync"
    )]
    Newer(i64),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn offsets_and_sessions_survive_reopening_in_a_private_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shipper.db");
        let state = ShipperState::open(&path).unwrap();
        assert_eq!(state.offset("a.jsonl").await.unwrap(), 0);
        state.set_offset("a.jsonl", 120).await.unwrap();
        let row = SessionRow {
            session_id: "ses_1".into(),
            parent_id: "ses_0".into(),
            share: Some(ShareTokens {
                share_id: "sh_1".into(),
                writer_token: "cswriter_secret".into(),
                viewer_token: "csviewer_secret".into(),
            }),
            generation: 2,
            ..SessionRow::default()
        };
        state.save(&row).await.unwrap();
        assert!(!format!("{row:?}").contains("secret"));
        drop(state);

        let again = ShipperState::open(&path).unwrap();
        assert_eq!(again.offset("a.jsonl").await.unwrap(), 120);
        assert_eq!(again.sessions().await.unwrap(), [row]);
        again.forget_segment("a.jsonl").await.unwrap();
        assert_eq!(again.offset("a.jsonl").await.unwrap(), 0);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
    }
}
