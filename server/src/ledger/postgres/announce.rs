//! Tells the other nodes what this node committed: after each commit the change is
//! handed to one thread per node, which sends every change gathered since its last
//! send as notifications in one statement, on a connection of its own.
//!
//! Not from the committing transaction: PostgreSQL serializes the commits of
//! transactions that notify (they take one lock on the notification queue and hold it
//! until their commit is on disk), so with a `NOTIFY` in every append, appends to
//! different shares stopped sharing disk flushes. Measured with pgbench, 16 clients of
//! one insert per transaction: 3,500 transactions/s without `NOTIFY`, 1,100 with it.
//! Here the node's only notifying transactions are its announcer's, which write
//! nothing else and do not wait for the disk (`synchronous_commit = off`).
//!
//! What this costs: a change reaches the other nodes one round trip after its commit,
//! and the changes of a node that dies between its commit and its announcement are
//! not announced; followers on other nodes see those ops at their next periodic check
//! (`--follow-recheck`), as after any lost notification.

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use postgres::{Client, Statement};

use super::connect::Database;
use super::notify::Channel;
use crate::ledger::Changed;

/// The wait before sending again after the database could not be reached, doubling
/// up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The sending end; the thread stops (sending what is left, if it can) when this drops.
pub(super) struct Announcer {
    shared: Arc<Shared>,
    channel: Channel,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
}

/// Changes not announced yet, each once: at most one entry per share.
#[derive(Default)]
struct Pending {
    payloads: BTreeSet<String>,
    stop: bool,
}

impl Announcer {
    pub(super) fn start(database: Database, channel: Channel) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (thread, on) = (Arc::clone(&shared), channel.clone());
        std::thread::Builder::new()
            .name("capsync-pg-announce".to_owned())
            .spawn(move || announce(&database, &on, &thread))?;
        Ok(Self { shared, channel })
    }

    /// Announces `changed` to the other nodes, soon.
    pub(super) fn announce(&self, changed: &Changed) {
        let payload = self.channel.payload(changed);
        let mut pending = self.shared.pending();
        pending.payloads.insert(payload);
        self.shared.wake.notify_one();
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.shared.pending().stop = true;
        self.shared.wake.notify_one();
    }
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn announce(database: &Database, channel: &Channel, shared: &Shared) {
    let mut client: Option<(Client, Statement)> = None;
    let mut backoff = FIRST_BACKOFF;
    loop {
        let (payloads, stopping) = {
            let mut pending = shared.pending();
            while pending.payloads.is_empty() && !pending.stop {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            (std::mem::take(&mut pending.payloads), pending.stop)
        };
        if !payloads.is_empty() {
            match send(database, &mut client, channel, &payloads) {
                Ok(()) => backoff = FIRST_BACKOFF,
                Err(e) => {
                    client = None;
                    if stopping {
                        return;
                    }
                    tracing::warn!(error = %e, "cannot announce changes to the other nodes");
                    // Kept, merged with what arrives meanwhile, and sent once it can be.
                    shared.pending().payloads.extend(payloads);
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Sends `payloads` as notifications on `channel`, connecting first if needed.
fn send(
    database: &Database,
    client: &mut Option<(Client, Statement)>,
    channel: &Channel,
    payloads: &BTreeSet<String>,
) -> Result<(), String> {
    if client.as_ref().is_none_or(|(c, _)| c.is_closed()) {
        let mut connected = database.connect().map_err(|e| e.to_string())?;
        // Nothing to keep durable here: a notification lives in memory only.
        connected
            .batch_execute("SET synchronous_commit = off")
            .map_err(|e| e.to_string())?;
        let statement = connected
            .prepare("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
            .map_err(|e| e.to_string())?;
        *client = Some((connected, statement));
    }
    let (client, statement) = client.as_mut().expect("connected above");
    let payloads: Vec<&str> = payloads.iter().map(String::as_str).collect();
    client
        .execute(&*statement, &[&channel.name(), &payloads])
        .map(|_| ())
        .map_err(|e| e.to_string())
}
