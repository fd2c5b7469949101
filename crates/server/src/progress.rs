//! Showing the model's download and load while the server starts: a progress bar on a
//! terminal (indicatif), log lines otherwise (containers, `--log-format json`), and the
//! latest step in `/health`, so a probe or a person can see what a pod that is not ready
//! yet is doing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use moeserve_core::progress::{LoadProgress, LoadStage, LogProgress, ProgressObserver, Reporter};

/// The latest progress of the load, for `/health`; `None` before the first step and
/// after the model is loaded.
#[derive(Default)]
pub struct LoadStatus(Mutex<Option<LoadProgress>>);

impl LoadStatus {
    pub fn get(&self) -> Option<LoadProgress> {
        self.0.lock().unwrap().clone()
    }

    pub fn clear(&self) {
        *self.0.lock().unwrap() = None;
    }

    fn set(&self, p: &LoadProgress) {
        let mut cur = self.0.lock().unwrap();
        match cur.as_mut() {
            // Most updates move the byte count only: no new allocation for them.
            Some(c) if c.stage == p.stage && c.file == p.file => {
                c.done = p.done;
                c.total = p.total;
                c.items_done = p.items_done;
                c.items_total = p.items_total;
            }
            _ => *cur = Some(p.clone()),
        }
    }
}

/// How progress is shown besides `/health`.
enum Display {
    /// A bar redrawn in place (stderr is a terminal and logs are text).
    Bar(Mutex<Option<(LoadStage, String, ProgressBar)>>),
    /// Log lines, at most one per interval per stage.
    Log(LogProgress),
}

/// The server's observer of the load.
pub struct StartupProgress {
    status: Arc<LoadStatus>,
    display: Display,
}

impl StartupProgress {
    /// A bar when `terminal`, else a log line every `log_interval`.
    pub fn new(status: Arc<LoadStatus>, terminal: bool, log_interval: Duration) -> Self {
        let display = if terminal {
            Display::Bar(Mutex::new(None))
        } else {
            Display::Log(LogProgress::every(log_interval))
        };
        Self { status, display }
    }

    pub fn reporter(self) -> Reporter {
        Reporter::new(Arc::new(self))
    }
}

/// A bar for one download (bytes of one file) or for the weights (bytes of them all, the
/// message naming the file and the tensor count).
fn new_bar(p: &LoadProgress) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(p.total), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        // Two lines: file names are long, and a wrapped bar redraws badly.
        "{msg}\n[{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
    )
    .expect("a valid template")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

fn bar_message(p: &LoadProgress) -> String {
    match p.stage {
        LoadStage::Download => format!("downloading {}", p.file),
        LoadStage::Weights => format!("loading {} ({}/{} tensors)", p.file, p.items_done, p.items_total),
    }
}

impl ProgressObserver for StartupProgress {
    fn update(&self, p: &LoadProgress) {
        self.status.set(p);
        match &self.display {
            Display::Log(log) => log.update(p),
            Display::Bar(slot) => {
                let mut slot = slot.lock().unwrap();
                let same = matches!(&*slot, Some((stage, file, _))
                    if *stage == p.stage && (p.stage == LoadStage::Weights || *file == p.file));
                if !same {
                    if let Some((_, _, old)) = slot.take() {
                        old.finish();
                    }
                    *slot = Some((p.stage, p.file.clone(), new_bar(p)));
                }
                let (_, _, bar) = slot.as_ref().expect("set above");
                if bar.length() != Some(p.total) {
                    bar.set_length(p.total);
                }
                bar.set_position(p.done);
                bar.set_message(bar_message(p));
            }
        }
    }

    fn finish(&self, p: &LoadProgress) {
        self.status.set(p);
        match &self.display {
            Display::Log(log) => log.finish(p),
            Display::Bar(slot) => {
                if let Some((_, _, bar)) = slot.lock().unwrap().take() {
                    bar.set_position(p.done);
                    bar.set_message(bar_message(p));
                    bar.finish();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(stage: LoadStage, file: &str, done: u64, total: u64) -> LoadProgress {
        LoadProgress {
            stage,
            file: file.into(),
            done,
            total,
            items_done: 0,
            items_total: 0,
        }
    }

    /// /health sees each step as it comes, whichever display is chosen.
    #[test]
    fn the_status_follows_the_load() {
        for terminal in [false, true] {
            let status = Arc::new(LoadStatus::default());
            let reporter = StartupProgress::new(status.clone(), terminal, Duration::from_secs(5)).reporter();
            assert_eq!(status.get(), None);
            reporter.update(&step(LoadStage::Download, "config.json", 0, 100));
            reporter.update(&step(LoadStage::Download, "config.json", 60, 100));
            assert_eq!(
                status.get(),
                Some(step(LoadStage::Download, "config.json", 60, 100))
            );
            reporter.finish(&step(LoadStage::Download, "config.json", 100, 100));
            reporter.update(&step(LoadStage::Weights, "a.safetensors", 10, 50));
            reporter.update(&step(LoadStage::Weights, "b.safetensors", 30, 50));
            assert_eq!(
                status.get(),
                Some(step(LoadStage::Weights, "b.safetensors", 30, 50))
            );
            reporter.finish(&step(LoadStage::Weights, "b.safetensors", 50, 50));
            assert_eq!(status.get().unwrap().done, 50);
            status.clear();
            assert_eq!(status.get(), None);
        }
    }
}
