//! `capsync opencode status`: what the plugin's shipper has shared, with links, and
//! what is still waiting to be sent.

use serde::Serialize;

use super::super::EXIT_OK;
use super::super::output::Output;
use super::install::{Installed, Layout, Target};
use capsync_client::error::ClientError;
use capsync_client::opencode::journal;
use capsync_client::opencode::state::ShipperState;

/// List the sessions capsync's opencode plugin shipped, their shares and links (no token)
///
/// For each session the journal held: its share and the share's link, or why it is not
/// shipped (not shared in opencode, stopped: the share was revoked or deleted). Also
/// whether a shipper is running, and how much journal it has not read yet. The links
/// hold viewer tokens: whoever has one can read the session.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Status {
    dir: String,
    shipper_running: bool,
    /// The running shipper's process id.
    shipper_pid: Option<u32>,
    /// Journal bytes not yet read into the outboxes.
    unread_bytes: u64,
    sessions: Vec<SessionStatus>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionStatus {
    session_id: String,
    title: String,
    parent_session_id: Option<String>,
    share_id: Option<String>,
    link: Option<String>,
    /// `shipping`; `waiting` (to be shipped once the server answers); `notShared`
    /// (manual: not shared in opencode); `stopped`; `deleted` (in opencode).
    state: &'static str,
    stopped: Option<String>,
}

pub async fn run(out: &Output, args: &StatusArgs) -> Result<u8, ClientError> {
    let layout = Layout::of(&args.target)?;
    let installed = Installed::read(&layout.dir)?;
    let status = read_status(&layout.dir, &installed).await?;
    out.result(&status, || human(&status));
    Ok(EXIT_OK)
}

async fn read_status(dir: &std::path::Path, installed: &Installed) -> Result<Status, ClientError> {
    let invalid = |e: &dyn std::fmt::Display| ClientError::invalid(e.to_string());
    let state_path = dir.join("shipper.db");
    let mut unread_bytes = 0;
    let mut rows = Vec::new();
    if state_path.exists() {
        let state = tokio::task::spawn_blocking(move || ShipperState::open(&state_path))
            .await
            .map_err(|e| invalid(&e))?
            .map_err(|e| invalid(&e))?;
        rows = state.sessions().await.map_err(|e| invalid(&e))?;
        for segment in journal::segments(&installed.journal).map_err(|e| invalid(&e))? {
            let offset = state.offset(&segment.name).await.map_err(|e| invalid(&e))?;
            let len = std::fs::metadata(&segment.path).map_or(0, |m| m.len());
            unread_bytes += len.saturating_sub(offset);
        }
    }
    let sessions = rows
        .into_iter()
        .map(|row| {
            let state = if row.deleted {
                "deleted"
            } else if row.stopped.is_some() {
                "stopped"
            } else if row.share.is_some() {
                "shipping"
            } else if installed.share == "auto" || !row.opencode_share_url.is_empty() {
                // To be shipped: its share is made once the server answers.
                "waiting"
            } else {
                "notShared"
            };
            SessionStatus {
                link: row.share.as_ref().map(|share| {
                    format!(
                        "{}/s/{}#{}",
                        installed.share_origin, share.share_id, share.viewer_token
                    )
                }),
                share_id: row.share.map(|share| share.share_id),
                session_id: row.session_id,
                title: row.title,
                parent_session_id: Some(row.parent_id).filter(|p| !p.is_empty()),
                state,
                stopped: row.stopped,
            }
        })
        .collect();
    let shipper = running_shipper(dir);
    Ok(Status {
        dir: dir.display().to_string(),
        shipper_running: shipper.is_some(),
        shipper_pid: shipper.flatten(),
        unread_bytes,
        sessions,
    })
}

/// `Some` while a shipper holds the directory's lock, with its process id if it wrote one.
fn running_shipper(dir: &std::path::Path) -> Option<Option<u32>> {
    let path = dir.join("shipper.lock");
    let file = std::fs::File::options().write(true).open(&path).ok()?;
    match file.try_lock() {
        Err(std::fs::TryLockError::WouldBlock) => Some(
            std::fs::read_to_string(&path)
                .ok()
                .and_then(|text| text.trim().parse().ok()),
        ),
        _ => None,
    }
}

fn human(status: &Status) -> String {
    let mut lines = vec![format!(
        "{}: shipper {}, {} journal bytes unread",
        status.dir,
        match (status.shipper_running, status.shipper_pid) {
            (true, Some(pid)) => format!("running (pid {pid})"),
            (true, None) => "running".to_owned(),
            (false, _) => "not running".to_owned(),
        },
        status.unread_bytes
    )];
    if status.sessions.is_empty() {
        lines.push("no sessions journaled yet".to_owned());
    }
    for session in &status.sessions {
        let title = if session.title.is_empty() {
            String::new()
        } else {
            format!(" \"{}\"", session.title)
        };
        let child = session
            .parent_session_id
            .as_deref()
            .map_or_else(String::new, |parent| format!(" (sub-agent of {parent})"));
        let what = match (session.state, &session.link, &session.stopped) {
            ("shipping", Some(link), _) => link.clone(),
            ("stopped", _, Some(why)) => format!("stopped: {why}"),
            ("deleted", _, _) => "deleted in opencode".to_owned(),
            ("waiting", _, _) => "waiting for the server to make its share".to_owned(),
            _ => "not shared (share it in opencode with /share)".to_owned(),
        };
        lines.push(format!("{}{title}{child}: {what}", session.session_id));
    }
    lines.join("\n")
}
