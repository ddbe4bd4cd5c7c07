//! `capsync state` and `capsync ops`: a share's cursor and epochs, and its applied ops.

use std::fmt::Write as _;

use capsync_shared::TokenKind;

use super::output::Output;
use super::{Global, finish};
use capsync_client::error::ClientError;
use capsync_client::expiry::format_time;
use capsync_client::viewer::{OpsPage, ViewerClient};

/// List the ops applied to a share, in cursor order (viewer or writer token)
///
/// Each line: cursor, time applied, kind, op id. Starts right after --after; --all
/// follows the pages up to the share's current cursor.
///
/// Examples:
///   capsync ops --after 120 --limit 50
///   capsync ops --all --json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct OpsArgs {
    /// List ops applied after this cursor
    #[arg(long, default_value_t = 0, value_name = "CURSOR")]
    pub after: u64,
    /// Ops per page (0: the server's default)
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
    /// Follow every page up to the share's current cursor
    #[arg(long)]
    pub all: bool,
    /// Print each op's payload too (readable output only; --json always has it)
    #[arg(long)]
    pub payloads: bool,
}

pub async fn state(global: &Global, out: &Output) -> Result<u8, ClientError> {
    let (conn, redeemed) = global
        .redeem(&[TokenKind::Writer, TokenKind::Viewer])
        .await?;
    let result = match redeemed {
        capsync_client::Redeemed::Writer(writer) => global.call(&conn, writer.state()).await,
        other => global.call(&conn, other.into_reader()?.state()).await,
    };
    finish(conn).await;
    let state = result?;
    out.result(&state, || {
        format!(
            "share {}: cursor {}, writer epoch {}, viewer epoch {}",
            state.share_id, state.cursor, state.writer_epoch, state.viewer_epoch
        )
    });
    Ok(super::EXIT_OK)
}

pub async fn ops(global: &Global, out: &Output, args: &OpsArgs) -> Result<u8, ClientError> {
    let (conn, redeemed) = global
        .redeem(&[TokenKind::Viewer, TokenKind::Writer])
        .await?;
    let viewer = redeemed.into_reader()?;
    let result = global.call(&conn, read_ops(&viewer, args)).await;
    finish(conn).await;
    let page = result?;
    out.result(&page, || ops_text(&page, args.payloads));
    Ok(super::EXIT_OK)
}

/// One page, or with --all every page joined.
async fn read_ops(viewer: &ViewerClient, args: &OpsArgs) -> Result<OpsPage, ClientError> {
    let mut page = viewer.ops_since(args.after, args.limit).await?;
    while args.all && page.has_more() {
        let after = page.ops.last().map_or(args.after, |op| op.cursor.0);
        let mut more = viewer.ops_since(after, args.limit).await?;
        if more.ops.is_empty() {
            break;
        }
        page.ops.append(&mut more.ops);
        page.cursor = more.cursor;
    }
    Ok(page)
}

fn ops_text(page: &OpsPage, payloads: bool) -> String {
    let mut text = String::new();
    for op in &page.ops {
        let _ = write!(
            text,
            "{:>8}  {}  {:<15} {}",
            op.cursor,
            format_time(op.applied_at),
            op.kind.as_str(),
            op.op_id
        );
        if payloads {
            let _ = write!(text, "\n          {}", op.payload);
        }
        text.push('\n');
    }
    let shown = page.ops.last().map_or(0, |op| op.cursor.0);
    if page.has_more() {
        let _ = write!(
            text,
            "share cursor {}; more after {shown}: pass --after {shown} (or --all)",
            page.cursor
        );
    } else {
        let _ = write!(text, "share cursor {}", page.cursor);
    }
    text
}
