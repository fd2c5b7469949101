//! Running one sequence start to finish, for the `generate` command and tests. (Serving
//! many at once is the engine's job.)

use std::time::Instant;

use crate::batch::{ForwardBatch, LogitRows, SequenceInput};
use crate::error::Result;
use crate::kv::{BlockPool, BlockTable, KvStorage};
use crate::models::CausalLm;
use crate::sampling::Sampler;

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Ended on one of the stop ids (else on `max_tokens`).
    pub stopped: bool,
}

impl Generation {
    pub fn prefill_tokens_per_sec(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode rate over the tokens after the first (the first comes from prefill).
    pub fn decode_tokens_per_sec(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Prefills `prompt` in one piece, then decodes up to `max_tokens` tokens, stopping early
/// on any of `stop_ids`. The sequence's blocks are returned to `alloc` at the end.
pub fn generate(
    model: &dyn CausalLm,
    kv: &mut KvStorage,
    alloc: &mut BlockPool,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    stop_ids: &[u32],
) -> Result<Generation> {
    let mut table = BlockTable::new();
    table.reserve(alloc, prompt.len() + max_tokens, kv.block_size())?;
    let result = (|| {
        let start = Instant::now();
        let mut gen = Generation {
            tokens: Vec::with_capacity(max_tokens),
            prompt_tokens: prompt.len(),
            prefill_secs: 0.0,
            decode_secs: 0.0,
            stopped: false,
        };
        let mut input = prompt.to_vec();
        let mut pos = 0;
        while gen.tokens.len() < max_tokens {
            let batch = ForwardBatch::new(vec![SequenceInput {
                tokens: &input,
                start_pos: pos,
                block_table: table.blocks(),
                logits: LogitRows::Last,
            }]);
            let out = model.forward(&batch, kv)?;
            let next = sampler
                .sample(&out.last_logits(0)?, prompt, &gen.tokens, &Default::default())
                .0;
            if pos == 0 {
                gen.prefill_secs = start.elapsed().as_secs_f64();
            }
            pos += input.len();
            gen.tokens.push(next);
            if stop_ids.contains(&next) {
                gen.stopped = true;
                break;
            }
            input = vec![next];
        }
        gen.decode_secs = start.elapsed().as_secs_f64() - gen.prefill_secs;
        Ok(gen)
    })();
    table.release_all(alloc);
    result
}
