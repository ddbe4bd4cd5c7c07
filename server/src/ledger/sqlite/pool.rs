//! The read side: a few read-only connections, each lent to one blocking task for one short read transaction.

use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::Connection;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::schema;
use crate::ledger::{LedgerError, LedgerResult};

pub(super) struct ReadPool {
    /// Connections not lent out. Holding a permit guarantees one is here.
    idle: Mutex<Vec<Connection>>,
    /// One permit per connection, so waiting for a connection is an async
    /// wait, never a blocked thread. Closed when the ledger closes.
    permits: Arc<Semaphore>,
}

impl ReadPool {
    pub fn open(path: &Path, connections: usize) -> LedgerResult<Arc<Self>> {
        let connections = connections.max(1);
        let idle = (0..connections)
            .map(|_| schema::open_reader(path))
            .collect::<LedgerResult<Vec<_>>>()?;
        Ok(Arc::new(Self {
            idle: Mutex::new(idle),
            permits: Arc::new(Semaphore::new(connections)),
        }))
    }

    /// Runs `read` in one read transaction on a pooled connection, on tokio's
    /// blocking pool. The transaction ends before the future resolves, so no
    /// snapshot outlives the call and WAL checkpoints are never held back.
    pub fn read<T, F>(
        self: &Arc<Self>,
        read: F,
    ) -> impl Future<Output = LedgerResult<T>> + Send + 'static
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> LedgerResult<T> + Send + 'static,
    {
        let pool = Arc::clone(self);
        async move {
            let permit = Arc::clone(&pool.permits)
                .acquire_owned()
                .await
                .map_err(|_| LedgerError::Closed)?;
            let conn = pool.lock_idle().pop().ok_or(LedgerError::Closed)?;
            let mut lease = Lease {
                conn: Some(conn),
                pool,
                _permit: permit,
            };
            tokio::task::spawn_blocking(move || lease.read(read))
                .await
                .map_err(|e| LedgerError::Storage(format!("read task failed: {e}")))?
        }
    }

    /// Refuses new reads; connections are closed as their current reads end.
    pub fn close(&self) {
        self.permits.close();
        self.lock_idle().clear();
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        // The vector stays consistent even if a holder panicked: push and pop only.
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A connection on loan; goes back to the pool when dropped, even if the read panicked.
struct Lease {
    conn: Option<Connection>,
    pool: Arc<ReadPool>,
    /// Released after the connection is back in `idle`.
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    fn read<T>(&mut self, read: impl FnOnce(&Connection) -> LedgerResult<T>) -> LedgerResult<T> {
        let conn = self.conn.as_mut().ok_or(LedgerError::Closed)?;
        let tx = conn.transaction()?;
        let value = read(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !self.pool.permits.is_closed()
        {
            self.pool.lock_idle().push(conn);
        }
    }
}
