//! Exclusive writer commands, checkpoints, vacuum, incremental vacuum and ledger
//! compaction, against real database files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsync_shared::{Cursor, OpKind, ShareId};
use rusqlite::Connection;
use serde_json::json;

use super::tests::{Fixture, batch, hold_writer, op};
use crate::ledger::{
    Authority, Backend, CompactPosition, CompactStep, LedgerError, OpIn, OpOutcome, Operator,
    RejectReason,
};

/// A model upsert whose payload is padded to about `pad` bytes.
fn padded_op(id: &str, pad: usize) -> OpIn {
    op(
        id,
        OpKind::ModelUpsert,
        json!({"id": id, "pad": "x".repeat(pad)}),
    )
}

/// Appends `count` padded ops named `<prefix>-<n>` to `writer`'s share, 100 to a batch.
async fn fill(fx: &Fixture, writer: &Authority, prefix: &str, count: usize, pad: usize) {
    let ids: Vec<String> = (0..count).map(|n| format!("{prefix}-{n}")).collect();
    for chunk in ids.chunks(100) {
        let ops = chunk.iter().map(|id| padded_op(id, pad)).collect();
        fx.backend.append(writer.clone(), batch(ops)).await.unwrap();
    }
}

fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    name.into()
}

fn file_bytes(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

/// Opens a read transaction on a connection of its own and keeps it open, so
/// that the log cannot be reset until the returned connection commits or drops.
fn pin_log(path: &Path) -> Connection {
    let reader = Connection::open(path).unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let _: i64 = reader
        .query_row("SELECT count(*) FROM ops", [], |r| r.get(0))
        .unwrap();
    reader
}

/// A pragma of the write connection, read on the writer thread.
async fn writer_pragma(fx: &Fixture, name: &'static str) -> i64 {
    fx.backend
        .writer
        .submit(move |conn| Ok(conn.pragma_query_value(None, name, |r| r.get(0))?))
        .await
        .unwrap()
}

/// Frees the pages of a second share's large ledger by deleting its rows on a
/// separate connection, and returns the freelist size it left.
async fn free_lots_of_pages(fx: &Fixture) -> i64 {
    let (writer, _) = fx.new_share(&fx.agent, "sh_2").await;
    fill(fx, &writer, "big", 1000, 4000).await;
    fx.raw()
        .execute_batch(
            "DELETE FROM models WHERE share_id = 'sh_2';
             DELETE FROM ops WHERE share_id = 'sh_2';",
        )
        .unwrap();
    let free = fx.count("SELECT freelist_count FROM pragma_freelist_count");
    assert!(free > 1000, "deleting ~8 MB freed only {free} pages");
    free
}

// ---------------------------------------------------------------------------
// Exclusive commands

#[tokio::test]
async fn an_exclusive_command_runs_alone_after_the_writes_queued_before_it_committed() {
    let fx = Fixture::new().await;
    let (release, held) = hold_writer(&fx.backend).await;
    // Queued together while the writer is held: without exclusive commands,
    // all three would run in one group transaction.
    let before = fx
        .backend
        .append(fx.writer.clone(), batch(vec![padded_op("before", 10)]));
    let path = fx.path();
    let exclusive = fx.backend.writer.exclusive(move |conn| {
        // Another connection sees only what was committed.
        let committed = Connection::open(&path)?;
        let count = |op_id: &str| -> rusqlite::Result<i64> {
            committed.query_row("SELECT count(*) FROM ops WHERE op_id = ?1", [op_id], |r| {
                r.get(0)
            })
        };
        Ok((conn.is_autocommit(), count("before")?, count("after")?))
    });
    let after = fx
        .backend
        .append(fx.writer.clone(), batch(vec![padded_op("after", 10)]));
    drop(release);
    held.await.unwrap();

    let (autocommit, before_seen, after_seen) = exclusive.await.unwrap();
    assert!(
        autocommit,
        "an exclusive command runs outside any transaction"
    );
    assert_eq!(
        before_seen, 1,
        "the write queued before it was committed first"
    );
    assert_eq!(after_seen, 0, "the write queued after it waited for it");
    assert_eq!(before.await.unwrap().cursor, Cursor(1));
    assert_eq!(after.await.unwrap().cursor, Cursor(2));
}

#[tokio::test]
async fn a_failing_exclusive_command_fails_alone_and_the_writer_keeps_going() {
    let fx = Fixture::new().await;
    let panicked = fx
        .backend
        .writer
        .exclusive(|_| -> crate::ledger::LedgerResult<()> { panic!("a bug") })
        .await;
    assert!(
        matches!(panicked, Err(LedgerError::Storage(_))),
        "{panicked:?}"
    );

    // Work that leaves a transaction open is rolled back and reported, or
    // every later group's BEGIN would fail.
    let left_open = fx
        .backend
        .writer
        .exclusive(|conn| {
            conn.execute_batch(
                "BEGIN; INSERT INTO audit (at, action, outcome, detail) VALUES (1, 'x', 'ok', '')",
            )?;
            Ok(())
        })
        .await;
    assert!(
        matches!(left_open, Err(LedgerError::Storage(_))),
        "{left_open:?}"
    );
    assert_eq!(fx.count("SELECT count(*) FROM audit WHERE action = 'x'"), 0);

    let ack = fx.append(vec![padded_op("later", 10)]).await;
    assert_eq!(ack.cursor, Cursor(1));
}

// ---------------------------------------------------------------------------
// Checkpoints

#[tokio::test]
async fn a_checkpoint_truncates_the_log_when_no_reader_is_in_it() {
    let fx = Fixture::new().await;
    fx.append(vec![padded_op("m1", 1000), padded_op("m2", 1000)])
        .await;
    let wal = wal_path(&fx.path());
    assert!(file_bytes(&wal) > 0, "the appends went to the log");

    let checkpoint = fx.backend.checkpoint(Duration::from_secs(1)).await.unwrap();
    assert!(!checkpoint.busy, "{checkpoint:?}");
    assert_eq!(file_bytes(&wal), 0);
    // The counts are read after the truncation, which empties the log.
    assert_eq!(
        (checkpoint.log_frames, checkpoint.checkpointed_frames),
        (0, 0)
    );
    assert_eq!(fx.count("SELECT count(*) FROM ops"), 2);
    // The log is cut back to this size when a write restarts it.
    assert_eq!(
        writer_pragma(&fx, "journal_size_limit").await,
        64 * 1024 * 1024
    );
}

#[tokio::test]
async fn a_checkpoint_reports_busy_while_a_reader_holds_the_log_and_restores_the_timeout() {
    let fx = Fixture::new().await;
    fx.append(vec![padded_op("m1", 1000)]).await;
    let wal = wal_path(&fx.path());
    let reader = pin_log(&fx.path());

    let started = Instant::now();
    let checkpoint = fx
        .backend
        .checkpoint(Duration::from_millis(50))
        .await
        .unwrap();
    assert!(checkpoint.busy, "{checkpoint:?}");
    assert!(checkpoint.log_frames > 0, "{checkpoint:?}");
    assert!(file_bytes(&wal) > 0, "a pinned log is not truncated");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "waited {:?}, not max_wait",
        started.elapsed()
    );
    assert_eq!(writer_pragma(&fx, "busy_timeout").await, 5000);

    drop(reader);
    let checkpoint = fx
        .backend
        .checkpoint(Duration::from_millis(50))
        .await
        .unwrap();
    assert!(!checkpoint.busy, "{checkpoint:?}");
    assert_eq!(file_bytes(&wal), 0);
}

