//! Progress of the long work before a model serves: fetching its files from the hub and
//! loading (converting, repacking) its weights. The core only reports; the caller decides
//! how to show it. The server draws a progress bar on a terminal, writes log lines
//! otherwise, and answers `/health` with the latest step; without an observer of its own
//! a load writes throttled log lines ([`LogProgress`]).

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What is in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStage {
    /// Downloading one file from the Hugging Face hub into its cache.
    Download,
    /// Reading the weights into compute-ready tensors (all files together).
    Weights,
}

impl LoadStage {
    pub fn verb(self) -> &'static str {
        match self {
            LoadStage::Download => "downloading",
            LoadStage::Weights => "loading weights",
        }
    }
}

/// One step: `done` of `total` bytes of `stage`, now working on `file`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProgress {
    pub stage: LoadStage,
    /// The file being downloaded, or the file of the tensor just loaded.
    pub file: String,
    pub done: u64,
    /// 0 when unknown (random weights).
    pub total: u64,
    /// Weights: tensors loaded so far and in the checkpoint. Downloads: 0.
    pub items_done: usize,
    pub items_total: usize,
}

impl fmt::Display for LoadProgress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(f, "{} {}", self.stage.verb(), self.file)?;
        if self.total > 0 {
            write!(
                f,
                ": {:.1}/{:.1} MiB ({:.0}%)",
                mib(self.done),
                mib(self.total),
                100.0 * self.done as f64 / self.total as f64
            )?;
        } else {
            write!(f, ": {:.1} MiB", mib(self.done))?;
        }
        if self.items_total > 0 {
            write!(f, ", {}/{} tensors", self.items_done, self.items_total)?;
        }
        Ok(())
    }
}

/// Receives the progress of a load. Called often (after every tensor, every chunk of a
/// download), so an observer that draws or logs throttles itself.
pub trait ProgressObserver: Send + Sync {
    fn update(&self, progress: &LoadProgress);
    /// The stage is over (a download finished, all weights loaded).
    fn finish(&self, progress: &LoadProgress);
}

/// The observer a load reports to.
#[derive(Clone)]
pub struct Reporter(Arc<dyn ProgressObserver>);

impl Reporter {
    pub fn new(observer: Arc<dyn ProgressObserver>) -> Self {
        Self(observer)
    }

    pub fn update(&self, progress: &LoadProgress) {
        self.0.update(progress)
    }

    pub fn finish(&self, progress: &LoadProgress) {
        self.0.finish(progress)
    }
}

impl Default for Reporter {
    /// Log lines, at most one every five seconds.
    fn default() -> Self {
        Self::new(Arc::new(LogProgress::every(Duration::from_secs(5))))
    }
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Reporter")
    }
}

/// Writes progress as `tracing` log lines: the first step of a stage, then at most one
/// line per interval, then the end. For logs read by people or collectors (containers,
/// `--log-format json`), where a redrawn progress bar would be noise.
pub struct LogProgress {
    interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl LogProgress {
    pub fn every(interval: Duration) -> Self {
        Self {
            interval,
            last: Mutex::new(None),
        }
    }
}

impl ProgressObserver for LogProgress {
    fn update(&self, progress: &LoadProgress) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap();
        if last.is_none_or(|t| now.duration_since(t) >= self.interval) {
            *last = Some(now);
            tracing::info!("{progress}");
        }
    }

    fn finish(&self, progress: &LoadProgress) {
        *self.last.lock().unwrap() = None;
        if progress.stage == LoadStage::Download {
            tracing::info!(
                "downloaded {} ({:.1} MiB)",
                progress.file,
                progress.total as f64 / (1u64 << 20) as f64
            );
        }
    }
}

/// Adapts a [`Reporter`] to hf-hub's download callback. hf-hub calls `init` once per
/// attempt (a resumed download starts with `update(bytes already there)`), then
/// `update` with each chunk's size.
pub(crate) struct HubDownload {
    reporter: Reporter,
    progress: LoadProgress,
}

impl HubDownload {
    pub(crate) fn new(reporter: Reporter, file: &str) -> Self {
        Self {
            reporter,
            progress: LoadProgress {
                stage: LoadStage::Download,
                file: file.to_string(),
                done: 0,
                total: 0,
                items_done: 0,
                items_total: 0,
            },
        }
    }
}

impl hf_hub::api::Progress for HubDownload {
    fn init(&mut self, size: usize, filename: &str) {
        self.progress.file = filename.to_string();
        self.progress.total = size as u64;
        self.progress.done = 0;
        self.reporter.update(&self.progress);
    }

    fn update(&mut self, size: usize) {
        self.progress.done += size as u64;
        self.reporter.update(&self.progress);
    }

    fn finish(&mut self) {
        self.reporter.finish(&self.progress);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_a_sentence() {
        let p = LoadProgress {
            stage: LoadStage::Weights,
            file: "model.safetensors".into(),
            done: 3 << 20,
            total: 12 << 20,
            items_done: 10,
            items_total: 40,
        };
        assert_eq!(
            p.to_string(),
            "loading weights model.safetensors: 3.0/12.0 MiB (25%), 10/40 tensors"
        );
        let d = LoadProgress {
            stage: LoadStage::Download,
            items_total: 0,
            total: 0,
            ..p
        };
        assert_eq!(d.to_string(), "downloading model.safetensors: 3.0 MiB");
    }
}
