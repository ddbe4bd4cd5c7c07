//! Plain Rust mirrors of the schema's data structs, serializable for `--json` output.
//!
//! Times are Unix milliseconds like on the wire, but "none" is `None` here instead of 0.

use serde::Serialize;

/// The live state of a share (`ShareState` in the schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareState {
    pub share_id: String,
    /// Number of ops applied so far; advances by exactly one per applied op.
    pub cursor: u64,
    /// Bumped by revoking the writers scope; older writer tokens stop working.
    pub writer_epoch: u32,
    /// Bumped by revoking the viewers scope; older viewer tokens stop working.
    pub viewer_epoch: u32,
}

/// What a share mirrors and who made it (`ShareInfo` in the schema).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareInfo {
    pub state: ShareState,
    /// The agent's session this share mirrors.
    pub session_id: String,
    pub project_id: String,
    /// `None` for a root session (the wire's "").
    pub parent_session_id: Option<String>,
    pub title: String,
    pub created_at: i64,
    /// Time of the last applied op (`created_at` before any).
    pub updated_at: i64,
    /// Id of the agent token that created the share.
    pub owner_token_id: String,
    /// When an admin archived it (then it is read-only); `None` when not archived.
    pub archived_at: Option<i64>,
}

/// Sizes and counts of the server's whole store (`Stats` in the schema). Sizes are bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub db_file_bytes: u64,
    /// The write-ahead log; 0 when there is none.
    pub wal_file_bytes: u64,
    pub page_size: u64,
    pub page_count: u64,
    /// Pages on the freelist.
    pub free_pages: u64,
    /// `free_pages * page_size`: space a vacuum would give back.
    pub reclaimable_bytes: u64,
    pub root_shares: u64,
    /// Shares of a child (sub-agent) session.
    pub child_shares: u64,
    /// Archived shares, also counted as root or child.
    pub archived_shares: u64,
    pub messages: u64,
    pub parts: u64,
    pub ledger_ops: u64,
    pub ledger_payload_bytes: u64,
}

/// A freshly minted sturdy ref. `token` is the whole secret, shown once: keep it safe.
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MintedToken {
    pub token: String,
    /// The public part of the token; safe to log, used to revoke it.
    pub token_id: String,
    /// `None` when the token never expires.
    pub expires_at: Option<i64>,
}

impl std::fmt::Debug for MintedToken {
    /// Hides the secret, so a token never lands in a log through `{:?}`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedToken")
            .field("token", &"<redacted>")
            .field("token_id", &self.token_id)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// One page of a share listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShareList {
    pub shares: Vec<ShareInfo>,
    /// Pass as `after` for the next page; `None` when this is the last one.
    pub next_after: Option<String>,
}

/// Which capabilities of a share a revocation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Writers,
    Viewers,
    All,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Writers => "writers",
            Self::Viewers => "viewers",
            Self::All => "all",
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Scope> for capsync_shared::capsync_capnp::Scope {
    fn from(scope: Scope) -> Self {
        match scope {
            Scope::Writers => Self::Writers,
            Scope::Viewers => Self::Viewers,
            Scope::All => Self::All,
        }
    }
}

/// `0` on the wire means "none".
pub(crate) fn nonzero_time(ms: i64) -> Option<i64> {
    (ms != 0).then_some(ms)
}

/// `None` goes on the wire as 0.
pub(crate) fn wire_time(ms: Option<i64>) -> i64 {
    ms.unwrap_or(0)
}

/// `""` on the wire means "none".
pub(crate) fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_token_debug_hides_the_secret() {
        let t = MintedToken {
            token: "csviewer_0011223344556677_secretsecret".into(),
            token_id: "0011223344556677".into(),
            expires_at: None,
        };
        let shown = format!("{t:?}");
        assert!(!shown.contains("secretsecret"));
        assert!(shown.contains("0011223344556677"));
    }

    #[test]
    fn json_field_names_follow_the_schema() {
        let state = ShareState {
            share_id: "sh_1".into(),
            cursor: 3,
            writer_epoch: 1,
            viewer_epoch: 2,
        };
        let json = serde_json::to_value(&state).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"shareId": "sh_1", "cursor": 3, "writerEpoch": 1, "viewerEpoch": 2})
        );
        assert_eq!(serde_json::to_value(Scope::All).unwrap(), "all");
    }
}
