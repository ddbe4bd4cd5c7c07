//! The node services of several server processes on one PostgreSQL database.
//!
//! - Leadership ([`AdvisoryLead`]): a session-level advisory lock, held on a connection
//!   of its own. The node holding it runs the lifecycle; when its connection (or the
//!   node) dies, PostgreSQL releases the lock and another node takes it at its next round.
//! - Presence ([`SharedPresence`]): each node counts its own writers in memory and
//!   publishes them, with a heartbeat, to the `presence` and `nodes` tables every
//!   `--node-heartbeat` (1 s); it reads the other live nodes' rows at the same pace. A
//!   node whose heartbeat is older than `--node-timeout` (15 s) counts as dead: its writers count
//!   as gone since its last heartbeat, so a killed node leaves nobody "connected".
//! - Failed-redeem limits stay per node ([`crate::rate_limit`]): with `n` nodes behind
//!   a load balancer a guesser gets at most `n` times one node's budget, and each node
//!   still bounds the argon2 work it does.
//!
//! Every connection here lives and dies on a thread of its own: the synchronous
//! PostgreSQL client must not be dropped inside an async context.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use capsync_shared::ShareId;
use futures::FutureExt;
use futures::future::BoxFuture;
use postgres::Client;
use tokio::sync::{oneshot, watch};

use super::Leadership;
use crate::clock::Clock;
use crate::ledger::postgres::Database;
use crate::presence::{LocalPresence, PresenceBoard, WriterStatus};

/// A dead node's rows are deleted after this long.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Lifecycle leadership by a session-level advisory lock.
pub struct AdvisoryLead {
    /// Asks the lock's thread whether it holds the lock (taking it if free).
    requests: Mutex<mpsc::Sender<oneshot::Sender<bool>>>,
}

impl AdvisoryLead {
    /// Starts the thread that holds (or waits for) the lock; it connects when first asked.
    pub fn start(database: Database) -> std::io::Result<Self> {
        let (requests, asked) = mpsc::channel::<oneshot::Sender<bool>>();
        std::thread::Builder::new()
            .name("capsync-pg-lead".to_owned())
            .spawn(move || {
                let mut client: Option<Client> = None;
                let mut holding = false;
                // Ends when the node drops its services; the lock goes with the connection.
                for reply in asked {
                    holding = lead(&database, &mut client, holding);
                    let _ = reply.send(holding);
                }
            })?;
        Ok(Self {
            requests: Mutex::new(requests),
        })
    }
}

/// Whether this node holds the lock now: checks that the connection holding it still
/// works, or tries to take the lock (on a new connection if the old one broke).
fn lead(database: &Database, client: &mut Option<Client>, holding: bool) -> bool {
    if client.as_ref().is_some_and(Client::is_closed) {
        *client = None;
    }
    if client.is_none() {
        match database.connect() {
            Ok(connected) => *client = Some(connected),
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach the database to lead the lifecycle");
                return false;
            }
        }
    }
    let Some(connection) = client.as_mut() else {
        return false;
    };
    let answer = if holding && client_holds(connection) {
        Ok(true)
    } else {
        connection
            .query_one(
                "SELECT pg_try_advisory_lock(hashtextextended('capsync-lead:' || current_schema(), 0))",
                &[],
            )
            .map(|row| row.get::<_, bool>(0))
    };
    match answer {
        Ok(now_holding) => {
            if now_holding && !holding {
                tracing::info!("this node now runs the lifecycle");
            }
            now_holding
        }
        Err(e) => {
            tracing::warn!(error = %e, "lost the connection that leads the lifecycle");
            *client = None;
            false
        }
    }
}

/// Whether the connection is alive (and so still holds its session's locks).
fn client_holds(client: &mut Client) -> bool {
    client.simple_query("SELECT 1").is_ok()
}

impl Leadership for AdvisoryLead {
    fn lead(&self) -> BoxFuture<'static, bool> {
        let (reply, answer) = oneshot::channel();
        let sent = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(reply)
            .is_ok();
        if !sent {
            return futures::future::ready(false).boxed();
        }
        async move { answer.await.unwrap_or(false) }.boxed()
    }
}

/// Writer presence of every node: this node's in memory, the others' as last read.
pub struct SharedPresence {
    local: LocalPresence,
    /// Other nodes' writers by share, merged.
    others: Mutex<HashMap<ShareId, WriterStatus>>,
    /// Shares whose local status changed since it was last published.
    dirty: Mutex<HashSet<ShareId>>,
    changed: watch::Sender<u64>,
    stop: AtomicBool,
}

