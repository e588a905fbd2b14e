//! Progress of long work as a person sees it: a bar on a terminal, and a plain line every
//! tenth of the work elsewhere (piped to a file, a run still says how far it got). The
//! library reports through callbacks (`on_step`, `on_window`); this draws them.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// Progress of `total` units of one piece of work.
pub struct Steps {
    bar: Option<ProgressBar>,
    show: bool,
    total: u64,
    every: u64,
    what: &'static str,
    start: Instant,
}

impl Steps {
    /// Report `total` units of `what` (`steps`, `windows`), unless `show` is false.
    pub fn new(show: bool, total: u64, what: &'static str) -> Self {
        let bar = (show && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{{spinner}} [{{elapsed_precise}}] {{bar:30}} {{pos}}/{{len}} {what}  {{msg}}"
                ))
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self { bar, show, total, every: (total / 10).max(1), what, start: Instant::now() }
    }

    /// `done` units are done; `message` says how it goes (a loss, a rate).
    pub fn tick(&self, done: u64, message: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(message.to_owned());
            }
            None if self.show && (done.is_multiple_of(self.every) || done == self.total) => {
                eprintln!(
                    "{done}/{} {} ({:.0} s) {message}",
                    self.total,
                    self.what,
                    self.start.elapsed().as_secs_f64()
                );
            }
            None => {}
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
