//! `capsync-server`: runs the sync server, or does maintenance on its data directory.

use std::path::PathBuf;
use std::process::ExitCode;

use capsync_server::config::{DEFAULT_DATA_DIR, DatabaseUrl};
use capsync_server::{Config, StartError, admin_token, data_dir::DataDirLock, server};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "capsync-server",
    version,
    about = "capsync: a capability-based sync server for AI coding-agent sessions",
    long_about = "capsync: a capability-based sync server for AI coding-agent sessions.\n\n\
        Agents push every change of a session as batches of ops over Cap'n Proto RPC; \
        the server applies each op exactly once to a SQLite ledger and acks with a cursor. \
        Share links are sturdy refs (tokens) that redeem into live capabilities.\n\n\
        Quick start:\n  capsync-server serve            # 127.0.0.1:7420, data in ./capsync-data\n  \
        cat capsync-data/admin.token    # the admin token created on first start"
)]
struct Cli {
    /// Log format on stderr. The level is set with RUST_LOG (default: info).
    #[arg(long, global = true, env = "CAPSYNC_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server until SIGINT or SIGTERM; then drain batches in flight and exit.
    Serve(Box<Config>),
    /// Manage the admin token (a server on this data directory must be stopped; on
    /// PostgreSQL, the nodes with other data directories keep running).
    AdminToken {
        /// Revoke every admin token and write a new one to <data-dir>/admin.token.
        #[arg(long)]
        rotate: bool,
        /// The server's data directory.
        #[arg(long, env = "CAPSYNC_DATA_DIR", default_value = DEFAULT_DATA_DIR)]
        data_dir: PathBuf,
        /// The ledger's PostgreSQL database, as the servers' `--database` (unset: the
        /// SQLite file in the data directory). Every node sees the new token at once.
        #[arg(long, env = "CAPSYNC_DATABASE", value_name = "URL")]
        database: Option<DatabaseUrl>,
    },
    /// Move a SQLite ledger into an empty PostgreSQL database: shares, tokens (as their
    /// hashes), ledger ops with their ids, cursors and digests, records, the audit log.
    /// Every token, link and cursor works as before, and a resent op is still a
    /// duplicate. One transaction (all or nothing), then a check that both hold the
    /// same rows. Stop the server first: the data directory must not be in use.
    Migrate {
        /// The data directory of the SQLite server (`--data-dir` of `serve`).
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// The PostgreSQL database, as `serve --database` will name it.
        #[arg(long, value_name = "URL")]
        to: DatabaseUrl,
        /// With `sslmode=require` in the URL: the CA certificates (PEM) to trust, as
        /// `serve --database-ca-file`.
        #[arg(long, env = "CAPSYNC_DATABASE_CA_FILE", value_name = "PEM")]
        database_ca_file: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Serve(config) => serve(*config),
        Command::AdminToken {
            rotate,
            data_dir,
            database,
        } => admin_token_command(rotate, data_dir, database),
        Command::Migrate {
            from,
            to,
            database_ca_file,
        } => migrate_command(&from, &to, database_ca_file.as_deref()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("capsync-server: {err}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(config: Config) -> Result<(), StartError> {
    server::serve_blocking(config, shutdown_signal())
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("signal received");
}

fn admin_token_command(
    rotate: bool,
    data_dir: PathBuf,
    database: Option<DatabaseUrl>,
) -> Result<(), StartError> {
    let config = Config {
        data_dir,
        database,
        ..Config::default()
    };
    let path = config.admin_token_path();
    if !rotate {
        println!(
            "The admin token is in {} (see --help; --rotate replaces it).",
            path.display()
        );
        return Ok(());
    }
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let ledger = server::open_ledger(&config, &Default::default())?;
        let hasher = server::hasher(&config)?;
        admin_token::rotate(&ledger, &hasher, &path).await?;
        ledger.close().await;
        tracing::info!(path = %path.display(),
            "admin token rotated: every earlier admin token is revoked");
        println!(
            "Rotated: every earlier admin token is revoked; the new one is in {}",
            path.display()
        );
        Ok(())
    })
}

fn migrate_command(
    from: &std::path::Path,
    to: &DatabaseUrl,
    ca_file: Option<&std::path::Path>,
) -> Result<(), StartError> {
    use capsync_server::ledger::move_to_postgres::{MoveProgress, move_to_postgres};
    use capsync_server::ledger::postgres::{Database, PostgresOptions};
    use std::io::IsTerminal as _;

    let config = Config {
        data_dir: from.to_owned(),
        ..Config::default()
    };
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    let options = PostgresOptions::for_database(
        Database::new(to.expose(), ca_file).map_err(StartError::Ledger)?,
    );
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg:>10} [{bar:40}] {pos}/{len} rows ({eta} left)",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar
    });
    // Without a terminal, a log line every tenth of the way.
    let mut logged_tenths = 0;
    let mut progress = |at: MoveProgress| match &bar {
        Some(bar) => {
            bar.set_length(at.total);
            bar.set_position(at.rows);
            bar.set_message(at.table);
        }
        None => {
            let tenths = (at.rows * 10).checked_div(at.total).unwrap_or(10);
            if tenths > logged_tenths {
                logged_tenths = tenths;
                tracing::info!(
                    table = at.table,
                    rows = at.rows,
                    total = at.total,
                    "copying"
                );
            }
        }
    };
    let report = move_to_postgres(&config.database_path(), &options, &mut progress)
        .map_err(StartError::Ledger)?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    println!("Moved into PostgreSQL and verified (rows per table):");
    for (table, rows) in &report.tables {
        println!("  {table:<10} {rows}");
    }
    println!(
        "Start the servers with --database (the admin token file stays in {}).",
        from.display()
    );
    Ok(())
}
