//! Following a share: the ops after a cursor, then each commit as it lands,
//! pulled at the follower's own pace.
//!
//! Both live paths use this: RPC subscriptions (which push to a listener with a
//! bounded window) and the HTTP gateway's Server-Sent Events. Nothing is
//! buffered per follower beyond one page: a slow consumer simply pulls later,
//! so it can never hold up the writer or other followers.

use std::time::Duration;

use capsync_shared::Cursor;
use tokio::sync::broadcast::{self, error::RecvError};

use crate::ledger::{Authority, Changed, Ledger, LedgerError, LedgerResult, LoggedOp};

/// A cursor into one share's ledger that advances as ops are pulled.
pub struct Follower {
    ledger: Ledger,
    auth: Authority,
    cursor: Cursor,
    /// Most ops per pull.
    page: u32,
    /// Subscribed before the first read, so a commit between a read that found
    /// nothing and the wait that follows it is never missed.
    changes: broadcast::Receiver<Changed>,
    /// How often an idle follower checks its authority again without any
    /// announcement (`--follow-recheck`), so an expired token stops it in time.
    recheck: Duration,
}

impl Follower {
    /// Follows the share of `auth` (a viewer or writer authority) from after `after`,
    /// checking again every `recheck` when nothing is announced.
    pub fn new(
        ledger: Ledger,
        auth: Authority,
        after: Cursor,
        page: u32,
        recheck: Duration,
    ) -> Self {
        let changes = ledger.changes();
        Self {
            ledger,
            auth,
            cursor: after,
            page: page.max(1),
            changes,
            recheck,
        }
    }

    /// The cursor of the last op returned (or the starting cursor).
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// The next ops after the cursor, in cursor order; waits for a commit when
    /// there are none. Fails when the authority no longer holds (`Revoked`,
    /// `PermissionDenied` once expired, `NotFound` once deleted) or the ledger closes.
    pub async fn next(&mut self) -> LedgerResult<Vec<LoggedOp>> {
        loop {
            let page = self
                .ledger
                .ops_since(self.auth.clone(), self.cursor, self.page)
                .await?;
            if let Some(last) = page.ops.last() {
                self.cursor = last.cursor;
                return Ok(page.ops);
            }
            self.wait_for_change().await?;
        }
    }

    /// Returns once something may have changed for this share: a commit to it,
    /// a token revocation, missed announcements (here or on the database's
    /// notification channel), or the periodic recheck.
    async fn wait_for_change(&mut self) -> LedgerResult<()> {
        let share = self.auth.share.as_ref().map(|(id, _)| id.clone());
        let wait = async {
            loop {
                match self.changes.recv().await {
                    Ok(Changed::Share(id)) if Some(&id) == share.as_ref() => return Ok(()),
                    Ok(Changed::Share(_)) => continue,
                    Ok(Changed::Tokens | Changed::Missed) | Err(RecvError::Lagged(_)) => {
                        return Ok(());
                    }
                    Err(RecvError::Closed) => return Err(LedgerError::Closed),
                }
            }
        };
        match tokio::time::timeout(self.recheck, wait).await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }
}

/// A share on a real SQLite ledger that tests fill and compact: how each read
/// path (RPC, HTTP, SSE) is shown to refuse ops below the compaction point.
#[cfg(test)]
pub(crate) mod test_share {
    use capsync_shared::{Cursor, OpId, OpKind, ShareId, TokenId, TokenKind, now_millis};
    use tempfile::TempDir;

    use crate::ledger::{
        Authority, BatchIn, Ledger, NewShare, NewToken, OpIn, Operator, ShareState, sqlite,
    };
    use sqlite::SqliteOptions;

    pub struct TestShare {
        /// Keeps the database directory alive for the test.
        pub dir: TempDir,
        pub ledger: Ledger,
        pub admin: Authority,
        /// The agent that created the share (it may mint tokens for it).
        pub agent: Authority,
        pub viewer: Authority,
        pub writer: Authority,
        /// Ops appended so far, to name the next ones uniquely.
        appended: usize,
    }

    fn token(id: &str) -> NewToken {
        NewToken {
            id: TokenId::from(id),
            secret_hash: format!("$argon2id$fake${id}"),
            expires_at: None,
            label: String::new(),
        }
    }

