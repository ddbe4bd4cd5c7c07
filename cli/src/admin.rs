//! `capsync admin ...`: the operator's commands (admin token).

use std::time::Duration;

use capsync_shared::TokenKind;
use clap::Subcommand;

use super::lifecycle::{self, PruneArgs, parse_age};
use super::output::{Output, bytes};
use super::{Global, ScopeArg, finish};
use capsync_client::admin::AdminClient;
use capsync_client::error::ClientError;
use capsync_client::expiry::{Expiry, format_expiry};
use capsync_client::types::{ShareList, Stats};

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Mint an agent token, which may create shares
    ///
    /// Prints the new token alone on stdout (details on stderr), so it can be captured:
    ///   AGENT_TOKEN=$(capsync admin mint-agent --label ci --expires 30d)
    #[command(verbatim_doc_comment)]
    MintAgent {
        /// Free text for people, shown in listings and audit logs
        #[arg(long, default_value = "")]
        label: String,
        /// When the token expires: a duration (30d, 12h), a time (2030-01-31T12:00:00Z), or never
        #[arg(long, value_name = "WHEN", default_value = "never")]
        expires: Expiry,
    },

    /// Revoke a share's tokens: every older token and live capability of the scope stops working
    ///
    /// Revocation bumps the share's epoch for the scope, so tokens minted afterwards work.
    ///   capsync admin revoke sh_0123abcd --scope viewers
    #[command(verbatim_doc_comment)]
    Revoke {
        /// The share's id (see `capsync admin list`)
        share_id: String,
        /// Which tokens to revoke
        #[arg(long, value_enum, default_value_t = ScopeArg::All)]
        scope: ScopeArg,
    },

    /// Revoke one token by its id (the middle part of the token, shown when it was minted)
    ///
    ///   capsync admin revoke-token 3f9a0c2e7b1d4a5c
    #[command(verbatim_doc_comment)]
    RevokeToken {
        /// The token's id (16 hex digits)
        token_id: String,
    },

    /// List all shares, ordered by share id
    ///
    ///   capsync admin list --limit 50
    ///   capsync admin list --all --json
    #[command(verbatim_doc_comment)]
    List(ListArgs),

    /// Archive a share: hidden from listings (unless --archived), read-only, still viewable
    ///
    /// Appends to an archived share fail until it is unarchived.
    ///   capsync admin archive sh_0123abcd
    #[command(verbatim_doc_comment)]
    Archive {
        /// The share's id
        share_id: String,
    },

    /// Unarchive a share: listed again and takes appends again
    ///
    ///   capsync admin unarchive sh_0123abcd
    #[command(verbatim_doc_comment)]
    Unarchive {
        /// The share's id
        share_id: String,
    },

    /// Show the database's size and what it holds
    ///
    ///   capsync admin stats
    ///   capsync admin stats --json
    #[command(verbatim_doc_comment)]
    Stats,

    /// Delete a share with its records, ledger and tokens (cannot be undone)
    ///
    ///   capsync admin delete-share sh_0123abcd
    #[command(verbatim_doc_comment)]
    DeleteShare {
        /// The share's id
        share_id: String,
    },

    /// Delete root shares with no change for longer than --older-than (default 30d)
    ///
    /// A root is a share whose parent session is held by no share on this server. Each
    /// pruned share goes with its records, ledger and tokens; its links stop working
    /// (notFound). Child sessions of a pruned share are kept, and listed, unless
    /// --children is given. Start with --dry-run: it lists exactly what would be
    /// deleted, and the real run right after deletes exactly that, except shares that
    /// changed in between (listed as skipped).
    ///   capsync admin prune --dry-run
    ///   capsync admin prune --older-than 90d --archived-only
    ///   capsync admin prune --older-than 12h --children --vacuum
    ///   capsync admin prune --dry-run --json
    #[command(verbatim_doc_comment)]
    Prune(PruneArgs),

    /// Rewrite the database file without its free pages, so it shrinks
    ///
    /// Checkpoints the write-ahead log, then runs VACUUM. Every write waits while it
    /// runs; when the database is busy it fails with "database busy; try again".
    /// The server gives free pages back on its own too, in small steps; this is for
    /// after a large prune.
    ///   capsync admin vacuum
    #[command(verbatim_doc_comment)]
    Vacuum,

    /// Clear the output of tool calls already marked compacted, stored before --reclaim was on
    ///
    /// Only the output and attachments of tool parts whose state has a compacted time
    /// are cleared; nothing else is touched. The server does this as parts arrive
    /// (its --reclaim setting, on by default); this pass is for older ones.
    ///   capsync admin reclaim --dry-run
    ///   capsync admin reclaim
    #[command(verbatim_doc_comment)]
    Reclaim {
        /// Count what would be cleared, and clear nothing
        #[arg(long)]
        dry_run: bool,
    },

    /// Drop the payload of ledger ops applied longer ago than --older-than
    ///
    /// The ops keep their ids, so retries are still deduplicated. Viewers asking for
    /// older ops (`capsync ops`, `follow --after`) are told to take a snapshot;
    /// `capsync follow` does so by itself. Snapshots are not affected.
    ///   capsync admin compact --older-than 30d --dry-run
    ///   capsync admin compact --older-than 30d
    #[command(verbatim_doc_comment)]
    Compact {
        /// Compact ops applied longer ago than this: 30d, 12h, 90m, 1w
        #[arg(long, value_name = "AGE", value_parser = parse_age)]
        older_than: Duration,
        /// Count what would be dropped, and drop nothing
        #[arg(long)]
        dry_run: bool,
    },
}

