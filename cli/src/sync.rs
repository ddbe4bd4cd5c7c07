//! `capsync sync SOURCE`: keep a share in step with a growing ops file or a rewritten session
//! export, through a durable outbox, until stopped (writer token).
//!
//! The loop: read what changed in SOURCE ([`super::sync_source`]), queue it in the outbox
//! (durable before the next read), and let the syncer send it. SIGINT/SIGTERM stop the
//! syncer and exit 0; the outbox keeps whatever is not acked yet for the next run, which
//! also picks up after a crash or `kill -9`: the outbox is the only state.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use capsync_shared::TokenKind;
use serde::Serialize;

use super::args::parse_duration;
use super::outbox_cmd::{default_outbox_path, open_outbox, outbox_error};
use super::output::Output;
use super::progress::Progress;
use super::push::FormatArg;
use super::sync_source::Source;
use super::{EXIT_OK, EXIT_REJECTED, Global};
use capsync_client::error::ClientError;
use capsync_client::ops_file::DetectedFormat;
use capsync_client::{
    Outbox, RejectedReason, SyncError, SyncOptions, SyncState, SyncStatus, Syncer, spawn_syncer,
};

/// Keep a share in step with a file that grows or changes, until stopped (writer token)
///
/// SOURCE is followed, not read once: every --poll interval capsync looks at it and queues
/// what is new in a local outbox, and a background syncer sends the queue to the share in
/// batches, retrying with backoff while the server is unreachable. SOURCE is one of
/// (detected from its first content, or forced with --format):
///   - a JSON Lines ops file an agent appends to, one op per line; a last line without
///     its newline is still being written and is read once it is complete
///   - an opencode-style session export, rewritten in place; it is read again whenever it
///     changes, and since its op ids are derived from the records' content, only changed
///     records become new ops
///   - a JSON array of ops, read again whenever it changes
///
/// The outbox (a SQLite file, by default SOURCE.capsync-outbox next to SOURCE) is the only
/// state: an op is queued durably before it is sent and marked only when the server acks
/// it. Stopping with Ctrl-C or SIGTERM, a crash or `kill -9` lose nothing; running the same
/// command again resumes where the last run stopped, and an op sent twice is applied once
/// (the server deduplicates op ids). The outbox is bound to the token's share the first
/// time the server is reached, and refuses a token for another share; queueing works while
/// the server is down. One sync per outbox at a time. `capsync outbox status` shows what
/// is queued.
///
/// Runs until stopped (exit 0), or with --once until everything queued is acked. Exits 1
/// when the server refuses the token for good, another sync is using the outbox, or the
/// outbox feeds another share (with --json the error's code says which: revoked,
/// permissionDenied, busy, wrongShare, ...), and with --once 3 when ops were rejected as
/// invalid or too large, or still wait for a dependsOn op that never came. On a terminal a
/// live progress line shows on stderr; otherwise only problems and a final summary print.
///
/// Examples:
///   export CAPSYNC_TOKEN=$WRITER_TOKEN
///   capsync sync agent-ops.jsonl                      # follow until Ctrl-C
///   capsync sync session.json --poll 2s               # an export rewritten by the agent
///   capsync sync ops.jsonl --once --timeout 5m --json # queue, send, exit (scripts, CI)
///   capsync sync ops.jsonl --outbox ~/.cache/capsync/ops.outbox
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct SyncArgs {
    /// The file to follow (not `-`: it is read again as it changes)
    pub source: PathBuf,
    /// The outbox file [default: SOURCE.capsync-outbox]
    #[arg(long, env = "CAPSYNC_OUTBOX", value_name = "PATH")]
    pub outbox: Option<PathBuf>,
    /// What SOURCE is
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,
    /// How often to look at SOURCE for changes (`500ms`, `2s`)
    #[arg(long, default_value = "500ms", value_parser = parse_duration, value_name = "DURATION")]
    pub poll: Duration,
    /// Queue what SOURCE holds now (including a last line without newline), send
    /// everything queued, and exit
    #[arg(long)]
    pub once: bool,
    /// With --once: give up after this long (exit 1); what was not acked stays queued
    #[arg(long, requires = "once", value_parser = parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Most ops per appendOps call [default: the syncer's]
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub batch_size: Option<u32>,
    /// Most appendOps calls in flight at once: with a backlog, the next full batch goes
    /// before the last one is acked (the server keeps them in order)
    #[arg(long, env = "CAPSYNC_MAX_IN_FLIGHT", default_value_t = capsync_client::syncer::DEFAULT_MAX_IN_FLIGHT as u32,
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub max_in_flight: u32,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
enum Ended {
    /// `--once`: everything queued was acked or rejected.
    Drained,
    /// SIGINT or SIGTERM.
    Signal,
    /// `--once --timeout` ran out.
    Timeout,
    /// The server refused the token for good.
    Fatal,
}

/// What `sync --json` prints at the end.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Summary<'a> {
    source: &'a Path,
    outbox: &'a Path,
    format: Option<DetectedFormat>,
    ended: Ended,
    /// Ops this run found new in SOURCE and queued.
    queued: u64,
    /// Its `shareId` is the outbox's share, bound by this run or an earlier one: `None`
    /// while the server was never reached with this outbox.
    #[serde(flatten)]
    status: &'a SyncStatus,
}