    fn authority(id: &str, kind: TokenKind, share: Option<&ShareState>) -> Authority {
        Authority {
            token_id: TokenId::from(id),
            kind,
            share: share.map(|state| {
                let epoch = match kind {
                    TokenKind::Writer => state.writer_epoch,
                    _ => state.viewer_epoch,
                };
                (state.share_id.clone(), epoch)
            }),
        }
    }

    impl TestShare {
        /// An empty share `sh_1`, created by an agent.
        pub async fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ledger = sqlite::open(SqliteOptions::new(dir.path().join("ledger.db"))).unwrap();
            ledger.replace_admin_token(token("adm")).await.unwrap();
            let admin = authority("adm", TokenKind::Admin, None);
            ledger
                .mint_token(admin.clone(), TokenKind::Agent, token("agt"))
                .await
                .unwrap();
            let agent = authority("agt", TokenKind::Agent, None);
            let share = NewShare {
                share_id: ShareId::from("sh_1"),
                session_id: "ses_1".into(),
                project_id: "prj".into(),
                parent_session_id: String::new(),
                title: "a session".into(),
            };
            let info = ledger
                .create_share(agent.clone(), share, token("wrt"), token("vwr"))
                .await
                .unwrap();
            Self {
                dir,
                ledger,
                admin,
                agent,
                viewer: authority("vwr", TokenKind::Viewer, Some(&info.state)),
                writer: authority("wrt", TokenKind::Writer, Some(&info.state)),
                appended: 0,
            }
        }

        /// Appends `count` ops (model upserts); returns the share's cursor after them.
        pub async fn append(&mut self, count: usize) -> Cursor {
            let mut cursor = Cursor(0);
            let ids: Vec<usize> = (self.appended..self.appended + count).collect();
            for chunk in ids.chunks(100) {
                let ops = chunk
                    .iter()
                    .map(|n| OpIn {
                        op_id: OpId::from(format!("op_{n}").as_str()),
                        kind: OpKind::ModelUpsert,
                        payload: format!(r#"{{"id":"model_{n}"}}"#),
                        depends_on: Vec::new(),
                    })
                    .collect();
                let batch = BatchIn {
                    batch_id: format!("batch_{}", chunk[0]),
                    ops,
                    expected_cursor: None,
                };
                cursor = self
                    .ledger
                    .append(self.writer.clone(), batch)
                    .await
                    .unwrap()
                    .cursor;
            }
            self.appended += count;
            cursor
        }

        /// Drops the payload of every op applied so far; returns the compaction
        /// point, which is then the share's cursor.
        pub async fn compact(&self) -> Cursor {
            // Ops applied in this very millisecond count as older than the cutoff too.
            let applied_before = now_millis() + 1;
            let mut from = None;
            loop {
                let step = self
                    .ledger
                    .compact_step(Operator::Scheduler, applied_before, from, 1000, false)
                    .await
                    .unwrap();
                from = step.next;
                if from.is_none() {
                    return self.state().await.cursor;
                }
            }
        }

        pub async fn state(&self) -> ShareState {
            self.ledger.share_state(self.viewer.clone()).await.unwrap()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_share::TestShare;
    use super::*;

    #[tokio::test]
    async fn a_follower_below_the_compaction_point_is_told_to_take_a_snapshot() {
        let mut share = TestShare::new().await;
        share.append(5).await;
        let point = share.compact().await;
        assert_eq!(point, Cursor(5));
        share.append(2).await;

        let mut behind = Follower::new(
            share.ledger.clone(),
            share.viewer.clone(),
            Cursor(4),
            10,
            crate::config::DEFAULT_FOLLOW_RECHECK,
        );
        match behind.next().await {
            Err(LedgerError::SnapshotRequired(at)) => assert_eq!(at, point),
            other => panic!("expected SnapshotRequired, got {other:?}"),
        }

        let mut at_point = Follower::new(
            share.ledger.clone(),
            share.viewer.clone(),
            point,
            10,
            crate::config::DEFAULT_FOLLOW_RECHECK,
        );
        let cursors: Vec<u64> = at_point
            .next()
            .await
            .unwrap()
            .iter()
            .map(|op| op.cursor.0)
            .collect();
        assert_eq!(cursors, [6, 7]);
    }
}
