//! `ShareViewer`: read-only access to one share (paged snapshot, ops since a
//! cursor, live subscription).

use std::rc::Rc;

use capsync_shared::Cursor;
use capsync_shared::capsync_capnp::share_viewer;
use capsync_shared::limits::{
    DEFAULT_OPS_PAGE, DEFAULT_SNAPSHOT_PAGE_BYTES, MAX_OPS_PAGE, MAX_SNAPSHOT_PAGE_BYTES,
};

use super::answer::answer;
use super::context::Context;
use super::{shares, subscription, wire};
use crate::error::ServerError;
use crate::ledger::{Authority, LedgerError};
use crate::presence::{PresenceView, last_change};

pub struct ViewerImpl {
    ctx: Rc<Context>,
    auth: Authority,
}

impl ViewerImpl {
    pub fn new(ctx: Rc<Context>, auth: Authority) -> Self {
        Self { ctx, auth }
    }
}

/// 0 means the default; anything above the cap is capped.
fn clamp(requested: u32, default: u32, max: u32) -> u32 {
    match requested {
        0 => default,
        n => n.min(max),
    }
}

/// `snapshot`'s page token and byte budget.
pub(super) fn read_snapshot(
    p: share_viewer::snapshot_params::Reader<'_>,
) -> Result<(String, u32), ServerError> {
    let max_bytes = clamp(
        p.get_max_bytes(),
        DEFAULT_SNAPSHOT_PAGE_BYTES,
        MAX_SNAPSHOT_PAGE_BYTES,
    );
    Ok((wire::text(p.get_page())?, max_bytes))
}

/// `opsSince`'s cursor and page size.
pub(super) fn read_ops_since(p: share_viewer::ops_since_params::Reader<'_>) -> (Cursor, u32) {
    let limit = clamp(p.get_limit(), DEFAULT_OPS_PAGE, MAX_OPS_PAGE);
    (Cursor(p.get_after()), limit)
}

impl share_viewer::Server for ViewerImpl {
    async fn snapshot(
        self: Rc<Self>,
        params: share_viewer::SnapshotParams,
        mut results: share_viewer::SnapshotResults,
    ) -> Result<(), capnp::Error> {
        let page = async {
            let (page, max_bytes) = read_snapshot(params.get()?)?;
            Ok::<_, ServerError>(
                self.ctx
                    .ledger
                    .snapshot_page(self.auth.clone(), page, max_bytes)
                    .await?,
            )
        }
        .await;
        answer!(results.get().init_result(), page, |page, ok| {
            wire::fill_snapshot(&page, ok)
        });
        Ok(())
    }

    async fn ops_since(
        self: Rc<Self>,
        params: share_viewer::OpsSinceParams,
        mut results: share_viewer::OpsSinceResults,
    ) -> Result<(), capnp::Error> {
        let page = async {
            let (after, limit) = read_ops_since(params.get()?);
            Ok::<_, ServerError>(
                self.ctx
                    .ledger
                    .ops_since(self.auth.clone(), after, limit)
                    .await?,
            )
        }
        .await;
        answer!(
            results.get().init_result(),
            page,
            |page, ok| wire::fill_ops(&page, ok)
        );
        Ok(())
    }

    async fn state(
        self: Rc<Self>,
        _params: share_viewer::StateParams,
        mut results: share_viewer::StateResults,
    ) -> Result<(), capnp::Error> {
        shares::state(&self.ctx, &self.auth, results.get().init_result()).await;
        Ok(())
    }

    async fn presence(
        self: Rc<Self>,
        _params: share_viewer::PresenceParams,
        mut results: share_viewer::PresenceResults,
    ) -> Result<(), capnp::Error> {
        let view = async {
            // Reading the state first also checks the viewer's authority.
            let state = self.ctx.ledger.share_state(self.auth.clone()).await?;
            let last_change = last_change(&state);
            Ok::<_, ServerError>(PresenceView::new(
                self.ctx.presence.status(&state.share_id),
                last_change,
                self.ctx.interrupted_after_ms,
                self.ctx.ledger.clock().now_millis(),
            ))
        }
        .await;
        answer!(results.get().init_result(), view, |view, ok| {
            wire::fill_presence(&view, ok)
        });
        Ok(())
    }

    async fn subscribe(
        self: Rc<Self>,
        params: share_viewer::SubscribeParams,
        mut results: share_viewer::SubscribeResults,
    ) -> Result<(), capnp::Error> {
        let started = async {
            let p = params.get()?;
            let from = Cursor(p.get_from_cursor());
            let listener = p.get_listener()?;
            // Checked here so a revoked viewer or a bad cursor gets a `failure`
            // answer instead of a subscription that ends at once.
            let state = self.ctx.ledger.share_state(self.auth.clone()).await?;
            // The same rule and answer as `opsSince` (see the schema).
            if from > state.cursor {
                return Err(LedgerError::CursorAhead {
                    asked: from,
                    cursor: state.cursor,
                }
                .into());
            }
            // The compaction point is never past the share's cursor, so only a
            // subscriber that is behind can be below it; the ledger answers
            // `SnapshotRequired` for that, and reading one op is the cheapest ask.
            if from < state.cursor {
                self.ctx
                    .ledger
                    .ops_since(self.auth.clone(), from, 1)
                    .await?;
            }
            let guard = self.ctx.begin_subscription()?;
            Ok::<_, ServerError>(subscription::start(
                &self.ctx,
                guard,
                self.auth.clone(),
                from,
                listener,
            ))
        }
        .await;
        let mut result = results.get().init_result();
        match started {
            Ok(handle) => result.set_ok(handle),
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }
}
