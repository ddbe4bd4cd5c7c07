//! Which shares a prune takes, deleting a share in bounded steps, and archiving
//! inactive shares.

use std::collections::{BTreeMap, HashSet, VecDeque};

use capsync_shared::{Cursor, ShareId};

use super::authority;
use super::store::{LedgerTx, ShareRow};
use crate::ledger::{
    DeleteStep, LedgerError, LedgerResult, Operator, PlannedShare, PruneFilter, PrunePlan,
    PruneReason, PruneSelect,
};

/// Plans a prune: the shares `filter` selects, their descendants if asked, and
/// what each holds, ordered by id. Runs in one read transaction, so every count
/// describes the same moment.
pub fn plan(
    tx: &mut impl LedgerTx,
    op: &Operator,
    filter: &PruneFilter,
    now: i64,
) -> LedgerResult<PrunePlan> {
    authority::check_operator(tx, op, now)?;
    let mut selected = Vec::new();
    for share in tx.inactive_shares(filter.inactive_before, filter.archived_only)? {
        let picked = match filter.select {
            // A root: no parent session, or one that no visible share holds (its
            // parent was never shared here, or was deleted), so nothing else
            // would ever prune it.
            PruneSelect::Roots => {
                share.parent_session_id.is_empty()
                    || !tx.session_is_shared(&share.parent_session_id)?
            }
            // A child: any share of a sub-agent session, whatever its parent's state.
            PruneSelect::Children => !share.parent_session_id.is_empty(),
        };
        if picked {
            selected.push(share);
        }
    }

    // Every planned share by id, with whether the filter picked it itself.
    let mut planned: BTreeMap<ShareId, (ShareRow, bool)> = selected
        .into_iter()
        .map(|share| (share.id.clone(), (share, true)))
        .collect();
    // Sessions whose children were looked up; a session that is its own
    // ancestor ends the walk instead of looping.
    let mut walked = HashSet::new();
    let mut kept_children = BTreeMap::new();
    let mut sessions: VecDeque<String> = planned
        .values()
        .map(|(share, _)| share.session_id.clone())
        .collect();
    while let Some(session) = sessions.pop_front() {
        if !walked.insert(session.clone()) {
            continue;
        }
        for child in tx.shares_of_parent_session(&session)? {
            if planned.contains_key(&child.id) {
                continue;
            }
            if filter.with_children {
                sessions.push_back(child.session_id.clone());
                planned.insert(child.id.clone(), (child, false));
            } else {
                kept_children.insert(child.id.clone(), child);
            }
        }
    }
    // A kept child found before its share was planned by a later walk is planned after all.
    kept_children.retain(|id, _| !planned.contains_key(id));

    let shares = planned
        .into_values()
        .map(|(share, selected)| {
            Ok(PlannedShare {
                footprint: tx.footprint(&share.id)?,
                info: share.info(),
                reason: if selected {
                    PruneReason::Inactive
                } else {
                    PruneReason::Child
                },
            })
        })
        .collect::<LedgerResult<Vec<_>>>()?;
    Ok(PrunePlan {
        shares,
        kept_children: kept_children.values().map(ShareRow::info).collect(),
    })
}

/// One step of deleting `share_id`.
///
/// The first step, on a still visible share, only hides it and deletes its
/// tokens: from that commit on no call finds the share and no token redeems,
/// whatever the later steps still have to remove. Each later step deletes at
/// most `max_rows` rows (at least one), and the last one the share itself.
pub fn delete_step(
    tx: &mut impl LedgerTx,
    op: &Operator,
    share_id: &ShareId,
    expect_cursor: Option<Cursor>,
    max_rows: u32,
    now: i64,
) -> LedgerResult<DeleteStep> {
    let share = tx.share_being_deleted(share_id)?;
    authority::check_deleter(tx, op, share.as_ref().map(|s| &s.owner), now)?;
    let Some(share) = share else {
        return Err(LedgerError::NotFound);
    };
    if !share.hidden {
        // The plan promised to delete the share as it was; one that changed
        // since may hold work someone still wants.
        if expect_cursor.is_some_and(|expected| expected != share.cursor) {
            return Ok(DeleteStep::Changed);
        }
        tx.hide_share(share_id, now)?;
        return Ok(DeleteStep::More);
    }
    if tx.delete_share_rows(share_id, max_rows.max(1))? {
        Ok(DeleteStep::Done)
    } else {
        Ok(DeleteStep::More)
    }
}

/// Archives up to `limit` visible, unarchived shares last changed before
/// `inactive_before`, oldest first, and returns their ids in that order.
pub fn archive_inactive(
    tx: &mut impl LedgerTx,
    op: &Operator,
    inactive_before: i64,
    limit: u32,
    now: i64,
) -> LedgerResult<Vec<ShareId>> {
    authority::check_operator(tx, op, now)?;
    let ids = tx.unarchived_inactive(inactive_before, limit)?;
    for id in &ids {
        tx.set_archived_at(id, Some(now))?;
    }
    Ok(ids)
}
