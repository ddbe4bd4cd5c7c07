//! `capsync push FILE`: send an ops file or a session export into a share (writer token).

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use capsync_shared::TokenKind;
use clap::ValueEnum;
use clap::builder::TypedValueParser as _;
use serde::Serialize;

use super::output::Output;
use super::progress::Progress;
use super::{EXIT_REJECTED, Global, finish};
use capsync_client::error::ClientError;
use capsync_client::ops_file::{DetectedFormat, InputFormat, read_push_input};
use capsync_client::push::{DEFAULT_BATCH_SIZE, PushReport, push_ops};

/// Push an ops file or a session export into a share, in batches (writer token)
///
/// FILE is one of (detected from its content, or forced with --format):
///   - an ops file: a JSON array of ops, or JSON Lines with one op per line, each
///     {"opId": "...", "kind": "part.upsert", "payload": {...}, "dependsOn": [...]}
///   - an opencode-style session export: {"info": {...}, "messages": [{"info": {...},
///     "parts": [...]}], "diffs": [...], "models": [...]}; its op ids are derived from
///     the records' content, so only records changed since the last push are applied
///
/// Batch ids are derived from the ops they carry, and op ids are deduplicated forever by
/// the server, so pushing the same file twice is harmless: the second time every op is a
/// duplicate. Prints applied/duplicate/rejected counts and the share's cursor, and lists
/// rejected ops with the server's reason.
///
/// Ops apply in file order. An op whose "dependsOn" ids are not applied yet is sent again
/// after the rest; an op that refers to a record not there yet (a part before its
/// message) is rejected as invalid, unless it names that record's op in "dependsOn".
///
/// Exit code 3 when an op was rejected as invalid or still misses a dependency
/// (rejections as stale transitions, from replaying an older export, do not count).
///
/// A push of more than one batch shows a progress bar on stderr when it is a terminal;
/// scripts and pipes (and --json) get only the summary.
///
/// Examples:
///   capsync push session.json
///   opencode export ses_123 | capsync push - --format export
///   capsync push ops.jsonl --batch-size 500 --json
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct PushArgs {
    /// The file to push; `-` reads standard input
    pub file: PathBuf,
    /// Ops per appendOps call
    #[arg(long, default_value_t = DEFAULT_BATCH_SIZE, value_parser = clap::value_parser!(u32).range(1..=10_000).map(|n| n as usize))]
    pub batch_size: usize,
    /// What FILE is
    #[arg(long, value_enum, default_value_t = FormatArg::Auto)]
    pub format: FormatArg,
}

/// `--format` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Look at the content: `[` starts an ops array; one object without opId is an export;
    /// anything else is JSON Lines
    Auto,
    /// An ops file (JSON array or JSON Lines)
    Ops,
    /// An opencode-style session export
    Export,
}

impl From<FormatArg> for InputFormat {
    fn from(format: FormatArg) -> Self {
        match format {
            FormatArg::Auto => Self::Auto,
            FormatArg::Ops => Self::Ops,
            FormatArg::Export => Self::Export,
        }
    }
}

/// What `push --json` prints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Pushed<'a> {
    share_id: &'a str,
    format: DetectedFormat,
    #[serde(flatten)]
    report: &'a PushReport,
}

pub async fn run(global: &Global, out: &Output, args: &PushArgs) -> Result<u8, ClientError> {
    // Read and check the file before connecting: a bad file costs no round trip.
    let input = read_push_input(&read_input(&args.file)?, args.format.into())?;
    let (conn, redeemed) = global.redeem(&[TokenKind::Writer]).await?;
    let writer = redeemed.into_writer()?;
    out.note(format!(
        "pushing {} ops from {} ({}) into share {}",
        input.ops.len(),
        args.file.display(),
        input.format.describe(),
        writer.share_id()
    ));
    // A bar only for pushes of more than one batch, and only on a terminal.
    let progress = if input.ops.len() > args.batch_size {
        Progress::new(out, "push", "ops")
    } else {
        Progress::hidden()
    };
    let total = input.ops.len() as u64;
    // Bounded by the server's silence, not in total: a long push that keeps being
    // answered is not cut short.
    let pushed = push_ops(&writer, &input.ops, args.batch_size, |report| {
        progress.update(
            (report.applied + report.duplicates + report.rejected.len()) as u64,
            total,
            format!("cursor {}", report.cursor),
        );
    });
    let result = global.call(&conn, pushed).await;
    progress.finish();
    finish(conn).await;
    let report = result?;
    let pushed = Pushed {
        share_id: writer.share_id(),
        format: input.format,
        report: &report,
    };
    out.result(&pushed, || report_text(&report));
    Ok(if report.has_errors() {
        EXIT_REJECTED
    } else {
        super::EXIT_OK
    })
}

/// A file's text, or standard input for `-`.
pub fn read_input(path: &Path) -> Result<String, ClientError> {
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text)?;
        return Ok(text);
    }
    std::fs::read_to_string(path)
        .map_err(|e| ClientError::invalid(format!("cannot read {}: {e}", path.display())))
}

/// The push summary for people.
fn report_text(report: &PushReport) -> String {
    let mut text = format!(
        "{} ops in {} batch{}: {} applied, {} duplicate, {} rejected; cursor {}",
        report.ops,
        report.batches,
        if report.batches == 1 { "" } else { "es" },
        report.applied,
        report.duplicates,
        report.rejected.len(),
        report.cursor
    );
    for rejected in &report.rejected {
        let _ = write!(
            text,
            "\n  rejected {} ({}): {}",
            rejected.op_id, rejected.kind, rejected.reason
        );
        if !rejected.detail.is_empty() {
            let _ = write!(text, ": {}", rejected.detail);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_client::push::RejectedOp;
    use capsync_client::writer::RejectReason;
    use capsync_shared::OpKind;

    #[test]
    fn the_summary_lists_rejections() {
        let report = PushReport {
            ops: 3,
            batches: 1,
            applied: 1,
            duplicates: 1,
            rejected: vec![RejectedOp {
                op_id: "o3".into(),
                kind: OpKind::PartUpsert,
                reason: RejectReason::Invalid,
                detail: "payload has no id".into(),
            }],
            cursor: 7,
        };
        assert_eq!(
            report_text(&report),
            "3 ops in 1 batch: 1 applied, 1 duplicate, 1 rejected; cursor 7\n  rejected o3 (part.upsert): invalid: payload has no id"
        );
    }

    #[test]
    fn unreadable_files_are_named() {
        let err = read_input(Path::new("/nonexistent/capsync.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/capsync.json"), "{err}");
    }
}
