//! The lifecycle commands' reports as text for people: the prune table with its
//! totals, kept children and skipped shares; vacuum, reclaim and compaction summaries.

use std::fmt::Write as _;

use super::output::{bytes, short_bytes};
use capsync_client::expiry::format_time;
use capsync_client::types::{CompactReport, PruneReport, ReclaimReport, ShareInfo, VacuumReport};

/// What a prune deleted (or would delete): a table of the shares, the totals, then
/// anything left alone that the operator should know about.
pub fn prune_text(report: &PruneReport) -> String {
    let mut text = String::new();
    let cutoff = format_time(report.cutoff);
    if report.shares.is_empty() {
        let _ = writeln!(
            text,
            "nothing to prune: no root share has been inactive since before {cutoff}"
        );
    } else {
        let _ = writeln!(
            text,
            "{:<28} {:<8}  {:<20}  {:>8} {:>8} {:>8} {:>10}  TITLE",
            "SHARE", "REASON", "LAST CHANGE", "MESSAGES", "PARTS", "OPS", "BYTES"
        );
        for share in &report.shares {
            let _ = writeln!(
                text,
                "{:<28} {:<8}  {:<20}  {:>8} {:>8} {:>8} {:>10}  {}",
                share.info.state.share_id,
                share.reason.as_str(),
                format_time(share.info.updated_at),
                share.messages,
                share.parts,
                share.ops,
                short_bytes(share.bytes),
                title(&share.info),
            );
        }
        let totals = &report.totals;
        let _ = writeln!(
            text,
            "{} {}: {} messages, {} parts, {} ops, {} tokens, {} (roots inactive since before {cutoff})",
            if report.dry_run {
                "would delete"
            } else {
                "deleted"
            },
            count(totals.shares, "share", "shares"),
            totals.messages,
            totals.parts,
            totals.ops,
            totals.tokens,
            bytes(totals.bytes),
        );
    }
    if !report.kept_children.is_empty() {
        let kept = report.kept_children.len() as u64;
        let _ = writeln!(
            text,
            "warning: {} of pruned shares {} kept; use --children to prune them too:",
            count(kept, "child session", "child sessions"),
            if kept == 1 { "was" } else { "were" },
        );
        for child in &report.kept_children {
            share_line(&mut text, child);
        }
    }
    if !report.skipped.is_empty() {
        let skipped = report.skipped.len() as u64;
        let _ = writeln!(
            text,
            "skipped {} that changed after {} selected (run prune again to reconsider {}):",
            count(skipped, "share", "shares"),
            if skipped == 1 { "it was" } else { "they were" },
            if skipped == 1 { "it" } else { "them" },
        );
        for share in &report.skipped {
            share_line(&mut text, share);
        }
    }
    if report.dry_run && !report.shares.is_empty() {
        text.push_str("dry run: nothing was deleted; without --dry-run these shares are deleted\n");
    }
    if let Some(vacuum) = &report.vacuum {
        text.push_str(&vacuum_text(vacuum));
        text.push('\n');
    }
    text
}

/// Before → after, what was saved, and how long writes waited.
pub fn vacuum_text(report: &VacuumReport) -> String {
    format!(
        "vacuumed: {} → {}, saved {} in {}",
        bytes(report.bytes_before),
        bytes(report.bytes_after),
        bytes(report.saved_bytes()),
        millis(report.duration_ms),
    )
}

pub fn reclaim_text(report: &ReclaimReport) -> String {
    let scanned = count(
        report.parts_scanned,
        "compacted tool part",
        "compacted tool parts",
    );
    if report.dry_run {
        format!(
            "{scanned} scanned: {} would be cleared, reclaiming {} (dry run: nothing changed)",
            report.parts_cleared,
            bytes(report.bytes_reclaimed),
        )
    } else {
        format!(
            "{scanned} scanned: {} cleared, {} reclaimed",
            report.parts_cleared,
            bytes(report.bytes_reclaimed),
        )
    }
}

pub fn compact_text(report: &CompactReport) -> String {
    let what = format!(
        "{} in {}, {} of payload, applied before {}",
        count(report.ops, "op", "ops"),
        count(report.shares, "share", "shares"),
        bytes(report.bytes),
        format_time(report.cutoff),
    );
    if report.dry_run {
        format!("would compact {what} (dry run: nothing changed)")
    } else {
        format!("compacted {what}; their op ids stay, so retries are still deduplicated")
    }
}

