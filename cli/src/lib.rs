//! The `capsync` command line: argument definitions, dispatch, and the runtime it runs on.
//!
//! Each command lives in its own module; they share [`Global`] (server, timeouts, output
//! mode, token) and [`Output`]. Exit codes: 0 success, 1 error, 2 bad usage (clap, which
//! includes a server address of the wrong form), 3 `push` (or `sync --once`) had ops
//! rejected as invalid or still missing a dependency.

mod admin;
mod args;
mod follow;
mod inspect;
mod lifecycle;
mod lifecycle_report;
mod link_status;
mod live_text;
mod mint;
mod opencode;
mod outbox_cmd;
mod output;
mod progress;
mod push;
mod render;
mod share;
mod snapshot;
mod sync;
mod sync_source;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use capsync_shared::{SturdyRef, TokenKind};
use clap::{Args, Parser, Subcommand, ValueEnum};

use args::{ServerAddrParser, parse_duration};
use capsync_client::connection::{ClientOptions, Connection, Redeemed, connect_any};
use capsync_client::error::ClientError;
use capsync_client::server_addr::ServerList;
use capsync_client::types::Scope;
pub use output::{Captured, Output};

/// Exit code of success.
pub const EXIT_OK: u8 = 0;
/// Exit code of any error (remote, transport, input).
pub const EXIT_ERROR: u8 = 1;
/// Exit code for a push (or `sync --once`) whose file had ops the server refused.
pub const EXIT_REJECTED: u8 = 3;

/// Default server address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7420";
/// The port of the server's HTTP gateway (share pages) unless it was moved.
pub const DEFAULT_SHARE_PORT: u16 = 7421;

/// How long a closing handshake may take once a command's work is done.
const DISCONNECT_TIMEOUT: Duration = Duration::from_secs(2);

const ABOUT: &str = "Share AI coding-agent sessions through a capsync server";

const LONG_ABOUT: &str = "\
Share AI coding-agent sessions through a capsync server.

Every command talks to one server (--server, or CAPSYNC_SERVER: the RPC address
HOST:PORT, port 7420 by default; not the share-page URL) and acts with one token
(--token, CAPSYNC_TOKEN, or --token-file). What a token may do depends on its kind:
  admin   mint agent tokens; revoke, list, archive and delete any share; prune,
          vacuum, reclaim and compact storage
  agent   create shares; list and revoke the shares it created, mint new tokens for them
  writer  push ops into one share; mint viewer links; read it
  viewer  read one share (snapshot, state, ops)

Tokens are secrets: prefer CAPSYNC_TOKEN or --token-file over --token, which other users
of the machine can see in the process list. capsync never prints a token except the new
ones a mint or create command exists to print.

No command waits forever on a server that does not answer: connecting (and redeeming
the token) gives up after --connect-timeout, a call after --call-timeout of silence
from the server. Prune, vacuum, reclaim and compact are the exception: their work grows
with the database, so they wait until the server is done (or the connection drops).";

const EXAMPLES: &str = "\
Examples:
  # an operator gives an agent its token
  export CAPSYNC_TOKEN=$ADMIN_TOKEN
  capsync admin mint-agent --label laptop --expires 30d

  # the agent shares a session and pushes it
  CAPSYNC_TOKEN=$AGENT_TOKEN capsync share create --from-export session.json
  CAPSYNC_TOKEN=$WRITER_TOKEN capsync push session.json

  # or the agent keeps the share in step with a log it appends to, until Ctrl-C
  CAPSYNC_TOKEN=$WRITER_TOKEN capsync sync agent-ops.jsonl
  capsync outbox status agent-ops.jsonl

  # anyone with the viewer token reads it, or watches it live
  CAPSYNC_TOKEN=$VIEWER_TOKEN capsync snapshot
  CAPSYNC_TOKEN=$VIEWER_TOKEN capsync follow

  # the agent unshares, then mints itself a fresh writer token (and a new link)
  export CAPSYNC_TOKEN=$AGENT_TOKEN
  capsync share revoke $SHARE_ID
  WRITER_TOKEN=$(capsync share mint-writer $SHARE_ID)
  VIEWER_TOKEN=$(capsync share mint-viewer $SHARE_ID --expires 7d)

  # an operator clears out sessions nobody touched for 90 days, looking first
  export CAPSYNC_TOKEN=$ADMIN_TOKEN
  capsync admin prune --older-than 90d --children --dry-run
  capsync admin prune --older-than 90d --children --vacuum

