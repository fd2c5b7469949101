//! In-process forward-pass throughput, like `llama-bench -p N -n M`.

use std::time::Instant;

use crate::batch::{ForwardBatch, SequenceInput};
use crate::error::Result;
use crate::kv::{BlockAllocator, BlockTable, KvCache};
use crate::models::CausalLm;

#[derive(Debug, Clone, Copy)]
pub struct ForwardThroughput {
    pub batch: usize,
    /// Tokens per second prefilling `batch` prompts in one forward call.
    pub prefill_tok_s: f64,
    /// Tokens per second over the decode steps (`batch` tokens per step).
    pub decode_tok_s: f64,
}

/// Prefills `batch` prompts of `prompt_len` tokens in one forward call, then runs
/// `decode_steps` decode steps of one token per sequence, and reports both rates.
/// Token ids are arbitrary but fixed (spread over the vocabulary).
pub fn forward_throughput(
    model: &dyn CausalLm,
    batch: usize,
    prompt_len: usize,
    decode_steps: usize,
) -> Result<ForwardThroughput> {
    let block_size = 16;
    let vocab = model.config().vocab_size;
    let per_seq = prompt_len + decode_steps;
    let blocks = batch * BlockTable::blocks_for(per_seq, block_size);
    let mut kv = KvCache::new(model.kv_layout(), block_size, blocks)?;
    let mut alloc = BlockAllocator::new(blocks);
    let mut tables = Vec::with_capacity(batch);
    for _ in 0..batch {
        let mut t = BlockTable::new();
        t.reserve(&mut alloc, per_seq, block_size)?;
        tables.push(t);
    }
    let prompts: Vec<Vec<u32>> = (0..batch)
        .map(|s| {
            (0..prompt_len)
                .map(|i| ((s * 7919 + i * 104_729 + 13) % vocab) as u32)
                .collect()
        })
        .collect();
    let seqs = (0..batch)
        .map(|s| SequenceInput {
            tokens: &prompts[s],
            start_pos: 0,
            block_table: tables[s].blocks(),
            all_logits: false,
        })
        .collect();
    let t = Instant::now();
    model.forward(&ForwardBatch::new(seqs), &mut kv)?;
    let prefill_tok_s = (batch * prompt_len) as f64 / t.elapsed().as_secs_f64();
    let next: Vec<[u32; 1]> = (0..batch).map(|s| [((s * 31 + 7) % vocab) as u32]).collect();
    let t = Instant::now();
    for step in 0..decode_steps {
        let seqs = (0..batch)
            .map(|s| SequenceInput {
                tokens: &next[s],
                start_pos: prompt_len + step,
                block_table: tables[s].blocks(),
                all_logits: false,
            })
            .collect();
        model.forward(&ForwardBatch::new(seqs), &mut kv)?;
    }
    let decode_tok_s = (batch * decode_steps) as f64 / t.elapsed().as_secs_f64();
    Ok(ForwardThroughput {
        batch,
        prefill_tok_s,
        decode_tok_s,
    })
}
