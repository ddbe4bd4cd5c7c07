//! `capsync follow`'s connection status on stderr: it says when the connection is lost and
//! when it is back, however many attempts that takes in between. On a terminal one line is
//! redrawn in place with each attempt; elsewhere (logs, pipes) a line is printed only when
//! the state changes. With `--json` it is silent, like every note.

use std::time::Duration;

use tokio::time::Instant;

use super::output::Output;

/// Erases the terminal's current line and returns to its start.
const REDRAW: &str = "\r\x1b[2K";

/// The connection state `capsync follow` reports.
pub(super) struct LinkStatus<'a> {
    out: &'a Output,
    /// Redraw one line in place (stderr is a terminal) rather than print lines.
    in_place: bool,
    /// Whether following has started: until then an outage is "cannot reach the server"
    /// rather than "connection lost", and the first success says nothing.
    followed_once: bool,
    /// The outage in progress, if any.
    outage: Option<Outage>,
    /// An in-place line is on screen without its newline.
    line_open: bool,
}

/// One stretch without a working connection.
struct Outage {
    since: Instant,
    /// Failures in it: the loss, then each failed attempt.
    failures: u32,
}

impl<'a> LinkStatus<'a> {
    /// Redraws in place when `out` draws progress (a terminal, readable output).
    pub(super) fn new(out: &'a Output) -> Self {
        Self::with_mode(out, out.shows_progress())
    }

    fn with_mode(out: &'a Output, in_place: bool) -> Self {
        Self {
            out,
            in_place,
            followed_once: false,
            outage: None,
            line_open: false,
        }
    }

    /// The connection was lost, or an attempt to make one failed; the next attempt comes
    /// after `retry_in`.
    pub(super) fn failed(&mut self, why: &str, retry_in: Duration) {
        let first = self.outage.is_none();
        let outage = self.outage.get_or_insert_with(|| Outage {
            since: Instant::now(),
            failures: 0,
        });
        outage.failures += 1;
        let head = if self.followed_once {
            "connection lost"
        } else {
            "cannot reach the server"
        };
        if self.in_place {
            let next = self.failed_attempts() + 1;
            self.out.stderr_text(&format!(
                "{REDRAW}{head}: {why}; attempt {next} in {:.1}s",
                retry_in.as_secs_f64()
            ));
            self.line_open = true;
        } else if first {
            self.out.note(format!("{head}: {why}; retrying"));
        }
    }

    /// Following works (again): ends an outage, saying how long it took.
    pub(super) fn connected(&mut self) {
        // The attempts that failed, and this one.
        let attempts = self.failed_attempts() + 1;
        let was_following = std::mem::replace(&mut self.followed_once, true);
        let Some(outage) = self.outage.take() else {
            return;
        };
        let what = if was_following {
            "reconnected"
        } else {
            "connected"
        };
        let line = format!(
            "{what} after {attempts} attempt{} ({:.1}s)",
            if attempts == 1 { "" } else { "s" },
            outage.since.elapsed().as_secs_f64()
        );
        if self.in_place {
            self.out.stderr_text(&format!("{REDRAW}{line}\n"));
            self.line_open = false;
        } else {
            self.out.note(line);
        }
    }

    /// Ends an in-place line before anything else is written to stderr.
    pub(super) fn close(&mut self) {
        if std::mem::take(&mut self.line_open) {
            self.out.stderr_text("\n");
        }
    }

    /// Attempts that failed in the current outage: every failure, except the loss that
    /// began it when following had started.
    fn failed_attempts(&self) -> u32 {
        let failures = self.outage.as_ref().map_or(0, |outage| outage.failures);
        if self.followed_once {
            failures.saturating_sub(1)
        } else {
            failures
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn without_a_terminal_only_changes_are_printed() {
        let (out, captured) = Output::captured(false);
        let mut status = LinkStatus::with_mode(&out, false);
        status.connected();
        for why in [
            "disconnected from the server",
            "connection refused",
            "refused",
        ] {
            status.failed(why, S);
            tokio::time::sleep(S).await;
        }
        status.connected();
        status.connected();
        status.failed("the server is shutting down", S);
        tokio::time::sleep(S / 2).await;
        status.connected();
        assert_eq!(
            captured.borrow().stderr,
            "connection lost: disconnected from the server; retrying\n\
             reconnected after 3 attempts (3.0s)\n\
             connection lost: the server is shutting down; retrying\n\
             reconnected after 1 attempt (0.5s)\n"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn on_a_terminal_one_line_is_redrawn_until_it_is_back() {
        let (out, captured) = Output::captured(false);
        let mut status = LinkStatus::with_mode(&out, true);
        status.failed("connection refused", S / 10);
        tokio::time::sleep(S / 10).await;
        status.failed("connection refused", S / 5);
        tokio::time::sleep(S / 5).await;
        status.connected();
        status.failed("disconnected from the server", S / 10);
        status.close();
        status.close();
        assert_eq!(
            captured.borrow().stderr,
            "\r\x1b[2Kcannot reach the server: connection refused; attempt 2 in 0.1s\
             \r\x1b[2Kcannot reach the server: connection refused; attempt 3 in 0.2s\
             \r\x1b[2Kconnected after 3 attempts (0.3s)\n\
             \r\x1b[2Kconnection lost: disconnected from the server; attempt 1 in 0.1s\n"
        );
    }

    #[test]
    fn json_output_hears_nothing() {
        let (out, captured) = Output::captured(true);
        let mut status = LinkStatus::new(&out);
        status.connected();
        status.failed("disconnected from the server", S);
        status.connected();
        status.close();
        assert_eq!(captured.borrow().stderr, "");
    }
}
