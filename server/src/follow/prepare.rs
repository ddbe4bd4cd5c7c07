//! What a feed prepares once for every follower that wants it. The HTTP
//! gateway's event streams send each op rendered (its text as HTML), and that
//! work is the same for every stream of a share, so the share's feed does it,
//! on a blocking thread.

use std::sync::Arc;

use capsync_shared::{Cursor, ShareId};

use crate::ledger::{Ledger, LoggedOp};

/// A share's preparation state, handed every op its feed reads, in cursor order.
/// Its methods run on a blocking thread.
pub trait Prepare: Send + 'static {
    /// What to send for each of `ops`; or, with nothing changed, the ids of the
    /// parts whose stored JSON it needs first (see [`Prepare::learn`]).
    fn prepare(&mut self, ops: &[LoggedOp]) -> Result<Vec<Arc<str>>, Vec<String>>;

    /// The stored JSON of parts it asked for, which includes every op up to
    /// `as_of`; ids in `asked` but not in `found` do not exist.
    fn learn(&mut self, asked: Vec<String>, found: Vec<(String, String)>, as_of: Cursor);
}

/// Makes the state of a feed that starts preparing.
pub type Preparer = Arc<dyn Fn() -> Box<dyn Prepare> + Send + Sync>;

/// Lookups one page may ask for before the feed gives up preparing it.
const LOOKUPS: usize = 2;

/// Prepares `ops` of `share` with `state` off the runtime thread, looking parts up
/// as it asks. Returns the state (`None` when it missed ops and must start over)
/// and what it prepared, one per op (`None` when it could not).
pub(super) async fn prepare(
    ledger: &Ledger,
    share: &ShareId,
    mut state: Box<dyn Prepare>,
    ops: Arc<Vec<LoggedOp>>,
) -> (Option<Box<dyn Prepare>>, Option<Vec<Arc<str>>>) {
    for _ in 0..=LOOKUPS {
        let page = Arc::clone(&ops);
        let done = tokio::task::spawn_blocking(move || {
            let prepared = state.prepare(&page);
            (state, prepared)
        })
        .await;
        // A panic in rendering: nothing to hand out, and the state is gone.
        let Ok((returned, prepared)) = done else {
            return (None, None);
        };
        state = returned;
        let asked = match prepared {
            Ok(prepared) => return (Some(state), Some(prepared)),
            Err(asked) => asked,
        };
        match ledger.feed_parts(share.clone(), asked.clone()).await {
            Ok(found) => state.learn(asked, found.parts, found.cursor),
            Err(err) => {
                tracing::debug!(%share, %err, "the share's feed could not look up parts");
                return (None, None);
            }
        }
    }
    (None, None)
}