Exit codes: 0 success, 1 error, 2 bad usage, 3 push (or sync --once) had ops rejected.";

/// The `capsync` command line.
#[derive(Debug, Parser)]
#[command(name = "capsync", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Debug, Args)]
pub struct Global {
    /// RPC address of the capsync server: HOST:PORT (port 7420 by default; not the share-page URL). Several nodes of one deployment: HOST:PORT,HOST:PORT (the first that answers is used)
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CAPSYNC_SERVER",
        default_value = DEFAULT_SERVER,
        value_name = "HOST:PORT",
        value_parser = ServerAddrParser
    )]
    pub server: ServerList,

    /// Give up connecting after this long: the TCP connect, then the server's answer to redeeming the token (each)
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CAPSYNC_CONNECT_TIMEOUT",
        default_value = "10s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub connect_timeout: Duration,

    /// Give up when the server leaves a call unanswered this long (not prune, vacuum, reclaim, compact: they wait until done)
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CAPSYNC_CALL_TIMEOUT",
        default_value = "60s",
        value_parser = parse_duration,
        value_name = "DURATION"
    )]
    pub call_timeout: Duration,

    /// Print machine-readable JSON on stdout (errors too, as {"error": {"code", "message"}})
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,

    /// The token to act with (prefer the environment variable: flags show up in `ps`)
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CAPSYNC_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// Where share links start: the server's share-page origin (its --public-url, or
    /// http://HOST:7421 of its HTTP gateway). Default: http:// and the --server host, port 7421
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CAPSYNC_SHARE_URL",
        value_name = "URL"
    )]
    pub share_url: Option<String>,

    /// Read the token from this file instead (first line; wins over --token)
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "CAPSYNC_TOKEN_FILE",
        value_name = "PATH"
    )]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Operator commands: mint agent tokens; revoke, list, archive, delete and prune shares; storage (admin token)
    #[command(subcommand)]
    Admin(admin::AdminCommand),

    /// Create shares; list, revoke and mint new tokens for the ones you created (agent token)
    #[command(subcommand)]
    Share(share::ShareCommand),

    // About and long help come from the args struct's doc comment.
    Push(push::PushArgs),

    // About and long help come from the args struct's doc comment.
    Sync(sync::SyncArgs),

    /// Inspect the local outbox of `capsync sync`: queued, acked and rejected ops (no token)
    #[command(subcommand)]
    Outbox(outbox_cmd::OutboxCommand),

    // About and long help come from the args struct's doc comment.
    Snapshot(snapshot::SnapshotArgs),

    // About and long help come from the args struct's doc comment.
    Follow(follow::FollowArgs),

    /// Print a share's id, cursor and epochs (viewer or writer token)
    State,

    // About and long help come from the args struct's doc comment.
    Ops(inspect::OpsArgs),

    // About and long help come from the args struct's doc comment.
    MintViewer(mint::MintViewerArgs),

    /// Mint a fresh writer token for the share, same epoch and expiry (writer token)
    Save,

    /// Share opencode sessions here: its built-in share client (config), or capsync's plugin (install)
    #[command(subcommand)]
    Opencode(opencode::OpencodeCommand),
}

/// `--scope` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ScopeArg {
    /// Writer tokens and capabilities only
    Writers,
    /// Viewer tokens and capabilities only
    Viewers,
    /// Both
    All,
}

impl From<ScopeArg> for Scope {
    fn from(scope: ScopeArg) -> Self {
        match scope {
            ScopeArg::Writers => Scope::Writers,
            ScopeArg::Viewers => Scope::Viewers,
            ScopeArg::All => Scope::All,
        }
    }
}

/// Entry point of the `capsync` binary: parses arguments, runs the command on a
/// current-thread runtime with a `LocalSet` (capnp-rpc is single-threaded), and turns
/// errors into one line on stderr (plus JSON on stdout with `--json`).
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let out = Output::new(cli.global.json);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            out.error(&ClientError::Io(e));
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let local = tokio::task::LocalSet::new();
    ExitCode::from(local.block_on(&runtime, run_reporting(&cli, &out)))
}

/// Runs one parsed command line and returns its exit code; an error is reported on
/// `out` first. Must run on a tokio `LocalSet`.
pub async fn run_reporting(cli: &Cli, out: &Output) -> u8 {
    match run(cli, out).await {
        Ok(code) => code,
        Err(e) => {
            out.error(&e);
            EXIT_ERROR
        }
    }
}

