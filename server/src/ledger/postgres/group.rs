//! Group commit: writes to different shares that are waiting when a worker becomes
//! free run in one transaction, one after another, and commit together.
//!
//! On a busy server most of an append's cost in PostgreSQL is per transaction (`BEGIN`,
//! `COMMIT`, the commit record and its flush, a round trip each way). pgbench on this
//! kind of machine, the statements of an append: 16 clients of one append per
//! transaction made 2,200–2,900 appends/s, 4 clients of four appends per transaction
//! 3,000–3,600. Groups form only when writes queue, that is, when every worker is busy;
//! a write that finds a free worker runs alone as before.
//!
//! A group is all or nothing, but its writes are not: if any write of the group fails
//! (its own rule refuses it, a lost race, a lost connection), the group is rolled back
//! and each write runs again on its own, with the usual retries, so one refusal
//! costs the others a second run, never their result. If the answer to `COMMIT` is lost
//! the group may have committed: every write is told to try again (as a write alone
//! would be), and nothing runs twice. Without a connection to be had, every write is
//! told so at once rather than each waiting for a connection of its own.

use tokio::sync::oneshot;

use super::errors::{Failure, to_ledger};
use super::pool::{Admitted, Worker};
use super::tx::{Committing, PgTx};
use crate::ledger::{LedgerError, LedgerResult};

/// Most writes in one group transaction.
pub(super) const MAX_GROUP: usize = 16;

/// The `BEGIN` of a write transaction (see `pool::Access::Write`).
pub(super) const BEGIN_WRITE: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// A write waiting for a worker, alone or in a group.
pub(super) trait GroupWrite: Send {
    /// Runs the write's work in `tx`, which the group's other writes share, keeping
    /// its result until the group commits.
    fn attempt(&mut self, tx: &mut PgTx<'_>, now: i64) -> LedgerResult<()>;

    /// The group committed: the after-commit step, then the answer.
    fn committed(self: Box<Self>);

    /// Answers `error` without running again.
    fn fail(self: Box<Self>, error: LedgerError);

    /// Runs in a transaction of its own (with the usual retries) and answers.
    fn alone(self: Box<Self>, worker: &mut Worker);
}

/// A write transaction queued by [`super::pool::Pool::run`].
pub(super) struct WriteJob<T, F, A> {
    work: F,
    after_commit: A,
    answer: oneshot::Sender<LedgerResult<T>>,
    /// The work's result, once it ran in a group that has not committed yet.
    done: Option<T>,
    /// Counted in the write queue until answered.
    _admitted: Admitted,
}

impl<T, F, A> WriteJob<T, F, A> {
    pub(super) fn new(
        work: F,
        after_commit: A,
        answer: oneshot::Sender<LedgerResult<T>>,
        admitted: Admitted,
    ) -> Self {
        Self {
            work,
            after_commit,
            answer,
            done: None,
            _admitted: admitted,
        }
    }
}

impl<T, F, A> GroupWrite for WriteJob<T, F, A>
where
    T: Send + 'static,
    F: for<'t> Fn(&mut PgTx<'t>, i64) -> LedgerResult<T> + Send + 'static,
    A: FnOnce(&T) + Send + 'static,
{
    fn attempt(&mut self, tx: &mut PgTx<'_>, now: i64) -> LedgerResult<()> {
        self.done = Some((self.work)(tx, now)?);
        Ok(())
    }

    fn committed(self: Box<Self>) {
        let Self {
            after_commit,
            answer,
            done,
            ..
        } = *self;
        match done {
            Some(done) => {
                after_commit(&done);
                let _ = answer.send(Ok(done));
            }
            None => {
                let _ = answer.send(Err(LedgerError::Storage(
                    "a grouped write committed without running".to_owned(),
                )));
            }
        }
    }

    fn fail(self: Box<Self>, error: LedgerError) {
        let _ = self.answer.send(Err(error));
    }

    fn alone(self: Box<Self>, worker: &mut Worker) {
        let Self {
            work,
            after_commit,
            answer,
            ..
        } = *self;
        let result = worker.transaction(super::pool::Access::Write, &work);
        if let Ok(done) = &result {
            after_commit(done);
        }
        let _ = answer.send(result);
    }
}

/// How a group's one attempt ended.
enum Ended {
    Committed,
    /// Rolled back: each write runs again alone.
    RolledBack,
    /// The answer to `COMMIT` was lost: the group may have committed.
    LostCommit(LedgerError),
    /// No connection could be opened: each write would only wait for the same.
    Unreachable(LedgerError),
}

/// Runs `writes` (several: one alone is run alone) in one transaction.
pub(super) fn run(worker: &mut Worker, mut writes: Vec<Box<dyn GroupWrite>>) {
    if writes.len() < 2 {
        if let Some(write) = writes.pop() {
            write.alone(worker);
        }
        return;
    }
    match attempt(worker, &mut writes) {
        Ended::Committed => writes.into_iter().for_each(|w| w.committed()),
        Ended::RolledBack => writes.into_iter().for_each(|w| w.alone(worker)),
        Ended::LostCommit(error) => {
            tracing::warn!(%error, writes = writes.len(), "lost the answer to a group's commit");
            writes.into_iter().for_each(|w| w.fail(error.clone()));
        }
        Ended::Unreachable(error) => writes.into_iter().for_each(|w| w.fail(error.clone())),
    }
}

