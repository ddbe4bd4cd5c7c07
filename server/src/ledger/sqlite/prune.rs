//! Prune planning, chunked share deletion, and archiving inactive shares.

use capsync_shared::{Cursor, ShareId, TokenId};
use rusqlite::{Connection, OptionalExtension, params};

use super::convert::cursor_column;
use super::errors::corrupt;
use super::share_rows::{SHARE_COLUMNS, VISIBLE, share_from_row};
use super::tx::SqliteTx;
use crate::ledger::rules::authority;
use crate::ledger::{
    DeleteStep, LedgerError, LedgerResult, Operator, PlannedShare, PruneFilter, PrunePlan,
    PruneReason, PruneSelect, ShareFootprint,
};

/// Which shares the filter picks by itself, and then every share a plan takes.
///
/// Parameters: `?1` the cutoff, `?2` archived only, `?3` with children. The
/// `{select}` slot is a condition on `s`, one of [`ROOTS`] or [`CHILDREN`].
/// `UNION` (not `UNION ALL`) drops a row already queued, so a session that is
/// its own ancestor ends the recursion instead of looping.
const PLANNED: &str = "
    WITH RECURSIVE
    selected(id) AS (
        SELECT s.id FROM shares s
        WHERE s.deleting_at IS NULL AND s.updated_at < ?1
          AND (NOT ?2 OR s.archived_at IS NOT NULL) AND {select}
    ),
    planned(id, session_id) AS (
        SELECT id, session_id FROM shares WHERE id IN (SELECT id FROM selected)
        UNION
        SELECT c.id, c.session_id FROM planned p
        JOIN shares c ON c.parent_session_id = p.session_id
        WHERE ?3 AND c.deleting_at IS NULL
    )";

/// A root: no parent session, or one that no visible share holds (its parent
/// was never shared here, or was deleted), so nothing else would ever prune it.
const ROOTS: &str = "(s.parent_session_id = '' OR NOT EXISTS (
        SELECT 1 FROM shares p WHERE p.session_id = s.parent_session_id AND p.deleting_at IS NULL))";

/// A child: any share of a sub-agent session, whatever its parent's state.
const CHILDREN: &str = "s.parent_session_id <> ''";

/// Rows and JSON bytes a share holds, one tagged row per kind of record, each
/// an aggregate over an index range led by `share_id`.
const FOOTPRINT: &str = "
    SELECT 'messages', count(*), coalesce(sum(length(CAST(json AS BLOB))), 0)
        FROM messages WHERE share_id = ?1
    UNION ALL
    SELECT 'parts', count(*), coalesce(sum(length(CAST(json AS BLOB))), 0)
        FROM parts WHERE share_id = ?1
    UNION ALL
    SELECT 'ops', count(*), coalesce(sum(length(CAST(payload AS BLOB))), 0)
        FROM ops WHERE share_id = ?1
    UNION ALL
    SELECT 'tokens', count(*), 0 FROM tokens WHERE share_id = ?1
    UNION ALL
    SELECT 'records', count(*), coalesce(sum(length(CAST(json AS BLOB))), 0) FROM (
        SELECT json FROM sessions WHERE share_id = ?1
        UNION ALL SELECT json FROM models WHERE share_id = ?1
        UNION ALL SELECT json FROM diffs WHERE share_id = ?1)";

/// Tables a deletion empties a chunk at a time, in an order that never leaves a
/// row whose parent is gone: parts before their messages, everything before the
/// share. Sessions and diffs hold one row each and go with the share row.
const CHUNKED_TABLES: [&str; 4] = ["ops", "parts", "messages", "models"];