impl SharedPresence {
    /// Starts publishing this node's writers as `node` and reading the others', every
    /// `heartbeat`; nodes silent for `timeout` count as gone.
    pub fn start(
        database: Database,
        node: String,
        clock: Clock,
        heartbeat: Duration,
        timeout: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let presence = Arc::new(Self {
            local: LocalPresence::default(),
            others: Mutex::default(),
            dirty: Mutex::default(),
            changed: watch::channel(0).0,
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&presence);
        std::thread::Builder::new()
            .name("capsync-pg-presence".to_owned())
            .spawn(move || {
                let mut client: Option<Client> = None;
                let mut published_all = false;
                loop {
                    let Some(presence) = weak.upgrade() else {
                        return;
                    };
                    if presence.stop.load(Ordering::Acquire) {
                        presence.leave(&mut client, &node);
                        return;
                    }
                    if client.as_ref().is_some_and(Client::is_closed) {
                        client = None;
                    }
                    if client.is_none() {
                        client = database.connect().ok();
                        // A new connection: publish everything again.
                        published_all = false;
                    }
                    if let Some(connection) = client.as_mut() {
                        match presence.exchange(
                            connection,
                            &node,
                            clock.now_millis(),
                            timeout,
                            !published_all,
                        ) {
                            Ok(()) => published_all = true,
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot share writer presence");
                                client = None;
                            }
                        }
                    }
                    drop(presence);
                    std::thread::sleep(heartbeat);
                }
            })?;
        Ok(presence)
    }

    /// Stops sharing: the node's rows are removed at the thread's next round.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn mark(&self, share: &ShareId) {
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(share.clone());
        self.bump();
    }

    /// One round: heartbeat, this node's changed writers out, the others' in.
    fn exchange(
        &self,
        client: &mut Client,
        node: &str,
        now: i64,
        timeout: Duration,
        everything: bool,
    ) -> Result<(), postgres::Error> {
        let dirty: Vec<ShareId> = if everything {
            self.local
                .all()
                .into_iter()
                .map(|(share, _)| share)
                .collect()
        } else {
            std::mem::take(&mut *self.dirty.lock().unwrap_or_else(PoisonError::into_inner))
                .into_iter()
                .collect()
        };
        let published = (|| {
            let mut tx = client.transaction()?;
            tx.execute(
                "INSERT INTO nodes (id, heartbeat_at) VALUES ($1, $2)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at",
                &[&node, &now],
            )?;
            for share in &dirty {
                let status = self.local.status(share);
                tx.execute(
                    "INSERT INTO presence (node_id, share_id, writers, last_disconnect, last_sync)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (node_id, share_id) DO UPDATE
                     SET writers = excluded.writers, last_disconnect = excluded.last_disconnect,
                         last_sync = excluded.last_sync",
                    &[
                        &node,
                        &share.as_str(),
                        &i64::try_from(status.writers).unwrap_or(i64::MAX),
                        &status.last_disconnect,
                        &status.last_sync,
                    ],
                )?;
            }
            tx.execute(
                "DELETE FROM nodes WHERE heartbeat_at < $1",
                &[&(now - millis(FORGET_AFTER))],
            )?;
            tx.commit()
        })();
        if let Err(e) = published {
            // Published again next round.
            self.dirty
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .extend(dirty);
            return Err(e);
        }
        // A dead node's writers count as gone since its last heartbeat.
        let rows = client.query(
            "SELECT p.share_id,
                    coalesce(sum(p.writers) FILTER (WHERE n.heartbeat_at >= $2), 0)::bigint,
                    max(CASE WHEN n.heartbeat_at < $2 AND p.writers > 0 THEN n.heartbeat_at
                             ELSE p.last_disconnect END),
                    max(p.last_sync)
             FROM presence p JOIN nodes n ON n.id = p.node_id
             WHERE p.node_id <> $1
             GROUP BY p.share_id",
            &[&node, &(now - millis(timeout))],
        )?;
        let others: HashMap<ShareId, WriterStatus> = rows
            .iter()
            .map(|row| {
                (
                    ShareId::from(row.get::<_, String>(0)),
                    WriterStatus {
                        writers: usize::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                        last_disconnect: row.get(2),
                        last_sync: row.get(3),
                    },
                )
            })
            .collect();
        let mut known = self.others.lock().unwrap_or_else(PoisonError::into_inner);
        if *known != others {
            *known = others;
            drop(known);
            self.bump();
        }
        Ok(())
    }

    /// Removes this node's rows: its writers are gone with it.
    fn leave(&self, client: &mut Option<Client>, node: &str) {
        if let Some(connection) = client.as_mut()
            && let Err(e) = connection.execute("DELETE FROM nodes WHERE id = $1", &[&node])
        {
            tracing::warn!(error = %e, "could not remove this node's presence");
        }
    }
}

impl PresenceBoard for SharedPresence {
    fn connected(&self, share: &ShareId) {
        self.local.connected(share);
        self.mark(share);
    }

    fn disconnected(&self, share: &ShareId, at: i64) {
        self.local.disconnected(share, at);
        self.mark(share);
    }

    fn synced(&self, share: &ShareId, at: i64) -> bool {
        let newly = self.local.synced(share, at);
        if newly {
            self.mark(share);
        } else {
            // Published with the next round, without waking anyone.
            self.dirty
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(share.clone());
        }
        newly
    }

    fn status(&self, share: &ShareId) -> WriterStatus {
        let here = self.local.status(share);
        let Some(there) = self
            .others
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(share)
            .copied()
        else {
            return here;
        };
        WriterStatus {
            writers: here.writers + there.writers,
            last_disconnect: here.last_disconnect.max(there.last_disconnect),
            last_sync: here.last_sync.max(there.last_sync),
        }
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}