// ---------------------------------------------------------------------------
// Vacuum

#[tokio::test]
async fn vacuum_gives_the_space_of_deleted_data_back() {
    let fx = Fixture::new().await;
    fx.append(vec![padded_op("kept", 100)]).await;
    free_lots_of_pages(&fx).await;
    let path = fx.path();
    let on_disk_before = file_bytes(&path) + file_bytes(&wal_path(&path));

    let denied = fx.backend.vacuum(Operator::Admin(fx.agent.clone())).await;
    assert!(
        matches!(denied, Err(LedgerError::PermissionDenied)),
        "{denied:?}"
    );

    let report = fx
        .backend
        .vacuum(Operator::Admin(fx.admin.clone()))
        .await
        .unwrap();
    let on_disk_after = file_bytes(&path) + file_bytes(&wal_path(&path));
    eprintln!(
        "vacuum: {} -> {} bytes in {} ms",
        report.bytes_before, report.bytes_after, report.duration_ms
    );
    assert_eq!(report.bytes_before, on_disk_before);
    assert_eq!(report.bytes_after, on_disk_after);
    assert!(
        report.bytes_after * 4 < report.bytes_before,
        "{report:?}: ~8 MB of deleted data should be gone"
    );
    assert_eq!(file_bytes(&wal_path(&path)), 0);
    assert_eq!(
        fx.count("SELECT freelist_count FROM pragma_freelist_count"),
        0
    );
    let integrity: String = fx
        .raw()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    assert_eq!(fx.count("SELECT count(*) FROM ops WHERE op_id = 'kept'"), 1);
    // VACUUM ran with its temporary copy on disk; the writer is back to memory (2).
    assert_eq!(writer_pragma(&fx, "temp_store").await, 2);
    // Still incremental, so later deletions can be given back in small steps.
    assert_eq!(fx.count("SELECT auto_vacuum FROM pragma_auto_vacuum"), 2);
}

