//! `capsync opencode ship`: the shipper the plugin starts (see [`capsync_client::opencode::shipper`]).

use std::path::PathBuf;
use std::time::Duration;

use capsync_shared::TokenKind;

use super::super::args::parse_duration;
use super::super::output::Output;
use super::super::sync::stop_signal;
use super::super::{EXIT_OK, Global};
use capsync_client::error::ClientError;
use capsync_client::opencode::shipper::{
    self, ShareMode, ShipperEnd, ShipperError, ShipperOptions,
};

use super::ShareArg;

/// The shipper's log is cut back to nothing at start once it is this large.
const LOG_LIMIT_BYTES: u64 = 4 << 20;

/// Send the opencode plugin's journal to the server (started by the plugin; agent token)
///
/// Reads the journal in DIR/journal as opencode writes it, queues each change in a
/// durable outbox per session and sends it exactly once, creating one share per
/// session (sub-agent sessions as children of their parent's share). Ends when no
/// opencode writes the journal any more and everything is sent; while the server is
/// unreachable it keeps retrying, for up to --linger after the last opencode ended.
/// Exits at once (0) when another shipper ships the same journal. Logs to stderr
/// (CAPSYNC_LOG sets the level: error, warn, info, debug).
///
/// The plugin starts it; run it by hand to send what a journal holds, e.g. after
/// --linger gave up.
#[derive(Debug, clap::Args)]
#[command(verbatim_doc_comment)]
pub struct ShipArgs {
    /// The shipper's directory, as `capsync opencode install` made it
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Which sessions are shipped
    #[arg(long, value_enum, default_value_t = ShareArg::Manual)]
    pub share: ShareArg,
    /// How often to look at the journal for new lines
    #[arg(long, env = "CAPSYNC_OPENCODE_POLL", default_value = "100ms", value_parser = parse_duration, value_name = "DURATION")]
    pub poll: Duration,
    /// How long to keep trying an unreachable server after the last opencode ended
    #[arg(long, env = "CAPSYNC_OPENCODE_LINGER", default_value = "24h", value_parser = parse_duration, value_name = "DURATION")]
    pub linger: Duration,
    /// How long a session's outbox is kept once everything in it is sent, while opencode runs
    #[arg(long, env = "CAPSYNC_OPENCODE_KEEP_DRAINED", default_value = "60s", value_parser = parse_duration, value_name = "DURATION")]
    pub keep_drained: Duration,
    /// The server's --max-op-bytes: a larger inlined attachment is left out (marked)
    #[arg(long, env = "CAPSYNC_MAX_OP_BYTES", default_value_t = capsync_shared::limits::DEFAULT_MAX_OP_BYTES, value_name = "BYTES")]
    pub max_op_bytes: usize,
}

pub async fn run(global: &Global, out: &Output, args: &ShipArgs) -> Result<u8, ClientError> {
    let stop = stop_signal()?;
    let token = global.token(&[TokenKind::Agent])?;
    trim_log(&args.dir.join("shipper.log"));
    init_logging();
    let mut options = ShipperOptions::new(&args.dir, global.server.to_string(), token);
    options.share = ShareMode::from(args.share);
    options.connection = global.client_options();
    options.call_timeout = global.call_timeout;
    options.poll = args.poll;
    options.linger = args.linger;
    options.keep_drained = args.keep_drained;
    options.max_op_bytes = args.max_op_bytes;
    tracing::info!(dir = %args.dir.display(), share = ShareMode::from(args.share).as_str(), server = %global.server, "shipper started");
    let end = shipper::ship(options, stop).await.map_err(|e| match e {
        ShipperError::AgentRefused(error) => error,
        other => ClientError::invalid(other.to_string()),
    });
    match &end {
        Ok(ShipperEnd::Busy) => tracing::info!("another shipper ships this journal"),
        Ok(end) => tracing::info!(?end, "shipper ended"),
        Err(error) => tracing::error!(%error, "shipper stopped"),
    }
    let end = end?;
    out.result(&serde_json::json!({ "ended": end }), || {
        format!("shipper ended: {end:?}")
    });
    Ok(EXIT_OK)
}

/// Empties the shipper's log once it has grown past [`LOG_LIMIT_BYTES`]. The plugin
/// opens it for appending, so writers carry on at the new end.
fn trim_log(path: &std::path::Path) {
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_LIMIT_BYTES)
        && let Ok(file) = std::fs::OpenOptions::new().write(true).open(path)
    {
        let _ = file.set_len(0);
    }
}

/// Log lines to stderr, at the level CAPSYNC_LOG names (default info).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSYNC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .try_init();
}
