//! Contract cases of pruning: plans (roots, children, descendants, kept
//! children, footprints), deleting a share in bounded steps, and archiving
//! inactive shares. Old shares are made by moving the fixture's clock.

use std::time::Duration;

use capsync_shared::{Cursor, OpKind, ShareId, TokenId, TokenKind};
use serde_json::json;

use super::{DAY, Fixture, authority, batch, logged_ops, model_op, op, snapshot, token};
use crate::ledger::{
    Authority, DeleteStep, LedgerError, NewShare, OpIn, Operator, PruneFilter, PrunePlan,
    PruneReason, PruneSelect, RecordKind, ShareFootprint, Stats,
};

/// How long ago old shares last changed.
const OLD: Duration = Duration::from_secs(30 * 24 * 3600);

/// The cutoff of most plans here: a week before now, so after every old
/// share and long before any fresh one.
fn cutoff(fx: &Fixture) -> i64 {
    fx.now() - i64::try_from((7 * DAY).as_millis()).unwrap()
}

pub(crate) fn admin(fx: &Fixture) -> Operator {
    Operator::Admin(fx.admin.clone())
}

/// Creates share `id` of `session` (a child of `parent` unless empty) in
/// `project`, owned by the fixture's agent; returns its writer.
pub(crate) async fn add_share(
    fx: &Fixture,
    id: &str,
    session: &str,
    parent: &str,
    project: &str,
) -> Authority {
    let share = NewShare {
        share_id: ShareId::from(id),
        session_id: session.into(),
        project_id: project.into(),
        parent_session_id: parent.into(),
        title: format!("share {id}"),
    };
    fx.backend
        .create_share(
            fx.agent.clone(),
            share,
            token(&format!("w-{id}")),
            token(&format!("v-{id}")),
        )
        .await
        .unwrap();
    authority(&format!("w-{id}"), TokenKind::Writer, Some((id, 0)))
}

/// The viewer of a share made by [`add_share`] (or the fixture's, for `sh_1`).
fn viewer(id: &str) -> Authority {
    authority(&format!("v-{id}"), TokenKind::Viewer, Some((id, 0)))
}

/// The ops of a session with a model, a diff list and `messages` messages of
/// `parts_per_message` text parts each.
pub(crate) fn session_ops(session: &str, messages: usize, parts_per_message: usize) -> Vec<OpIn> {
    let mut ops = vec![
        op(
            "o-ses",
            OpKind::SessionUpsert,
            json!({"id": session, "title": "t"}),
        ),
        model_op("model-a"),
        model_op("model-b"),
        op("o-diff", OpKind::DiffSet, json!([{"file": "src/main.rs"}])),
    ];
    for m in 0..messages {
        let message = format!("msg_{m}");
        ops.push(op(
            &format!("o-{message}"),
            OpKind::MessageUpsert,
            json!({"id": message, "role": "assistant", "sessionID": session}),
        ));
        for p in 0..parts_per_message {
            let part = format!("prt_{m}_{p}");
            ops.push(op(
                &format!("o-{part}"),
                OpKind::PartUpsert,
                json!({"id": part, "messageID": message, "sessionID": session,
                       "type": "text", "text": "x".repeat(10 * (p + 1))}),
            ));
        }
    }
    ops
}

/// Appends `ops` as `writer`; returns the share's cursor after them.
pub(crate) async fn populate(fx: &Fixture, writer: &Authority, ops: Vec<OpIn>) -> Cursor {
    fx.backend
        .append(writer.clone(), batch(ops))
        .await
        .unwrap()
        .cursor
}

fn roots(inactive_before: i64, with_children: bool) -> PruneFilter {
    PruneFilter {
        select: PruneSelect::Roots,
        inactive_before,
        archived_only: false,
        with_children,
    }
}

fn children(inactive_before: i64, with_children: bool) -> PruneFilter {
    PruneFilter {
        select: PruneSelect::Children,
        ..roots(inactive_before, with_children)
    }
}

async fn plan(fx: &Fixture, filter: PruneFilter) -> PrunePlan {
    fx.backend.plan_prune(admin(fx), filter).await.unwrap()
}