fn attempt(worker: &mut Worker, writes: &mut [Box<dyn GroupWrite>]) -> Ended {
    let now = worker.now_millis();
    let connection = match worker.connection() {
        Ok(connection) => connection,
        Err(error) => return Ended::Unreachable(error),
    };
    let mut tx = PgTx::new(connection, BEGIN_WRITE);
    for write in writes.iter_mut() {
        if write.attempt(&mut tx, now).is_err() {
            let lost = tx.failure() == Some(Failure::Connection);
            tx.rollback();
            if lost {
                worker.drop_connection();
            }
            return Ended::RolledBack;
        }
    }
    match tx.commit() {
        Ok(()) => Ended::Committed,
        Err(Committing::Before(_)) => Ended::RolledBack,
        Err(Committing::At(e)) => {
            worker.drop_connection();
            Ended::LostCommit(to_ledger(&e))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::super::pool::{Access, Pool, QueueLimits};
    use super::super::test_database;
    use super::super::tx::get;
    use super::*;
    use crate::clock::Clock;

    /// A write's work, boxed so that one test can queue different ones.
    type Work<T> = Box<dyn Fn(&mut PgTx<'_>, i64) -> LedgerResult<T> + Send>;

    /// A pool of one worker on a schema of its own, and what keeps the schema named.
    fn one_worker() -> Option<(Arc<Pool>, tempfile::TempDir)> {
        if !test_database::available() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let options = test_database::options_for(dir.path(), Clock::system());
        let limits = QueueLimits {
            commands: 64,
            bytes: 1 << 20,
        };
        let pool = Pool::start("test", &options.database, 1, limits, &options.clock).unwrap();
        Some((pool, dir))
    }

    /// Runs `writes` on `pool` queued behind a job that holds its only worker, so that
    /// they wait together; their answers.
    fn queued_together<T: Send + 'static>(
        pool: &Pool,
        writes: Vec<(&str, Work<T>)>,
    ) -> Vec<LedgerResult<T>> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (release, held) = std::sync::mpsc::channel::<()>();
            let busy = pool.submit(None, move |_| {
                let _ = held.recv();
                Ok(())
            });
            let answers: Vec<_> = writes
                .into_iter()
                .map(|(lane, work)| {
                    pool.run(
                        Some(lane),
                        Access::Write,
                        1,
                        move |tx, now| work(tx, now),
                        |_| {},
                    )
                })
                .collect();
            release.send(()).unwrap();
            busy.await.unwrap();
            futures::future::join_all(answers).await
        })
    }

    fn close(pool: &Pool) {
        futures::executor::block_on(pool.close());
    }

    #[test]
    fn writes_waiting_together_commit_in_one_transaction() {
        let Some((pool, _dir)) = one_worker() else {
            return;
        };
        let txid = |tx: &mut PgTx<'_>, _: i64| -> LedgerResult<i64> {
            let row = tx.row("SELECT txid_current()", &[])?;
            get(row.as_ref().expect("a row"), 0)
        };
        let ids = queued_together(
            &pool,
            vec![
                ("a", Box::new(txid)),
                ("b", Box::new(txid)),
                ("c", Box::new(txid)),
            ],
        );
        let ids: Vec<i64> = ids.into_iter().map(Result::unwrap).collect();
        assert_eq!(ids.len(), 3);
        assert!(
            ids.iter().all(|id| *id == ids[0]),
            "one transaction: {ids:?}"
        );
        close(&pool);
    }

    #[test]
    fn a_refused_write_costs_its_group_a_rerun_and_nothing_else() {
        let Some((pool, _dir)) = one_worker() else {
            return;
        };
        let setup: Work<()> =
            Box::new(|tx, _| tx.exec("CREATE TABLE grouped (n INT)", &[]).map(|_| ()));
        assert!(queued_together(&pool, vec![("setup", setup)])[0].is_ok());
        let insert = |n: i32| -> Work<i64> {
            Box::new(move |tx, _| {
                tx.exec("INSERT INTO grouped VALUES ($1)", &[&n])?;
                if n == 2 {
                    return Err(LedgerError::Revoked);
                }
                let row = tx.row("SELECT txid_current()", &[])?;
                get(row.as_ref().expect("a row"), 0)
            })
        };
        let answers = queued_together(
            &pool,
            vec![("a", insert(1)), ("b", insert(2)), ("c", insert(3))],
        );
        assert!(
            matches!(answers[1], Err(LedgerError::Revoked)),
            "{:?}",
            answers[1]
        );
        let (first, third) = (answers[0].clone().unwrap(), answers[2].clone().unwrap());
        assert_ne!(first, third, "after the refusal each ran alone");
        let count: Work<Vec<i32>> = Box::new(|tx, _| {
            tx.rows("SELECT n FROM grouped ORDER BY n", &[])?
                .iter()
                .map(|row| get(row, 0))
                .collect()
        });
        let rows = queued_together(&pool, vec![("count", count)])
            .remove(0)
            .unwrap();
        assert_eq!(
            rows,
            vec![1, 3],
            "each write once, the refused one not at all"
        );
        close(&pool);
    }
}
