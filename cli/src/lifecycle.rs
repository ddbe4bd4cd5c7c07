//! `capsync admin prune|vacuum|reclaim|compact`: the storage lifecycle commands,
//! run with a progress bar on a terminal and reported as text or `--json`.

use std::rc::Rc;
use std::time::Duration;

use super::lifecycle_report::{compact_text, prune_text, reclaim_text, vacuum_text};
use super::output::Output;
use super::progress::Progress;
use capsync_client::admin::AdminClient;
use capsync_client::error::ClientError;
use capsync_client::progress_listener::ProgressFn;
use capsync_client::types::PruneOptions;

/// Arguments of `capsync admin prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// Prune roots with no change for longer than this: 30d, 12h, 90m, 1w
    #[arg(long, value_name = "AGE", default_value = "30d", value_parser = parse_age)]
    pub older_than: Duration,
    /// Also prune the child (sub-agent) sessions of every pruned share, and theirs,
    /// whatever their project or age (without it they are kept and listed)
    #[arg(long)]
    pub children: bool,
    /// Only prune roots that were archived (`capsync admin archive`)
    #[arg(long)]
    pub archived_only: bool,
    /// Delete nothing: list exactly what would be deleted, with counts and bytes
    #[arg(long)]
    pub dry_run: bool,
    /// Afterwards, vacuum the database so the file shrinks (blocks writes while it runs)
    #[arg(long)]
    pub vacuum: bool,
}

impl PruneArgs {
    fn options(&self) -> PruneOptions {
        PruneOptions {
            older_than: self.older_than,
            children: self.children,
            archived_only: self.archived_only,
            dry_run: self.dry_run,
            vacuum: self.vacuum,
        }
    }
}

/// Parses an age argument (`--older-than 30d`). Zero is refused: it would select
/// every share, which is never what an age means.
pub fn parse_age(text: &str) -> Result<Duration, String> {
    const EXAMPLES: &str = "use a number and a unit, like 30d, 12h or 90m";
    let age = humantime::parse_duration(text.trim())
        .map_err(|e| format!("not a duration ({e}); {EXAMPLES}"))?;
    if age < Duration::from_millis(1) {
        return Err(format!("the age must be more than zero; {EXAMPLES}"));
    }
    Ok(age)
}

pub async fn prune(admin: &AdminClient, out: &Output, args: &PruneArgs) -> Result<(), ClientError> {
    if args.dry_run && args.vacuum {
        out.note("a dry run deletes nothing, so it does not vacuum either");
    }
    let progress = Rc::new(Progress::new(out, "prune", "shares"));
    let report = admin.prune(&args.options(), on_progress(&progress)).await;
    progress.finish();
    let report = report?;
    out.result(&report, || prune_text(&report));
    Ok(())
}

pub async fn vacuum(admin: &AdminClient, out: &Output) -> Result<(), ClientError> {
    out.note("vacuuming: writes wait until it is done");
    let report = admin.vacuum().await?;
    out.result(&report, || vacuum_text(&report));
    Ok(())
}

pub async fn reclaim(admin: &AdminClient, out: &Output, dry_run: bool) -> Result<(), ClientError> {
    let progress = Rc::new(Progress::new(out, "reclaim", "parts"));
    let report = admin.reclaim(dry_run, on_progress(&progress)).await;
    progress.finish();
    let report = report?;
    out.result(&report, || reclaim_text(&report));
    Ok(())
}

pub async fn compact(
    admin: &AdminClient,
    out: &Output,
    older_than: Duration,
    dry_run: bool,
) -> Result<(), ClientError> {
    let progress = Rc::new(Progress::new(out, "compact", "shares"));
    let report = admin
        .compact_ledger(older_than, dry_run, on_progress(&progress))
        .await;
    progress.finish();
    let report = report?;
    out.result(&report, || compact_text(&report));
    Ok(())
}

/// Feeds the bar from the server's progress calls; `None` when no bar is drawn, so
/// the server is not asked to send updates nobody sees.
fn on_progress(progress: &Rc<Progress>) -> Option<ProgressFn> {
    if !progress.is_visible() {
        return None;
    }
    let progress = progress.clone();
    Some(Box::new(move |update| {
        progress.update(update.done, update.total, update.stage)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_durations_above_zero() {
        assert_eq!(parse_age("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("12h"), Ok(Duration::from_secs(12 * 3_600)));
        assert_eq!(parse_age(" 1h 30m "), Ok(Duration::from_secs(90 * 60)));
        for bad in ["soon", "30", "-1d", ""] {
            let err = parse_age(bad).unwrap_err();
            assert!(err.contains("like 30d, 12h or 90m"), "{bad}: {err}");
        }
        assert!(parse_age("0s").unwrap_err().contains("more than zero"));
    }

    #[test]
    fn captured_output_sends_no_progress_listener() {
        let (out, _) = Output::captured(false);
        assert!(on_progress(&Rc::new(Progress::new(&out, "prune", "shares"))).is_none());
    }
}
