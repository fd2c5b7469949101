//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::PathBuf;

use moeserve_core::{BlockPool, BlockTable, ForwardBatch, KvStorage, LoadedModel, LogitRows, SequenceInput};

/// A committed fixture model (tests/fixtures/models/NAME).
pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// The last-position logits of `prompt` prefilled in one piece on a fresh cache.
pub fn prefill_logits(m: &LoadedModel, prompt: &[u32]) -> Vec<f32> {
    let blocks = BlockTable::blocks_for(prompt.len(), 16);
    let mut kv = KvStorage::new(m.model.kv_layout(), 16, blocks).unwrap();
    let mut alloc = BlockPool::new(blocks);
    let mut table = BlockTable::new();
    table.reserve(&mut alloc, prompt.len(), 16).unwrap();
    let batch = ForwardBatch::new(vec![SequenceInput {
        tokens: prompt,
        start_pos: 0,
        block_table: table.blocks(),
        logits: LogitRows::Last,
    }]);
    m.model.forward(&batch, &mut kv).unwrap().last_logits(0).unwrap()
}
