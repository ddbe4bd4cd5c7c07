//! A follower over Server-Sent Events, as the share page follows a share (one HTTP/1
//! connection each; see `common/event_stream.rs`). Only the ops' cursors are read.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::task::JoinHandle;

use crate::BenchResult;
use crate::event_stream::{self, next_event, ops_cursors};
use crate::follower::{Link, Recorder};
use crate::writer::Share;

/// Opens the stream after `after` and reads its `hello`: the server has the follower
/// registered when this returns.
pub async fn start(
    addr: SocketAddr,
    share: &Share,
    after: u64,
    mut recorder: Recorder,
) -> BenchResult<(JoinHandle<Result<(), String>>, Link)> {
    let mut stream = event_stream::open(addr, &share.share_id, &share.viewer_token, after).await?;
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = next_event(&mut stream.events).await? {
            let at = Instant::now();
            match event.event.as_deref() {
                Some("ops") => recorder.record(ops_cursors(&event)?, at)?,
                Some("presence") => {}
                _ => return Err(format!("the event stream ended with {event:?}")),
            }
        }
        Err("the event stream ended".to_owned())
    });
    Ok((task, Link::Sse(stream.connection)))
}
