//! A small in-memory capsync server, to test the client's RPC plumbing and the CLI
//! without the real server (which lives in `server/` and has its own tests).
//!
//! It follows the schema's semantics closely enough for the client: tokens are real
//! `SturdyRef`s, epochs revoke, op ids dedupe forever, the cursor advances by one per
//! applied op, `part.upsert` needs its message, snapshot pages hold one record each so
//! paging is exercised. It is not a reference for the server: no persistence, no argon2.
#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::rc::Rc;

use capnp::capability::Rc as CapRc;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{RpcSystem, twoparty};
use capsync_shared::capsync_capnp::{
    ErrorCode, OpKind as WireKind, RecordKind, RejectReason, Scope, admin, agent, failure, gateway,
    share_state, share_viewer, share_writer,
};
use capsync_shared::{SturdyRef, TokenKind};
use futures::AsyncReadExt;
use tokio_util::compat::TokioAsyncReadCompatExt;

/// What one token stands for.
#[derive(Clone)]
struct TokenRow {
    kind: TokenKind,
    id: String,
    share: Option<String>,
    epoch: u32,
    expires_at: i64,
}

#[derive(Clone)]
struct Logged {
    cursor: u64,
    op_id: String,
    kind: WireKind,
    payload: String,
}

/// A stored record, keyed for snapshot order (session, models, diffs, messages+parts).
type RecordKey = (u8, String, String);

#[derive(Clone)]
struct StoredRecord {
    kind: RecordKind,
    id: String,
    message_id: String,
    json: String,
}

struct Share {
    id: String,
    session_id: String,
    title: String,
    owner: String,
    cursor: u64,
    writer_epoch: u32,
    viewer_epoch: u32,
    ledger: Vec<Logged>,
    applied: HashMap<String, u64>,
    records: BTreeMap<RecordKey, StoredRecord>,
}

#[derive(Default)]
pub struct World {
    tokens: HashMap<String, TokenRow>,
    shares: BTreeMap<String, Share>,
    next_share: u64,
    /// Test hook: while > 0, serving a snapshot page after the first applies a filler op
    /// (so the client sees the cursor move) and decrements.
    pub churn: u32,
    /// The admin token, minted at start.
    pub admin_token: String,
}

impl World {
    fn mint(
        &mut self,
        kind: TokenKind,
        share: Option<String>,
        epoch: u32,
        expires_at: i64,
    ) -> (String, String) {
        let token = SturdyRef::generate(kind);
        let text = token.expose();
        self.tokens.insert(
            text.clone(),
            TokenRow {
                kind,
                id: token.id.to_string(),
                share,
                epoch,
                expires_at,
            },
        );
        (text, token.id.to_string())
    }
}

type Shared = Rc<RefCell<World>>;

fn fail(mut f: failure::Builder<'_>, code: ErrorCode, message: &str) {
    f.set_code(code);
    f.set_message(message);
}

fn set_state(mut b: share_state::Builder<'_>, share: &Share) {
    b.set_share_id(share.id.as_str());
    b.set_cursor(share.cursor);
    b.set_writer_epoch(share.writer_epoch);
    b.set_viewer_epoch(share.viewer_epoch);
}

fn text(r: capnp::Result<capnp::text::Reader<'_>>) -> capnp::Result<String> {
    Ok(r?.to_str()?.to_owned())
}

// ---------------------------------------------------------------------------

struct GatewayImpl {
    world: Shared,
}

