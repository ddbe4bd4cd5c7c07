//! Conversions between the ledger's Rust types and the schema's builders and readers.

use std::time::Duration;

use capsync_shared::capsync_capnp::{
    self as wire, ack, compact_report, logged_op, minted_token, ops_page, prune_report,
    pruned_share, reclaim_report, record, share_info, share_list, share_state, snapshot_page,
    stats, vacuum_report,
};
use capsync_shared::{Cursor, OpId};

use crate::error::ServerError;
use crate::ledger::{
    Ack, BatchIn, LoggedOp, OpIn, OpOutcome, OpsPage, PlannedShare, PruneReason, Record,
    RevokeScope, ShareInfo, ShareState, SnapshotPage, Stats, StorageStats, VacuumReport,
};
use crate::lifecycle::{CompactReport, PruneReport, ReclaimReport};
use crate::presence::PresenceView;
use capsync_shared::limits::{MAX_BATCH_ID_BYTES, MAX_DEPENDS_ON, MAX_OP_ID_BYTES};

/// A text field as an owned string; bad UTF-8 is the caller's mistake.
pub fn text(field: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, ServerError> {
    field?
        .to_string()
        .map_err(|_| ServerError::invalid("text field is not valid UTF-8"))
}

/// An expiry: `0` on the wire means "never"; a time not after `now` is refused,
/// since a token that is dead on arrival is always a mistake.
pub fn optional_time(millis: i64, what: &str, now: i64) -> Result<Option<i64>, ServerError> {
    match millis {
        0 => Ok(None),
        t if t <= now => Err(ServerError::invalid(format!(
            "{what} must be in the future (Unix milliseconds), or 0 for never"
        ))),
        t => Ok(Some(t)),
    }
}

/// A retention age in milliseconds; it must be positive, since an age of zero
/// or less would take everything, up to the present moment.
pub fn older_than(millis: i64, what: &str) -> Result<Duration, ServerError> {
    match u64::try_from(millis) {
        Ok(ms) if ms > 0 => Ok(Duration::from_millis(ms)),
        _ => Err(ServerError::invalid(format!(
            "{what} must be a positive number of milliseconds (got {millis})"
        ))),
    }
}

pub fn scope(scope: Result<wire::Scope, capnp::NotInSchema>) -> Result<RevokeScope, ServerError> {
    Ok(match scope? {
        wire::Scope::Writers => RevokeScope::Writers,
        wire::Scope::Viewers => RevokeScope::Viewers,
        wire::Scope::All => RevokeScope::All,
    })
}

/// Limits that shape a batch; checked before anything reaches the ledger.
pub struct BatchLimits {
    pub max_ops: usize,
}

/// Reads and size-checks a batch. Content (JSON, ids, references) is the ledger's to judge.
pub fn batch(
    reader: wire::batch::Reader<'_>,
    limits: &BatchLimits,
) -> Result<BatchIn, ServerError> {
    let batch_id = text(reader.get_batch_id())?;
    if batch_id.len() > MAX_BATCH_ID_BYTES {
        return Err(ServerError::too_large(format!(
            "batchId is longer than {MAX_BATCH_ID_BYTES} bytes"
        )));
    }
    let ops_reader = reader.get_ops()?;
    if ops_reader.len() as usize > limits.max_ops {
        return Err(ServerError::too_large(format!(
            "batch has {} ops; the limit is {} per batch",
            ops_reader.len(),
            limits.max_ops
        )));
    }
    let mut ops = Vec::with_capacity(ops_reader.len() as usize);
    for op in ops_reader.iter() {
        let op_id = text(op.get_op_id())?;
        if op_id.is_empty() || op_id.len() > MAX_OP_ID_BYTES {
            return Err(ServerError::invalid(format!(
                "opId must be 1 to {MAX_OP_ID_BYTES} bytes (got {})",
                op_id.len()
            )));
        }
        // An op over the per-op limit is refused alone by the ledger
        // (`ledger::oversize`); the message size limit bounds it here.
        let payload = text(op.get_payload())?;
        let deps = op.get_depends_on()?;
        if deps.len() as usize > MAX_DEPENDS_ON {
            return Err(ServerError::too_large(format!(
                "op {op_id} depends on {} ops; the limit is {MAX_DEPENDS_ON}",
                deps.len()
            )));
        }
        // An entry that is no op id can never be applied: refused like a bad opId,
        // not left to wait forever as a missing dependency.
        let depends_on = deps
            .iter()
            .map(|dep| {
                let dep = text(dep)?;
                if dep.is_empty() || dep.len() > MAX_OP_ID_BYTES {
                    return Err(ServerError::invalid(format!(
                        "op {op_id} depends on an id of {} bytes; op ids are 1 to {MAX_OP_ID_BYTES} bytes",
                        dep.len()
                    )));
                }
                Ok(OpId(dep))
            })
            .collect::<Result<Vec<_>, _>>()?;
        ops.push(OpIn {
            kind: op.get_kind()?.into(),
            op_id: OpId(op_id),
            payload,
            depends_on,
        });
    }
    Ok(BatchIn {
        batch_id,
        ops,
        expected_cursor: reader
            .get_has_expected_cursor()
            .then(|| Cursor(reader.get_expected_cursor())),
        follows: None,
        link: None,
    })
}

pub fn fill_presence(view: &PresenceView, mut out: wire::presence::Builder<'_>) {
    out.set_writer_connected(view.writer_connected);
    out.set_last_change(view.last_change.unwrap_or(0));
    out.set_writer_gone_since(view.writer_gone_since.unwrap_or(0));
    out.set_interrupted(view.interrupted);
}

pub fn fill_state(state: &ShareState, mut out: share_state::Builder<'_>) {
    out.set_share_id(state.share_id.as_str());
    out.set_cursor(state.cursor.0);
    out.set_writer_epoch(state.writer_epoch.0);
    out.set_viewer_epoch(state.viewer_epoch.0);
}

pub fn fill_info(info: &ShareInfo, mut out: share_info::Builder<'_>) {
    fill_state(&info.state, out.reborrow().init_state());
    out.set_session_id(&info.session_id);
    out.set_project_id(&info.project_id);
    out.set_parent_session_id(&info.parent_session_id);
    out.set_title(&info.title);
    out.set_created_at(info.created_at);
    out.set_updated_at(info.updated_at);
    out.set_owner_token_id(info.owner_token_id.as_str());
    out.set_archived_at(info.archived_at.unwrap_or(0));
}

pub fn fill_stats(stats: &Stats, mut out: stats::Builder<'_>) {
    match &stats.storage {
        StorageStats::Sqlite(sqlite) => {
            out.set_db_file_bytes(sqlite.db_file_bytes);
            out.set_wal_file_bytes(sqlite.wal_file_bytes);
            out.set_page_size(sqlite.page_size);
            out.set_page_count(sqlite.page_count);
            out.set_free_pages(sqlite.free_pages);
            out.set_reclaimable_bytes(sqlite.free_pages * sqlite.page_size);
            out.set_engine("sqlite");
        }
        StorageStats::Postgres(postgres) => {
            out.set_engine("postgres");
            out.set_database_bytes(postgres.database_bytes);
            let mut tables = out
                .reborrow()
                .init_tables(u32::try_from(postgres.tables.len()).unwrap_or(u32::MAX));
            for (i, table) in postgres.tables.iter().enumerate() {
                let mut row = tables.reborrow().get(u32::try_from(i).unwrap_or(u32::MAX));
                row.set_name(&table.name);
                row.set_total_bytes(table.total_bytes);
                row.set_index_bytes(table.index_bytes);
                row.set_live_rows(table.live_rows);
                row.set_dead_rows(table.dead_rows);
            }
        }
    }
    out.set_root_shares(stats.root_shares);
    out.set_child_shares(stats.child_shares);
    out.set_archived_shares(stats.archived_shares);
    out.set_messages(stats.messages);
    out.set_parts(stats.parts);
    out.set_ledger_ops(stats.ledger_ops);
    out.set_ledger_payload_bytes(stats.ledger_payload_bytes);
    out.set_compacted_ops(stats.compacted_ops);
    out.set_reclaimable_output_bytes(stats.reclaimable_output_bytes);
}

fn fill_pruned(share: &PlannedShare, mut out: pruned_share::Builder<'_>) {
    fill_info(&share.info, out.reborrow().init_info());
    out.set_reason(match share.reason {
        PruneReason::Inactive => wire::PruneReason::Inactive,
        PruneReason::Child => wire::PruneReason::Child,
    });
    let footprint = &share.footprint;
    out.set_messages(footprint.messages);
    out.set_parts(footprint.parts);
    out.set_ops(footprint.ops);
    out.set_tokens(footprint.tokens);
    out.set_bytes(footprint.bytes);
}

fn fill_info_list(
    infos: &[ShareInfo],
    mut out: capnp::struct_list::Builder<'_, share_info::Owned>,
) {
    for (i, info) in infos.iter().enumerate() {
        fill_info(info, out.reborrow().get(i as u32));
    }
}

pub fn fill_prune_report(report: &PruneReport, mut out: prune_report::Builder<'_>) {
    out.set_dry_run(report.dry_run);
    out.set_cutoff(report.cutoff);
    let mut shares = out.reborrow().init_shares(report.shares.len() as u32);
    for (i, share) in report.shares.iter().enumerate() {
        fill_pruned(share, shares.reborrow().get(i as u32));
    }
    let mut totals = out.reborrow().init_totals();
    totals.set_shares(report.shares.len() as u64);
    totals.set_messages(report.totals.messages);
    totals.set_parts(report.totals.parts);
    totals.set_ops(report.totals.ops);
    totals.set_tokens(report.totals.tokens);
    totals.set_bytes(report.totals.bytes);
    fill_info_list(
        &report.kept_children,
        out.reborrow()
            .init_kept_children(report.kept_children.len() as u32),
    );
    fill_info_list(
        &report.skipped,
        out.reborrow().init_skipped(report.skipped.len() as u32),
    );
    if let Some(vacuum) = &report.vacuum {
        fill_vacuum(vacuum, out.reborrow().init_vacuum());
    }
    out.set_vacuumed(report.vacuum.is_some());
}

pub fn fill_vacuum(report: &VacuumReport, mut out: vacuum_report::Builder<'_>) {
    out.set_bytes_before(report.bytes_before);
    out.set_bytes_after(report.bytes_after);
    out.set_duration_ms(report.duration_ms);
}

pub fn fill_reclaim_report(report: &ReclaimReport, mut out: reclaim_report::Builder<'_>) {
    out.set_dry_run(report.dry_run);
    out.set_parts_scanned(report.parts_scanned);
    out.set_parts_cleared(report.parts_cleared);
    out.set_bytes_reclaimed(report.bytes_reclaimed);
}

pub fn fill_compact_report(report: &CompactReport, mut out: compact_report::Builder<'_>) {
    out.set_dry_run(report.dry_run);
    out.set_cutoff(report.cutoff);
    out.set_shares(report.shares);
    out.set_ops(report.ops);
    out.set_bytes(report.bytes);
}

/// `more`: whether shares follow this page (then `nextAfter` is the last id).
pub fn fill_list(shares: &[ShareInfo], more: bool, mut out: share_list::Builder<'_>) {
    fill_info_list(shares, out.reborrow().init_shares(shares.len() as u32));
    if let Some(last) = shares.last().filter(|_| more) {
        out.set_next_after(last.state.share_id.as_str());
    }
}

pub fn fill_minted(
    token: &str,
    token_id: &str,
    expires_at: Option<i64>,
    mut out: minted_token::Builder<'_>,
) {
    out.set_token(token);
    out.set_token_id(token_id);
    out.set_expires_at(expires_at.unwrap_or(0));
}

pub fn fill_ack(ack: &Ack, mut out: ack::Builder<'_>) {
    out.set_cursor(ack.cursor.0);
    let mut results = out.init_results(ack.results.len() as u32);
    for (i, result) in ack.results.iter().enumerate() {
        let mut entry = results.reborrow().get(i as u32);
        entry.set_op_id(result.op_id.as_str());
        match &result.outcome {
            OpOutcome::Applied(cursor) => entry.set_applied(cursor.0),
            OpOutcome::Duplicate(cursor) => entry.set_duplicate(cursor.0),
            OpOutcome::Rejected { reason, detail } => {
                let mut rejection = entry.init_rejected();
                rejection.set_reason((*reason).into());
                rejection.set_detail(detail);
            }
        }
    }
}

fn fill_record(rec: &Record, mut out: record::Builder<'_>) {
    out.set_kind(rec.kind.into());
    out.set_id(&rec.id);
    out.set_message_id(&rec.message_id);
    out.set_json(&rec.json);
}

pub fn fill_snapshot(page: &SnapshotPage, mut out: snapshot_page::Builder<'_>) {
    out.set_cursor(page.cursor.0);
    out.set_next_page(&page.next_page);
    let mut records = out.init_records(page.records.len() as u32);
    for (i, rec) in page.records.iter().enumerate() {
        fill_record(rec, records.reborrow().get(i as u32));
    }
}

fn fill_logged(op: &LoggedOp, mut out: logged_op::Builder<'_>) {
    out.set_cursor(op.cursor.0);
    out.set_op_id(op.op_id.as_str());
    out.set_kind(op.kind.into());
    out.set_payload(&op.payload);
    out.set_applied_at(op.applied_at);
}

pub fn fill_ops(page: &OpsPage, mut out: ops_page::Builder<'_>) {
    out.set_cursor(page.cursor.0);
    fill_logged_list(&page.ops, out.init_ops(page.ops.len() as u32));
}

/// `out` must have been initialized with `ops.len()` elements.
pub fn fill_logged_list<'a>(
    ops: impl IntoIterator<Item = &'a LoggedOp>,
    mut out: capnp::struct_list::Builder<'_, logged_op::Owned>,
) {
    for (i, op) in ops.into_iter().enumerate() {
        fill_logged(op, out.reborrow().get(i as u32));
    }
}

