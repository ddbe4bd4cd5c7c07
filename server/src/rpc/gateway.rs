//! `Gateway`: the bootstrap capability. It holds no authority; it redeems sturdy refs.

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
use crate::redeem::{Redeemed, Via};

/// One per connection: knows the peer, for rate limiting and the audit log.
pub struct GatewayImpl {
    ctx: Rc<Context>,
    peer: SocketAddr,
}

impl GatewayImpl {
    pub fn new(ctx: Rc<Context>, peer: SocketAddr) -> Self {
        Self { ctx, peer }
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
        let outcome = match token {
            Ok(token) => self.ctx.redeemer.redeem(&token, self.peer, Via::Rpc).await,
            Err(err) => Err(err),
        };
        let result = results.get().init_result();
        match outcome {
            Ok(redeemed) => {
                let mut ok = result.init_ok();
                fill_capability(&self.ctx, &redeemed, ok.reborrow().init_capability());
                ok.set_token_id(redeemed.token.id.as_str());
                ok.set_expires_at(redeemed.token.expires_at.unwrap_or(0));
                if let Some(state) = &redeemed.state {
                    wire::fill_state(state, ok.init_state());
                }
            }
            Err(err) => err.fill(result.init_failure()),
        }
        Ok(())
    }
}
