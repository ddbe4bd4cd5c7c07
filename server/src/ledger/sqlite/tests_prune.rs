//! Prune plans, chunked share deletion and auto-archiving, through the `Backend` API on real files.

use capsync_shared::{Cursor, OpKind, ShareId, TokenId, TokenKind};
use rusqlite::Connection;
use serde_json::json;

use super::tests::{Fixture, authority, batch, model_op, op, token};
use crate::ledger::{
    Authority, Backend, DeleteStep, LedgerError, NewShare, OpIn, Operator, PruneFilter, PrunePlan,
    PruneReason, PruneSelect, ShareFootprint,
};

/// When aged shares last changed: inactive for any cutoff after it.
const LONG_AGO: i64 = 1_000;
/// The cutoff of most plans here: after every aged share, long before any fresh one.
const CUTOFF: i64 = 10_000;

/// Tables holding a share's rows, with the column naming the share.
const SHARE_TABLES: [(&str, &str); 8] = [
    ("shares", "id"),
    ("tokens", "share_id"),
    ("ops", "share_id"),
    ("sessions", "share_id"),
    ("messages", "share_id"),
    ("parts", "share_id"),
    ("diffs", "share_id"),
    ("models", "share_id"),
];

/// Rows the cascade from the share row removes besides the row itself: its
/// session and its diffs.
const CASCADED_SINGLE_ROWS: i64 = 2;

fn admin(fx: &Fixture) -> Operator {
    Operator::Admin(fx.admin.clone())
}