impl gateway::Server for GatewayImpl {
    async fn redeem(
        self: CapRc<Self>,
        params: gateway::RedeemParams,
        mut results: gateway::RedeemResults,
    ) -> Result<(), capnp::Error> {
        let token = text(params.get()?.get_token())?;
        let world = self.world.borrow();
        let result = results.get().init_result();
        let Some(row) = world.tokens.get(token.trim()).cloned() else {
            fail(
                result.init_failure(),
                ErrorCode::PermissionDenied,
                "token not accepted",
            );
            return Ok(());
        };
        let share = row.share.as_ref().and_then(|id| world.shares.get(id));
        let current = share.map(|s| match row.kind {
            TokenKind::Writer => s.writer_epoch,
            _ => s.viewer_epoch,
        });
        if row.share.is_some() && current != Some(row.epoch) {
            fail(
                result.init_failure(),
                ErrorCode::PermissionDenied,
                "token not accepted",
            );
            return Ok(());
        }
        let mut ok = result.init_ok();
        ok.set_token_id(row.id.as_str());
        ok.set_expires_at(row.expires_at);
        if let Some(share) = share {
            set_state(ok.reborrow().init_state(), share);
        }
        let world_rc = self.world.clone();
        let mut cap = ok.init_capability();
        match row.kind {
            TokenKind::Admin => cap.set_admin(capnp_rpc::new_client(AdminImpl { world: world_rc })),
            TokenKind::Agent => cap.set_agent(capnp_rpc::new_client(AgentImpl {
                world: world_rc,
                token_id: row.id.clone(),
            })),
            TokenKind::Writer => cap.set_writer(capnp_rpc::new_client(WriterImpl {
                world: world_rc,
                share: row.share.clone().unwrap(),
                epoch: row.epoch,
                expires_at: row.expires_at,
            })),
            TokenKind::Viewer => cap.set_viewer(capnp_rpc::new_client(ViewerImpl {
                world: world_rc,
                share: row.share.clone().unwrap(),
                epoch: row.epoch,
            })),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

struct AdminImpl {
    world: Shared,
}

impl admin::Server for AdminImpl {
    async fn mint_agent(
        self: CapRc<Self>,
        params: admin::MintAgentParams,
        mut results: admin::MintAgentResults,
    ) -> Result<(), capnp::Error> {
        let expires_at = params.get()?.get_expires_at();
        let (token, id) = self
            .world
            .borrow_mut()
            .mint(TokenKind::Agent, None, 0, expires_at);
        let mut ok = results.get().init_result().init_ok();
        ok.set_token(token.as_str());
        ok.set_token_id(id.as_str());
        ok.set_expires_at(expires_at);
        Ok(())
    }

    async fn revoke_share(
        self: CapRc<Self>,
        params: admin::RevokeShareParams,
        mut results: admin::RevokeShareResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let share_id = text(params.get_share_id())?;
        let scope = params.get_scope()?;
        let mut world = self.world.borrow_mut();
        let result = results.get().init_result();
        match world.shares.get_mut(&share_id) {
            None => fail(result.init_failure(), ErrorCode::NotFound, "no such share"),
            Some(share) => {
                if matches!(scope, Scope::Writers | Scope::All) {
                    share.writer_epoch += 1;
                }
                if matches!(scope, Scope::Viewers | Scope::All) {
                    share.viewer_epoch += 1;
                }
                set_state(result.init_ok(), share);
            }
        }
        Ok(())
    }

    async fn list_shares(
        self: CapRc<Self>,
        params: admin::ListSharesParams,
        mut results: admin::ListSharesResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        list_shares(
            &self.world.borrow(),
            None,
            &text(params.get_after())?,
            params.get_limit(),
            results.get().init_result(),
        );
        Ok(())
    }
}

/// One page of shares, optionally only those `owner` created.
fn list_shares(
    world: &World,
    owner: Option<&str>,
    after: &str,
    limit: u32,
    result: capsync_shared::capsync_capnp::share_list_result::Builder<'_>,
) {
    let limit = match limit {
        0 => 100,
        n => n as usize,
    };
    let page: Vec<&Share> = world
        .shares
        .values()
        .filter(|s| s.id.as_str() > after && owner.is_none_or(|o| s.owner == o))
        .take(limit + 1)
        .collect();
    let more = page.len() > limit;
    let page = &page[..page.len().min(limit)];
    let mut ok = result.init_ok();
    if more {
        ok.set_next_after(page.last().unwrap().id.as_str());
    }
    let mut list = ok.init_shares(page.len() as u32);
    for (i, share) in page.iter().enumerate() {
        let mut info = list.reborrow().get(i as u32);
        set_state(info.reborrow().init_state(), share);
        info.set_session_id(share.session_id.as_str());
        info.set_title(share.title.as_str());
        info.set_owner_token_id(share.owner.as_str());
    }
}

// ---------------------------------------------------------------------------

struct AgentImpl {
    world: Shared,
    token_id: String,
}

impl agent::Server for AgentImpl {
    async fn create_share(
        self: CapRc<Self>,
        params: agent::CreateShareParams,
        mut results: agent::CreateShareResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let session_id = text(params.get_session_id())?;
        let title = text(params.get_title())?;
        let viewer_expires_at = params.get_viewer_expires_at();
        let mut world = self.world.borrow_mut();
        if session_id.is_empty() {
            fail(
                results.get().init_result().init_failure(),
                ErrorCode::InvalidArgument,
                "sessionId is empty",
            );
            return Ok(());
        }
        world.next_share += 1;
        let id = format!("sh_{:04}", world.next_share);
        world.shares.insert(
            id.clone(),
            Share {
                id: id.clone(),
                session_id: session_id.clone(),
                title,
                owner: self.token_id.clone(),
                cursor: 0,
                writer_epoch: 0,
                viewer_epoch: 0,
                ledger: Vec::new(),
                applied: HashMap::new(),
                records: BTreeMap::new(),
            },
        );
        let (writer_token, writer_id) = world.mint(TokenKind::Writer, Some(id.clone()), 0, 0);
        let (viewer_token, viewer_id) =
            world.mint(TokenKind::Viewer, Some(id.clone()), 0, viewer_expires_at);
        let share = &world.shares[&id];
        let mut ok = results.get().init_result().init_ok();
        ok.set_writer(capnp_rpc::new_client(WriterImpl {
            world: self.world.clone(),
            share: id.clone(),
            epoch: 0,
            expires_at: 0,
        }));
        {
            let mut t = ok.reborrow().init_writer_token();
            t.set_token(writer_token.as_str());
            t.set_token_id(writer_id.as_str());
        }
        {
            let mut t = ok.reborrow().init_viewer_token();
            t.set_token(viewer_token.as_str());
            t.set_token_id(viewer_id.as_str());
            t.set_expires_at(viewer_expires_at);
        }
        let mut info = ok.init_info();
        set_state(info.reborrow().init_state(), share);
        info.set_session_id(session_id.as_str());
        info.set_title(share.title.as_str());
        info.set_owner_token_id(self.token_id.as_str());
        Ok(())
    }

    async fn list_shares(
        self: CapRc<Self>,
        params: agent::ListSharesParams,
        mut results: agent::ListSharesResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        list_shares(
            &self.world.borrow(),
            Some(&self.token_id),
            &text(params.get_after())?,
            params.get_limit(),
            results.get().init_result(),
        );
        Ok(())
    }

    async fn revoke_share(
        self: CapRc<Self>,
        params: agent::RevokeShareParams,
        mut results: agent::RevokeShareResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let share_id = text(params.get_share_id())?;
        let scope = params.get_scope()?;
        let mut world = self.world.borrow_mut();
        let result = results.get().init_result();
        match world.shares.get_mut(&share_id) {
            Some(share) if share.owner == self.token_id => {
                if matches!(scope, Scope::Writers | Scope::All) {
                    share.writer_epoch += 1;
                }
                if matches!(scope, Scope::Viewers | Scope::All) {
                    share.viewer_epoch += 1;
                }
                set_state(result.init_ok(), share);
            }
            _ => fail(result.init_failure(), ErrorCode::NotFound, "no such share"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

struct WriterImpl {
    world: Shared,
    share: String,
    epoch: u32,
    expires_at: i64,
}

impl WriterImpl {
    /// `Err(message)` when the capability no longer works.
    fn check(&self, world: &World) -> Result<(), (ErrorCode, &'static str)> {
        match world.shares.get(&self.share) {
            None => Err((ErrorCode::NotFound, "the share is gone")),
            Some(s) if s.writer_epoch != self.epoch => Err((ErrorCode::Revoked, "writer revoked")),
            Some(_) => Ok(()),
        }
    }
}

/// Applies one op to a share; the op's outcome.
enum Outcome {
    Applied(u64),
    Duplicate(u64),
    Rejected(RejectReason, String),
}

fn apply(
    share: &mut Share,
    op_id: &str,
    kind: WireKind,
    payload: &str,
    depends_on: &[String],
) -> Outcome {
    if let Some(&cursor) = share.applied.get(op_id) {
        return Outcome::Duplicate(cursor);
    }
    let Ok(json) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Outcome::Rejected(RejectReason::Invalid, "payload is not JSON".into());
    };
    if let Some(missing) = depends_on.iter().find(|d| !share.applied.contains_key(*d)) {
        return Outcome::Rejected(
            RejectReason::MissingDependency,
            format!("{missing} not applied"),
        );
    }
    let id = json
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_owned();
    let record = |kind, id: &str, message_id: &str| StoredRecord {
        kind,
        id: id.to_owned(),
        message_id: message_id.to_owned(),
        json: payload.to_owned(),
    };
    match kind {
        WireKind::SessionUpsert => {
            if id != share.session_id {
                return Outcome::Rejected(RejectReason::Invalid, "not this share's session".into());
            }
            share.records.insert(
                (0, String::new(), String::new()),
                record(RecordKind::Session, "", ""),
            );
        }
        WireKind::ModelUpsert => {
            share.records.insert(
                (1, id.clone(), String::new()),
                record(RecordKind::Model, &id, ""),
            );
        }
        WireKind::DiffSet => {
            let diffs = json.get("diffs").cloned().unwrap_or(json.clone());
            share.records.insert(
                (2, String::new(), String::new()),
                StoredRecord {
                    kind: RecordKind::Diffs,
                    id: String::new(),
                    message_id: String::new(),
                    json: diffs.to_string(),
                },
            );
        }
        WireKind::MessageUpsert => {
            if id.is_empty() {
                return Outcome::Rejected(RejectReason::Invalid, "message has no id".into());
            }
            share.records.insert(
                (3, id.clone(), String::new()),
                record(RecordKind::Message, &id, ""),
            );
        }
        WireKind::PartUpsert => {
            let message_id = json
                .get("messageID")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_owned();
            if id.is_empty() {
                return Outcome::Rejected(RejectReason::Invalid, "part has no id".into());
            }
            if !share
                .records
                .contains_key(&(3, message_id.clone(), String::new()))
            {
                return Outcome::Rejected(
                    RejectReason::MissingDependency,
                    "message not there".into(),
                );
            }
            share.records.insert(
                (3, message_id.clone(), id.clone()),
                record(RecordKind::Part, &id, &message_id),
            );
        }
        _ => {}
    }
    share.cursor += 1;
    share.applied.insert(op_id.to_owned(), share.cursor);
    share.ledger.push(Logged {
        cursor: share.cursor,
        op_id: op_id.to_owned(),
        kind,
        payload: payload.to_owned(),
    });
    Outcome::Applied(share.cursor)
}

impl share_writer::Server for WriterImpl {
    async fn append_ops(
        self: CapRc<Self>,
        params: share_writer::AppendOpsParams,
        mut results: share_writer::AppendOpsResults,
    ) -> Result<(), capnp::Error> {
        let batch = params.get()?.get_batch()?;
        let mut world = self.world.borrow_mut();
        let result = results.get().init_result();
        if let Err((code, message)) = self.check(&world) {
            fail(result.init_failure(), code, message);
            return Ok(());
        }
        let share = world.shares.get_mut(&self.share).unwrap();
        if batch.get_has_expected_cursor() && batch.get_expected_cursor() != share.cursor {
            let mut f = result.init_failure();
            f.set_cursor(share.cursor);
            fail(
                f,
                ErrorCode::CursorConflict,
                "expectedCursor does not match",
            );
            return Ok(());
        }
        let ops = batch.get_ops()?;
        let mut outcomes = Vec::new();
        for op in ops.iter() {
            let depends_on = op
                .get_depends_on()?
                .iter()
                .map(|d| Ok(d?.to_str()?.to_owned()))
                .collect::<capnp::Result<Vec<String>>>()?;
            let op_id = text(op.get_op_id())?;
            let outcome = apply(
                share,
                &op_id,
                op.get_kind()?,
                &text(op.get_payload())?,
                &depends_on,
            );
            outcomes.push((op_id, outcome));
        }
        let mut ack = result.init_ack();
        ack.set_cursor(share.cursor);
        let mut list = ack.init_results(outcomes.len() as u32);
        for (i, (op_id, outcome)) in outcomes.iter().enumerate() {
            let mut r = list.reborrow().get(i as u32);
            r.set_op_id(op_id.as_str());
            match outcome {
                Outcome::Applied(c) => r.set_applied(*c),
                Outcome::Duplicate(c) => r.set_duplicate(*c),
                Outcome::Rejected(reason, detail) => {
                    let mut rej = r.init_rejected();
                    rej.set_reason(*reason);
                    rej.set_detail(detail.as_str());
                }
            }
        }
        Ok(())
    }

    async fn mint_viewer(
        self: CapRc<Self>,
        params: share_writer::MintViewerParams,
        mut results: share_writer::MintViewerResults,
    ) -> Result<(), capnp::Error> {
        let expires_at = params.get()?.get_expires_at();
        let mut world = self.world.borrow_mut();
        let result = results.get().init_result();
        if let Err((code, message)) = self.check(&world) {
            fail(result.init_failure(), code, message);
            return Ok(());
        }
        let epoch = world.shares[&self.share].viewer_epoch;
        let (token, id) = world.mint(
            TokenKind::Viewer,
            Some(self.share.clone()),
            epoch,
            expires_at,
        );
        let mut ok = result.init_ok();
        ok.set_token(token.as_str());
        ok.set_token_id(id.as_str());
        ok.set_expires_at(expires_at);
        Ok(())
    }

    async fn save(
        self: CapRc<Self>,
        _: share_writer::SaveParams,
        mut results: share_writer::SaveResults,
    ) -> Result<(), capnp::Error> {
        let mut world = self.world.borrow_mut();
        let result = results.get().init_result();
        if let Err((code, message)) = self.check(&world) {
            fail(result.init_failure(), code, message);
            return Ok(());
        }
        let (token, id) = world.mint(
            TokenKind::Writer,
            Some(self.share.clone()),
            self.epoch,
            self.expires_at,
        );
        let mut ok = result.init_ok();
        ok.set_token(token.as_str());
        ok.set_token_id(id.as_str());
        ok.set_expires_at(self.expires_at);
        Ok(())
    }

    async fn state(
        self: CapRc<Self>,
        _: share_writer::StateParams,
        mut results: share_writer::StateResults,
    ) -> Result<(), capnp::Error> {
        let world = self.world.borrow();
        let result = results.get().init_result();
        match self.check(&world) {
            Err((code, message)) => fail(result.init_failure(), code, message),
            Ok(()) => set_state(result.init_ok(), &world.shares[&self.share]),
        }
        Ok(())
    }

    async fn viewer(
        self: CapRc<Self>,
        _: share_writer::ViewerParams,
        mut results: share_writer::ViewerResults,
    ) -> Result<(), capnp::Error> {
        let world = self.world.borrow();
        if let Err((_, message)) = self.check(&world) {
            return Err(capnp::Error::failed(message.into()));
        }
        let epoch = world.shares[&self.share].viewer_epoch;
        results.get().set_viewer(capnp_rpc::new_client(ViewerImpl {
            world: self.world.clone(),
            share: self.share.clone(),
            epoch,
        }));
        Ok(())
    }
}

// ---------------------------------------------------------------------------

struct ViewerImpl {
    world: Shared,
    share: String,
    epoch: u32,
}

impl ViewerImpl {
    fn check(&self, world: &World) -> Result<(), (ErrorCode, &'static str)> {
        match world.shares.get(&self.share) {
            None => Err((ErrorCode::NotFound, "the share is gone")),
            Some(s) if s.viewer_epoch != self.epoch => Err((ErrorCode::Revoked, "viewer revoked")),
            Some(_) => Ok(()),
        }
    }
}

impl share_viewer::Server for ViewerImpl {
    async fn snapshot(
        self: CapRc<Self>,
        params: share_viewer::SnapshotParams,
        mut results: share_viewer::SnapshotResults,
    ) -> Result<(), capnp::Error> {
        let page = text(params.get()?.get_page())?;
        let mut world = self.world.borrow_mut();
        let result = results.get().init_result();
        if let Err((code, message)) = self.check(&world) {
            fail(result.init_failure(), code, message);
            return Ok(());
        }
        if !page.is_empty() && world.churn > 0 {
            world.churn -= 1;
            let share = world.shares.get_mut(&self.share).unwrap();
            let filler = format!("churn-{}", share.cursor);
            apply(share, &filler, WireKind::PartRemove, "{}", &[]);
        }
        let share = &world.shares[&self.share];
        // One record per page; the page token is the record's index.
        let index: usize = if page.is_empty() {
            0
        } else {
            page.parse()
                .map_err(|_| capnp::Error::failed("bad page".into()))?
        };
        let records: Vec<&StoredRecord> = share.records.values().collect();
        let mut ok = result.init_ok();
        ok.set_cursor(share.cursor);
        if index + 1 < records.len() {
            ok.set_next_page((index + 1).to_string().as_str());
        }
        let this: Vec<&StoredRecord> = records.get(index).into_iter().copied().collect();
        let mut list = ok.init_records(this.len() as u32);
        for (i, r) in this.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_kind(r.kind);
            b.set_id(r.id.as_str());
            b.set_message_id(r.message_id.as_str());
            b.set_json(r.json.as_str());
        }
        Ok(())
    }

    async fn ops_since(
        self: CapRc<Self>,
        params: share_viewer::OpsSinceParams,
        mut results: share_viewer::OpsSinceResults,
    ) -> Result<(), capnp::Error> {
        let params = params.get()?;
        let after = params.get_after();
        let limit = match params.get_limit() {
            0 => 1000,
            n => n as usize,
        };
        let world = self.world.borrow();
        let result = results.get().init_result();
        if let Err((code, message)) = self.check(&world) {
            fail(result.init_failure(), code, message);
            return Ok(());
        }
        let share = &world.shares[&self.share];
        let ops: Vec<&Logged> = share
            .ledger
            .iter()
            .filter(|op| op.cursor > after)
            .take(limit)
            .collect();
        let mut ok = result.init_ok();
        ok.set_cursor(share.cursor);
        let mut list = ok.init_ops(ops.len() as u32);
        for (i, op) in ops.iter().enumerate() {
            let mut b = list.reborrow().get(i as u32);
            b.set_cursor(op.cursor);
            b.set_op_id(op.op_id.as_str());
            b.set_kind(op.kind);
            b.set_payload(op.payload.as_str());
            b.set_applied_at(1_700_000_000_000 + op.cursor as i64);
        }
        Ok(())
    }

    async fn state(
        self: CapRc<Self>,
        _: share_viewer::StateParams,
        mut results: share_viewer::StateResults,
    ) -> Result<(), capnp::Error> {
        let world = self.world.borrow();
        let result = results.get().init_result();
        match self.check(&world) {
            Err((code, message)) => fail(result.init_failure(), code, message),
            Ok(()) => set_state(result.init_ok(), &world.shares[&self.share]),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------

/// A fake server on the current `LocalSet`, listening on 127.0.0.1:0.
pub async fn start_local() -> (SocketAddr, Shared) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let world: Shared = Rc::new(RefCell::new(World::default()));
    let (admin_token, _) = world.borrow_mut().mint(TokenKind::Admin, None, 0, 0);
    world.borrow_mut().admin_token = admin_token;
    let gateway: gateway::Client = capnp_rpc::new_client(GatewayImpl {
        world: world.clone(),
    });
    tokio::task::spawn_local(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            stream.set_nodelay(true).unwrap();
            let (reader, writer) = stream.compat().split();
            let network = twoparty::VatNetwork::new(
                futures::io::BufReader::new(reader),
                futures::io::BufWriter::new(writer),
                Side::Server,
                Default::default(),
            );
            let rpc = RpcSystem::new(Box::new(network), Some(gateway.clone().client));
            tokio::task::spawn_local(rpc);
        }
    });
    (addr, world)
}

/// A fake server on its own thread, for driving the CLI binary. Returns the address and
/// the admin token; the server lives until the test process ends.
pub fn start_thread() -> (SocketAddr, String) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async move {
            let (addr, world) = start_local().await;
            let admin = world.borrow().admin_token.clone();
            tx.send((addr, admin)).unwrap();
            std::future::pending::<()>().await;
        });
    });
    rx.recv().unwrap()
}