/// Runs one parsed command line: `Ok(exit code)` (0, or 3 for rejected ops),
/// or the error. Must run on a tokio `LocalSet`.
pub async fn run(cli: &Cli, out: &Output) -> Result<u8, ClientError> {
    let global = &cli.global;
    match &cli.command {
        Command::Admin(command) => admin::run(global, out, command).await,
        Command::Share(command) => share::run(global, out, command).await,
        Command::Push(args) => push::run(global, out, args).await,
        Command::Sync(args) => sync::run(global, out, args).await,
        Command::Outbox(command) => outbox_cmd::run(out, command).await,
        Command::Snapshot(args) => snapshot::run(global, out, args).await,
        Command::Follow(args) => follow::run(global, out, args).await,
        Command::State => inspect::state(global, out).await,
        Command::Ops(args) => inspect::ops(global, out, args).await,
        Command::MintViewer(args) => mint::mint_viewer(global, out, args).await,
        Command::Save => mint::save(global, out).await,
        Command::Opencode(command) => opencode::run(global, out, command).await,
    }
}

/// What an in-process run of the command line did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CliRun {
    /// The exit code the binary would have returned.
    pub code: u8,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `capsync` in-process with these arguments (the first is the program name) and
/// captures its output, for tests and embedding. Must run on a tokio `LocalSet`.
/// Environment variables (`CAPSYNC_SERVER`, `CAPSYNC_TOKEN`, ...) apply as for the binary,
/// so tests should pass `--server` and `--token` explicitly. Usage errors give code 2 and
/// clap's message, like the binary.
pub async fn run_args<I, T>(args: I) -> CliRun
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let text = e.render().to_string();
            let code = u8::try_from(e.exit_code()).unwrap_or(2);
            return if e.use_stderr() {
                CliRun {
                    code,
                    stdout: String::new(),
                    stderr: text,
                }
            } else {
                CliRun {
                    code,
                    stdout: text,
                    stderr: String::new(),
                }
            };
        }
    };
    let (out, captured) = Output::captured(cli.global.json);
    let code = run_reporting(&cli, &out).await;
    let captured = captured.take();
    CliRun {
        code,
        stdout: captured.stdout,
        stderr: captured.stderr,
    }
}

impl Global {
    /// Where share links start: `--share-url` without its trailing `/`, else
    /// the server's host with the HTTP gateway's default port.
    fn share_origin(&self) -> String {
        match &self.share_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None => {
                let host = self.server.first().host();
                if host.contains(':') {
                    format!("http://[{host}]:{DEFAULT_SHARE_PORT}")
                } else {
                    format!("http://{host}:{DEFAULT_SHARE_PORT}")
                }
            }
        }
    }

    /// The share page of `share_id`, the viewer token in the URL fragment (never sent to
    /// the server, so never in an access log).
    fn share_link(&self, share_id: &str, viewer_token: &str) -> String {
        format!("{}/s/{share_id}#{viewer_token}", self.share_origin())
    }

    /// The token from `--token-file`, `--token` or `CAPSYNC_TOKEN`, checked for form and
    /// kind before anything is sent. Errors never include the token.
    fn token(&self, accepted: &[TokenKind]) -> Result<String, ClientError> {
        let token = match (&self.token_file, &self.token) {
            (Some(path), _) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    ClientError::invalid(format!("cannot read token file {}: {e}", path.display()))
                })?;
                text.lines().next().unwrap_or("").trim().to_owned()
            }
            (None, Some(token)) => token.trim().to_owned(),
            (None, None) => {
                return Err(ClientError::invalid(format!(
                    "this command needs {} token: set CAPSYNC_TOKEN, or pass --token or --token-file",
                    describe_kinds(accepted)
                )));
            }
        };
        check_token(token, accepted)
    }

    /// How to connect: the default reader limits, `--connect-timeout`.
    fn client_options(&self) -> ClientOptions {
        ClientOptions {
            connect_timeout: self.connect_timeout,
            ..ClientOptions::default()
        }
    }

    /// Connects to `--server`, within `--connect-timeout`.
    async fn connect(&self) -> Result<Connection, ClientError> {
        connect_any(&self.server, 0, &self.client_options())
            .await
            .map(|(conn, _)| conn)
    }

    /// Connects and redeems the token, which must be one of `accepted`.
    async fn redeem(&self, accepted: &[TokenKind]) -> Result<(Connection, Redeemed), ClientError> {
        let token = self.token(accepted)?;
        let conn = self.connect().await?;
        let redeemed = conn.redeem(&token).await?;
        Ok((conn, redeemed))
    }

    /// Runs `work`, calls on `conn`, failing once the server has been silent for
    /// `--call-timeout` while it waits.
    async fn call<T>(
        &self,
        conn: &Connection,
        work: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        conn.with_call_timeout(self.call_timeout, work).await
    }
}

