//! A follower over RPC: `ShareViewer.subscribe` through [`ViewerClient::subscribe`]
//! on a connection of its own, as the CLI's `follow` does.
//!
//! [`ViewerClient::subscribe`]: capsync_tests::client::ViewerClient::subscribe

use std::net::SocketAddr;
use std::time::Instant;

use capsync_tests::client::{self, LiveEvent};
use tokio::task::JoinHandle;

use crate::BenchResult;
use crate::follower::{Link, Recorder};
use crate::writer::Share;

/// Subscribes after `after`; the subscription is registered when this returns.
pub async fn start(
    addr: SocketAddr,
    share: &Share,
    after: u64,
    mut recorder: Recorder,
) -> BenchResult<(JoinHandle<Result<(), String>>, Link)> {
    let conn = client::connect(addr).await?;
    let viewer = conn.redeem(&share.viewer_token).await?.into_viewer()?;
    let mut live = viewer.subscribe(after).await?;
    let task = tokio::task::spawn_local(async move {
        while let Some(event) = live.next().await {
            match event {
                LiveEvent::Ops(ops) => {
                    let at = Instant::now();
                    recorder.record(ops.iter().map(|op| op.cursor.0), at)?;
                }
                LiveEvent::Ended(ended) => {
                    return Err(format!(
                        "a subscription ended at cursor {}: {} {}",
                        ended.cursor, ended.reason, ended.message
                    ));
                }
            }
        }
        Err("a subscription ended without a reason".to_owned())
    });
    Ok((task, Link::Rpc(conn)))
}
