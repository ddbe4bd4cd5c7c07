//! `capsync opencode`: share opencode's sessions to this server, through opencode's own
//! share client (`config`) or through capsync's plugin (`install`, `ship`, `status`,
//! `uninstall`).

mod install;
mod ship;
mod status;

use capsync_shared::TokenKind;
use serde_json::json;

use super::output::Output;
use super::{Global, finish};
use capsync_client::error::ClientError;

pub use install::{InstallArgs, UninstallArgs};

use capsync_client::opencode::shipper::ShareMode;

/// `--share`: which sessions the plugin's shipper ships.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShareArg {
    /// Every session, sub-agent sessions included
    Auto,
    /// Sessions shared in opencode (/share), with their sub-agent sessions
    Manual,
}

impl From<ShareArg> for ShareMode {
    fn from(share: ShareArg) -> Self {
        match share {
            ShareArg::Auto => ShareMode::Auto,
            ShareArg::Manual => ShareMode::Manual,
        }
    }
}
pub use ship::ShipArgs;
pub use status::StatusArgs;

#[derive(Debug, clap::Subcommand)]
pub enum OpencodeCommand {
    /// Print the opencode.json snippet that makes opencode's /share publish here (agent token)
    ///
    /// Prints a JSON object with `enterprise.url`: merge it into opencode.json (or
    /// ~/.config/opencode/opencode.json). The URL holds the agent token: keep the file
    /// private; revoke the token (`capsync admin revoke-token`) to cut opencode off.
    /// The token is checked with the server first.
    #[command(verbatim_doc_comment)]
    Config,

    // About and long help come from the args struct's doc comment.
    Install(InstallArgs),

    // About and long help come from the args struct's doc comment.
    Ship(ShipArgs),

    // About and long help come from the args struct's doc comment.
    Status(StatusArgs),

    // About and long help come from the args struct's doc comment.
    Uninstall(UninstallArgs),
}

pub async fn run(
    global: &Global,
    out: &Output,
    command: &OpencodeCommand,
) -> Result<u8, ClientError> {
    match command {
        OpencodeCommand::Config => {
            let (conn, redeemed) = global.redeem(&[TokenKind::Agent]).await?;
            redeemed.into_agent()?;
            finish(conn).await;
            let token = global.token(&[TokenKind::Agent])?;
            let config = json!({
                "$schema": "https://opencode.ai/config.json",
                "enterprise": {"url": enterprise_url(&global.share_origin(), &token)},
            });
            out.note(
                "Merge this into opencode.json. It holds your agent token: keep the file private.",
            );
            // JSON with or without --json (pretty for people): it is meant to be pasted or piped.
            out.result(&config, || {
                serde_json::to_string_pretty(&config).unwrap_or_default()
            });
            Ok(super::EXIT_OK)
        }
        OpencodeCommand::Install(args) => install::install(global, out, args).await,
        OpencodeCommand::Ship(args) => ship::run(global, out, args).await,
        OpencodeCommand::Status(args) => status::run(out, args).await,
        OpencodeCommand::Uninstall(args) => install::uninstall(out, args),
    }
}

/// opencode's share server for an agent token: the server's routes for
/// opencode live under `/opencode/<agent token>`.
pub fn enterprise_url(origin: &str, agent_token: &str) -> String {
    format!("{origin}/opencode/{agent_token}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_url_puts_the_token_under_the_opencode_prefix() {
        assert_eq!(
            enterprise_url("https://share.example.com", "csagent_1_2"),
            "https://share.example.com/opencode/csagent_1_2"
        );
    }
}