#[tokio::test]
async fn vacuum_answers_busy_while_a_reader_pins_the_log() {
    let fx = Fixture::new().await;
    fx.append(vec![padded_op("m1", 1000)]).await;
    let reader = pin_log(&fx.path());

    // Waits the normal busy timeout (5 s) for the reader, once.
    let busy = fx.backend.vacuum(Operator::Admin(fx.admin.clone())).await;
    assert!(matches!(busy, Err(LedgerError::Busy)), "{busy:?}");
    assert_eq!(writer_pragma(&fx, "temp_store").await, 2);

    drop(reader);
    fx.backend
        .vacuum(Operator::Scheduler)
        .await
        .expect("the vacuum runs once the reader is gone");
    assert_eq!(fx.append(vec![padded_op("m2", 10)]).await.cursor, Cursor(2));
}

// ---------------------------------------------------------------------------
// Incremental vacuum

#[tokio::test]
async fn incremental_vacuum_frees_at_most_max_pages_per_step_until_none_are_left() {
    let fx = Fixture::new().await;
    let freed_by_deletion = u64::try_from(free_lots_of_pages(&fx).await).unwrap();
    let mut free = freed_by_deletion;
    let page_size = u64::try_from(fx.count("SELECT page_size FROM pragma_page_size")).unwrap();
    assert!(
        !fx.backend
            .checkpoint(Duration::from_secs(1))
            .await
            .unwrap()
            .busy
    );
    let db_before = file_bytes(&fx.path());

    // 0 would mean "the whole freelist" to SQLite: here it frees nothing.
    let none = fx.backend.incremental_vacuum(0).await.unwrap();
    assert_eq!((none.freed_pages, none.free_pages), (0, free));

    let mut steps = 0;
    while free > 0 {
        let step = fx.backend.incremental_vacuum(200).await.unwrap();
        assert_eq!(step.freed_pages, free.min(200), "{step:?}");
        assert_eq!(step.free_pages, free - step.freed_pages);
        free = step.free_pages;
        steps += 1;
        assert!(steps < 1000, "incremental vacuum does not converge");
    }
    assert_eq!(
        fx.count("SELECT freelist_count FROM pragma_freelist_count"),
        0
    );

    // Each step committed a shorter database; the checkpoint moves it into the file.
    assert!(
        !fx.backend
            .checkpoint(Duration::from_secs(1))
            .await
            .unwrap()
            .busy
    );
    let db_after = file_bytes(&fx.path());
    eprintln!("incremental vacuum: {db_before} -> {db_after} bytes in {steps} steps");
    // The file also loses the pointer-map pages that tracked the freed ones.
    assert!(
        db_before - db_after >= freed_by_deletion * page_size,
        "{freed_by_deletion} pages freed"
    );
    // A write committed after the checkpoint (an audit line) may have grown the
    // database in the log, so the file is at most the current page count.
    let page_count = fx.count("SELECT page_count FROM pragma_page_count");
    assert!(db_after <= u64::try_from(page_count).unwrap() * page_size);
    let integrity: String = fx
        .raw()
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
}

// ---------------------------------------------------------------------------
// Ledger compaction

/// Spins until the clock has moved past `at`, so the next commit is stamped later.
fn wait_for_clock_past(at: i64) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while capsync_shared::now_millis() <= at {
        assert!(Instant::now() < deadline, "the clock does not move");
        std::thread::yield_now();
    }
}

/// The payload of `share`'s op at `cursor`, as stored.
fn stored_payload(fx: &Fixture, share: &str, cursor: i64) -> String {
    fx.raw()
        .query_row(
            "SELECT payload FROM ops WHERE share_id = ?1 AND cursor = ?2",
            rusqlite::params![share, cursor],
            |r| r.get(0),
        )
        .unwrap()
}