/// Plans a prune: the shares `filter` selects, their descendants if asked, and
/// what each holds. Runs in the caller's read transaction, so every count
/// describes the same moment.
pub(super) fn plan(
    conn: &Connection,
    op: &Operator,
    filter: &PruneFilter,
    now: i64,
) -> LedgerResult<PrunePlan> {
    authority::check_operator(&mut SqliteTx::new(conn), op, now)?;
    let select = match filter.select {
        PruneSelect::Roots => ROOTS,
        PruneSelect::Children => CHILDREN,
    };
    let planned = PLANNED.replace("{select}", select);
    let filter_params = params![
        filter.inactive_before,
        filter.archived_only,
        filter.with_children
    ];

    let rows = conn
        .prepare_cached(&format!(
            "{planned}
             SELECT {SHARE_COLUMNS}, id IN (SELECT id FROM selected) AS selected FROM shares
             WHERE id IN (SELECT id FROM planned) ORDER BY id"
        ))?
        .query_map(filter_params, |r| {
            Ok((share_from_row(r)?, r.get::<_, bool>("selected")?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let shares = rows
        .into_iter()
        .map(|(row, selected)| {
            Ok(PlannedShare {
                footprint: footprint(conn, &row.id)?,
                info: row.info(),
                reason: if selected {
                    PruneReason::Inactive
                } else {
                    PruneReason::Child
                },
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;

    // With children every descendant is planned, so none can be left behind.
    let kept_children = if filter.with_children {
        Vec::new()
    } else {
        conn.prepare_cached(&format!(
            "{planned}
             SELECT {SHARE_COLUMNS} FROM shares
             WHERE {VISIBLE} AND parent_session_id IN (SELECT session_id FROM planned)
               AND id NOT IN (SELECT id FROM planned)
             ORDER BY id"
        ))?
        .query_map(filter_params, |r| share_from_row(r).map(|row| row.info()))?
        .collect::<Result<Vec<_>, _>>()?
    };
    Ok(PrunePlan {
        shares,
        kept_children,
    })
}

/// What deleting `share_id` removes, from aggregates.
fn footprint(conn: &Connection, share_id: &ShareId) -> LedgerResult<ShareFootprint> {
    let mut footprint = ShareFootprint::default();
    let mut stmt = conn.prepare_cached(FOOTPRINT)?;
    let mut rows = stmt.query([share_id.as_str()])?;
    while let Some(row) = rows.next()? {
        let kind: String = row.get(0)?;
        let count = non_negative(row.get(1)?)?;
        footprint.bytes += non_negative(row.get(2)?)?;
        match kind.as_str() {
            "messages" => footprint.messages = count,
            "parts" => footprint.parts = count,
            "ops" => footprint.ops = count,
            "tokens" => footprint.tokens = count,
            // Sessions, models and diffs count in bytes only.
            _ => {}
        }
    }
    Ok(footprint)
}

/// A count or a sum of lengths, which SQLite cannot make negative.
fn non_negative(value: i64) -> LedgerResult<u64> {
    u64::try_from(value).map_err(|_| corrupt(format!("negative count {value}")))
}

/// One step of deleting `share_id`, in the writer's transaction.
///
/// The first step, on a still visible share, only hides it and deletes its
/// tokens: from that commit on no call finds the share and no token redeems,
/// whatever the later steps still have to remove. Each later step deletes at
/// most `max_rows` rows (at least one), and the last one the share row itself,
/// whose cascade then only meets its single session and diffs rows.
pub(super) fn delete_step(
    conn: &Connection,
    op: &Operator,
    share_id: &ShareId,
    expect_cursor: Option<Cursor>,
    max_rows: u32,
    now: i64,
) -> LedgerResult<DeleteStep> {
    let share = conn
        .prepare_cached(
            "SELECT cursor, deleting_at IS NOT NULL, owner_token_id FROM shares WHERE id = ?1",
        )?
        .query_row([share_id.as_str()], |r| {
            Ok((
                cursor_column(r, 0)?,
                r.get::<_, bool>(1)?,
                TokenId(r.get(2)?),
            ))
        })
        .optional()?;
    authority::check_deleter(
        &mut SqliteTx::new(conn),
        op,
        share.as_ref().map(|s| &s.2),
        now,
    )?;
    let Some((cursor, hidden, _)) = share else {
        return Err(LedgerError::NotFound);
    };
    if !hidden {
        // The plan promised to delete the share as it was; one that changed
        // since may hold work someone still wants.
        if expect_cursor.is_some_and(|expected| expected != cursor) {
            return Ok(DeleteStep::Changed);
        }
        conn.prepare_cached("UPDATE shares SET deleting_at = ?2 WHERE id = ?1")?
            .execute(params![share_id.as_str(), now])?;
        conn.prepare_cached("DELETE FROM tokens WHERE share_id = ?1")?
            .execute([share_id.as_str()])?;
        return Ok(DeleteStep::More);
    }

    let mut budget = max_rows.max(1);
    for table in CHUNKED_TABLES {
        let deleted = conn
            .prepare_cached(&format!(
                "DELETE FROM {table} WHERE rowid IN
                     (SELECT rowid FROM {table} WHERE share_id = ?1 LIMIT ?2)"
            ))?
            .execute(params![share_id.as_str(), budget])?;
        budget = budget.saturating_sub(u32::try_from(deleted).unwrap_or(u32::MAX));
        if budget == 0 {
            return Ok(DeleteStep::More);
        }
    }
    conn.prepare_cached("DELETE FROM shares WHERE id = ?1")?
        .execute([share_id.as_str()])?;
    Ok(DeleteStep::Done)
}

/// Shares whose deletion began but did not finish, by id.
pub(super) fn unfinished(conn: &Connection) -> LedgerResult<Vec<ShareId>> {
    Ok(conn
        .prepare_cached("SELECT id FROM shares WHERE deleting_at IS NOT NULL ORDER BY id")?
        .query_map([], |r| r.get(0).map(ShareId))?
        .collect::<Result<Vec<_>, _>>()?)
}

/// Archives up to `limit` visible, unarchived shares last changed before
/// `inactive_before`, oldest first, and returns their ids in that order.
pub(super) fn archive_inactive(
    conn: &Connection,
    op: &Operator,
    inactive_before: i64,
    limit: u32,
    now: i64,
) -> LedgerResult<Vec<ShareId>> {
    authority::check_operator(&mut SqliteTx::new(conn), op, now)?;
    let ids = conn
        .prepare_cached(&format!(
            "SELECT id FROM shares
             WHERE {VISIBLE} AND archived_at IS NULL AND updated_at < ?1
             ORDER BY updated_at, id LIMIT ?2"
        ))?
        .query_map(params![inactive_before, limit], |r| r.get(0).map(ShareId))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut archive = conn.prepare_cached("UPDATE shares SET archived_at = ?2 WHERE id = ?1")?;
    for id in &ids {
        archive.execute(params![id.as_str(), now])?;
    }
    Ok(ids)
}