/// Creates share `id` of `session` (a child of `parent` unless empty) in
/// `project`, owned by the fixture's agent; returns its writer.
async fn add_share(
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

/// Makes share `id` look last changed at `updated_at`, as if time had passed.
fn age(fx: &Fixture, id: &str, updated_at: i64) {
    let changed = fx
        .raw()
        .execute(
            "UPDATE shares SET updated_at = ?2 WHERE id = ?1",
            rusqlite::params![id, updated_at],
        )
        .unwrap();
    assert_eq!(changed, 1, "no share {id}");
}

/// The ops of a session with a model, a diff list and `messages` messages of
/// `parts_per_message` text parts each.
fn session_ops(session: &str, messages: usize, parts_per_message: usize) -> Vec<OpIn> {
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
async fn populate(fx: &Fixture, writer: &Authority, ops: Vec<OpIn>) -> Cursor {
    fx.backend
        .append(writer.clone(), batch(ops))
        .await
        .unwrap()
        .cursor
}

fn roots(with_children: bool) -> PruneFilter {
    PruneFilter {
        select: PruneSelect::Roots,
        inactive_before: CUTOFF,
        archived_only: false,
        with_children,
    }
}

fn children(with_children: bool) -> PruneFilter {
    PruneFilter {
        select: PruneSelect::Children,
        ..roots(with_children)
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

/// Rows of share `id` in `table`, whose `column` names the share.
fn count_rows(conn: &Connection, table: &str, column: &str, id: &str) -> i64 {
    conn.query_row(
        &format!("SELECT count(*) FROM {table} WHERE {column} = ?1"),
        [id],
        |r| r.get(0),
    )
    .unwrap()
}

/// Rows of share `id` in each of [`SHARE_TABLES`], in that order.
fn rows_of(conn: &Connection, id: &str) -> Vec<i64> {
    SHARE_TABLES
        .iter()
        .map(|(table, column)| count_rows(conn, table, column, id))
        .collect()
}

/// Checks the whole file the way an operator would after a prune.
fn assert_database_consistent(fx: &Fixture) {
    assert_eq!(fx.count("SELECT count(*) FROM pragma_foreign_key_check"), 0);
    let integrity: String = fx
        .raw()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
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
async fn family() -> Fixture {
    let fx = Fixture::new().await;
    for (id, session, parent, project) in [
        ("r_old", "ses_r", "", "p1"),
        ("r_new", "ses_n", "", "p1"),
        ("c_old", "ses_c", "ses_r", "p2"),
        ("c_new", "ses_c2", "ses_r", "p1"),
        ("g_old", "ses_g", "ses_c", "p3"),
        ("orphan", "ses_o", "ses_gone", "p1"),
        ("arch", "ses_a", "", "p1"),
    ] {
        add_share(&fx, id, session, parent, project).await;
    }
    fx.backend
        .set_archived(fx.admin.clone(), ShareId::from("arch"), true)
        .await
        .unwrap();
    for id in ["r_old", "c_old", "g_old", "orphan", "arch"] {
        age(&fx, id, LONG_AGO);
    }
    fx
}

// ---------------------------------------------------------------------------
// Plans

#[tokio::test]
async fn a_plan_of_roots_takes_old_roots_and_reports_their_children() {
    let fx = family().await;
    let plan = plan(&fx, roots(false)).await;
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

#[tokio::test]
async fn archived_only_leaves_unarchived_shares_alone() {
    let fx = family().await;
    let plan = plan(
        &fx,
        PruneFilter {
            archived_only: true,
            ..roots(false)
        },
    )
    .await;
    assert_eq!(planned(&plan), [("arch", PruneReason::Inactive)]);
    assert!(plan.shares[0].info.archived_at.is_some());
    assert!(plan.kept_children.is_empty());
}

#[tokio::test]
async fn with_children_takes_every_descendant_whatever_its_project_or_age() {
    let fx = family().await;
    let plan = plan(&fx, roots(true)).await;
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

#[tokio::test]
async fn a_share_selected_and_reached_as_a_child_is_listed_once_as_inactive() {
    let fx = family().await;
    // g_old is an old child itself, and c_old's child.
    let plan = plan(&fx, children(true)).await;
    assert_eq!(
        planned(&plan),
        [
            ("c_old", PruneReason::Inactive),
            ("g_old", PruneReason::Inactive),
            ("orphan", PruneReason::Inactive),
        ]
    );
}

#[tokio::test]
async fn a_child_whose_parent_share_is_being_deleted_becomes_a_root() {
    let fx = family().await;
    let step = fx
        .backend
        .delete_share_step(admin(&fx), ShareId::from("r_old"), None, 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::More);
    let plan = plan(&fx, roots(false)).await;
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

#[tokio::test]
async fn a_cycle_of_parent_sessions_ends_and_lists_each_share_once() {
    let fx = Fixture::new().await;
    // root and back both hold ses_x; back is a child of ses_y, itself a child
    // of ses_x: descending from root comes back to ses_x.
    for (id, session, parent) in [
        ("root", "ses_x", ""),
        ("mid", "ses_y", "ses_x"),
        ("back", "ses_x", "ses_y"),
        ("self", "ses_s", "ses_s"),
    ] {
        add_share(&fx, id, session, parent, "p").await;
        age(&fx, id, LONG_AGO);
    }
    let from_roots = plan(&fx, roots(true)).await;
    assert_eq!(
        planned(&from_roots),
        [
            ("back", PruneReason::Child),
            ("mid", PruneReason::Child),
            ("root", PruneReason::Inactive),
        ]
    );
    let from_children = plan(&fx, children(true)).await;
    assert_eq!(
        planned(&from_children),
        [
            ("back", PruneReason::Inactive),
            ("mid", PruneReason::Inactive),
            ("self", PruneReason::Inactive),
        ]
    );
}

#[tokio::test]
async fn the_footprint_of_each_share_matches_its_rows_and_bytes() {
    let fx = Fixture::new().await;
    let other = add_share(&fx, "sh_2", "ses_2", "", "p").await;
    populate(&fx, &fx.writer, session_ops("ses_1", 3, 2)).await;
    populate(&fx, &other, session_ops("ses_2", 5, 3)).await;
    fx.backend
        .mint_token(fx.writer.clone(), TokenKind::Viewer, token("v-extra"))
        .await
        .unwrap();
    age(&fx, "sh_1", LONG_AGO);
    age(&fx, "sh_2", LONG_AGO);

    let plan = plan(&fx, roots(false)).await;
    assert_eq!(plan.shares.len(), 2);
    let raw = fx.raw();
    for planned in &plan.shares {
        let id = planned.info.state.share_id.as_str();
        let count = |table: &str| count_rows(&raw, table, "share_id", id) as u64;
        // Summed here from the stored text, not by the SQL under test.
        let text_bytes = |table: &str, column: &str| -> u64 {
            let mut stmt = raw
                .prepare(&format!("SELECT {column} FROM {table} WHERE share_id = ?1"))
                .unwrap();
            stmt.query_map([id], |r| r.get::<_, String>(0))
                .unwrap()
                .map(|text| text.unwrap().len() as u64)
                .sum()
        };
        let bytes = ["sessions", "models", "diffs", "messages", "parts"]
            .iter()
            .map(|table| text_bytes(table, "json"))
            .sum::<u64>()
            + text_bytes("ops", "payload");
        let expected = ShareFootprint {
            messages: count("messages"),
            parts: count("parts"),
            ops: count("ops"),
            tokens: count("tokens"),
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

#[tokio::test]
async fn a_deletion_in_small_steps_removes_every_row_and_leaves_others_untouched() {
    let fx = Fixture::new().await;
    let other = add_share(&fx, "sh_2", "ses_2", "", "p").await;
    populate(&fx, &fx.writer, session_ops("ses_1", 4, 3)).await;
    populate(&fx, &other, session_ops("ses_2", 2, 2)).await;
    let raw = fx.raw();
    let others_before = rows_of(&raw, "sh_2");
    let chunked: i64 = ["ops", "parts", "messages", "models"]
        .iter()
        .map(|table| count_rows(&raw, table, "share_id", "sh_1"))
        .sum();
    assert_eq!(chunked, 20 + 12 + 4 + 2, "the rows deleted in chunks");

    const MAX_ROWS: i64 = 7;
    let mut steps = 0;
    let mut before: i64 = rows_of(&raw, "sh_1").iter().sum();
    loop {
        let step = fx
            .backend
            .delete_share_step(admin(&fx), fx.share.clone(), None, MAX_ROWS as u32)
            .await
            .unwrap();
        steps += 1;
        let after: i64 = rows_of(&raw, "sh_1").iter().sum();
        let deleted = before - after;
        before = after;
        match step {
            DeleteStep::More if steps == 1 => {
                assert_eq!(deleted, 2, "the first step deletes only the tokens")
            }
            DeleteStep::More => assert!((1..=MAX_ROWS).contains(&deleted), "{deleted}"),
            DeleteStep::Done => {
                assert!(deleted <= MAX_ROWS + 1 + CASCADED_SINGLE_ROWS, "{deleted}");
                break;
            }
            DeleteStep::Changed => panic!("no cursor was expected"),
        }
        assert!(steps < 100, "the deletion does not end");
    }
    // One step hides the share, then 38 rows at most 7 at a time take six.
    assert!(steps >= 7, "{steps} steps for {chunked} rows");
    assert_eq!(rows_of(&raw, "sh_1"), [0; SHARE_TABLES.len()]);
    assert_eq!(rows_of(&raw, "sh_2"), others_before);
    assert_database_consistent(&fx);
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

#[tokio::test]
async fn the_first_step_hides_the_share_and_an_interrupted_deletion_is_finished_later() {
    let fx = Fixture::new().await;
    populate(&fx, &fx.writer, session_ops("ses_1", 2, 2)).await;
    age(&fx, "sh_1", LONG_AGO);
    assert_eq!(planned(&plan(&fx, roots(false)).await).len(), 1);

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
    assert!(plan(&fx, roots(false)).await.shares.is_empty());
    // Only hidden so far: the records are still there for later steps.
    assert!(fx.count("SELECT count(*) FROM parts WHERE share_id = 'sh_1'") > 0);

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
    assert_eq!(rows_of(&fx.raw(), "sh_1"), [0; SHARE_TABLES.len()]);
    assert_database_consistent(&fx);
}

#[tokio::test]
async fn a_share_that_moved_since_its_plan_is_not_deleted() {
    let fx = Fixture::new().await;
    let cursor = populate(&fx, &fx.writer, session_ops("ses_1", 1, 1)).await;
    let raw = fx.raw();
    let rows = rows_of(&raw, "sh_1");

    let stale = Cursor(cursor.0 - 1);
    let step = fx
        .backend
        .delete_share_step(admin(&fx), fx.share.clone(), Some(stale), 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::Changed);
    assert_eq!(rows_of(&raw, "sh_1"), rows);
    assert!(fx.backend.unfinished_deletions().await.unwrap().is_empty());
    let state = fx.backend.share_state(fx.viewer.clone()).await.unwrap();
    assert_eq!(state.cursor, cursor);

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

#[tokio::test]
async fn only_an_admin_or_the_scheduler_runs_lifecycle_steps() {
    let fx = Fixture::new().await;
    age(&fx, "sh_1", LONG_AGO);
    for who in [fx.agent.clone(), fx.writer.clone(), fx.viewer.clone()] {
        let op = Operator::Admin(who);
        let r = fx.backend.plan_prune(op.clone(), roots(true)).await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
        let r = fx
            .backend
            .delete_share_step(op.clone(), fx.share.clone(), None, 7)
            .await;
        assert!(matches!(r, Err(LedgerError::PermissionDenied)), "{r:?}");
        let r = fx.backend.archive_inactive(op, CUTOFF, 10).await;
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
    assert_eq!(
        fx.count("SELECT count(*) FROM shares WHERE archived_at IS NOT NULL"),
        0
    );
    let planned = fx
        .backend
        .plan_prune(Operator::Scheduler, roots(false))
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

#[tokio::test]
async fn archive_inactive_archives_old_unarchived_shares_oldest_first() {
    let fx = Fixture::new().await;
    for id in ["a", "b", "c", "d", "e"] {
        add_share(&fx, id, &format!("ses_{id}"), "", "p").await;
    }
    fx.backend
        .set_archived(fx.admin.clone(), ShareId::from("d"), true)
        .await
        .unwrap();
    let archived_d: i64 = fx.count("SELECT archived_at FROM shares WHERE id = 'd'");
    fx.backend
        .delete_share_step(admin(&fx), ShareId::from("e"), None, 7)
        .await
        .unwrap();
    // a and b are old (b older), c and sh_1 fresh, d already archived, e being deleted.
    age(&fx, "a", 3_000);
    age(&fx, "b", 2_000);
    age(&fx, "d", LONG_AGO);
    age(&fx, "e", LONG_AGO);

    let first = fx
        .backend
        .archive_inactive(Operator::Scheduler, CUTOFF, 1)
        .await
        .unwrap();
    assert_eq!(first, [ShareId::from("b")]);
    let rest = fx
        .backend
        .archive_inactive(admin(&fx), CUTOFF, 10)
        .await
        .unwrap();
    assert_eq!(rest, [ShareId::from("a")]);
    let nothing_left = fx
        .backend
        .archive_inactive(Operator::Scheduler, CUTOFF, 10)
        .await
        .unwrap();
    assert!(nothing_left.is_empty());

    let archived: Vec<String> = fx
        .raw()
        .prepare("SELECT id FROM shares WHERE archived_at IS NOT NULL ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(archived, ["a", "b", "d"]);
    assert_eq!(
        fx.count("SELECT archived_at FROM shares WHERE id = 'd'"),
        archived_d,
        "an archived share keeps its date"
    );
    // The listing tells when the scheduler archived it.
    let a = fx
        .backend
        .list_shares(fx.admin.clone(), String::new(), 100, true)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.state.share_id.as_str() == "a")
        .unwrap();
    assert!(a.archived_at.is_some_and(|at| at > CUTOFF));
}