/// The planned shares as (id, reason), in plan order.
fn planned(plan: &PrunePlan) -> Vec<(&str, PruneReason)> {
    plan.shares
        .iter()
        .map(|s| (s.info.state.share_id.as_str(), s.reason))
        .collect()
}

fn kept(plan: &PrunePlan) -> Vec<&str> {
    plan.kept_children
        .iter()
        .map(|s| s.state.share_id.as_str())
        .collect()
}

/// Record and ledger rows the stats count: messages, parts and ops. They are
/// counted while they are stored, so those of a share whose deletion has
/// begun (and which every call already answers `NotFound` for) count until a
/// step deletes them; the share counts (`root_shares`, …) drop at once.
fn counted_rows(stats: &Stats) -> u64 {
    stats.messages + stats.parts + stats.ledger_ops
}

/// The shares of a small server, ids chosen so that id order is easy to read:
///
/// ```text
/// sh_1    ses_1   root, fresh (the fixture's)
/// r_old   ses_r   root, old, project p1
/// r_new   ses_n   root, fresh
/// c_old   ses_c   child of ses_r, old, project p2
/// c_new   ses_c2  child of ses_r, fresh
/// g_old   ses_g   child of ses_c (a grandchild of r_old), old, project p3
/// orphan  ses_o   child of ses_gone, which no share holds, old
/// arch    ses_a   root, old, archived
/// ```
async fn family(fx: &Fixture) {
    fx.ago(OLD, async {
        for (id, session, parent, project) in [
            ("r_old", "ses_r", "", "p1"),
            ("c_old", "ses_c", "ses_r", "p2"),
            ("g_old", "ses_g", "ses_c", "p3"),
            ("orphan", "ses_o", "ses_gone", "p1"),
            ("arch", "ses_a", "", "p1"),
        ] {
            add_share(fx, id, session, parent, project).await;
        }
        fx.backend
            .set_archived(fx.admin.clone(), ShareId::from("arch"), true)
            .await
            .unwrap();
    })
    .await;
    for (id, session, parent, project) in [
        ("r_new", "ses_n", "", "p1"),
        ("c_new", "ses_c2", "ses_r", "p1"),
    ] {
        add_share(fx, id, session, parent, project).await;
    }
}

// ---------------------------------------------------------------------------
// Plans

pub(crate) async fn a_plan_of_roots_takes_old_roots_and_reports_their_children(fx: Fixture) {
    family(&fx).await;
    let plan = plan(&fx, roots(cutoff(&fx), false)).await;
    // r_new and sh_1 are recent; c_old and g_old have a parent on the server;
    // orphan's parent session is held by no share, so it is a root.
    assert_eq!(
        planned(&plan),
        [
            ("arch", PruneReason::Inactive),
            ("orphan", PruneReason::Inactive),
            ("r_old", PruneReason::Inactive),
        ]
    );
    // Deleting r_old must not orphan its children silently, fresh or old.
    assert_eq!(kept(&plan), ["c_new", "c_old"]);
    let r_old = &plan.shares[2].info;
    assert_eq!(
        (r_old.session_id.as_str(), r_old.project_id.as_str()),
        ("ses_r", "p1")
    );
}

pub(crate) async fn archived_only_leaves_unarchived_shares_alone(fx: Fixture) {
    family(&fx).await;
    let plan = plan(
        &fx,
        PruneFilter {
            archived_only: true,
            ..roots(cutoff(&fx), false)
        },
    )
    .await;
    assert_eq!(planned(&plan), [("arch", PruneReason::Inactive)]);
    assert!(plan.shares[0].info.archived_at.is_some());
    assert!(plan.kept_children.is_empty());
}

pub(crate) async fn with_children_takes_every_descendant_whatever_its_project_or_age(fx: Fixture) {
    family(&fx).await;
    let plan = plan(&fx, roots(cutoff(&fx), true)).await;
    assert_eq!(
        planned(&plan),
        [
            ("arch", PruneReason::Inactive),
            ("c_new", PruneReason::Child),
            ("c_old", PruneReason::Child),
            ("g_old", PruneReason::Child),
            ("orphan", PruneReason::Inactive),
            ("r_old", PruneReason::Inactive),
        ]
    );
    assert!(plan.kept_children.is_empty());
    let projects: Vec<&str> = plan
        .shares
        .iter()
        .map(|s| s.info.project_id.as_str())
        .collect();
    assert_eq!(projects, ["p1", "p1", "p2", "p3", "p1", "p1"]);
}

