//! A share's live event stream as the share page opens it, for the benchmarks:
//! `GET /api/shares/{share}/events?after=N` with the viewer token as a bearer, on an
//! HTTP/1 connection of its own (hyper's client), its events parsed by `sse-stream`.
//!
//! The stream opens with `hello`; then each `ops` event carries `id:` (the cursor of its
//! last op) and `{"ops": [{"cursor": …, …}, …]}`. [`ops_cursors`] reads only the
//! cursors, so a bench's own CPU per event stays small next to the server's.
#![allow(dead_code)]

use std::error::Error;
use std::net::SocketAddr;

use futures::StreamExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sse_stream::{Sse, SseStream};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// An open stream, past its `hello`.
pub struct EventStream {
    pub events: SseStream<Incoming>,
    /// Drives the HTTP connection; aborting it closes the stream.
    pub connection: JoinHandle<()>,
}

/// Opens the stream of `share_id` after `after` and reads its `hello`: the server has
/// the follower registered when this returns. Runs on a `LocalSet`.
pub async fn open(
    addr: SocketAddr,
    share_id: &str,
    viewer_token: &str,
    after: u64,
) -> Result<EventStream, Box<dyn Error>> {
    let stream = TcpStream::connect(addr).await?;
    // Events are small writes that must go out at once, as in the RPC client.
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, String>(TokioIo::new(stream)).await?;
    // Nothing moves on the connection unless this is polled; its end (closed, or
    // aborted with the follower) says nothing the stream does not.
    let connection = tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    let request = Request::get(format!("/api/shares/{share_id}/events?after={after}"))
        .header(HOST, addr.to_string())
        .header(AUTHORIZATION, format!("Bearer {viewer_token}"))
        .header(ACCEPT, "text/event-stream")
        .body(String::new())?;
    let response = sender.send_request(request).await?;
    if response.status() != StatusCode::OK {
        connection.abort();
        return Err(format!("the event stream answered {}", response.status()).into());
    }
    let mut events = SseStream::new(response.into_body());
    match next_event(&mut events).await? {
        Some(hello) if hello.event.as_deref() == Some("hello") => {}
        other => {
            connection.abort();
            return Err(format!("the event stream began with {other:?}, not hello").into());
        }
    }
    Ok(EventStream { events, connection })
}

/// The next event; `None` when the stream ended.
pub async fn next_event(events: &mut SseStream<Incoming>) -> Result<Option<Sse>, String> {
    events
        .next()
        .await
        .transpose()
        .map_err(|err| format!("the event stream broke: {err}"))
}

/// The data of an `ops` event, as far as the benches read it.
#[derive(Debug, Deserialize)]
struct OpsEvent {
    ops: Vec<EventOp>,
}

#[derive(Debug, Deserialize)]
struct EventOp {
    cursor: u64,
}

/// The cursors of an `ops` event, checked: its `id:` is its last op's cursor.
pub fn ops_cursors(event: &Sse) -> Result<Vec<u64>, String> {
    let data = event.data.as_deref().unwrap_or_default();
    let parsed: OpsEvent =
        serde_json::from_str(data).map_err(|err| format!("an ops event did not parse: {err}"))?;
    let id = event.id.as_deref().and_then(|id| id.parse::<u64>().ok());
    let last = parsed.ops.last().map(|op| op.cursor);
    if id.is_none() || id != last {
        return Err(format!(
            "an ops event's id {:?} is not its last op's cursor {last:?}",
            event.id
        ));
    }
    Ok(parsed.ops.iter().map(|op| op.cursor).collect())
}
