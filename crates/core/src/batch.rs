//! The seam between the scheduler and the model: what one forward call computes.

use std::ops::Range;

use candle_core::Tensor;

/// One sequence's part of a forward call: its new tokens, the position of the first of
/// them (how many of its tokens the cache already holds), and its block table, which
/// must cover every position up to `start_pos + tokens.len()`. A prompt chunk has many
/// tokens, a decode step one or (checking several tokens at once) a few; all mix freely
/// in a batch.
#[derive(Debug, Clone, Copy)]
pub struct SequenceInput<'a> {
    pub tokens: &'a [u32],
    pub start_pos: usize,
    pub block_table: &'a [u32],
    pub logits: LogitRows,
}

/// Which of a sequence's new tokens get a row of logits back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// None: a prompt chunk that does not end the prompt (the output head is skipped).
    None,
    /// The last token's: the next token is sampled from it.
    Last,
    /// Every new token's: prompt logprobs.
    All,
    /// The last `n` tokens' (at most all): a decoding sequence checking `n - 1` drafted
    /// tokens, one row for the token before them and one per draft.
    Tail(usize),
}

#[derive(Debug, Clone, Default)]
pub struct ForwardBatch<'a> {
    pub seqs: Vec<SequenceInput<'a>>,
    /// Return every token's final hidden state too (after the final norm), as a
    /// multi-token prediction module drafts from it.
    pub hidden: bool,
}

impl<'a> ForwardBatch<'a> {
    pub fn new(seqs: Vec<SequenceInput<'a>>) -> Self {
        Self { seqs, hidden: false }
    }

    /// The same batch, asking for the hidden states.
    pub fn with_hidden(self, hidden: bool) -> Self {
        Self { hidden, ..self }
    }

    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// What a forward call returns.
#[derive(Debug, Clone)]
pub struct ForwardOutput {
    /// `[rows, vocab]` in f32: per sequence, the rows its [`LogitRows`] asked for.
    pub logits: Tensor,
    /// The rows of `logits` that belong to each sequence, in batch order.
    pub rows: Vec<Range<usize>>,
    /// For each layer, the number of tokens routed to each expert (empty for dense layers).
    pub expert_load: Vec<Vec<u32>>,
    /// `[tokens, hidden]`: every input token's final hidden state, in batch order, when
    /// the batch asked for them.
    pub hidden: Option<Tensor>,
}

impl ForwardOutput {
    /// The last row of logits of sequence `i` (its last token's, when it asked for one).
    pub fn last_logits(&self, i: usize) -> candle_core::Result<Vec<f32>> {
        let r = &self.rows[i];
        if r.is_empty() {
            candle_core::bail!("sequence {i} asked for no logits");
        }
        self.logits.get(r.end - 1)?.to_vec1::<f32>()
    }
}
