//! Progress on stderr: indicatif bars on a terminal, plain lines (at most one a second per
//! file and phase, plus each phase's start and end) when stderr is a file or a pipe.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::Retrying;
use crate::cli::ProgressMode;

const PLAIN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Bar,
    Plain,
    Quiet,
}

#[derive(Clone)]
pub struct Progress {
    style: Style,
    multi: MultiProgress,
}

impl Progress {
    pub fn new(mode: ProgressMode) -> Self {
        let style = match mode {
            ProgressMode::Auto if std::io::stderr().is_terminal() => Style::Bar,
            ProgressMode::Auto | ProgressMode::Plain => Style::Plain,
            ProgressMode::Bar => Style::Bar,
            ProgressMode::None => Style::Quiet,
        };
        let target = if style == Style::Bar {
            // indicatif hides itself anyway when stderr is no terminal (or TERM is dumb).
            ProgressDrawTarget::stderr_with_hz(10)
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            style,
            multi: MultiProgress::with_draw_target(target),
        }
    }

    /// A line above the bars (or on stderr), for warnings and retries.
    pub fn note(&self, line: &str) {
        match self.style {
            Style::Bar => {
                if self.multi.println(line).is_err() || self.multi.is_hidden() {
                    eprintln!("{line}");
                }
            }
            Style::Plain | Style::Quiet => eprintln!("{line}"),
        }
    }

    /// A result line on stdout that the bars do not tear.
    pub fn print(&self, line: &str) {
        self.multi.suspend(|| println!("{line}"));
    }

