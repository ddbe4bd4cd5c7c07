//! `capsync outbox status|rejected`: what a `capsync sync` outbox holds, read locally
//! (no server, no token), also while a sync runs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use serde::Serialize;

use super::output::Output;
use capsync_client::error::ClientError;
use capsync_client::expiry::format_time;
use capsync_client::{Outbox, OutboxError, OutboxStatus, RejectedEntry};

/// What the default outbox path appends to SOURCE.
pub const OUTBOX_SUFFIX: &str = ".capsync-outbox";

/// `SOURCE.capsync-outbox`, next to SOURCE.
pub fn default_outbox_path(source: &Path) -> PathBuf {
    let mut name = source.as_os_str().to_owned();
    name.push(OUTBOX_SUFFIX);
    PathBuf::from(name)
}

const OUTBOX_EXAMPLES: &str = "\
Examples:
  capsync outbox status agent-ops.jsonl          # the outbox of `capsync sync agent-ops.jsonl`
  capsync outbox status --outbox ops.outbox --json
  capsync outbox rejected session.json";

/// Inspect the outbox of `capsync sync` (local; needs no server or token)
#[derive(Debug, Subcommand)]
#[command(after_long_help = OUTBOX_EXAMPLES)]
pub enum OutboxCommand {
    /// Count the queued ops: pending, in flight, waiting, acked, rejected; the last
    /// cursor and error
    ///
    /// pending: queued, not sent yet. in flight: sent, no ack yet (sent again on the
    /// next run if the sync stopped). waiting: the server said a dependsOn op is missing;
    /// retried after others are acked. acked: applied (or found already applied) by the
    /// server. rejected: refused for good (see `capsync outbox rejected`).
    ///
    /// Examples:
    ///   capsync outbox status agent-ops.jsonl
    ///   capsync outbox status --outbox ops.outbox --json
    #[command(verbatim_doc_comment)]
    Status(OutboxArgs),

    /// List the ops the server rejected for good, with its reason and detail
    ///
    /// Examples:
    ///   capsync outbox rejected agent-ops.jsonl
    ///   capsync outbox rejected --outbox ops.outbox --json
    #[command(verbatim_doc_comment)]
    Rejected(OutboxArgs),
}

/// Which outbox: the one next to SOURCE, or --outbox.
#[derive(Debug, clap::Args)]
pub struct OutboxArgs {
    /// The file `capsync sync` follows; its outbox is SOURCE.capsync-outbox
    pub source: Option<PathBuf>,
    /// The outbox file itself (wins over SOURCE)
    #[arg(long, env = "CAPSYNC_OUTBOX", value_name = "PATH")]
    pub outbox: Option<PathBuf>,
}

impl OutboxArgs {
    fn path(&self) -> Result<PathBuf, ClientError> {
        match (&self.outbox, &self.source) {
            (Some(outbox), _) => Ok(outbox.clone()),
            (None, Some(source)) => Ok(default_outbox_path(source)),
            (None, None) => Err(ClientError::invalid(
                "which outbox? name the synced file (SOURCE) or pass --outbox",
            )),
        }
    }
}

/// What `outbox status --json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusReport<'a> {
    outbox: &'a Path,
    #[serde(flatten)]
    status: &'a OutboxStatus,
}

pub async fn run(out: &Output, command: &OutboxCommand) -> Result<u8, ClientError> {
    match command {
        OutboxCommand::Status(args) => {
            let path = args.path()?;
            let outbox = open_outbox(&path, false).await?;
            let status = outbox.status().await.map_err(|e| outbox_error(&path, e))?;
            let report = StatusReport {
                outbox: &path,
                status: &status,
            };
            out.result(&report, || status_text(&path, &status));
        }
        OutboxCommand::Rejected(args) => {
            let path = args.path()?;
            let outbox = open_outbox(&path, false).await?;
            let rejected = outbox
                .rejected()
                .await
                .map_err(|e| outbox_error(&path, e))?;
            out.result(&rejected, || rejected_text(&rejected));
        }
    }
    Ok(super::EXIT_OK)
}

/// Opens an outbox; unless `create`, one that does not exist is an error (reading
/// the status of a mistyped path must not leave an empty outbox behind).
pub async fn open_outbox(path: &Path, create: bool) -> Result<Outbox, ClientError> {
    if !create && !path.exists() {
        return Err(ClientError::invalid(format!(
            "no outbox at {} (`capsync sync` creates it on its first run)",
            path.display()
        )));
    }
    let owned = path.to_owned();
    tokio::task::spawn_blocking(move || Outbox::open(&owned))
        .await
        .map_err(|e| ClientError::Io(std::io::Error::other(e)))?
        .map_err(|e| outbox_error(path, e))
}

/// An outbox failure in the CLI's error type, naming the outbox.
pub fn outbox_error(path: &Path, error: OutboxError) -> ClientError {
    ClientError::Outbox {
        path: Some(path.to_owned()),
        error,
    }
}

fn status_text(path: &Path, status: &OutboxStatus) -> String {
    let mut text = format!("outbox:      {}\n", path.display());
    match (&status.share_id, &status.server) {
        (Some(share), Some(server)) => {
            let _ = writeln!(text, "share:       {share} on {server}");
        }
        (Some(share), None) => {
            let _ = writeln!(text, "share:       {share}");
        }
        _ => text.push_str("share:       none yet (`capsync sync` binds it on its first run)\n"),
    }
    let _ = writeln!(
        text,
        "ops:         {} pending, {} in flight, {} waiting, {} acked, {} rejected",
        status.pending, status.in_flight, status.waiting, status.acked, status.rejected
    );
    let _ = writeln!(
        text,
        "last cursor: {}",
        status
            .last_cursor
            .map_or_else(|| "none".to_owned(), |c| c.to_string())
    );
    let _ = write!(
        text,
        "last error:  {}",
        status.last_error.as_deref().unwrap_or("none")
    );
    if let Some(at) = status.next_retry_at {
        let _ = write!(text, "\nnext retry:  {}", format_time(at));
    }
    if status.rejected > 0 {
        text.push_str("\n(`capsync outbox rejected` lists the rejected ops)");
    }
    text
}

fn rejected_text(rejected: &[RejectedEntry]) -> String {
    if rejected.is_empty() {
        return "no rejected ops".to_owned();
    }
    let mut text = String::new();
    for entry in rejected {
        let _ = write!(text, "{} ({})", entry.op_id, entry.reason);
        if !entry.detail.is_empty() {
            let _ = write!(text, ": {}", entry.detail);
        }
        text.push('\n');
    }
    let _ = write!(text, "{} rejected ops", rejected.len());
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outbox_is_named_by_source_or_flag() {
        let args = OutboxArgs {
            source: Some("ops.jsonl".into()),
            outbox: None,
        };
        assert_eq!(
            args.path().unwrap(),
            PathBuf::from("ops.jsonl.capsync-outbox")
        );
        let args = OutboxArgs {
            source: Some("ops.jsonl".into()),
            outbox: Some("x.db".into()),
        };
        assert_eq!(args.path().unwrap(), PathBuf::from("x.db"));
        let args = OutboxArgs {
            source: None,
            outbox: None,
        };
        assert!(args.path().unwrap_err().to_string().contains("--outbox"));
    }
}
