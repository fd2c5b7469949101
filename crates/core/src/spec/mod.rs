//! Speculative decoding: cheap guesses of a sequence's next tokens (drafts) that the
//! model checks in its ordinary batched forward, one logits row per drafted token.
//!
//! A decoding sequence with `k` drafts is scheduled with `1 + k` input tokens; the output
//! stage samples from each row in turn, exactly as it would without drafts, and keeps
//! going while the sampled token equals the draft. Every draft here is a single token
//! (q is one-hot: n-gram lookup, and MTP's greedy guess), and for a one-hot q the
//! standard rejection rule (accept with min(1, p/q), else draw from the residual
//! max(0, p - q)) is exactly "draw from p; accept when the draw is the draft, else keep
//! the draw": both emit the draft with probability p(draft) and any other token y with
//! probability p(y). So the output distribution is the model's, whatever the sampling
//! settings, and greedy output is the same token for token.
//!
//! The proposers: [`ngram`] (prompt lookup, any model) and DeepSeek's multi-token
//! prediction module (a model with MTP weights).

pub mod ngram;

use std::str::FromStr;

/// How drafts are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SpeculativeMethod {
    /// No speculation: one new token per sequence per step.
    None,
    /// Prompt lookup: the tokens that followed an earlier occurrence of the sequence's
    /// latest n-gram.
    #[default]
    Ngram,
    /// The model's own multi-token prediction module (DeepSeek-V3's
    /// `num_nextn_predict_layers`).
    Mtp,
}

impl SpeculativeMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            SpeculativeMethod::None => "none",
            SpeculativeMethod::Ngram => "ngram",
            SpeculativeMethod::Mtp => "mtp",
        }
    }
}

impl FromStr for SpeculativeMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "ngram" => Ok(Self::Ngram),
            "mtp" => Ok(Self::Mtp),
            other => Err(format!(
                "unknown speculative method {other:?} (expected none, ngram or mtp)"
            )),
        }
    }
}

impl std::fmt::Display for SpeculativeMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Speculative decoding settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeConfig {
    pub method: SpeculativeMethod,
    /// Most drafted tokens per sequence per step.
    pub num_speculative_tokens: usize,
    /// The n-gram proposer's shortest and longest match (tokens).
    pub ngram_min: usize,
    pub ngram_max: usize,
    /// Drafts are checked only in steps with at most this many running sequences (0: in
    /// every step). A wide batch already keeps the cores busy, so a rejected draft there
    /// costs as much as a real token and an accepted one saves little.
    pub disable_by_batch_size: usize,
}

impl Default for SpeculativeConfig {
    fn default() -> Self {
        Self {
            method: SpeculativeMethod::default(),
            num_speculative_tokens: 8,
            ngram_min: 2,
            ngram_max: 4,
            disable_by_batch_size: 4,
        }
    }
}

impl SpeculativeConfig {
    pub fn off() -> Self {
        Self {
            method: SpeculativeMethod::None,
            ..Self::default()
        }
    }

    pub fn enabled(&self) -> bool {
        self.method != SpeculativeMethod::None && self.num_speculative_tokens > 0
    }

    /// Whether a step with `running` sequences checks drafts.
    pub fn drafts_in_batch_of(&self, running: usize) -> bool {
        self.disable_by_batch_size == 0 || running <= self.disable_by_batch_size
    }

    /// Checks the settings (the server refuses to start on an error).
    pub fn validate(&self) -> Result<(), String> {
        if self.num_speculative_tokens > 16 {
            return Err(format!(
                "num_speculative_tokens is {}, at most 16",
                self.num_speculative_tokens
            ));
        }
        if self.ngram_min == 0 || self.ngram_min > self.ngram_max {
            return Err(format!(
                "the n-gram match lengths must satisfy 1 <= min <= max (min {}, max {})",
                self.ngram_min, self.ngram_max
            ));
        }
        Ok(())
    }
}

/// How many tokens one sequence drafts next, adapted to how its drafts fare: the length
/// grows by one after a fully accepted draft and shrinks to what was accepted plus one
/// after a rejection; after [`PAUSE_AFTER`] drafts in a row with nothing accepted the
/// sequence stops drafting for a while (8 steps, doubling on each further failure up to
/// 256), so free text that never echoes costs almost nothing.
#[derive(Debug, Clone)]
pub struct DraftLength {
    max: usize,
    current: usize,
    failures: u32,
    paused_for: u32,
    pause: u32,
}

/// Drafts in a row with no token accepted before a sequence pauses drafting.
pub const PAUSE_AFTER: u32 = 3;
const FIRST_PAUSE: u32 = 8;
const LONGEST_PAUSE: u32 = 256;

impl DraftLength {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            current: max.min(2),
            failures: 0,
            paused_for: 0,
            pause: FIRST_PAUSE,
        }
    }

    /// Drafted tokens wanted this step (0 while paused); counts a paused step.
    pub fn next_len(&mut self) -> usize {
        if self.paused_for > 0 {
            self.paused_for -= 1;
            return 0;
        }
        self.current
    }

    /// Records how many of `drafted` tokens were accepted.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        if accepted == drafted {
            self.current = (self.current + 1).min(self.max);
        } else {
            self.current = (accepted + 1).min(self.max);
        }
        if accepted == 0 {
            self.failures += 1;
            if self.failures >= PAUSE_AFTER {
                self.failures = 0;
                self.paused_for = self.pause;
                self.pause = (self.pause * 2).min(LONGEST_PAUSE);
            }
        } else {
            self.failures = 0;
            self.pause = FIRST_PAUSE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draft_length_grows_on_success_and_pauses_after_failures() {
        let mut d = DraftLength::new(4);
        assert_eq!(d.next_len(), 2);
        d.record(2, 2);
        assert_eq!(d.next_len(), 3);
        d.record(3, 3);
        d.record(4, 4);
        assert_eq!(d.next_len(), 4);
        d.record(4, 1);
        assert_eq!(d.next_len(), 2);
        for _ in 0..PAUSE_AFTER {
            d.record(2, 0);
        }
        let paused = (0..FIRST_PAUSE).map(|_| d.next_len()).collect::<Vec<_>>();
        assert!(paused.iter().all(|&k| k == 0), "{paused:?}");
        assert_eq!(d.next_len(), 1);
        // A second run of failures pauses twice as long; a success resets the pause.
        for _ in 0..PAUSE_AFTER {
            d.record(1, 0);
        }
        assert_eq!((0..2 * FIRST_PAUSE).filter(|_| d.next_len() == 0).count(), 16);
        d.record(1, 1);
        assert_eq!(d.pause, FIRST_PAUSE);
    }

    #[test]
    fn settings_are_checked() {
        assert!(SpeculativeConfig::default().validate().is_ok());
        let bad = SpeculativeConfig {
            ngram_min: 3,
            ngram_max: 2,
            ..SpeculativeConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("min"));
        assert_eq!("mtp".parse::<SpeculativeMethod>(), Ok(SpeculativeMethod::Mtp));
        assert!("eagle".parse::<SpeculativeMethod>().is_err());
    }

    #[test]
    fn wide_batches_do_not_draft() {
        let c = SpeculativeConfig::default();
        assert!(c.drafts_in_batch_of(1) && c.drafts_in_batch_of(c.disable_by_batch_size));
        assert!(!c.drafts_in_batch_of(c.disable_by_batch_size + 1));
        let always = SpeculativeConfig {
            disable_by_batch_size: 0,
            ..c
        };
        assert!(always.drafts_in_batch_of(1000));
    }
}
