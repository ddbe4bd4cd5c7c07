//! Decoding of the schema's result structs into the client's plain types.
//!
//! Every method's result is a union of `ok` and `failure`; [`ok_or_fail!`] unpacks it so
//! the capability wrappers stay one screen each.

use capsync_shared::capsync_capnp::{
    PruneReason as WirePruneReason, compact_report, failure, minted_token, outcome, prune_report,
    pruned_share, reclaim_report, share_info, share_state, vacuum_report,
};

use crate::error::ClientError;
use crate::types::{
    CompactReport, LoggedOp, MintedToken, PruneReason, PruneReport, PruneTotals, PrunedShare,
    ReclaimReport, ShareInfo, ShareState, VacuumReport, nonempty, nonzero_time,
};

/// Unpacks a `union { ok @0 :T; failure @1 :Failure; }` reader: the `ok` reader, or an early
/// `return Err(ClientError::Remote{..})`. The first argument is the union's generated module.
macro_rules! ok_or_fail {
    ($module:path, $reader:expr) => {{
        use $module as m;
        match $reader.which()? {
            m::Which::Ok(ok) => ok?,
            m::Which::Failure(f) => return Err($crate::wire::failure(f?)),
        }
    }};
}
pub(crate) use ok_or_fail;

/// Owned text of a text field.
pub(crate) fn text(reader: capnp::Result<capnp::text::Reader<'_>>) -> Result<String, ClientError> {
    Ok(reader?.to_str()?.to_owned())
}

/// A `Failure` from results, as the client's error.
pub(crate) fn failure(f: failure::Reader<'_>) -> ClientError {
    let decode = || -> Result<ClientError, ClientError> {
        Ok(ClientError::Remote {
            // A code this build does not know is treated as internal rather than as a decoding error,
            // so the caller still sees the server's message.
            code: f
                .get_code()
                .map(Into::into)
                .unwrap_or(capsync_shared::ErrorCode::Internal),
            message: text(f.get_message())?,
            cursor: f.get_cursor(),
            retry_after: retry_after(f.get_retry_after_ms()),
        })
    };
    decode().unwrap_or_else(|e| e)
}

/// `Failure.retryAfterMs` as a wait: 0 means the server gave no hint.
fn retry_after(millis: u64) -> Option<std::time::Duration> {
    (millis > 0).then(|| std::time::Duration::from_millis(millis))
}

/// An `Outcome`: `Ok(())` or the failure.
pub(crate) fn outcome(r: outcome::Reader<'_>) -> Result<(), ClientError> {
    match r.which()? {
        outcome::Which::Ok(()) => Ok(()),
        outcome::Which::Failure(f) => Err(failure(f?)),
    }
}

pub(crate) fn share_state(r: share_state::Reader<'_>) -> Result<ShareState, ClientError> {
    Ok(ShareState {
        share_id: text(r.get_share_id())?,
        cursor: r.get_cursor(),
        writer_epoch: r.get_writer_epoch(),
        viewer_epoch: r.get_viewer_epoch(),
    })
}

pub(crate) fn share_info(r: share_info::Reader<'_>) -> Result<ShareInfo, ClientError> {
    Ok(ShareInfo {
        state: share_state(r.get_state()?)?,
        session_id: text(r.get_session_id())?,
        project_id: text(r.get_project_id())?,
        parent_session_id: nonempty(text(r.get_parent_session_id())?),
        title: text(r.get_title())?,
        created_at: r.get_created_at(),
        updated_at: r.get_updated_at(),
        owner_token_id: text(r.get_owner_token_id())?,
        archived_at: nonzero_time(r.get_archived_at()),
    })
}

pub(crate) fn stats(
    r: capsync_shared::capsync_capnp::stats::Reader<'_>,
) -> Result<crate::types::Stats, ClientError> {
    let mut tables = Vec::new();
    for table in r.get_tables()? {
        tables.push(crate::types::TableStats {
            name: text(table.get_name())?,
            total_bytes: table.get_total_bytes(),
            index_bytes: table.get_index_bytes(),
            live_rows: table.get_live_rows(),
            dead_rows: table.get_dead_rows(),
        });
    }
    Ok(crate::types::Stats {
        db_file_bytes: r.get_db_file_bytes(),
        wal_file_bytes: r.get_wal_file_bytes(),
        page_size: r.get_page_size(),
        page_count: r.get_page_count(),
        free_pages: r.get_free_pages(),
        reclaimable_bytes: r.get_reclaimable_bytes(),
        root_shares: r.get_root_shares(),
        child_shares: r.get_child_shares(),
        archived_shares: r.get_archived_shares(),
        messages: r.get_messages(),
        parts: r.get_parts(),
        ledger_ops: r.get_ledger_ops(),
        ledger_payload_bytes: r.get_ledger_payload_bytes(),
        compacted_ops: r.get_compacted_ops(),
        reclaimable_output_bytes: r.get_reclaimable_output_bytes(),
        engine: text(r.get_engine())?,
        database_bytes: r.get_database_bytes(),
        tables,
    })
}