pub(crate) async fn a_share_selected_and_reached_as_a_child_is_listed_once_as_inactive(
    fx: Fixture,
) {
    family(&fx).await;
    // g_old is an old child itself, and c_old's child.
    let plan = plan(&fx, children(cutoff(&fx), true)).await;
    assert_eq!(
        planned(&plan),
        [
            ("c_old", PruneReason::Inactive),
            ("g_old", PruneReason::Inactive),
            ("orphan", PruneReason::Inactive),
        ]
    );
}

pub(crate) async fn a_child_whose_parent_share_is_being_deleted_becomes_a_root(fx: Fixture) {
    family(&fx).await;
    let step = fx
        .backend
        .delete_share_step(admin(&fx), ShareId::from("r_old"), None, 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::More);
    let plan = plan(&fx, roots(cutoff(&fx), false)).await;
    // r_old is hidden: no longer planned, and its old child now has no parent here.
    assert_eq!(
        planned(&plan),
        [
            ("arch", PruneReason::Inactive),
            ("c_old", PruneReason::Inactive),
            ("orphan", PruneReason::Inactive),
        ]
    );
    assert_eq!(kept(&plan), ["g_old"]);
}

pub(crate) async fn a_cycle_of_parent_sessions_ends_and_lists_each_share_once(fx: Fixture) {
    // root and back both hold ses_x; back is a child of ses_y, itself a child
    // of ses_x: descending from root comes back to ses_x.
    fx.ago(OLD, async {
        for (id, session, parent) in [
            ("root", "ses_x", ""),
            ("mid", "ses_y", "ses_x"),
            ("back", "ses_x", "ses_y"),
            ("self", "ses_s", "ses_s"),
        ] {
            add_share(&fx, id, session, parent, "p").await;
        }
    })
    .await;
    let from_roots = plan(&fx, roots(cutoff(&fx), true)).await;
    assert_eq!(
        planned(&from_roots),
        [
            ("back", PruneReason::Child),
            ("mid", PruneReason::Child),
            ("root", PruneReason::Inactive),
        ]
    );
    let from_children = plan(&fx, children(cutoff(&fx), true)).await;
    assert_eq!(
        planned(&from_children),
        [
            ("back", PruneReason::Inactive),
            ("mid", PruneReason::Inactive),
            ("self", PruneReason::Inactive),
        ]
    );
}

pub(crate) async fn the_footprint_of_each_share_matches_its_rows_and_bytes(fx: Fixture) {
    let other = add_share(&fx, "sh_2", "ses_2", "", "p").await;
    populate(&fx, &fx.writer, session_ops("ses_1", 3, 2)).await;
    populate(&fx, &other, session_ops("ses_2", 5, 3)).await;
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v-extra"))
        .await
        .unwrap();
    // Both shares grow old.
    fx.clock.advance(OLD);

    let plan = plan(&fx, roots(cutoff(&fx), false)).await;
    assert_eq!(plan.shares.len(), 2);
    let every_token = [
        "adm", "agt", "w-sh_1", "v-sh_1", "v-extra", "w-sh_2", "v-sh_2",
    ];
    for planned in &plan.shares {
        let id = planned.info.state.share_id.as_str();
        // Counted and summed here from what the share shows, not by the engine's footprint.
        let (records, _) = snapshot(&fx.backend, &viewer(id), 1 << 20).await;
        let ops = logged_ops(&fx.backend, &viewer(id)).await;
        let of_kind = |kind: RecordKind| records.iter().filter(|r| r.kind == kind).count() as u64;
        let mut tokens = 0;
        for token_id in every_token {
            let found = fx
                .backend
                .find_token(TokenId::from(token_id))
                .await
                .unwrap()
                .unwrap();
            if found.share_id.as_ref().map(ShareId::as_str) == Some(id) {
                tokens += 1;
            }
        }
        let bytes = records.iter().map(|r| r.json.len() as u64).sum::<u64>()
            + ops.iter().map(|o| o.payload.len() as u64).sum::<u64>();
        let expected = ShareFootprint {
            messages: of_kind(RecordKind::Message),
            parts: of_kind(RecordKind::Part),
            ops: ops.len() as u64,
            tokens,
            bytes,
        };
        assert_eq!(planned.footprint, expected, "{id}");
    }
    // The two shares differ, so each footprint is its own share's.
    assert_eq!(
        (
            plan.shares[0].footprint.parts,
            plan.shares[0].footprint.tokens
        ),
        (6, 3)
    );
    assert_eq!(
        (
            plan.shares[1].footprint.parts,
            plan.shares[1].footprint.tokens
        ),
        (15, 2)
    );
}

