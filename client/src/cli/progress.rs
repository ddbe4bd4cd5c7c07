//! Live progress on stderr (an indicatif bar) for long pushes and `capsync sync`, drawn only
//! when stderr is a terminal: scripts, pipes, `--json` and captured runs see none of it.

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
    /// Drawn from the first [`Progress::update`] on, so no empty bar shows before the
    /// total is known.
    bar: OnceCell<ProgressBar>,
}

impl Progress {
    /// A bar counting ops, labelled `prefix`; drawn only when [`Output::shows_progress`].
    pub fn ops(out: &Output, prefix: &str) -> Self {
        Self {
            prefix: out.shows_progress().then(|| prefix.to_owned()),
            bar: OnceCell::new(),
        }
    }

    /// Progress that draws nothing.
    pub fn hidden() -> Self {
        Self {
            prefix: None,
            bar: OnceCell::new(),
        }
    }

    /// Whether anything is drawn.
    #[cfg(test)]
    pub fn is_visible(&self) -> bool {
        self.prefix.is_some()
    }

    /// Moves the bar to `pos` of `len` with `message` after it (drawing it the first time).
    pub fn update(&self, pos: u64, len: u64, message: impl Into<String>) {
        let Some(prefix) = &self.prefix else {
            return;
        };
        let bar = self.bar.get_or_init(|| new_bar(prefix, len));
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

fn new_bar(prefix: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} {spinner} [{bar:30}] {human_pos}/{human_len} ops, eta {eta} · {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_owned());
    bar.enable_steady_tick(TICK);
    bar
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
        let progress = Progress::ops(&out, "push");
        assert!(!progress.is_visible());
        progress.update(5, 10, "half way");
        progress.note(&out, "a note");
        progress.finish();
        assert_eq!(captured.borrow().stderr, "a note\n");
        assert!(!Progress::ops(&Output::new(true), "push").is_visible());
    }
}
