//! `Gateway`: the bootstrap capability. It holds no authority; it redeems sturdy refs.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use capsync_shared::TokenKind;
use capsync_shared::capsync_capnp::{gateway, redeemed};

use super::admin::AdminImpl;
use super::agent::AgentImpl;
use super::context::Context;
use super::viewer::ViewerImpl;
use super::wire;
use super::writer::WriterImpl;
use crate::error::ServerError;
use crate::net::ConnectionState;
use crate::redeem::{Redeemed, Via};

/// Redeems one connection may have in progress at once. A client redeems one
/// token, maybe a few; more at once only queue up argon2 work and memory.
pub const MAX_REDEEMS_IN_FLIGHT: usize = 4;

/// One per connection: knows the peer, for rate limiting and the audit log,
/// and tells the connection's reader once a redeem succeeded.
pub struct GatewayImpl {
    ctx: Rc<Context>,
    peer: SocketAddr,
    connection: Rc<ConnectionState>,
    /// Redeems of this connection between their call and their answer.
    in_flight: Cell<usize>,
}

impl GatewayImpl {
    pub fn new(ctx: Rc<Context>, peer: SocketAddr, connection: Rc<ConnectionState>) -> Self {
        Self {
            ctx,
            peer,
            connection,
            in_flight: Cell::new(0),
        }
    }

    /// Counts a redeem in progress until the guard drops; `None` when this
    /// connection has [`MAX_REDEEMS_IN_FLIGHT`] already.
    fn begin_redeem(&self) -> Option<RedeemSlot<'_>> {
        let now = self.in_flight.get();
        (now < MAX_REDEEMS_IN_FLIGHT).then(|| {
            self.in_flight.set(now + 1);
            RedeemSlot(&self.in_flight)
        })
    }
}

/// One redeem in progress on a connection.
struct RedeemSlot<'a>(&'a Cell<usize>);

impl Drop for RedeemSlot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

fn fill_capability(
    ctx: &Rc<Context>,
    redeemed: &Redeemed,
    mut out: redeemed::capability::Builder<'_>,
) {
    let auth = redeemed.authority();
    let stored = &redeemed.token;
    match stored.kind {
        TokenKind::Admin => out.set_admin(capnp_rpc::new_client(AdminImpl::new(ctx.clone(), auth))),
        TokenKind::Agent => out.set_agent(capnp_rpc::new_client(AgentImpl::new(ctx.clone(), auth))),
        TokenKind::Writer => out.set_writer(capnp_rpc::new_client(WriterImpl::new(
            ctx.clone(),
            auth,
            stored.expires_at,
        ))),
        TokenKind::Viewer => {
            out.set_viewer(capnp_rpc::new_client(ViewerImpl::new(ctx.clone(), auth)))
        }
    }
}

impl gateway::Server for GatewayImpl {
    async fn redeem(
        self: Rc<Self>,
        params: gateway::RedeemParams,
        mut results: gateway::RedeemResults,
    ) -> Result<(), capnp::Error> {
        let token = wire::text(params.get()?.get_token());
        let outcome = match (token, self.begin_redeem()) {
            (Err(err), _) => Err(err),
            (Ok(_), None) => Err(ServerError::overloaded(format!(
                "at most {MAX_REDEEMS_IN_FLIGHT} redeems at once per connection"
            ))),
            (Ok(token), Some(_slot)) => self.ctx.redeemer.redeem(&token, self.peer, Via::Rpc).await,
        };
        let result = results.get().init_result();
        match outcome {
            Ok(redeemed) => {
                self.connection.authenticate();
                let mut ok = result.init_ok();
                fill_capability(&self.ctx, &redeemed, ok.reborrow().init_capability());
                ok.set_token_id(redeemed.token.id.as_str());
                ok.set_expires_at(redeemed.token.expires_at.unwrap_or(0));
                // A writer capability orders pipelined batches (`Batch.after`).
                ok.set_orders_pipelined_batches(redeemed.token.kind == TokenKind::Writer);
                if let Some(state) = &redeemed.state {
                    wire::fill_state(state, ok.init_state());
                }
            }
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }
}