#[cfg(test)]
mod tests {
    use capsync_shared::{Epoch, ShareId, TokenId};

    use super::*;
    use crate::ledger::ShareFootprint;

    fn info(id: &str) -> ShareInfo {
        ShareInfo {
            state: ShareState {
                share_id: ShareId::from(id),
                cursor: Cursor(9),
                writer_epoch: Epoch(0),
                viewer_epoch: Epoch(1),
                updated_at: 0,
            },
            session_id: format!("ses_{id}"),
            project_id: "prj".into(),
            parent_session_id: String::new(),
            title: "t".into(),
            created_at: 1,
            updated_at: 2,
            owner_token_id: TokenId::from("agt"),
            archived_at: None,
        }
    }

    fn footprint(n: u64) -> ShareFootprint {
        ShareFootprint {
            messages: n,
            parts: 2 * n,
            ops: 3 * n,
            tokens: 2,
            bytes: 100 * n,
        }
    }

    #[test]
    fn a_prune_report_keeps_every_share_reason_and_count() {
        let mut totals = footprint(1);
        totals.add(&footprint(2));
        let report = PruneReport {
            dry_run: false,
            cutoff: 1234,
            shares: vec![
                PlannedShare {
                    info: info("sh_a"),
                    reason: PruneReason::Inactive,
                    footprint: footprint(1),
                },
                PlannedShare {
                    info: info("sh_b"),
                    reason: PruneReason::Child,
                    footprint: footprint(2),
                },
            ],
            totals,
            kept_children: vec![info("sh_c")],
            skipped: vec![info("sh_d"), info("sh_e")],
            vacuum: Some(VacuumReport {
                bytes_before: 4096,
                bytes_after: 1024,
                duration_ms: 7,
            }),
        };
        let mut message = capnp::message::Builder::new_default();
        let mut root = message.init_root::<prune_report::Builder<'_>>();
        fill_prune_report(&report, root.reborrow());
        let out = root.into_reader();

        assert!(!out.get_dry_run());
        assert_eq!(out.get_cutoff(), 1234);
        let shares = out.get_shares().unwrap();
        assert_eq!(shares.len(), 2);
        let child = shares.get(1);
        assert_eq!(
            child
                .get_info()
                .unwrap()
                .get_state()
                .unwrap()
                .get_share_id()
                .unwrap(),
            "sh_b"
        );
        assert_eq!(child.get_reason().unwrap(), wire::PruneReason::Child);
        assert_eq!(
            (child.get_messages(), child.get_parts(), child.get_ops()),
            (2, 4, 6)
        );
        assert_eq!((child.get_tokens(), child.get_bytes()), (2, 200));
        assert_eq!(
            shares.get(0).get_reason().unwrap(),
            wire::PruneReason::Inactive
        );
        let totals = out.get_totals().unwrap();
        assert_eq!(totals.get_shares(), 2);
        assert_eq!((totals.get_ops(), totals.get_bytes()), (9, 300));
        assert_eq!(totals.get_tokens(), 4);
        assert_eq!(out.get_kept_children().unwrap().len(), 1);
        assert_eq!(out.get_skipped().unwrap().len(), 2);
        assert!(out.get_vacuumed());
        assert_eq!(out.get_vacuum().unwrap().get_bytes_after(), 1024);
    }

    #[test]
    fn a_retention_must_be_positive() {
        assert_eq!(
            older_than(1500, "olderThanMs").unwrap(),
            Duration::from_millis(1500)
        );
        for bad in [0, -1, i64::MIN] {
            let err = older_than(bad, "olderThanMs").unwrap_err();
            assert_eq!(err.code, capsync_shared::ErrorCode::InvalidArgument);
            assert!(err.message.contains("olderThanMs"), "{}", err.message);
        }
    }
}