impl AdminCommand {
    /// The storage lifecycle commands: how long they take grows with the database (and a
    /// prune or reclaim without a progress bar hears nothing from the server until the
    /// end), so no call timeout applies; they wait until the server answers or the
    /// connection drops. Each step the server completes stays done if the wait is cut short.
    fn waits_until_done(&self) -> bool {
        matches!(
            self,
            Self::Prune(_) | Self::Vacuum | Self::Reclaim { .. } | Self::Compact { .. }
        )
    }
}

/// Paging flags of the list commands.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// Start after this share id (the `next` value a previous page printed)
    #[arg(long, default_value = "", value_name = "SHARE_ID")]
    pub after: String,
    /// Shares per page (0: the server's default)
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    /// Follow every page to the end
    #[arg(long)]
    pub all: bool,
    /// Include archived shares (marked "(archived)")
    #[arg(long)]
    pub archived: bool,
}

pub async fn run(global: &Global, out: &Output, command: &AdminCommand) -> Result<u8, ClientError> {
    let (conn, redeemed) = global.redeem(&[TokenKind::Admin]).await?;
    let admin = redeemed.into_admin()?;
    let work = run_with(&admin, out, command);
    let result = if command.waits_until_done() {
        work.await
    } else {
        global.call(&conn, work).await
    };
    finish(conn).await;
    result.map(|()| super::EXIT_OK)
}

async fn run_with(
    admin: &AdminClient,
    out: &Output,
    command: &AdminCommand,
) -> Result<(), ClientError> {
    match command {
        AdminCommand::MintAgent { label, expires } => {
            let expires_at = expires.expires_at(capsync_shared::now_millis());
            let minted = admin.mint_agent(label, expires_at).await?;
            out.note(format!(
                "minted agent token {} (expires {})",
                minted.token_id,
                format_expiry(minted.expires_at)
            ));
            out.result(&minted, || minted.token.clone());
        }
        AdminCommand::Revoke { share_id, scope } => {
            let state = admin.revoke_share(share_id, (*scope).into()).await?;
            out.result(&state, || {
                super::share::revoked_text(&state, (*scope).into())
            });
        }
        AdminCommand::RevokeToken { token_id } => {
            admin.revoke_token(token_id).await?;
            out.result(&serde_json::json!({"revoked": token_id}), || {
                format!("revoked token {token_id}")
            });
        }
        AdminCommand::List(args) => {
            let list = list_pages(args, |after, limit| async move {
                admin.list_shares(&after, limit, args.archived).await
            })
            .await?;
            out.result(&list, || super::share::list_text(&list));
        }
        AdminCommand::Archive { share_id } => {
            let info = admin.archive_share(share_id).await?;
            out.result(&info, || format!("archived share {share_id}"));
        }
        AdminCommand::Unarchive { share_id } => {
            let info = admin.unarchive_share(share_id).await?;
            out.result(&info, || format!("unarchived share {share_id}"));
        }
        AdminCommand::Stats => {
            let stats = admin.stats().await?;
            out.result(&stats, || stats_text(&stats));
        }
        AdminCommand::DeleteShare { share_id } => {
            admin.delete_share(share_id).await?;
            out.result(&serde_json::json!({"deleted": share_id}), || {
                format!("deleted share {share_id}")
            });
        }
        AdminCommand::Prune(args) => lifecycle::prune(admin, out, args).await?,
        AdminCommand::Vacuum => lifecycle::vacuum(admin, out).await?,
        AdminCommand::Reclaim { dry_run } => lifecycle::reclaim(admin, out, *dry_run).await?,
        AdminCommand::Compact {
            older_than,
            dry_run,
        } => lifecycle::compact(admin, out, *older_than, *dry_run).await?,
    }
    Ok(())
}