    /// Progress of one file (or source) named `name`.
    pub fn track(&self, name: &str) -> Arc<Tracker> {
        let bar = (self.style == Style::Bar).then(|| {
            let bar = self.multi.add(ProgressBar::new(0));
            bar.set_prefix(name.to_owned());
            bar
        });
        Arc::new(Tracker {
            name: name.to_owned(),
            style: self.style,
            bar,
            phase: Mutex::new(Phase::Idle),
            position: AtomicU64::new(0),
            total: AtomicU64::new(0),
            last_plain: Mutex::new(Instant::now()),
            retrying: Mutex::new(None),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Sending,
    Processing,
    Exporting,
}

/// One file's progress: first bytes sent, then rows processed. Shared with the body stream,
/// so updates take `&self`.
pub struct Tracker {
    name: String,
    style: Style,
    bar: Option<ProgressBar>,
    phase: Mutex<Phase>,
    position: AtomicU64,
    total: AtomicU64,
    last_plain: Mutex<Instant>,
    /// The server-side retry run last reported, so each is said once.
    retrying: Mutex<Option<Retrying>>,
}

impl Tracker {
    /// Starts (or, on a retry, restarts) the bytes phase.
    pub fn start_sending(&self, bytes: u64) {
        self.start(Phase::Sending, bytes, 0, || {
            ProgressStyle::with_template(
                "{prefix} sending    [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
        });
    }

    /// `n` more bytes went out.
    pub fn sent(&self, n: u64) {
        let position = self.position.fetch_add(n, Ordering::Relaxed) + n;
        self.advance(position, false);
    }

    /// Starts the rows phase, once the server has the file.
    pub fn start_processing(&self, processed: u64, total_rows: u64) {
        self.start(Phase::Processing, total_rows, processed, || {
            ProgressStyle::with_template(
                "{prefix} processing [{bar:30}] {pos}/{len} rows {per_sec} eta {eta} {msg}",
            )
        });
    }

    /// Starts the profiles phase of an export of `total` profiles.
    pub fn start_exporting(&self, total: u64) {
        self.start(Phase::Exporting, total, 0, || {
            ProgressStyle::with_template(
                "{prefix} exporting [{bar:30}] {pos}/{len} profiles {per_sec} eta {eta}",
            )
        });
    }

    /// `n` more profiles were written.
    pub fn exported(&self, n: u64) {
        let position = self.position.fetch_add(n, Ordering::Relaxed) + n;
        self.advance(position, false);
    }

    pub fn processed(&self, processed: u64, total_rows: u64) {
        self.total.store(total_rows, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.set_length(total_rows);
        }
        self.position.store(processed, Ordering::Relaxed);
        self.advance(processed, false);
    }

    /// Says when the source starts waiting out transient trouble on the server (an outage of
    /// its object store or database) and when it moves again: on the bar's line, or as a plain
    /// line once per change.
    pub fn retrying(&self, now: Option<&Retrying>) {
        let mut last = self.retrying.lock().expect("progress lock");
        let Some(line) = retry_change(&self.name, last.as_ref(), now) else {
            return;
        };
        *last = now.cloned();
        match (&self.bar, self.style) {
            (Some(bar), Style::Bar) => bar
                .set_message(now.map_or_else(String::new, |r| format!("retrying: {}", r.message))),
            (_, Style::Plain) => eprintln!("{line}"),
            _ => {}
        }
    }

    /// Ends the current phase, printing its last plain line.
    pub fn end_phase(&self) {
        let position = self.position.load(Ordering::Relaxed);
        self.advance(position, true);
    }

    /// Removes the bar (its summary line is printed by the caller).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn start(
        &self,
        phase: Phase,
        total: u64,
        position: u64,
        style: impl FnOnce() -> Result<ProgressStyle, indicatif::style::TemplateError>,
    ) {
        *self.phase.lock().expect("progress lock") = phase;
        self.position.store(position, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            if let Ok(style) = style() {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.reset();
            bar.set_length(total);
        }
        self.advance(position, true);
    }

    fn advance(&self, position: u64, force: bool) {
        match self.style {
            Style::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_position(position);
                }
            }
            Style::Quiet => {}
            Style::Plain => {
                let mut last = self.last_plain.lock().expect("progress lock");
                if !force && last.elapsed() < PLAIN_EVERY {
                    return;
                }
                *last = Instant::now();
                let total = self.total.load(Ordering::Relaxed);
                let percent = (position * 100).checked_div(total).unwrap_or(100);
                let phase = *self.phase.lock().expect("progress lock");
                match phase {
                    Phase::Sending => eprintln!(
                        "{}: sent {} of {} ({percent}%)",
                        self.name,
                        HumanBytes(position),
                        HumanBytes(total)
                    ),
                    Phase::Processing => eprintln!(
                        "{}: processed {position} of {total} rows ({percent}%)",
                        self.name
                    ),
                    Phase::Exporting => eprintln!(
                        "{}: wrote {position} of {total} profiles ({percent}%)",
                        self.name
                    ),
                    Phase::Idle => {}
                }
            }
        }
    }
}

/// The line that reports a change of a source's server-side retrying, if it changed: a new
/// run of transient failures (a new `since`), or the end of one.
fn retry_change(name: &str, last: Option<&Retrying>, now: Option<&Retrying>) -> Option<String> {
    match (last, now) {
        (last, Some(now)) if last.map(|l| &l.since) != Some(&now.since) => Some(format!(
            "{name}: the server has been retrying since {} after transient trouble: {}",
            now.since, now.message
        )),
        (Some(_), None) => Some(format!("{name}: moving again")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(since: &str, message: &str) -> Retrying {
        Retrying {
            since: since.into(),
            message: message.into(),
        }
    }

    #[test]
    fn each_retry_run_and_its_end_are_said_once() {
        let a = run(
            "2026-11-29T15:02:11Z",
            "object store error: connection refused",
        );
        let a_later = run("2026-11-29T15:02:11Z", "object store error: timed out");
        let b = run("2026-11-29T15:09:00Z", "database error: pool timed out");
        assert_eq!(retry_change("f.csv", None, None), None);
        assert_eq!(
            retry_change("f.csv", None, Some(&a)).as_deref(),
            Some("f.csv: the server has been retrying since 2026-11-29T15:02:11Z after transient trouble: object store error: connection refused")
        );
        assert_eq!(
            retry_change("f.csv", Some(&a), Some(&a_later)),
            None,
            "the same run, whatever its last error"
        );
        assert_eq!(
            retry_change("f.csv", Some(&a), None).as_deref(),
            Some("f.csv: moving again")
        );
        assert!(retry_change("f.csv", Some(&a), Some(&b))
            .unwrap()
            .contains("since 2026-11-29T15:09:00Z"));
    }
}