#[tokio::test]
async fn reused_op_ids_are_still_caught_after_compaction() {
    let fx = Fixture::new().await;
    let first = op("t", OpKind::ModelUpsert, json!({"id": "m1"}));
    fx.append(vec![first.clone()]).await;
    let cutoff = capsync_shared::now_millis() + 1;
    compact_pass(&fx, cutoff, 100, false).await;
    assert_eq!(fx.count("SELECT count(*) FROM ops WHERE payload = ''"), 1);
    let ack = fx.append(vec![first]).await;
    assert_eq!(ack.results[0].outcome, OpOutcome::Duplicate(Cursor(1)));
    let ack = fx
        .append(vec![op("t", OpKind::ModelUpsert, json!({"id": "m2"}))])
        .await;
    assert!(
        matches!(
            ack.results[0].outcome,
            OpOutcome::Rejected {
                reason: RejectReason::OpIdReused,
                ..
            }
        ),
        "{:?}",
        ack.results[0]
    );
}

/// Runs a whole compaction pass in steps of `max_ops`, returning every step.
async fn compact_pass(
    fx: &Fixture,
    applied_before: i64,
    max_ops: u32,
    dry_run: bool,
) -> Vec<CompactStep> {
    let mut steps = Vec::new();
    let mut from: Option<CompactPosition> = None;
    loop {
        let step = fx
            .backend
            .compact_step(
                Operator::Admin(fx.admin.clone()),
                applied_before,
                from.clone(),
                max_ops,
                dry_run,
            )
            .await
            .unwrap();
        from = step.next.clone();
        steps.push(step);
        assert!(steps.len() < 100, "the pass does not end");
        if from.is_none() {
            return steps;
        }
    }
}

fn ledger_payload_bytes(fx: &Fixture) -> i64 {
    fx.count("SELECT coalesce(sum(length(CAST(payload AS BLOB))), 0) FROM ops")
}

#[tokio::test]
async fn compaction_drops_old_payloads_and_sends_viewers_below_the_point_to_a_snapshot() {
    let fx = Fixture::new().await;
    let old: Vec<OpIn> = (1..=5)
        .map(|n| padded_op(&format!("old-{n}"), 50))
        .collect();
    fx.append(old.clone()).await;
    let old_bytes = ledger_payload_bytes(&fx);
    wait_for_clock_past(fx.count("SELECT max(applied_at) FROM ops"));
    fx.append(
        (1..=3)
            .map(|n| padded_op(&format!("new-{n}"), 50))
            .collect(),
    )
    .await;
    let cutoff = fx.count("SELECT min(applied_at) FROM ops WHERE cursor > 5");
    let new_payloads: Vec<String> = (6..=8).map(|c| stored_payload(&fx, "sh_1", c)).collect();

    let denied = fx
        .backend
        .compact_step(Operator::Admin(fx.agent.clone()), cutoff, None, 100, true)
        .await;
    assert!(
        matches!(denied, Err(LedgerError::PermissionDenied)),
        "{denied:?}"
    );

    let expected = CompactStep {
        next: None,
        visited: 1,
        total_shares: 1,
        shares: 1,
        ops: 5,
        bytes: u64::try_from(old_bytes).unwrap(),
    };
    let dry = compact_pass(&fx, cutoff, 100, true).await;
    assert_eq!(dry, vec![expected.clone()]);
    assert_eq!(fx.count("SELECT compacted_through FROM shares"), 0);
    assert_eq!(fx.count("SELECT count(*) FROM ops WHERE payload = ''"), 0);

    let real = compact_pass(&fx, cutoff, 100, false).await;
    assert_eq!(real, dry, "a dry run reports what the real run does");
    assert_eq!(fx.count("SELECT compacted_through FROM shares"), 5);
    for cursor in 1..=5 {
        assert_eq!(stored_payload(&fx, "sh_1", cursor), "");
    }
    let kept: Vec<String> = (6..=8).map(|c| stored_payload(&fx, "sh_1", c)).collect();
    assert_eq!(kept, new_payloads);
    assert_eq!(
        fx.count("SELECT count(*) FROM ops WHERE op_id LIKE 'old-%' AND cursor <= 5"),
        5,
        "op ids stay"
    );

    for below in [0, 4] {
        let gap = fx
            .backend
            .ops_since(fx.viewer.clone(), Cursor(below), 100)
            .await;
        assert!(
            matches!(gap, Err(LedgerError::SnapshotRequired(Cursor(5)))),
            "{gap:?}"
        );
    }
    let page = fx
        .backend
        .ops_since(fx.viewer.clone(), Cursor(5), 100)
        .await
        .unwrap();
    let served: Vec<(u64, String)> = page
        .ops
        .iter()
        .map(|o| (o.cursor.0, o.payload.clone()))
        .collect();
    assert_eq!(served, (6..=8).zip(new_payloads).collect::<Vec<_>>());

    // Dedupe outlives the payload: a retried old op is still a duplicate at its cursor.
    let retried = fx.append(vec![old[2].clone()]).await;
    assert_eq!(retried.results[0].outcome, OpOutcome::Duplicate(Cursor(3)));
    assert_eq!(retried.cursor, Cursor(8));

    let stats = fx.backend.stats(fx.admin.clone()).await.unwrap();
    assert_eq!(stats.compacted_ops, 5);
    let again = compact_pass(&fx, cutoff, 100, false).await;
    assert_eq!((again[0].ops, again[0].shares, again[0].visited), (0, 0, 1));
}

