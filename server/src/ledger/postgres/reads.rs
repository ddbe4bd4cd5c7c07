//! PostgreSQL's own reads and steps: token lookup for redeeming, `stats`, and the
//! reclaim pass, whose positions here are the parts' `pos` column.

use capsync_shared::{ShareId, TokenId, TokenKind};

use super::errors::corrupt;
use super::tx::{PgTx, count, cursor, epoch, get};
use crate::ledger::rules::authority;
use crate::ledger::rules::compacted_output::clear_compacted_output;
use crate::ledger::storage_stats::{PostgresStats, TableStats};
use crate::ledger::{
    Authority, LedgerResult, Operator, ReclaimStep, ShareState, Stats, StorageStats, StoredToken,
};

/// The token row with its share's current state; no authority needed.
pub(super) fn find_token(tx: &mut PgTx<'_>, id: &TokenId) -> LedgerResult<Option<StoredToken>> {
    let row = tx.row(
        "SELECT t.kind, t.share_id, t.epoch, t.secret_hash, t.expires_at,
                t.revoked_at IS NOT NULL, s.id, s.cursor, s.writer_epoch, s.viewer_epoch,
                s.updated_at
         FROM tokens t LEFT JOIN shares s ON s.id = t.share_id AND s.deleting_at IS NULL
         WHERE t.id = $1",
        &[&id.as_str()],
    )?;
    let Some(row) = row else {
        return Ok(None);
    };
    let share = match get::<Option<String>>(&row, 6)? {
        Some(share_id) => Some(ShareState {
            share_id: ShareId(share_id),
            cursor: cursor(get(&row, 7)?)?,
            writer_epoch: epoch(get(&row, 8)?)?,
            viewer_epoch: epoch(get(&row, 9)?)?,
            updated_at: get(&row, 10)?,
        }),
        None => None,
    };
    let kind: String = get(&row, 0)?;
    Ok(Some(StoredToken {
        id: id.clone(),
        kind: TokenKind::parse(&kind).ok_or_else(|| corrupt(format!("token kind {kind:?}")))?,
        share_id: get::<Option<String>>(&row, 1)?.map(ShareId),
        epoch: epoch(get(&row, 2)?)?,
        secret_hash: get(&row, 3)?,
        expires_at: get(&row, 4)?,
        revoked: get(&row, 5)?,
        share,
    }))
}

