//! The seam between the scheduler and the model: what one forward call computes.

use std::ops::Range;

use candle_core::Tensor;

/// One sequence's part of a forward call: its new tokens, the position of the first of
/// them (how many of its tokens the cache already holds), and its block table, which
/// must cover every position up to `start_pos + tokens.len()`. A prompt chunk has many
/// tokens, a decode step one; both mix freely in a batch.
#[derive(Debug, Clone, Copy)]
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
    /// Return logits for every new token (prompt logprobs), not just the last.
    pub all_logits: bool,
}

#[derive(Debug, Clone, Default)]
pub struct ForwardBatch<'a> {
    pub seqs: Vec<SequenceInput<'a>>,
}

impl<'a> ForwardBatch<'a> {
    pub fn new(seqs: Vec<SequenceInput<'a>>) -> Self {
        Self { seqs }
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// What a forward call returns.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[rows, vocab]` in f32: one row per sequence (its last token), or one per new
    /// token for sequences that asked for all logits.
    pub logits: Tensor,
    /// The rows of `logits` that belong to each sequence, in batch order.
    pub rows: Vec<Range<usize>>,
    /// For each layer, the number of tokens routed to each expert (empty for dense layers).
    pub expert_load: Vec<Vec<u32>>,
}

impl ForwardOutput {
    /// The logits of sequence `i`'s last token.
    pub fn last_logits(&self, i: usize) -> candle_core::Result<Vec<f32>> {
        self.logits.get(self.rows[i].end - 1)?.to_vec1::<f32>()
    }
}
