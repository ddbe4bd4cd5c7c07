//! A share on a real SQLite ledger that tests fill and compact: how each read
//! path (RPC, HTTP, SSE) is shown to refuse ops below the compaction point.

use capsync_shared::{Cursor, OpId, OpKind, ShareId, TokenId, TokenKind, now_millis};
use tempfile::TempDir;

use crate::ledger::{
    Authority, BatchIn, Ledger, NewShare, NewToken, OpIn, Operator, RevokeScope, ShareState, sqlite,
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
                follows: None,
                link: None,
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

    /// Revokes the share's viewers (its owner, the agent, does): the viewer
    /// authority stops working.
    pub async fn revoke_viewers(&self) {
        self.ledger
            .revoke_share(
                self.agent.clone(),
                ShareId::from("sh_1"),
                RevokeScope::Viewers,
            )
            .await
            .unwrap();
    }

    pub async fn state(&self) -> ShareState {
        self.ledger.share_state(self.viewer.clone()).await.unwrap()
    }
}