pub(crate) fn minted_token(r: minted_token::Reader<'_>) -> Result<MintedToken, ClientError> {
    Ok(MintedToken {
        token: text(r.get_token())?,
        token_id: text(r.get_token_id())?,
        expires_at: nonzero_time(r.get_expires_at()),
    })
}

pub(crate) fn share_list(
    r: capsync_shared::capsync_capnp::share_list::Reader<'_>,
) -> Result<crate::types::ShareList, ClientError> {
    let shares = r
        .get_shares()?
        .iter()
        .map(share_info)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(crate::types::ShareList {
        shares,
        next_after: nonempty(text(r.get_next_after())?),
    })
}

impl From<WirePruneReason> for PruneReason {
    fn from(reason: WirePruneReason) -> Self {
        match reason {
            WirePruneReason::Inactive => Self::Inactive,
            WirePruneReason::Child => Self::Child,
        }
    }
}

fn share_infos(
    list: capnp::struct_list::Reader<'_, capsync_shared::capsync_capnp::share_info::Owned>,
) -> Result<Vec<ShareInfo>, ClientError> {
    list.iter().map(share_info).collect()
}

fn pruned_share(r: pruned_share::Reader<'_>) -> Result<PrunedShare, ClientError> {
    Ok(PrunedShare {
        info: share_info(r.get_info()?)?,
        reason: r.get_reason()?.into(),
        messages: r.get_messages(),
        parts: r.get_parts(),
        ops: r.get_ops(),
        tokens: r.get_tokens(),
        bytes: r.get_bytes(),
    })
}

pub(crate) fn prune_report(r: prune_report::Reader<'_>) -> Result<PruneReport, ClientError> {
    let totals = r.get_totals()?;
    Ok(PruneReport {
        dry_run: r.get_dry_run(),
        cutoff: r.get_cutoff(),
        shares: r
            .get_shares()?
            .iter()
            .map(pruned_share)
            .collect::<Result<_, _>>()?,
        totals: PruneTotals {
            shares: totals.get_shares(),
            messages: totals.get_messages(),
            parts: totals.get_parts(),
            ops: totals.get_ops(),
            tokens: totals.get_tokens(),
            bytes: totals.get_bytes(),
        },
        kept_children: share_infos(r.get_kept_children()?)?,
        skipped: share_infos(r.get_skipped()?)?,
        vacuum: if r.get_vacuumed() {
            Some(vacuum_report(r.get_vacuum()?))
        } else {
            None
        },
    })
}

pub(crate) fn vacuum_report(r: vacuum_report::Reader<'_>) -> VacuumReport {
    VacuumReport {
        bytes_before: r.get_bytes_before(),
        bytes_after: r.get_bytes_after(),
        duration_ms: r.get_duration_ms(),
    }
}

pub(crate) fn reclaim_report(r: reclaim_report::Reader<'_>) -> ReclaimReport {
    ReclaimReport {
        dry_run: r.get_dry_run(),
        parts_scanned: r.get_parts_scanned(),
        parts_cleared: r.get_parts_cleared(),
        bytes_reclaimed: r.get_bytes_reclaimed(),
    }
}

pub(crate) fn compact_report(r: compact_report::Reader<'_>) -> CompactReport {
    CompactReport {
        dry_run: r.get_dry_run(),
        cutoff: r.get_cutoff(),
        shares: r.get_shares(),
        ops: r.get_ops(),
        bytes: r.get_bytes(),
    }
}

/// A list of logged ops as the client's type (`opsSince` pages and subscription calls).
pub(crate) fn logged_ops(
    list: capnp::struct_list::Reader<'_, capsync_shared::capsync_capnp::logged_op::Owned>,
) -> Result<Vec<LoggedOp>, ClientError> {
    list.iter()
        .map(|op| {
            Ok(LoggedOp {
                cursor: capsync_shared::Cursor(op.get_cursor()),
                op_id: capsync_shared::OpId(text(op.get_op_id())?),
                kind: op.get_kind()?.into(),
                payload: text(op.get_payload())?,
                applied_at: op.get_applied_at(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use capsync_shared::ErrorCode;
    use capsync_shared::capsync_capnp::{ErrorCode as WireCode, failure};

    use crate::error::ClientError;

    /// A `Failure` as the server would send it, read back through the client's decoder.
    fn decoded(code: WireCode, retry_after_ms: u64) -> ClientError {
        let mut message = capnp::message::Builder::new_default();
        let mut f = message.init_root::<failure::Builder>();
        f.set_code(code);
        f.set_message("slow down");
        f.set_retry_after_ms(retry_after_ms);
        super::failure(f.into_reader())
    }

    #[test]
    fn a_failure_carries_the_retry_hint() {
        let e = decoded(WireCode::Overloaded, 6_000);
        assert_eq!(e.code(), Some(ErrorCode::Overloaded));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(6)));
        assert_eq!(e.to_string(), "server overloaded: slow down (retry in 6s)");

        let e = decoded(WireCode::StorageFull, 0);
        assert_eq!(e.code(), Some(ErrorCode::StorageFull));
        assert_eq!(e.retry_after(), None, "0 is no hint");
        assert_eq!(e.to_string(), "server storage full: slow down");
    }
}