/// The stats as a two-column table, for people: the engine's own numbers, then the counts.
pub fn stats_text(s: &Stats) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    if s.engine == "postgres" {
        rows.push(("engine".into(), "PostgreSQL".into()));
        rows.push(("database".into(), bytes(s.database_bytes)));
        for table in &s.tables {
            rows.push((
                format!("table {}", table.name),
                format!(
                    "{} ({} rows, {} dead)",
                    bytes(table.total_bytes),
                    table.live_rows,
                    table.dead_rows
                ),
            ));
        }
    } else {
        rows.extend([
            ("database file".into(), bytes(s.db_file_bytes)),
            ("wal file".into(), bytes(s.wal_file_bytes)),
            ("page size".into(), bytes(s.page_size)),
            ("pages".into(), s.page_count.to_string()),
            ("free pages".into(), s.free_pages.to_string()),
            ("reclaimable".into(), bytes(s.reclaimable_bytes)),
        ]);
    }
    rows.extend([
        ("root shares".into(), s.root_shares.to_string()),
        ("child shares".into(), s.child_shares.to_string()),
        ("archived shares".into(), s.archived_shares.to_string()),
        ("messages".into(), s.messages.to_string()),
        ("parts".into(), s.parts.to_string()),
        ("ledger ops".into(), s.ledger_ops.to_string()),
        ("ledger payload".into(), bytes(s.ledger_payload_bytes)),
        ("compacted ops".into(), s.compacted_ops.to_string()),
        (
            "reclaimable output".into(),
            bytes(s.reclaimable_output_bytes),
        ),
    ]);
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(name, value)| format!("{name:<width$} {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One page, or with `--all` every page joined into one list.
pub async fn list_pages<F, Fut>(args: &ListArgs, mut fetch: F) -> Result<ShareList, ClientError>
where
    F: FnMut(String, u32) -> Fut,
    Fut: std::future::Future<Output = Result<ShareList, ClientError>>,
{
    let mut list = fetch(args.after.clone(), args.limit).await?;
    if !args.all {
        return Ok(list);
    }
    while let Some(after) = list.next_after.take() {
        let mut page = fetch(after.clone(), args.limit).await?;
        if page.next_after.as_deref() == Some(after.as_str()) {
            // A server bug would otherwise make this loop forever.
            return Err(ClientError::Rpc(capnp::Error::failed(
                "the server returned the same share page twice".into(),
            )));
        }
        list.shares.append(&mut page.shares);
        list.next_after = page.next_after;
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_show_compaction_and_reclaimable_output() {
        let stats = Stats {
            ledger_ops: 100,
            compacted_ops: 40,
            reclaimable_output_bytes: 3 << 20,
            ..Stats::default()
        };
        let text = stats_text(&stats);
        assert!(text.contains("\ncompacted ops      40\n"), "{text}");
        assert!(
            text.ends_with("\nreclaimable output 3145728 B (3.0 MiB)"),
            "{text}"
        );
        let json = serde_json::to_value(&stats).unwrap();
        assert_eq!(json["compactedOps"], 40);
        assert_eq!(json["reclaimableOutputBytes"], 3 << 20);
    }
}
