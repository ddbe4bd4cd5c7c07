//! SQLite's side of chunked share deletion: the rows of every table each step
//! deletes, and a consistent file after a deletion, checked with SQL. Prune
//! plans, deletion and archiving through the seam are the contract suite's
//! (`crate::ledger::contract::prune`).

use capsync_shared::ShareId;
use rusqlite::Connection;

use super::tests::Fixture;
use crate::ledger::contract::prune::{add_share, admin, populate, session_ops};
use crate::ledger::{DeleteStep, LedgerError, Operator};

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

/// The contract's `a_deletion_in_small_steps_removes_every_row_and_leaves_others_untouched`
/// counts what the stats show; here, the rows of every table, step by step.
#[tokio::test]
async fn a_deletion_in_small_steps_deletes_at_most_max_rows_rows_of_the_tables() {
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

/// The contract's `the_first_step_hides_the_share_and_an_interrupted_deletion_is_finished_later`
/// checks what the seam shows; here, the rows left between the steps and after them.
#[tokio::test]
async fn an_interrupted_deletion_keeps_its_rows_until_it_is_finished_then_leaves_none() {
    let fx = Fixture::new().await;
    populate(&fx, &fx.writer, session_ops("ses_1", 2, 2)).await;
    let step = fx
        .backend
        .delete_share_step(admin(&fx), fx.share.clone(), None, 7)
        .await
        .unwrap();
    assert_eq!(step, DeleteStep::More);
    // Only hidden so far: the records are still there for later steps.
    assert_eq!(rows_of(&fx.raw(), "sh_1"), [1, 0, 10, 1, 2, 4, 1, 2]);
    assert_eq!(
        fx.count("SELECT count(*) FROM shares WHERE deleting_at IS NOT NULL"),
        1
    );

    // The server stops here; the next one finishes the deletion.
    let fx = fx.reopen().await;
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
    assert_eq!(rows_of(&fx.raw(), "sh_1"), [0; SHARE_TABLES.len()]);
    assert_database_consistent(&fx);
    let again = fx
        .backend
        .delete_share_step(Operator::Scheduler, fx.share.clone(), None, 7)
        .await;
    assert!(matches!(again, Err(LedgerError::NotFound)), "{again:?}");
}
