//! `capsync snapshot`: print a share's current state (viewer or writer token).

use capsync_shared::TokenKind;
use capsync_shared::limits::{DEFAULT_SNAPSHOT_PAGE_BYTES, MAX_SNAPSHOT_PAGE_BYTES};

use super::output::Output;
use super::{Global, finish};
use capsync_client::error::ClientError;

/// Print a share's current state: the session with its messages (viewer or writer token)
///
/// Readable by default: the title, then each message with its role and its parts (text,
/// reasoning, tool calls with their status, files). With --json, the structured document
/// {"cursor", "session", "models", "diffs", "messages": [{"info", "parts"}]}, which
/// `capsync push --format export` accepts back.
///
/// Examples:
///   capsync snapshot
///   capsync snapshot --json > session.json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct SnapshotArgs {
    /// Byte budget of each snapshot page the server sends
    #[arg(long, default_value_t = DEFAULT_SNAPSHOT_PAGE_BYTES, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_SNAPSHOT_PAGE_BYTES)))]
    pub page_bytes: u32,
}

pub async fn run(global: &Global, out: &Output, args: &SnapshotArgs) -> Result<u8, ClientError> {
    let (conn, redeemed) = global
        .redeem(&[TokenKind::Viewer, TokenKind::Writer])
        .await?;
    let viewer = redeemed.into_reader()?;
    let result = global
        .call(&conn, viewer.snapshot_with(args.page_bytes))
        .await;
    finish(conn).await;
    let document = result?.to_document();
    out.result(&document, || {
        super::render::document_text(&document, viewer.share_id())
    });
    Ok(super::EXIT_OK)
}
