//! Exclusive writer commands, checkpoints, vacuum and incremental vacuum,
//! against real database files. Ledger compaction, and who may vacuum, are the
//! contract suite's (`crate::ledger::contract::compaction`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use capsync_shared::Cursor;
use rusqlite::Connection;

use super::tests::{Fixture, hold_writer};
use crate::ledger::contract::{batch, fill, padded_op};
use crate::ledger::{LedgerError, Operator};

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
    fx.sqlite
        .writer
        .submit(move |conn| Ok(conn.pragma_query_value(None, name, |r| r.get(0))?))
        .await
        .unwrap()
}

/// Frees the pages of a second share's large ledger by deleting its rows on a
/// separate connection, and returns the freelist size it left.
async fn free_lots_of_pages(fx: &Fixture) -> i64 {
    let (writer, _) = fx.new_share(&fx.agent, "sh_2").await;
    fill(&fx.backend, &writer, "big", 1000, 4000).await;
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
    let (release, held) = hold_writer(&fx.sqlite).await;
    // Queued together while the writer is held: without exclusive commands,
    // all three would run in one group transaction.
    let before = fx
        .backend
        .append(fx.writer.clone(), batch(vec![padded_op("before", 10)]));
    let path = fx.path();
    let exclusive = fx.sqlite.writer.exclusive(move |conn| {
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
        .sqlite
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
        .sqlite
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

    let checkpoint = fx.sqlite.checkpoint(Duration::from_secs(1)).await.unwrap();
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
        .sqlite
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
        .sqlite
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
        !fx.sqlite
            .checkpoint(Duration::from_secs(1))
            .await
            .unwrap()
            .busy
    );
    let db_before = file_bytes(&fx.path());

    // 0 would mean "the whole freelist" to SQLite: here it frees nothing.
    let none = fx.sqlite.incremental_vacuum(0).await.unwrap();
    assert_eq!((none.freed_pages, none.free_pages), (0, free));

    let mut steps = 0;
    while free > 0 {
        let step = fx.sqlite.incremental_vacuum(200).await.unwrap();
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
        !fx.sqlite
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