#[tokio::test]
async fn compaction_in_small_steps_resumes_inside_and_across_shares() {
    let fx = Fixture::new().await;
    let (writer_2, _) = fx.new_share(&fx.agent, "sh_2").await;
    let (writer_3, _) = fx.new_share(&fx.agent, "sh_3").await;
    let (writer_4, _) = fx.new_share(&fx.agent, "sh_4").await;
    fill(&fx, &fx.writer, "a", 7, 20).await;
    fill(&fx, &writer_3, "c", 5, 30).await;
    fill(&fx, &writer_4, "d", 3, 40).await;
    wait_for_clock_past(fx.count("SELECT max(applied_at) FROM ops"));
    fill(&fx, &fx.writer, "a-new", 2, 20).await;
    fill(&fx, &writer_2, "b-new", 3, 20).await;
    let cutoff = fx.count("SELECT min(applied_at) FROM ops WHERE op_id LIKE '%-new-%'");
    // A share whose deletion has begun is no longer visited.
    fx.raw()
        .execute("UPDATE shares SET deleting_at = 1 WHERE id = 'sh_4'", [])
        .unwrap();
    let bytes_before = ledger_payload_bytes(&fx);
    let old_bytes = fx.count(
        "SELECT sum(length(CAST(payload AS BLOB))) FROM ops
         WHERE share_id IN ('sh_1', 'sh_3') AND op_id NOT LIKE '%-new-%'",
    );

    let dry = compact_pass(&fx, cutoff, 3, true).await;
    assert_eq!(
        ledger_payload_bytes(&fx),
        bytes_before,
        "a dry run changes nothing"
    );
    assert_eq!(fx.count("SELECT sum(compacted_through) FROM shares"), 0);
    let real = compact_pass(&fx, cutoff, 3, false).await;
    assert_eq!(
        real, dry,
        "a dry run reports what the real run does, step by step"
    );

    let at = |share: &str, cursor: u64| Some((ShareId::from(share), Cursor(cursor)));
    let positions: Vec<_> = real.iter().map(|s| s.next.clone()).collect();
    assert_eq!(
        positions,
        vec![
            at("sh_1", 3),
            at("sh_1", 6),
            at("sh_3", 1),
            at("sh_3", 4),
            None
        ]
    );
    assert!(
        real.iter().all(|s| s.ops <= 3 && s.total_shares == 3),
        "{real:?}"
    );
    assert_eq!(real.iter().map(|s| s.ops).sum::<u64>(), 12);
    assert_eq!(real.iter().map(|s| s.visited).sum::<u64>(), 3);
    // sh_1 and sh_3 were each split across steps, and each counts once.
    assert_eq!(real.iter().map(|s| s.shares).sum::<u64>(), 2);
    assert_eq!(
        real.iter().map(|s| s.bytes).sum::<u64>(),
        u64::try_from(old_bytes).unwrap()
    );

    let points: Vec<(String, i64)> = fx
        .raw()
        .prepare("SELECT id, compacted_through FROM shares ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        points,
        vec![
            ("sh_1".into(), 7),
            ("sh_2".into(), 0),
            ("sh_3".into(), 5),
            ("sh_4".into(), 0)
        ]
    );
    assert_eq!(
        fx.count("SELECT count(*) FROM ops WHERE payload = ''"),
        12,
        "only the old ops of visible shares lost their payload"
    );
}
