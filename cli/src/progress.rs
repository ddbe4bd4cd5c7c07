//! Live progress on stderr (an indicatif bar) for long pushes, `capsync sync` and the
//! long admin commands (prune, reclaim, compact), drawn only when stderr is a
//! terminal: scripts, pipes, `--json` and captured runs see none of it.

use std::cell::OnceCell;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::output::Output;

/// How often the bar redraws on its own (spinner, elapsed time) between updates.
const TICK: Duration = Duration::from_millis(120);

/// A progress bar, or nothing when progress must not be drawn.
#[derive(Debug)]
pub struct Progress {
    /// The bar's label; `None` when output is not a terminal: every method is then a
    /// no-op.
    prefix: Option<String>,
    /// What the bar counts ("ops", "shares", "parts"), shown after the numbers.
    unit: &'static str,
    /// Drawn from the first [`Progress::update`] on, so no empty bar shows before the
    /// total is known.
    bar: OnceCell<ProgressBar>,
}

impl Progress {
    /// A bar counting `unit`s, labelled `prefix`; drawn only when
    /// [`Output::shows_progress`].
    pub fn new(out: &Output, prefix: &str, unit: &'static str) -> Self {
        Self {
            prefix: out.shows_progress().then(|| prefix.to_owned()),
            unit,
            bar: OnceCell::new(),
        }
    }

    /// Progress that draws nothing.
    pub fn hidden() -> Self {
        Self {
            prefix: None,
            unit: "",
            bar: OnceCell::new(),
        }
    }

    /// Whether anything is drawn.
    pub fn is_visible(&self) -> bool {
        self.prefix.is_some()
    }

    /// Moves the bar to `pos` of `len` with `message` after it (drawing it the first time).
    pub fn update(&self, pos: u64, len: u64, message: impl Into<String>) {
        let Some(prefix) = &self.prefix else {
            return;
        };
        let bar = self.bar.get_or_init(|| new_bar(prefix, self.unit, len));
        bar.set_length(len);
        bar.set_position(pos.min(len));
        bar.set_message(message.into());
    }

    /// Prints a note (like [`Output::note`]) without tearing the bar: the bar is hidden
    /// while the line is written, then redrawn below it.
    pub fn note(&self, out: &Output, text: impl AsRef<str>) {
        match self.bar.get() {
            Some(bar) => bar.suspend(|| out.note(text)),
            None => out.note(text),
        }
    }

    /// Removes the bar from the terminal (the final summary is printed by the caller).
    pub fn finish(&self) {
        if let Some(bar) = self.bar.get() {
            bar.finish_and_clear();
        }
    }
}

fn new_bar(prefix: &str, unit: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(&bar_template(unit))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar.enable_steady_tick(TICK);
    bar
}

/// The bar's layout: counts in `unit`, then the time left and the message.
fn bar_template(unit: &str) -> String {
    format!(
        "{{prefix}} {{spinner}} [{{bar:30}}] {{human_pos}}/{{human_len}} {unit}, eta {{eta}} · {{wide_msg}}"
    )
}

impl Drop for Progress {
    /// A bar left behind by an early return (an error) must not stay on screen.
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captured_and_json_output_draw_nothing() {
        let (out, captured) = Output::captured(false);
        let progress = Progress::new(&out, "push", "ops");
        assert!(!progress.is_visible());
        progress.update(5, 10, "half way");
        progress.note(&out, "a note");
        progress.finish();
        assert_eq!(captured.borrow().stderr, "a note\n");
        assert!(!Progress::new(&Output::new(true), "prune", "shares").is_visible());
    }

    #[test]
    fn the_bar_counts_in_its_unit() {
        let template = bar_template("shares");
        assert!(
            template.contains("{human_pos}/{human_len} shares,"),
            "{template}"
        );
        assert!(ProgressStyle::with_template(&template).is_ok());
    }
}
