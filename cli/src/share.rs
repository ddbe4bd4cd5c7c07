//! `capsync share ...`: an agent creates, lists and revokes its shares, and mints new
//! writer and viewer tokens for them (agent token).

use std::fmt::Write as _;
use std::path::PathBuf;

use capsync_shared::TokenKind;
use clap::Subcommand;
use serde::Serialize;

use super::admin::{ListArgs, list_pages};
use super::output::Output;
use super::{Global, ScopeArg, finish};
use capsync_client::agent::{AgentClient, NewShare};
use capsync_client::error::ClientError;
use capsync_client::expiry::{Expiry, format_expiry, format_time};
use capsync_client::export::SessionExport;
use capsync_client::types::{MintedToken, Scope, ShareInfo, ShareList, ShareState};

#[derive(Debug, Subcommand)]
pub enum ShareCommand {
    /// Create a share for a session; prints its id, writer token and viewer token
    ///
    /// The writer token pushes into the share (`capsync push`); the viewer token is the
    /// read-only link to hand out. Session details come from flags, or from a session
    /// export with --from-export (flags win).
    ///   capsync share create --session-id ses_123 --title "Fix the build" --viewer-expires 7d
    ///   capsync share create --from-export session.json --json
    #[command(verbatim_doc_comment)]
    Create(CreateArgs),

    /// List the shares this agent token created, ordered by share id
    ///
    ///   capsync share list --all
    #[command(verbatim_doc_comment)]
    List(ListArgs),

    /// Revoke one of your shares without its own token (unshare)
    ///
    /// Every older token and live capability of the scope stops working at once.
    ///   capsync share revoke sh_0123abcd              # writers and viewers
    ///   capsync share revoke sh_0123abcd --scope viewers
    #[command(verbatim_doc_comment)]
    Revoke {
        /// The share's id (see `capsync share list`)
        share_id: String,
        /// Which tokens to revoke
        #[arg(long, value_enum, default_value_t = ScopeArg::All)]
        scope: ScopeArg,
    },

    /// Mint a new writer token for one of your shares
    ///
    /// The token is minted at the share's current writer epoch, so it works after
    /// `capsync share revoke <id> --scope writers` stopped the old ones: how the owner
    /// writes again after unsharing, or replaces a writer token that leaked.
    /// Prints the new token alone on stdout (details on stderr), so it can be captured:
    ///   WRITER_TOKEN=$(capsync share mint-writer sh_0123abcd --expires 30d)
    ///   capsync share mint-writer sh_0123abcd --json
    #[command(verbatim_doc_comment)]
    MintWriter(MintArgs),

    /// Mint a new viewer token (a read-only link) for one of your shares
    ///
    /// The token is minted at the share's current viewer epoch, so it works after
    /// `capsync share revoke <id> --scope viewers` stopped the old links: how the owner
    /// hands out a fresh link, or one that expires sooner.
    /// Prints the new token alone on stdout (details on stderr), so it can be captured:
    ///   VIEWER_TOKEN=$(capsync share mint-viewer sh_0123abcd --expires 7d)
    ///   capsync share mint-viewer sh_0123abcd --json
    #[command(verbatim_doc_comment)]
    MintViewer(MintArgs),
}

/// Arguments of `share mint-writer` and `share mint-viewer`.
#[derive(Debug, clap::Args)]
pub struct MintArgs {
    /// The share's id (see `capsync share list`); it must be one this agent token created
    pub share_id: String,
    /// When the token expires: a duration (30d, 12h), a time (2030-01-31T12:00:00Z), or never
    #[arg(long, value_name = "WHEN", default_value = "never")]
    pub expires: Expiry,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The agent's session id; the pushed session record must carry the same id
    #[arg(long, value_name = "ID", required_unless_present = "from_export")]
    pub session_id: Option<String>,
    /// The session's project id
    #[arg(long, value_name = "ID")]
    pub project_id: Option<String>,
    /// The parent session, for a child session
    #[arg(long, value_name = "ID")]
    pub parent_session_id: Option<String>,
    /// A title for people
    #[arg(long)]
    pub title: Option<String>,
    /// When the viewer token expires: a duration (7d), a time, or never
    #[arg(long, value_name = "WHEN", default_value = "never")]
    pub viewer_expires: Expiry,
    /// Take the session id, project, parent and title from this session export
    #[arg(long, value_name = "FILE")]
    pub from_export: Option<PathBuf>,
}

/// What `share create` prints with --json.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created<'a> {
    share_id: &'a str,
    /// The share page, the viewer token in its fragment.
    link: &'a str,
    writer_token: &'a MintedToken,
    viewer_token: &'a MintedToken,
    info: &'a ShareInfo,
}

pub async fn run(global: &Global, out: &Output, command: &ShareCommand) -> Result<u8, ClientError> {
    // Read local input before connecting, so a bad file costs no round trip.
    let new_share = match command {
        ShareCommand::Create(args) => Some(new_share(args)?),
        _ => None,
    };
    let (conn, redeemed) = global.redeem(&[TokenKind::Agent]).await?;
    let agent = redeemed.into_agent()?;
    let result = global
        .call(&conn, run_with(global, &agent, out, command, new_share))
        .await;
    finish(conn).await;
    result.map(|()| super::EXIT_OK)
}