// ---------------------------------------------------------------------------
// Deletion

/// How many rows each step deletes is observed through the stats counts
/// (messages, parts, ops); the engines' own tests count every table.
pub(crate) async fn a_deletion_in_small_steps_removes_every_row_and_leaves_others_untouched(
    fx: Fixture,
) {
    let other = add_share(&fx, "sh_2", "ses_2", "", "p").await;
    populate(&fx, &fx.writer, session_ops("ses_1", 4, 3)).await;
    populate(&fx, &other, session_ops("ses_2", 2, 2)).await;
    let others_records = snapshot(&fx.backend, &viewer("sh_2"), 1 << 20).await.0;
    let others_ops = logged_ops(&fx.backend, &viewer("sh_2")).await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let ops = fx.logged_ops().await;
    let chunked = ops.len()
        + records
            .iter()
            .filter(|r| {
                matches!(
                    r.kind,
                    RecordKind::Part | RecordKind::Message | RecordKind::Model
                )
            })
            .count();
    assert_eq!(chunked, 20 + 12 + 4 + 2, "the rows deleted in chunks");
    let stats_before = fx.stats().await;
    let others_rows = counted_rows(&stats_before) - (20 + 12 + 4);

    const MAX_ROWS: u64 = 7;
    let mut steps = 0;
    let mut before = counted_rows(&stats_before);
    let mut seen_deleted = 0;
    loop {
        let step = fx
            .backend
            .delete_share_step(admin(&fx), fx.share.clone(), None, MAX_ROWS as u32)
            .await
            .unwrap();
        steps += 1;
        let after = counted_rows(&fx.stats().await);
        let deleted = before - after;
        before = after;
        seen_deleted += deleted;
        match step {
            DeleteStep::More if steps == 1 => {
                assert_eq!(deleted, 0, "the first step deletes only the tokens");
                for id in ["w-sh_1", "v-sh_1"] {
                    let found = fx.backend.find_token(TokenId::from(id)).await.unwrap();
                    assert!(found.is_none(), "{id} still redeems");
                }
            }
            DeleteStep::More | DeleteStep::Done => {
                assert!(deleted <= MAX_ROWS, "{deleted}");
                if step == DeleteStep::Done {
                    break;
                }
            }
            DeleteStep::Changed => panic!("no cursor was expected"),
        }
        assert!(steps < 100, "the deletion does not end");
    }
    // One step hides the share, then 38 rows at most 7 at a time take six.
    assert!(steps >= 7, "{steps} steps for {chunked} rows");
    assert_eq!(seen_deleted, 20 + 12 + 4);
    let stats = fx.stats().await;
    assert_eq!(counted_rows(&stats), others_rows);
    assert_eq!(stats.root_shares, 1);
    assert_eq!(
        snapshot(&fx.backend, &viewer("sh_2"), 1 << 20).await.0,
        others_records
    );
    assert_eq!(logged_ops(&fx.backend, &viewer("sh_2")).await, others_ops);
    assert_eq!(
        fx.backend.unfinished_deletions().await.unwrap(),
        Vec::<ShareId>::new()
    );
    let again = fx
        .backend
        .delete_share_step(admin(&fx), fx.share.clone(), None, 7)
        .await;
    assert!(matches!(again, Err(LedgerError::NotFound)), "{again:?}");
}