pub async fn run(global: &Global, out: &Output, args: &SyncArgs) -> Result<u8, ClientError> {
    if args.source.as_os_str() == "-" {
        return Err(ClientError::invalid(
            "sync follows a file as it changes; to send standard input once, use `capsync push -`",
        ));
    }
    // Listen first: from here on a signal means "stop cleanly", not "die".
    let mut stop = Box::pin(stop_signal()?);
    let token = global.token(&[TokenKind::Writer])?;
    let outbox_path = args
        .outbox
        .clone()
        .unwrap_or_else(|| default_outbox_path(&args.source));
    let mut source = Source::new(&args.source, args.format.into());
    // --once: a bad file fails before anything is opened or sent.
    let first = if args.once {
        Some(read_source(&source, true).await?)
    } else {
        None
    };

    let outbox = open_outbox(&outbox_path, true).await?;
    let bound = outbox
        .status()
        .await
        .map_err(|e| outbox_error(&outbox_path, e))?
        .share_id;
    let mut queued = 0u64;
    if let Some(update) = first {
        queued += enqueue(&outbox, update.ops).await?;
        source.advance(update.mark);
    }

    let mut options = SyncOptions::new(global.server.to_string(), token);
    options.connection = global.client_options();
    options.call_timeout = global.call_timeout;
    if let Some(batch_size) = args.batch_size {
        options.batch_size = batch_size as usize;
    }
    options.max_in_flight = args.max_in_flight as usize;
    let syncer = spawn_syncer(outbox.clone(), options);
    let progress = Progress::new(out, "sync", "ops");
    progress.note(
        out,
        format!(
            "syncing {}{} (outbox {}){}",
            args.source.display(),
            bound
                .as_deref()
                .map_or_else(String::new, |share| format!(" into share {share}")),
            outbox_path.display(),
            if args.once { "" } else { "; Ctrl-C stops" }
        ),
    );
    let mut view = View::new(out, &progress);
    let ended = if args.once {
        let deadline = args.timeout.map(|t| tokio::time::Instant::now() + t);
        drain(&syncer, &outbox_path, &mut view, &mut stop, deadline).await
    } else {
        follow(
            &syncer,
            &outbox,
            &mut source,
            &mut view,
            &mut stop,
            args.poll,
        )
        .await
        .map(|(ended, n)| {
            queued += n;
            ended
        })
    };
    let mut status = syncer.stop().await;
    progress.finish();
    let ended = ended?;
    // Bound by an earlier run if this one never reached the server.
    if status.share_id.is_none() {
        status.share_id = bound;
    }

    let summary = Summary {
        source: &args.source,
        outbox: &outbox_path,
        format: source.format(),
        ended: ended.0,
        queued,
        status: &status,
    };
    let rejected = if args.once && status.rejected > 0 {
        outbox
            .rejected()
            .await
            .map_err(|e| outbox_error(&outbox_path, e))?
    } else {
        Vec::new()
    };
    if let Some(error) = ended.1 {
        out.note(summary_text(&summary));
        return Err(error);
    }
    out.result(&summary, || {
        let mut text = summary_text(&summary);
        for entry in &rejected {
            let _ = write!(text, "\n  rejected {} ({})", entry.op_id, entry.reason);
            if !entry.detail.is_empty() {
                let _ = write!(text, ": {}", entry.detail);
            }
        }
        text
    });
    if ended.0 == Ended::Timeout {
        // Not an error document: with --json the summary above ("ended": "timeout") is
        // the one document on stdout.
        out.note(format!(
            "error: not everything was acked within {}; the rest stays queued",
            humantime::format_duration(args.timeout.unwrap_or_default()),
        ));
        return Ok(super::EXIT_ERROR);
    }
    // Stale transitions (an older state of a finished message) are not the input's fault.
    let has_errors = status.waiting > 0
        || rejected
            .iter()
            .any(|r| matches!(r.reason, RejectedReason::Invalid | RejectedReason::TooLarge));
    Ok(if args.once && has_errors {
        EXIT_REJECTED
    } else {
        EXIT_OK
    })
}

