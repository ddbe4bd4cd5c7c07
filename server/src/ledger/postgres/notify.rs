//! Changes across nodes: each node announces its commits on a channel of the
//! database ([`super::announce`]), and one listener per node turns the other nodes'
//! notifications into the node's own [`Changed`] announcements.
//!
//! A notification is delivered only to listeners connected at that moment. While the listener reconnects, notifications
//! are lost: after every reconnect it announces [`Changed::Missed`], and every
//! follower on the node reads again from its cursor, so no op is missed for long.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use capsync_shared::ShareId;
use postgres::fallible_iterator::FallibleIterator;
use tokio::sync::broadcast;

use super::connect::Database;
use crate::ledger::Changed;

/// How often the listener looks whether its node is closing while nothing arrives.
const POLL: Duration = Duration::from_millis(500);
/// The wait between attempts to reconnect, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One node's end of the channel: who it is, and where it notifies.
#[derive(Clone, Debug)]
pub(super) struct Channel {
    /// `capsync:<schema>`: nodes on other schemas of the database do not hear it.
    name: String,
    /// This node, so it skips its own notifications (it announced them itself).
    node: String,
}

impl Channel {
    pub(super) fn new(schema: &str, node: String) -> Self {
        Self {
            name: format!("capsync:{schema}"),
            node,
        }
    }

    /// The channel's name.
    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// What this node sends to announce `changed`.
    pub(super) fn payload(&self, changed: &Changed) -> String {
        let what = match changed {
            Changed::Ops { share, .. } => format!("ops {share}"),
            Changed::Share(id) => format!("share {id}"),
            Changed::Tokens => "tokens".to_owned(),
            Changed::Missed => "missed".to_owned(),
        };
        format!("{} {what}", self.node)
    }

    /// What another node's notification announces; `None` for this node's own or
    /// one that cannot be read.
    fn parse(&self, payload: &str) -> Option<Changed> {
        let (node, what) = payload.split_once(' ')?;
        if node == self.node {
            return None;
        }
        match what.split_once(' ') {
            Some(("ops", id)) => Some(Changed::Ops {
                share: ShareId::from(id),
                applied: None,
            }),
            Some(("share", id)) => Some(Changed::Share(ShareId::from(id))),
            _ if what == "tokens" => Some(Changed::Tokens),
            _ if what == "missed" => Some(Changed::Missed),
            _ => None,
        }
    }
}

/// The node's listener thread; stops within [`POLL`] once dropped.
pub(super) struct Listener {
    stop: Arc<AtomicBool>,
}

impl Listener {
    pub(super) fn start(
        database: Database,
        channel: Channel,
        changes: broadcast::Sender<Changed>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("capsync-pg-listen".to_owned())
            .spawn(move || listen(&database, &channel, &changes, &stopping))?;
        Ok(Self { stop })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

fn listen(
    database: &Database,
    channel: &Channel,
    changes: &broadcast::Sender<Changed>,
    stop: &AtomicBool,
) {
    let mut backoff = FIRST_BACKOFF;
    let mut connected_before = false;
    while !stop.load(Ordering::Acquire) {
        let mut client = match database.connect() {
            Ok(client) => client,
            Err(e) => {
                tracing::warn!(error = %e, "the change listener cannot reach the database");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let quoted = format!("\"{}\"", channel.name.replace('"', "\"\""));
        if let Err(e) = client.batch_execute(&format!("LISTEN {quoted}")) {
            tracing::warn!(error = %e, "the change listener cannot listen");
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
            continue;
        }
        backoff = FIRST_BACKOFF;
        if connected_before {
            tracing::info!("the change listener is back: every follower checks again");
            let _ = changes.send(Changed::Missed);
        }
        connected_before = true;
        let mut notifications = client.notifications();
        let mut arriving = notifications.timeout_iter(POLL);
        loop {
            if stop.load(Ordering::Acquire) {
                return;
            }
            match arriving.next() {
                Ok(Some(notification)) => {
                    if let Some(changed) = channel.parse(notification.payload()) {
                        // No receivers is fine: nobody follows anything on this node.
                        let _ = changes.send(changed);
                    }
                }
                // Nothing for a while.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "the change listener lost its connection");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_hears_the_others_and_not_itself() {
        let channel = Channel::new("public", "n1".to_owned());
        assert_eq!(channel.parse("n1 share sh_1"), None);
        assert_eq!(
            channel.parse("n2 share sh_1"),
            Some(Changed::Share(ShareId::from("sh_1")))
        );
        assert_eq!(channel.parse("n2 tokens"), Some(Changed::Tokens));
        assert_eq!(channel.parse("n2 missed"), Some(Changed::Missed));
        assert_eq!(channel.parse("n2 nonsense"), None);
        assert_eq!(channel.parse("garbage"), None);
        let other = Channel::new("public", "n2".to_owned());
        for changed in [
            Changed::Ops {
                share: ShareId::from("sh_1"),
                applied: None,
            },
            Changed::Share(ShareId::from("sh_1")),
            Changed::Tokens,
            Changed::Missed,
        ] {
            assert_eq!(channel.parse(&other.payload(&changed)), Some(changed));
        }
    }
}