async fn run_with(
    global: &Global,
    agent: &AgentClient,
    out: &Output,
    command: &ShareCommand,
    new_share: Option<NewShare>,
) -> Result<(), ClientError> {
    match command {
        ShareCommand::Create(_) => {
            let share = new_share.expect("parsed before connecting");
            let created = agent.create_share(share).await?;
            let link = global.share_link(&created.info.state.share_id, &created.viewer_token.token);
            let json = Created {
                share_id: &created.info.state.share_id,
                link: &link,
                writer_token: &created.writer_token,
                viewer_token: &created.viewer_token,
                info: &created.info,
            };
            out.result(&json, || {
                format!(
                    "share:        {}\nsession:      {}\nwriter token: {}\nviewer token: {}  (expires {})\nlink:         {link}",
                    created.info.state.share_id,
                    created.info.session_id,
                    created.writer_token.token,
                    created.viewer_token.token,
                    format_expiry(created.viewer_token.expires_at),
                )
            });
        }
        ShareCommand::List(args) => {
            let list = list_pages(args, |after, limit| async move {
                agent.list_shares(&after, limit, args.archived).await
            })
            .await?;
            out.result(&list, || list_text(&list));
        }
        ShareCommand::Revoke { share_id, scope } => {
            let state = agent.revoke_share(share_id, (*scope).into()).await?;
            out.result(&state, || revoked_text(&state, (*scope).into()));
        }
        ShareCommand::MintWriter(args) => {
            let expires_at = args.expires.expires_at(capsync_shared::now_millis());
            let minted = agent.mint_writer(&args.share_id, expires_at).await?;
            super::mint::print_minted(out, "writer", &args.share_id, &minted);
        }
        ShareCommand::MintViewer(args) => {
            let expires_at = args.expires.expires_at(capsync_shared::now_millis());
            let minted = agent.mint_viewer(&args.share_id, expires_at).await?;
            let link = global.share_link(&args.share_id, &minted.token);
            super::mint::print_minted_viewer(out, &args.share_id, &minted, &link);
        }
    }
    Ok(())
}

/// The share to create, from flags and optionally an export.
fn new_share(args: &CreateArgs) -> Result<NewShare, ClientError> {
    let export = match &args.from_export {
        Some(path) => Some(SessionExport::from_json(&super::push::read_input(path)?)?),
        None => None,
    };
    let from = |flag: &Option<String>, field: fn(&SessionExport) -> &str| {
        flag.clone()
            .or_else(|| export.as_ref().map(|e| field(e).to_owned()))
            .unwrap_or_default()
    };
    let session_id = from(&args.session_id, SessionExport::session_id);
    if session_id.is_empty() {
        return Err(ClientError::invalid("--session-id is empty"));
    }
    let parent_session_id = args.parent_session_id.clone().or_else(|| {
        export
            .as_ref()
            .and_then(|e| e.parent_id().map(str::to_owned))
    });
    Ok(NewShare {
        session_id,
        project_id: from(&args.project_id, SessionExport::project_id),
        parent_session_id: parent_session_id.filter(|p| !p.is_empty()),
        title: from(&args.title, SessionExport::title),
        viewer_expires_at: args.viewer_expires.expires_at(capsync_shared::now_millis()),
        join_existing: false,
    })
}

/// A listing as a table for people.
pub fn list_text(list: &ShareList) -> String {
    if list.shares.is_empty() {
        return "no shares".to_owned();
    }
    let mut text = String::new();
    let _ = writeln!(
        text,
        "{:<28} {:>8}  {:<20}  {:<24}  TITLE",
        "SHARE", "CURSOR", "UPDATED", "SESSION"
    );
    for share in &list.shares {
        let _ = writeln!(
            text,
            "{:<28} {:>8}  {:<20}  {:<24}  {}",
            share.state.share_id,
            share.state.cursor,
            if share.updated_at == 0 {
                "-".to_owned()
            } else {
                format_time(share.updated_at)
            },
            share.session_id,
            if share.archived_at.is_some() {
                format!("{} (archived)", share.title)
            } else {
                share.title.clone()
            }
        );
    }
    if let Some(next) = &list.next_after {
        let _ = writeln!(text, "more: pass --after {next} (or --all)");
    }
    text
}

/// What a revocation did, for people.
pub fn revoked_text(state: &ShareState, scope: Scope) -> String {
    format!(
        "revoked {} of share {} (writer epoch {}, viewer epoch {})",
        match scope {
            Scope::Writers => "writers",
            Scope::Viewers => "viewers",
            Scope::All => "writers and viewers",
        },
        state.share_id,
        state.writer_epoch,
        state.viewer_epoch
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(
        session_id: Option<&str>,
        title: Option<&str>,
        from_export: Option<PathBuf>,
    ) -> CreateArgs {
        CreateArgs {
            session_id: session_id.map(Into::into),
            project_id: None,
            parent_session_id: None,
            title: title.map(Into::into),
            viewer_expires: Expiry::Never,
            from_export,
        }
    }

    #[test]
    fn flags_fill_the_new_share() {
        let share = new_share(&args(Some("ses_1"), Some("T"), None)).unwrap();
        assert_eq!(share.session_id, "ses_1");
        assert_eq!(share.title, "T");
        assert_eq!(share.parent_session_id, None);
        assert_eq!(share.viewer_expires_at, None);
    }

    #[test]
    fn an_export_fills_what_flags_leave_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("export.json");
        std::fs::write(
            &path,
            r#"{"info": {"id": "ses_9", "projectID": "prj", "parentID": "ses_0", "title": "From export"}, "messages": []}"#,
        )
        .unwrap();
        let share = new_share(&args(None, Some("Flag title"), Some(path.clone()))).unwrap();
        assert_eq!(share.session_id, "ses_9");
        assert_eq!(share.project_id, "prj");
        assert_eq!(share.parent_session_id.as_deref(), Some("ses_0"));
        assert_eq!(share.title, "Flag title");
    }
}