pub(crate) async fn the_first_step_hides_the_share_and_an_interrupted_deletion_is_finished_later(
    fx: Fixture,
) {
    populate(&fx, &fx.writer, session_ops("ses_1", 2, 2)).await;
    fx.clock.advance(OLD);
    assert_eq!(
        planned(&plan(&fx, roots(cutoff(&fx), false)).await).len(),
        1
    );

    let step = fx
        .backend
        .delete_share_step(admin(&fx), fx.share.clone(), None, 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::More);
    let append = fx
        .backend
        .append(fx.writer.clone(), batch(vec![model_op("late")]))
        .await;
    assert!(matches!(append, Err(LedgerError::NotFound)), "{append:?}");
    let state = fx.backend.share_state(fx.viewer.clone()).await;
    assert!(matches!(state, Err(LedgerError::NotFound)), "{state:?}");
    let ops = fx.backend.ops_since(fx.viewer.clone(), Cursor(0), 10).await;
    assert!(matches!(ops, Err(LedgerError::NotFound)), "{ops:?}");
    for id in ["w-sh_1", "v-sh_1"] {
        let found = fx.backend.find_token(TokenId::from(id)).await.unwrap();
        assert!(found.is_none(), "{id} still redeems");
    }
    let listed = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, true)
        .await
        .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
    assert!(plan(&fx, roots(cutoff(&fx), false)).await.shares.is_empty());
    // Only hidden so far: the records are still there for later steps.
    let stats = fx.stats().await;
    assert_eq!((stats.messages, stats.parts), (2, 4));
    assert_eq!(stats.root_shares, 0, "a hidden share is not counted");

    // The server stops here; the next one finds the deletion and finishes it.
    let fx = fx.reopen().await;
    assert_eq!(
        fx.backend.unfinished_deletions().await.unwrap(),
        [ShareId::from("sh_1")]
    );
    let mut steps = 0;
    while fx
        .backend
        .delete_share_step(Operator::Scheduler, fx.share.clone(), None, 7)
        .await
        .unwrap()
        == DeleteStep::More
    {
        steps += 1;
        assert!(steps < 100, "the deletion does not end");
    }
    assert!(fx.backend.unfinished_deletions().await.unwrap().is_empty());
    let stats = fx.stats().await;
    assert_eq!(counted_rows(&stats), 0);
    let r = fx
        .backend
        .delete_share_step(Operator::Scheduler, fx.share.clone(), None, 7)
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
}

pub(crate) async fn a_share_that_moved_since_its_plan_is_not_deleted(fx: Fixture) {
    let cursor = populate(&fx, &fx.writer, session_ops("ses_1", 1, 1)).await;
    let (records, _) = fx.snapshot(1 << 20).await;
    let ops = fx.logged_ops().await;
    let stats = fx.stats().await;

    let stale = Cursor(cursor.0 - 1);
    let step = fx
        .backend
        .delete_share_step(admin(&fx), fx.share.clone(), Some(stale), 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::Changed);
    assert_eq!(fx.snapshot(1 << 20).await.0, records);
    assert_eq!(fx.logged_ops().await, ops);
    // What the engine says of its own storage moves on by itself (PostgreSQL's
    // statistics); every count stays.
    let after = fx.stats().await;
    assert_eq!(
        Stats {
            storage: stats.storage.clone(),
            ..after
        },
        stats
    );
    assert!(fx.backend.unfinished_deletions().await.unwrap().is_empty());
    let state = fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    assert_eq!(state.cursor, cursor);
    fx.backend
        .find_token(TokenId::from("w-sh_1"))
        .await
        .unwrap()
        .expect("its tokens are kept");

    let step = fx
        .backend
        .delete_share_step(admin(&fx), fx.share.clone(), Some(cursor), 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::More);
    assert_eq!(
        fx.backend.unfinished_deletions().await.unwrap(),
        [ShareId::from("sh_1")]
    );
}

