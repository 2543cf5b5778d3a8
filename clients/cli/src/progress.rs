//! Progress of a generation from its step events, and Ctrl-C.
//!
//! The count shown is the number of step events received (one per denoising step, whatever
//! the number of CFG branches), and it is updated together with the computed / reused counts
//! in one message, so the line never shows a step's decisions next to the previous step's
//! position (what `set_message` before `inc` did: `0/20 steps computed 1`).

use std::fmt;

use indicatif::{ProgressBar, ProgressStyle};
use teaserve_proto::v1::StepEvent;
use tokio::sync::watch;

/// Counts of a generation's step events so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepProgress {
    /// Steps the generation will run, where known beforehand.
    pub expected: Option<u32>,
    /// Step events received.
    pub steps: u32,
    /// Branch decisions that ran the transformer blocks (summed over CFG branches).
    pub computed: u32,
    /// Branch decisions that reused the cached residual.
    pub reused: u32,
    /// Most CFG branches seen in one step (1 without CFG, 2 with).
    pub branches: usize,
    /// Sigma of the latest step.
    pub sigma: f64,
}

impl StepProgress {
    /// Nothing received yet; `expected` steps where known.
    pub fn new(expected: Option<u32>) -> Self {
        Self {
            expected,
            ..Self::default()
        }
    }

    /// Counts one step event.
    pub fn record(&mut self, step: &StepEvent) {
        self.steps += 1;
        self.branches = self.branches.max(step.branches.len());
        for b in &step.branches {
            if b.computed {
                self.computed += 1;
            } else {
                self.reused += 1;
            }
        }
        self.sigma = step.sigma;
    }

    /// The total to show: the expected steps, or more if more arrived (a wrong guess).
    pub fn total(&self) -> Option<u32> {
        self.expected.map(|e| e.max(self.steps))
    }

    /// `7/20 steps` (`7 steps` when the total is unknown).
    pub fn count(&self) -> String {
        match self.total() {
            Some(t) => format!("{}/{t} steps", self.steps),
            None if self.steps == 1 => "1 step".to_string(),
            None => format!("{} steps", self.steps),
        }
    }

    /// The whole progress line after the bar.
    pub fn line(&self) -> String {
        let branches = if self.branches > 1 {
            format!(" (summed over {} CFG branches)", self.branches)
        } else {
            String::new()
        };
        if self.steps == 0 {
            return format!("{}, waiting for the first step", self.count());
        }
        format!(
            "{}, computed {} reused {}{branches}, sigma {:.3}",
            self.count(),
            self.computed,
            self.reused,
            self.sigma
        )
    }
}

/// A progress bar (on stderr; hidden when stderr is not a terminal) fed by a
/// [`StepProgress`].
pub struct StepBar {
    bar: ProgressBar,
    /// The counts the bar shows.
    pub progress: StepProgress,
}

impl StepBar {
    /// A bar for `expected` steps (a spinner until the total is known).
    pub fn new(expected: Option<u32>) -> Self {
        let progress = StepProgress::new(expected);
        let bar = match expected {
            Some(n) => {
                let bar = ProgressBar::new(u64::from(n));
                bar.set_style(
                    ProgressStyle::with_template("{bar:30} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                );
                bar
            }
            None => {
                let bar = ProgressBar::new_spinner();
                bar.set_style(
                    ProgressStyle::with_template("{spinner} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                bar
            }
        };
        bar.set_message(progress.line());
        Self { bar, progress }
    }

    /// Counts `step` and redraws.
    pub fn record(&mut self, step: &StepEvent) {
        self.progress.record(step);
        if let Some(t) = self.progress.total() {
            self.bar.set_length(u64::from(t));
        }
        self.bar.set_message(self.progress.line());
        self.bar.set_position(u64::from(self.progress.steps));
    }

    /// The generation finished: the total is what arrived; leaves the final line.
    pub fn finish(&mut self) {
        self.progress.expected = Some(self.progress.steps);
        self.bar.set_length(u64::from(self.progress.steps));
        self.bar.set_message(self.progress.line());
        self.bar.finish();
        end_line(&self.bar);
    }

    /// Leaves the line as it is (an error or Ctrl-C ends the generation early).
    pub fn abandon(&self) {
        self.bar.abandon();
        end_line(&self.bar);
    }
}

/// Ends a finished bar's line, so what is printed next starts on a line of its own.
pub fn end_line(bar: &ProgressBar) {
    if !bar.is_hidden() {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr());
    }
}

/// The user pressed Ctrl-C: what was cut short. The command exits with status 130.
#[derive(Debug)]
pub struct Cancelled(pub String);

impl fmt::Display for Cancelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Cancelled {}

/// Ctrl-C, watched from program start (so SIGINT never kills the process mid-write); clone
/// it into every place that can stop early.
#[derive(Clone)]
pub struct CtrlC(watch::Receiver<bool>);

impl CtrlC {
    /// Installs the handler (on the current Tokio runtime).
    pub fn install() -> Self {
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            // If the handler cannot be installed, `tx` is dropped and `pressed` never fires.
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = tx.send(true);
                // A second Ctrl-C ends the process at once, whatever it is waiting for.
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            }
        });
        Self(rx)
    }

    /// Resolves when Ctrl-C was pressed (never, if the handler could not be installed).
    pub async fn pressed(&mut self) {
        if self.0.wait_for(|p| *p).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use teaserve_proto::v1::BranchDecision;

    fn step(i: u32, computed: &[bool]) -> StepEvent {
        StepEvent {
            step: i,
            sigma: 1.0 - f64::from(i) / 20.0,
            branches: computed
                .iter()
                .map(|&c| BranchDecision {
                    computed: c,
                    ..Default::default()
                })
                .collect(),
            elapsed_ms: 1.0,
        }
    }

    #[test]
    fn the_count_is_the_step_events_received_with_their_decisions() {
        let mut p = StepProgress::new(Some(3));
        assert_eq!(p.line(), "0/3 steps, waiting for the first step");
        p.record(&step(0, &[true]));
        // The first step's decision goes with position 1, not 0.
        assert_eq!(p.line(), "1/3 steps, computed 1 reused 0, sigma 1.000");
        p.record(&step(1, &[false]));
        p.record(&step(2, &[true]));
        assert_eq!(p.count(), "3/3 steps");
        assert_eq!((p.computed, p.reused), (2, 1));
    }

    #[test]
    fn cfg_counts_one_step_per_event_and_decisions_per_branch() {
        let mut p = StepProgress::new(Some(4));
        for i in 0..4 {
            p.record(&step(i, &[i % 2 == 0, true]));
        }
        assert_eq!(p.count(), "4/4 steps");
        assert_eq!(p.computed + p.reused, 8);
        assert!(
            p.line().contains("summed over 2 CFG branches"),
            "{}",
            p.line()
        );
    }

    #[test]
    fn unknown_or_wrong_totals_follow_what_arrives() {
        let mut p = StepProgress::new(None);
        p.record(&step(0, &[true]));
        assert_eq!(p.count(), "1 step");
        p.record(&step(1, &[true]));
        assert_eq!(p.count(), "2 steps");
        let mut p = StepProgress::new(Some(1));
        p.record(&step(0, &[true]));
        p.record(&step(1, &[true]));
        assert_eq!(p.count(), "2/2 steps");
    }

    #[test]
    fn the_bar_finishes_on_the_steps_that_ran() {
        let mut bar = StepBar::new(Some(28));
        for i in 0..20 {
            bar.record(&step(i, &[true]));
        }
        bar.finish();
        assert_eq!(bar.progress.count(), "20/20 steps");
    }
}