/// Queues ops; the count newly queued.
async fn enqueue(outbox: &Outbox, ops: Vec<capsync_client::OpSpec>) -> Result<u64, ClientError> {
    if ops.is_empty() {
        return Ok(0);
    }
    let n = outbox
        .enqueue_all(ops)
        .await
        .map_err(|e| outbox_error(outbox.path(), e))?;
    Ok(n as u64)
}

/// Reads SOURCE off the async thread (it may be large).
async fn read_source(
    source: &Source,
    last: bool,
) -> Result<super::sync_source::Update, ClientError> {
    let source = source.clone();
    tokio::task::spawn_blocking(move || source.read(last))
        .await
        .map_err(|e| ClientError::Io(std::io::Error::other(e)))?
}

/// How a run ended, and the error to exit with.
type Outcome = (Ended, Option<ClientError>);

/// `--once`: waits until the syncer has nothing left to send.
async fn drain(
    syncer: &Syncer,
    outbox_path: &Path,
    view: &mut View<'_>,
    stop: &mut std::pin::Pin<Box<impl Future<Output = ()>>>,
    deadline: Option<tokio::time::Instant>,
) -> Result<Outcome, ClientError> {
    let mut updates = syncer.watch();
    let idle = syncer.wait_idle();
    tokio::pin!(idle);
    let timeout = async {
        match deadline {
            Some(deadline) => tokio::time::sleep_until(deadline).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(timeout);
    loop {
        tokio::select! {
            result = &mut idle => {
                return Ok(match result {
                    Ok(status) => { view.show(&status); (Ended::Drained, None) }
                    Err(e) => (Ended::Fatal, Some(sync_error(e, outbox_path))),
                });
            }
            () = stop.as_mut() => return Ok((Ended::Signal, None)),
            () = &mut timeout => return Ok((Ended::Timeout, None)),
            changed = updates.changed() => {
                if changed.is_err() {
                    // The syncer is gone; wait_idle says why.
                    continue;
                }
                let status = updates.borrow_and_update().clone();
                view.show(&status);
            }
        }
    }
}

/// Follows SOURCE until a signal, or until the syncer stops for good. Also returns how
/// many ops were newly queued.
async fn follow(
    syncer: &Syncer,
    outbox: &Outbox,
    source: &mut Source,
    view: &mut View<'_>,
    stop: &mut std::pin::Pin<Box<impl Future<Output = ()>>>,
    poll: Duration,
) -> Result<(Outcome, u64), ClientError> {
    let mut updates = syncer.watch();
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut queued = 0;
    let mut problem: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.as_mut() => return Ok(((Ended::Signal, None), queued)),
            _ = tick.tick() => {
                let update = read_source(source, false).await?;
                queued += enqueue(outbox, update.ops).await?;
                source.advance(update.mark);
                // A problem is printed once, until it changes or goes away.
                let now = update.problem.map(|p| match p {
                    ClientError::InvalidInput(text) => text,
                    other => other.to_string(),
                });
                if let Some(text) = &now && problem.as_ref() != Some(text) {
                    view.note(&format!("{text}; waiting for it to change"));
                }
                problem = now;
            }
            changed = updates.changed() => {
                let status = updates.borrow_and_update().clone();
                view.show(&status);
                // The syncer ends by itself only on a fatal error, recorded before its
                // status turns `Stopped` (or its channel closes, as `changed` then says).
                if let Some(fatal) = syncer.fatal() {
                    let error = sync_error(fatal, outbox.path());
                    return Ok(((Ended::Fatal, Some(error)), queued));
                }
                debug_assert!(changed.is_ok(), "a syncer that ended has an error");
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub(super) fn stop_signal() -> Result<impl Future<Output = ()>, ClientError> {
    #[cfg(unix)]
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    })
}

/// The live view of a run: the progress bar on a terminal, and a note for each new error
/// (for logs, where there is no bar).
struct View<'a> {
    out: &'a Output,
    progress: &'a Progress,
    /// The last error noted, so a retry loop prints it once.
    last_error: Option<String>,
}

impl<'a> View<'a> {
    fn new(out: &'a Output, progress: &'a Progress) -> Self {
        Self {
            out,
            progress,
            last_error: None,
        }
    }

    fn note(&self, text: &str) {
        self.progress.note(self.out, text);
    }

    fn show(&mut self, status: &SyncStatus) {
        let total =
            status.pending + status.in_flight + status.waiting + status.acked + status.rejected;
        // Nothing to count yet (connecting, an empty source): no bar rather than 0/0.
        if total > 0 {
            self.progress
                .update(status.acked + status.rejected, total, state_text(status));
        }
        // A fatal stop is reported once, as the command's error.
        let stopped = matches!(status.state, SyncState::Stopped { .. });
        if status.last_error != self.last_error
            && !stopped
            && let Some(error) = &status.last_error
        {
            self.note(&format!("sync: {error}; retrying"));
        }
        self.last_error = status.last_error.clone();
    }
}

/// The state for the progress line.
fn state_text(status: &SyncStatus) -> String {
    let cursor = status
        .last_acked_cursor
        .map_or_else(String::new, |c| format!(" · cursor {c}"));
    match &status.state {
        SyncState::Connecting => format!("connecting{cursor}"),
        SyncState::Syncing => format!("sending{cursor}"),
        SyncState::Idle => format!("up to date{cursor}"),
        SyncState::Backoff { retry_in_ms } => format!(
            "retrying in {}{cursor}",
            humantime::format_duration(Duration::from_millis(*retry_in_ms))
        ),
        SyncState::Stopped { error } => format!("stopped: {error}"),
    }
}

/// The summary line for people.
fn summary_text(summary: &Summary<'_>) -> String {
    let status = summary.status;
    let what = match summary.ended {
        Ended::Drained => "synced",
        Ended::Signal => "stopped syncing",
        Ended::Timeout => "timed out syncing",
        Ended::Fatal => "failed syncing",
    };
    let unsent = status.pending + status.in_flight + status.waiting;
    let share = status.share_id.as_deref().map_or_else(
        || "the token's share (not reached yet)".to_owned(),
        |share| format!("share {share}"),
    );
    let mut text = format!(
        "{what} {} into {share}: {} acked, {} rejected, {unsent} still queued",
        summary.source.display(),
        status.acked,
        status.rejected,
    );
    if status.waiting > 0 {
        let _ = write!(text, " ({} waiting for a dependsOn op)", status.waiting);
    }
    if let Some(cursor) = status.last_acked_cursor {
        let _ = write!(text, "; cursor {cursor}");
    }
    if unsent > 0 {
        let _ = write!(
            text,
            " (kept in {} for the next run)",
            summary.outbox.display()
        );
    }
    text
}

/// The error a fatal sync stop exits with (`--json` codes: `revoked`, `permissionDenied`,
/// `busy`, `wrongShare`, `outbox`, `syncStopped`), naming the outbox if that failed.
fn sync_error(e: SyncError, outbox_path: &Path) -> ClientError {
    match e {
        SyncError::Outbox(e) => outbox_error(outbox_path, e),
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_outbox_sits_next_to_the_source() {
        assert_eq!(
            default_outbox_path(Path::new("/tmp/a/ops.jsonl")),
            PathBuf::from("/tmp/a/ops.jsonl.capsync-outbox")
        );
        assert_eq!(
            default_outbox_path(Path::new("session.json")),
            PathBuf::from("session.json.capsync-outbox")
        );
    }
}