/// What a reclaim pass would clear: output and attachments still held by tool parts
/// marked compacted, as the stored JSON text has them (`json`, not `jsonb`, keeps the
/// text as it was stored, so the byte counts are those of the rows).
const RECLAIMABLE_OUTPUT_BYTES: &str = "
    SELECT coalesce(sum(
        coalesce(octet_length(j #>> '{state,output}'), 0)
        + CASE WHEN json_typeof(j #> '{state,attachments}') = 'array'
                    AND json_array_length(j #> '{state,attachments}') > 0
               THEN octet_length((j #> '{state,attachments}')::text) ELSE 0 END), 0)
    FROM (SELECT json::json AS j FROM parts WHERE strpos(json, '\"compacted\"') > 0) p
    WHERE j ->> 'type' = 'tool' AND j #>> '{state,time,compacted}' IS NOT NULL";

/// Admin only: what PostgreSQL says of the tables in this schema, and counts from aggregates.
pub(super) fn stats(tx: &mut PgTx<'_>, who: &Authority, now: i64) -> LedgerResult<Stats> {
    authority::check_global(tx, who, TokenKind::Admin, now)?;
    let shares = tx
        .row(
            "SELECT count(*) FILTER (WHERE parent_session_id = ''),
                    count(*) FILTER (WHERE parent_session_id <> ''),
                    count(*) FILTER (WHERE archived_at IS NOT NULL),
                    coalesce(sum(compacted_through), 0)::bigint
             FROM shares WHERE deleting_at IS NULL",
            &[],
        )?
        .ok_or_else(|| corrupt("stats: no row"))?;
    let ops = tx
        .row(
            "SELECT count(*), coalesce(sum(octet_length(payload)), 0)::bigint FROM ops",
            &[],
        )?
        .ok_or_else(|| corrupt("stats: no row"))?;
    let single = |tx: &mut PgTx<'_>, sql: &str| -> LedgerResult<u64> {
        let row = tx.row(sql, &[])?.ok_or_else(|| corrupt("stats: no row"))?;
        Ok(count(get(&row, 0)?))
    };
    let messages = single(tx, "SELECT count(*) FROM messages")?;
    let parts = single(tx, "SELECT count(*) FROM parts")?;
    let reclaimable_output_bytes = single(tx, RECLAIMABLE_OUTPUT_BYTES)?;
    let tables = tx
        .rows(
            "SELECT relname::text, pg_total_relation_size(relid), pg_indexes_size(relid),
                    n_live_tup, n_dead_tup
             FROM pg_stat_user_tables WHERE schemaname = current_schema()
             ORDER BY relname",
            &[],
        )?
        .iter()
        .map(|r| {
            Ok(TableStats {
                name: get(r, 0)?,
                total_bytes: count(get(r, 1)?),
                index_bytes: count(get(r, 2)?),
                live_rows: count(get(r, 3)?),
                dead_rows: count(get(r, 4)?),
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;
    let database_bytes = single(tx, "SELECT pg_database_size(current_database())")?;
    Ok(Stats {
        storage: StorageStats::Postgres(PostgresStats {
            database_bytes,
            tables,
        }),
        root_shares: count(get(&shares, 0)?),
        child_shares: count(get(&shares, 1)?),
        archived_shares: count(get(&shares, 2)?),
        compacted_ops: count(get(&shares, 3)?),
        messages,
        parts,
        ledger_ops: count(get(&ops, 0)?),
        ledger_payload_bytes: count(get(&ops, 1)?),
        reclaimable_output_bytes,
    })
}

/// One step of the retroactive reclaim pass over the parts after position `after`
/// (see [`crate::ledger::Backend::reclaim_step`]); positions are the parts' `pos`.
pub(super) fn reclaim_step(
    tx: &mut PgTx<'_>,
    op: &Operator,
    after: i64,
    max_parts: u32,
    dry_run: bool,
    now: i64,
) -> LedgerResult<ReclaimStep> {
    authority::check_operator(tx, op, now)?;
    let total: i64 = get(
        &tx.row("SELECT coalesce(max(pos), 0) FROM parts", &[])?
            .ok_or_else(|| corrupt("reclaim: no row"))?,
        0,
    )?;
    // At least one part, so every step moves the pass on.
    let window_end: Option<i64> = get(
        &tx.row(
            "SELECT max(pos) FROM (SELECT pos FROM parts WHERE pos > $1 ORDER BY pos LIMIT $2) w",
            &[&after, &i64::from(max_parts.max(1))],
        )?
        .ok_or_else(|| corrupt("reclaim: no row"))?,
        0,
    )?;
    let Some(end) = window_end else {
        return Ok(ReclaimStep {
            next: None,
            position: total,
            total,
            ..ReclaimStep::default()
        });
    };
    let mut report = ReclaimStep {
        next: (end < total).then_some(end),
        position: end,
        total,
        ..ReclaimStep::default()
    };
    let candidates = tx.rows(
        "SELECT pos, json FROM parts
         WHERE pos > $1 AND pos <= $2 AND strpos(json, '\"compacted\"') > 0
           AND json::json ->> 'type' = 'tool'
           AND json::json #>> '{state,time,compacted}' IS NOT NULL
         ORDER BY pos",
        &[&after, &end],
    )?;
    let mut updates = Vec::new();
    for row in &candidates {
        report.scanned += 1;
        let json: String = get(row, 1)?;
        if let Some(cleared) = clear_compacted_output(&json) {
            report.cleared += 1;
            // Clearing an output that was a bare number can add a byte; that part saves nothing.
            report.bytes += u64::try_from(json.len().saturating_sub(cleared.len())).unwrap_or(0);
            if !dry_run {
                updates.push((get::<i64>(row, 0)?, cleared));
            }
        }
    }
    for (pos, json) in updates {
        tx.exec("UPDATE parts SET json = $2 WHERE pos = $1", &[&pos, &json])?;
    }
    Ok(report)
}
