//! `capsync mint-viewer` and `capsync save`: new sturdy refs from a writer token.

use capsync_shared::TokenKind;

use super::output::Output;
use super::{Global, finish};
use capsync_client::error::ClientError;
use capsync_client::expiry::{Expiry, format_expiry};
use capsync_client::types::MintedToken;

/// Mint a read-only viewer token for the share (writer token)
///
/// Prints the new token alone on stdout (details on stderr), so it can be captured:
///   VIEWER_TOKEN=$(capsync mint-viewer --expires 7d)
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct MintViewerArgs {
    /// When the token expires: a duration (7d, 12h), a time (2030-01-31T12:00:00Z), or never
    #[arg(long, value_name = "WHEN", default_value = "never")]
    pub expires: Expiry,
}

pub async fn mint_viewer(
    global: &Global,
    out: &Output,
    args: &MintViewerArgs,
) -> Result<u8, ClientError> {
    let (conn, redeemed) = global.redeem(&[TokenKind::Writer]).await?;
    let writer = redeemed.into_writer()?;
    let expires_at = args.expires.expires_at(capsync_shared::now_millis());
    let result = global.call(&conn, writer.mint_viewer(expires_at)).await;
    finish(conn).await;
    let minted = result?;
    let link = global.share_link(writer.share_id(), &minted.token);
    print_minted_viewer(out, writer.share_id(), &minted, &link);
    Ok(super::EXIT_OK)
}

pub async fn save(global: &Global, out: &Output) -> Result<u8, ClientError> {
    let (conn, redeemed) = global.redeem(&[TokenKind::Writer]).await?;
    let writer = redeemed.into_writer()?;
    let result = global.call(&conn, writer.save()).await;
    finish(conn).await;
    print_minted(out, "writer", writer.share_id(), &result?);
    Ok(super::EXIT_OK)
}

/// [`print_minted`] for a viewer token, with its share link: on stderr (stdout
/// keeps the token alone, for scripts), and as `link` with `--json`.
pub(super) fn print_minted_viewer(out: &Output, share_id: &str, minted: &MintedToken, link: &str) {
    out.note(format!(
        "minted viewer token {} for share {share_id} (expires {})\nshare link: {link}",
        minted.token_id,
        format_expiry(minted.expires_at)
    ));
    let mut json = serde_json::to_value(minted).unwrap_or_default();
    json["link"] = link.into();
    out.result(&json, || minted.token.clone());
}

/// The token alone on stdout; what it is on stderr. With `--json`, the `MintedToken`.
pub(super) fn print_minted(out: &Output, kind: &str, share_id: &str, minted: &MintedToken) {
    out.note(format!(
        "minted {kind} token {} for share {share_id} (expires {})",
        minted.token_id,
        format_expiry(minted.expires_at)
    ));
    out.result(minted, || minted.token.clone());
}
