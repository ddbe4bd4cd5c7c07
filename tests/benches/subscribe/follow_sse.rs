//! A follower over Server-Sent Events: `GET /api/shares/{share}/events?after=N` on the
//! HTTP gateway with the viewer token as a bearer, as the share page does (one HTTP/1
//! connection each).
//!
//! The stream opens with `hello`; then each `ops` event carries `id:` (the cursor of its
//! last op) and `{"ops": [{"cursor": …, …}, …]}`. Only the cursors are read from the
//! ops; everything else in them is skipped unparsed, so the bench's own CPU per event
//! stays small next to the server's.

use std::net::SocketAddr;
use std::time::Instant;

use futures::StreamExt;
use hyper::body::Incoming;
use hyper::header::{ACCEPT, AUTHORIZATION, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use sse_stream::{Sse, SseStream};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::BenchResult;
use crate::follower::{Link, Recorder};
use crate::writer::Share;

/// The data of an `ops` event, as far as the bench reads it.
#[derive(Debug, Deserialize)]
struct OpsEvent {
    ops: Vec<EventOp>,
}

#[derive(Debug, Deserialize)]
struct EventOp {
    cursor: u64,
}

/// Opens the stream after `after` and reads its `hello`: the server has the follower
/// registered when this returns.
pub async fn start(
    addr: SocketAddr,
    share: &Share,
    after: u64,
    mut recorder: Recorder,
) -> BenchResult<(JoinHandle<Result<(), String>>, Link)> {
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
    let request = Request::get(format!(
        "/api/shares/{}/events?after={after}",
        share.share_id
    ))
    .header(HOST, addr.to_string())
    .header(AUTHORIZATION, format!("Bearer {}", share.viewer_token))
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
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = next_event(&mut events).await? {
            let at = Instant::now();
            match event.event.as_deref() {
                Some("ops") => ops(&event, &mut recorder, at)?,
                Some("presence") => {}
                _ => return Err(format!("the event stream ended with {event:?}")),
            }
        }
        Err("the event stream ended".to_owned())
    });
    Ok((task, Link::Sse(connection)))
}

async fn next_event(events: &mut SseStream<Incoming>) -> Result<Option<Sse>, String> {
    events
        .next()
        .await
        .transpose()
        .map_err(|err| format!("the event stream broke: {err}"))
}

/// Records an `ops` event, checking that its `id:` is its last op's cursor.
fn ops(event: &Sse, recorder: &mut Recorder, at: Instant) -> Result<(), String> {
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
    recorder.record(parsed.ops.iter().map(|op| op.cursor), at)
}