/// `token` if it is well-formed and one of `accepted`, checked before anything is sent.
/// Errors never include the token.
fn check_token(token: String, accepted: &[TokenKind]) -> Result<String, ClientError> {
    let parsed: SturdyRef = token
        .parse()
        .map_err(|e: capsync_shared::token::MalformedToken| ClientError::invalid(e.to_string()))?;
    if !accepted.contains(&parsed.kind) {
        return Err(ClientError::WrongKind {
            expected: accepted[0],
            got: parsed.kind,
        });
    }
    Ok(token)
}

/// "an admin", "a viewer or writer", for messages.
fn describe_kinds(kinds: &[TokenKind]) -> String {
    let names: Vec<&str> = kinds.iter().map(|k| k.as_str()).collect();
    let article = match kinds.first() {
        Some(TokenKind::Admin | TokenKind::Agent) => "an",
        _ => "a",
    };
    format!("{article} {}", names.join(" or "))
}

/// Closes the connection at the end of a command; a failure to close cleanly (or in time,
/// from a server that stopped answering) changes nothing for the user once the command's
/// work is done.
async fn finish(conn: Connection) {
    let _ = tokio::time::timeout(DISCONNECT_TIMEOUT, conn.disconnect()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_go_anywhere_and_have_defaults() {
        let cli = Cli::try_parse_from(["capsync", "state", "--json"]).unwrap();
        assert!(cli.global.json);
        assert!(matches!(cli.command, Command::State));
        let cli = Cli::try_parse_from([
            "capsync",
            "--server",
            "example:1",
            "admin",
            "revoke",
            "sh_1",
            "--scope",
            "viewers",
        ])
        .unwrap();
        assert_eq!(
            cli.global.server,
            ServerList::from(capsync_client::server_addr::ServerAddr::new("example", 1))
        );
        assert_eq!(cli.global.connect_timeout, Duration::from_secs(10));
        assert_eq!(cli.global.call_timeout, Duration::from_secs(60));
        match cli.command {
            Command::Admin(admin::AdminCommand::Revoke { share_id, scope }) => {
                assert_eq!(share_id, "sh_1");
                assert_eq!(scope, ScopeArg::Viewers);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn timeouts_are_durations_and_server_addresses_are_checked_without_echo() {
        let cli = Cli::try_parse_from([
            "capsync",
            "--connect-timeout",
            "250ms",
            "state",
            "--call-timeout",
            "2m",
        ])
        .unwrap();
        assert_eq!(cli.global.connect_timeout, Duration::from_millis(250));
        assert_eq!(cli.global.call_timeout, Duration::from_secs(120));
        for bad in ["0s", "soon"] {
            let err = Cli::try_parse_from(["capsync", "--call-timeout", bad, "state"]).unwrap_err();
            assert_eq!(err.exit_code(), 2);
        }

        let link = "http://sync.example.org:7421/s/sh_1#csviewer_00ff_verysecret";
        let err = Cli::try_parse_from(["capsync", "--server", link, "state"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let text = err.render().to_string();
        assert!(
            text.contains("invalid value for '--server <HOST:PORT>'"),
            "{text}"
        );
        assert!(text.contains("sync.example.org:7420"), "{text}");
        assert!(!text.contains("verysecret"), "{text}");
        let err = Cli::try_parse_from(["capsync", "--server", "example.org", "state"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.render().to_string().contains("e.g. example.org:7420"));
    }

    #[test]
    fn expiry_flags_parse_durations() {
        let cli =
            Cli::try_parse_from(["capsync", "admin", "mint-agent", "--expires", "30d"]).unwrap();
        match cli.command {
            Command::Admin(admin::AdminCommand::MintAgent { expires, .. }) => {
                assert_eq!(
                    expires,
                    capsync_client::expiry::Expiry::In(std::time::Duration::from_secs(30 * 86_400))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["capsync", "mint-viewer", "--expires", "soon"]).is_err());
    }

    #[test]
    fn share_mint_commands_take_a_share_id_and_an_expiry() {
        let cli = Cli::try_parse_from([
            "capsync",
            "share",
            "mint-writer",
            "sh_1",
            "--expires",
            "30d",
        ])
        .unwrap();
        match cli.command {
            Command::Share(share::ShareCommand::MintWriter(args)) => {
                assert_eq!(args.share_id, "sh_1");
                assert_eq!(
                    args.expires,
                    capsync_client::expiry::Expiry::In(std::time::Duration::from_secs(30 * 86_400))
                );
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["capsync", "share", "mint-viewer", "sh_2"]).unwrap();
        match cli.command {
            Command::Share(share::ShareCommand::MintViewer(args)) => {
                assert_eq!(args.share_id, "sh_2");
                assert_eq!(args.expires, capsync_client::expiry::Expiry::Never);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["capsync", "share", "mint-writer"]).is_err());
    }

    #[test]
    fn prune_defaults_to_thirty_days_and_takes_its_flags() {
        let cli = Cli::try_parse_from(["capsync", "admin", "prune"]).unwrap();
        match cli.command {
            Command::Admin(admin::AdminCommand::Prune(args)) => {
                assert_eq!(args.older_than, capsync_client::types::DEFAULT_PRUNE_AGE);
                assert!(!args.children && !args.archived_only && !args.dry_run && !args.vacuum);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from([
            "capsync",
            "admin",
            "prune",
            "--older-than",
            "12h",
            "--children",
            "--archived-only",
            "--dry-run",
            "--vacuum",
        ])
        .unwrap();
        match cli.command {
            Command::Admin(admin::AdminCommand::Prune(args)) => {
                assert_eq!(args.older_than, std::time::Duration::from_secs(12 * 3600));
                assert!(args.children && args.archived_only && args.dry_run && args.vacuum);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_bad_age_is_refused_with_examples() {
        for bad in ["soon", "30", "0d"] {
            let err = Cli::try_parse_from(["capsync", "admin", "prune", "--older-than", bad])
                .unwrap_err();
            assert_eq!(err.exit_code(), 2);
            let text = err.render().to_string();
            assert!(text.contains("--older-than <AGE>"), "{text}");
            assert!(text.contains("like 30d, 12h or 90m"), "{text}");
        }
    }

    #[test]
    fn compact_needs_an_age_and_reclaim_takes_dry_run() {
        assert!(Cli::try_parse_from(["capsync", "admin", "compact"]).is_err());
        let cli = Cli::try_parse_from([
            "capsync",
            "admin",
            "compact",
            "--older-than",
            "30d",
            "--dry-run",
        ])
        .unwrap();
        match cli.command {
            Command::Admin(admin::AdminCommand::Compact {
                older_than,
                dry_run,
            }) => {
                assert_eq!(older_than, capsync_client::types::DEFAULT_PRUNE_AGE);
                assert!(dry_run);
            }
            other => panic!("{other:?}"),
        }
        let cli = Cli::try_parse_from(["capsync", "admin", "reclaim", "--dry-run"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Admin(admin::AdminCommand::Reclaim { dry_run: true })
        ));
        let cli = Cli::try_parse_from(["capsync", "admin", "vacuum", "--json"]).unwrap();
        assert!(cli.global.json);
        assert!(matches!(
            cli.command,
            Command::Admin(admin::AdminCommand::Vacuum)
        ));
    }

    #[test]
    fn tokens_are_checked_without_being_echoed() {
        let mut global = Global {
            server: DEFAULT_SERVER.parse().unwrap(),
            connect_timeout: Duration::from_secs(10),
            call_timeout: Duration::from_secs(60),
            json: false,
            token: Some("csviewer_nothex_secret-value".into()),
            token_file: None,
            share_url: None,
        };
        let err = global.token(&[TokenKind::Viewer]).unwrap_err().to_string();
        assert!(!err.contains("secret-value"), "{err}");

        let token = SturdyRef::generate(TokenKind::Viewer).expose();
        global.token = Some(token.clone());
        assert_eq!(
            global
                .token(&[TokenKind::Viewer, TokenKind::Writer])
                .unwrap(),
            token
        );
        let err = global.token(&[TokenKind::Admin]).unwrap_err();
        assert!(matches!(err, ClientError::WrongKind { .. }));
        assert!(!err.to_string().contains(&token));

        global.token = None;
        let err = global.token(&[TokenKind::Agent]).unwrap_err().to_string();
        assert!(err.contains("needs an agent token"), "{err}");
    }
}