/// A share in the kept and skipped lists: id, session (and its parent), title.
fn share_line(text: &mut String, share: &ShareInfo) {
    let _ = write!(text, "  {:<28} {}", share.state.share_id, share.session_id);
    if let Some(parent) = &share.parent_session_id {
        let _ = write!(text, " (child of {parent})");
    }
    let _ = writeln!(text, "  {}", title(share));
}

fn title(share: &ShareInfo) -> &str {
    if share.title.is_empty() {
        "(untitled)"
    } else {
        &share.title
    }
}

/// "1 share", "3 shares".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// A duration in milliseconds, in seconds once that reads better.
fn millis(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capsync_client::types::{PruneReason, PruneTotals, PrunedShare, ShareState};

    const DAY: i64 = 86_400_000;
    /// 2025-01-31T00:00:00Z.
    const CUTOFF: i64 = 1_738_281_600_000;

    fn info(share_id: &str, session_id: &str, parent: Option<&str>, title: &str) -> ShareInfo {
        ShareInfo {
            state: ShareState {
                share_id: share_id.into(),
                cursor: 4,
                writer_epoch: 0,
                viewer_epoch: 0,
            },
            session_id: session_id.into(),
            project_id: "prj".into(),
            parent_session_id: parent.map(Into::into),
            title: title.into(),
            created_at: CUTOFF - 40 * DAY,
            updated_at: CUTOFF - 10 * DAY,
            owner_token_id: "0011223344556677".into(),
            archived_at: None,
        }
    }

    fn pruned(share: ShareInfo, reason: PruneReason, bytes: u64) -> PrunedShare {
        PrunedShare {
            info: share,
            reason,
            messages: 3,
            parts: 12,
            ops: 40,
            tokens: 2,
            bytes,
        }
    }

    fn report(dry_run: bool) -> PruneReport {
        PruneReport {
            dry_run,
            cutoff: CUTOFF,
            shares: vec![
                pruned(
                    info("sh_root", "ses_root", None, "Fix the build"),
                    PruneReason::Inactive,
                    2048,
                ),
                pruned(
                    info("sh_child", "ses_child", Some("ses_root"), ""),
                    PruneReason::Child,
                    100,
                ),
            ],
            totals: PruneTotals {
                shares: 2,
                messages: 6,
                parts: 24,
                ops: 80,
                tokens: 4,
                bytes: 2148,
            },
            kept_children: vec![],
            skipped: vec![],
            vacuum: None,
        }
    }

    #[test]
    fn a_dry_run_lists_every_share_and_what_would_go() {
        let text = prune_text(&report(true));
        let expected = "\
SHARE                        REASON    LAST CHANGE           MESSAGES    PARTS      OPS      BYTES  TITLE
sh_root                      inactive  2025-01-21T00:00:00Z         3       12       40    2.0 KiB  Fix the build
sh_child                     child     2025-01-21T00:00:00Z         3       12       40      100 B  (untitled)
would delete 2 shares: 6 messages, 24 parts, 80 ops, 4 tokens, 2148 B (2.1 KiB) (roots inactive since before 2025-01-31T00:00:00Z)
dry run: nothing was deleted; without --dry-run these shares are deleted
";
        assert_eq!(text, expected);
    }

    #[test]
    fn a_real_run_says_deleted_and_shows_the_vacuum() {
        let mut report = report(false);
        report.vacuum = Some(VacuumReport {
            bytes_before: 10 << 20,
            bytes_after: 4 << 20,
            duration_ms: 1500,
        });
        let text = prune_text(&report);
        assert!(text.contains("\ndeleted 2 shares: 6 messages"), "{text}");
        assert!(!text.contains("would delete"), "{text}");
        assert!(!text.contains("dry run"), "{text}");
        assert!(
            text.ends_with(
                "vacuumed: 10485760 B (10.0 MiB) → 4194304 B (4.0 MiB), saved 6291456 B (6.0 MiB) in 1.5 s\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn kept_children_are_a_warning_that_names_each_one() {
        let mut report = report(false);
        report.shares.truncate(1);
        report.kept_children = vec![
            info("sh_kid1", "ses_kid1", Some("ses_root"), "Run the tests"),
            info("sh_kid2", "ses_kid2", Some("ses_root"), "Lint"),
        ];
        let text = prune_text(&report);
        assert!(
            text.contains(
                "warning: 2 child sessions of pruned shares were kept; use --children to prune them too:\n\
                 \x20 sh_kid1                      ses_kid1 (child of ses_root)  Run the tests\n\
                 \x20 sh_kid2                      ses_kid2 (child of ses_root)  Lint\n"
            ),
            "{text}"
        );
        report.kept_children.truncate(1);
        assert!(
            prune_text(&report).contains("warning: 1 child session of pruned shares was kept;"),
            "{text}"
        );
    }

    #[test]
    fn skipped_shares_and_an_empty_prune_are_explained() {
        let mut report = report(false);
        report.shares.clear();
        report.totals = PruneTotals::default();
        report.skipped = vec![info("sh_busy", "ses_busy", None, "Still going")];
        let text = prune_text(&report);
        assert!(
            text.starts_with(
                "nothing to prune: no root share has been inactive since before 2025-01-31T00:00:00Z\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "skipped 1 share that changed after it was selected (run prune again to reconsider it):\n  sh_busy"
            ),
            "{text}"
        );
        assert!(!text.contains("SHARE "), "no table without shares: {text}");
    }

    #[test]
    fn the_json_report_mirrors_the_schema() {
        let mut report = report(true);
        report.shares.truncate(1);
        report.kept_children = vec![info("sh_kid", "ses_kid", Some("ses_root"), "")];
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["dryRun"], true);
        assert_eq!(json["cutoff"], CUTOFF);
        assert_eq!(json["shares"][0]["reason"], "inactive");
        assert_eq!(json["shares"][0]["info"]["state"]["shareId"], "sh_root");
        assert_eq!(json["shares"][0]["bytes"], 2048);
        assert_eq!(
            json["totals"],
            serde_json::json!({"shares": 2, "messages": 6, "parts": 24, "ops": 80, "tokens": 4, "bytes": 2148})
        );
        assert_eq!(json["keptChildren"][0]["parentSessionId"], "ses_root");
        assert_eq!(json["skipped"], serde_json::json!([]));
        assert_eq!(json["vacuum"], serde_json::Value::Null);
    }

    #[test]
    fn vacuum_reclaim_and_compact_summaries() {
        let vacuum = VacuumReport {
            bytes_before: 5000,
            bytes_after: 1000,
            duration_ms: 42,
        };
        assert_eq!(
            vacuum_text(&vacuum),
            "vacuumed: 5000 B (4.9 KiB) → 1000 B, saved 4000 B (3.9 KiB) in 42 ms"
        );
        assert_eq!(
            serde_json::to_value(vacuum).unwrap(),
            serde_json::json!({"bytesBefore": 5000, "bytesAfter": 1000, "durationMs": 42})
        );
        let mut reclaim = ReclaimReport {
            dry_run: false,
            parts_scanned: 40,
            parts_cleared: 12,
            bytes_reclaimed: 300,
        };
        assert_eq!(
            reclaim_text(&reclaim),
            "40 compacted tool parts scanned: 12 cleared, 300 B reclaimed"
        );
        reclaim.dry_run = true;
        assert_eq!(
            reclaim_text(&reclaim),
            "40 compacted tool parts scanned: 12 would be cleared, reclaiming 300 B (dry run: nothing changed)"
        );
        let mut compact = CompactReport {
            dry_run: true,
            cutoff: CUTOFF,
            shares: 1,
            ops: 250,
            bytes: 4096,
        };
        assert_eq!(
            compact_text(&compact),
            "would compact 250 ops in 1 share, 4096 B (4.0 KiB) of payload, applied before 2025-01-31T00:00:00Z (dry run: nothing changed)"
        );
        compact.dry_run = false;
        assert!(compact_text(&compact).starts_with("compacted 250 ops in 1 share,"));
        assert_eq!(
            serde_json::to_value(compact).unwrap(),
            serde_json::json!({"dryRun": false, "cutoff": CUTOFF, "shares": 1, "ops": 250, "bytes": 4096})
        );
    }
}