pub(crate) async fn only_an_admin_or_the_scheduler_runs_lifecycle_steps(fx: Fixture) {
    fx.clock.advance(OLD);
    let cutoff = cutoff(&fx);
    for who in [fx.agent.clone(), fx.writer.clone(), fx.viewer.clone()] {
        let op = Operator::Admin(who);
        let r = fx.backend.plan_prune(op.clone(), roots(cutoff, true)).await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
        let r = fx
            .backend
            .delete_share_step(op.clone(), fx.share.clone(), None, 7)
            .await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
        let r = fx.backend.archive_inactive(op, cutoff, 10).await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
    }
    // A replaced admin token no longer counts.
    fx.backend.replace_admin_token(token("adm2")).await.unwrap();
    let old_admin = admin(&fx);
    let r = fx
        .backend
        .delete_share_step(old_admin, fx.share.clone(), None, 7)
        .await;
    assert!(matches!(r, Err(LedgerError::Revoked)), "{r:?}");

    // Nothing was deleted or archived.
    let state = fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    assert_eq!(state.share_id, fx.share);
    let new_admin = authority("adm2", TokenKind::Admin, None);
    let listed = fx
        .backend
        .list_shares(new_admin, String::new(), 100, true)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed.iter().all(|s| s.archived_at.is_none()), "{listed:?}");
    let planned = fx
        .backend
        .plan_prune(Operator::Scheduler, roots(cutoff, false))
        .await
        .unwrap();
    assert_eq!(planned.shares.len(), 1);
    let r = fx
        .backend
        .delete_share_step(Operator::Scheduler, ShareId::from("nope"), None, 7)
        .await;
    assert!(matches!(r, Err(LedgerError::NotFound)), "{r:?}");
}

// ---------------------------------------------------------------------------
// Automatic archiving

pub(crate) async fn archive_inactive_archives_old_unarchived_shares_oldest_first(fx: Fixture) {
    let cutoff = cutoff(&fx);
    // b is older than a; d (archived) and e (being deleted) are old too;
    // c and sh_1 are fresh.
    fx.ago(OLD + 10 * DAY, add_share(&fx, "b", "ses_b", "", "p"))
        .await;
    fx.ago(OLD, async {
        for id in ["a", "d", "e"] {
            add_share(&fx, id, &format!("ses_{id}"), "", "p").await;
        }
        fx.backend
            .set_archived(fx.admin.clone(), ShareId::from("d"), true)
            .await
            .unwrap();
        fx.backend
            .delete_share_step(admin(&fx), ShareId::from("e"), None, 7)
            .await
            .unwrap();
    })
    .await;
    add_share(&fx, "c", "ses_c", "", "p").await;
    let archived_at = |listed: &[crate::ledger::ShareInfo], id: &str| {
        listed
            .iter()
            .find(|s| s.state.share_id.as_str() == id)
            .unwrap_or_else(|| panic!("{id} is not listed"))
            .archived_at
    };
    let listed = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, true)
        .await
        .unwrap();
    let archived_d = archived_at(&listed, "d").expect("d is archived");

    let first = fx
        .backend
        .archive_inactive(Operator::Scheduler, cutoff, 1)
        .await
        .unwrap();
    assert_eq!(first, [ShareId::from("b")]);
    let rest = fx
        .backend
        .archive_inactive(admin(&fx), cutoff, 10)
        .await
        .unwrap();
    assert_eq!(rest, [ShareId::from("a")]);
    let nothing_left = fx
        .backend
        .archive_inactive(Operator::Scheduler, cutoff, 10)
        .await
        .unwrap();
    assert!(nothing_left.is_empty());

    let listed = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, true)
        .await
        .unwrap();
    let archived: Vec<&str> = listed
        .iter()
        .filter(|s| s.archived_at.is_some())
        .map(|s| s.state.share_id.as_str())
        .collect();
    assert_eq!(archived, ["a", "b", "d"]);
    assert_eq!(
        archived_at(&listed, "d"),
        Some(archived_d),
        "an archived share keeps its date"
    );
    // The listing tells when the scheduler archived it.
    let a = archived_at(&listed, "a");
    assert!(a.is_some_and(|at| at > cutoff));
    assert_eq!(a, Some(fx.now()));
}
