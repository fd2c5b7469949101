//! The runner: a [`StepPlan`] executed as one forward call over the mixed batch.

use super::scheduler::StepPlan;
use crate::batch::{ForwardBatch, ForwardOutput, SequenceInput};
use crate::error::Result;
use crate::kv::KvStorage;
use crate::models::CausalLm;

/// Runs `plan`: each planned sequence's input tokens at their positions, through its
/// block table (`seq(id)` gives a sequence's tokens, drafted tokens and block table;
/// a sequence planned with drafts takes its uncomputed tokens, then the drafts); the
/// rows of logits each asked for come back in plan order, and with `hidden` every input
/// token's final hidden state (for the MTP module).
pub(super) fn execute<'a>(
    model: &dyn CausalLm,
    kv: &mut KvStorage,
    plan: &StepPlan,
    hidden: bool,
    seq: impl Fn(u64) -> (&'a [u32], &'a [u32], &'a [u32]),
) -> Result<ForwardOutput> {
    let drafted: Vec<Option<Vec<u32>>> = plan
        .seqs
        .iter()
        .map(|p| {
            (p.drafts > 0).then(|| {
                let (tokens, drafts, _) = seq(p.seq);
                let mut input = tokens[p.start..].to_vec();
                input.extend_from_slice(&drafts[..p.drafts]);
                debug_assert_eq!(input.len(), p.len);
                input
            })
        })
        .collect();
    let inputs = plan
        .seqs
        .iter()
        .zip(&drafted)
        .map(|(p, drafted)| {
            let (tokens, _, table) = seq(p.seq);
            SequenceInput {
                tokens: match drafted {
                    Some(input) => input,
                    None => &tokens[p.start..p.start + p.len],
                },
                start_pos: p.start,
                block_table: table,
                logits: p.logits,
            }
        })
        .collect();
    model.forward(&ForwardBatch::new(inputs).with_hidden(hidden), kv)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::batch::LogitRows;
    use crate::engine::scheduler::PlannedSeq;
    use crate::kv::{BlockPool, BlockTable};
    use crate::sampling::argmax;

    /// A decoding sequence given k known tokens in one step (one logits row each, beside
    /// another sequence's ordinary decode) gets the logits that k single steps give,
    /// within 1e-4 in f32, and the same greedy picks: the seam speculative decoding
    /// verifies drafts through.
    #[test]
    fn several_tokens_in_one_step_give_the_logits_of_single_steps() {
        for name in ["llama", "qwen3_moe", "deepseek_v3"] {
            let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models")
                .join(name);
            let model = crate::load(dir.to_str().unwrap(), &crate::LoadOptions::default())
                .unwrap()
                .model;
            let mut kv = KvStorage::new(model.kv_layout(), 16, 64).unwrap();
            let mut pool = BlockPool::new(kv.num_blocks());
            let prompt: Vec<u32> = (0..21).map(|i| (i * 37 % 300 + 3) as u32).collect();
            let known: Vec<u32> = vec![17, 250, 4, 99, 123];
            let k = known.len();
            // Sequences 0 and 1 are the same tokens; 2 decodes alongside.
            let mut tokens: HashMap<u64, Vec<u32>> = HashMap::new();
            let mut tables: HashMap<u64, BlockTable> = HashMap::new();
            for id in 0..3u64 {
                let mut t = prompt.clone();
                t.extend(&known);
                let mut table = BlockTable::new();
                table.reserve(&mut pool, t.len(), 16).unwrap();
                tokens.insert(id, t);
                tables.insert(id, table);
            }
            let mut run = |seqs: Vec<PlannedSeq>| {
                let plan = StepPlan { seqs };
                let out = execute(model.as_ref(), &mut kv, &plan, false, |id| {
                    (tokens[&id].as_slice(), &[], tables[&id].blocks())
                })
                .unwrap();
                let rows: Vec<Vec<Vec<f32>>> = out
                    .rows
                    .iter()
                    .map(|r| {
                        r.clone()
                            .map(|i| out.logits.get(i).unwrap().to_vec1::<f32>().unwrap())
                            .collect()
                    })
                    .collect();
                rows
            };
            let planned = |seq, start, len, logits| PlannedSeq {
                seq,
                start,
                len,
                drafts: 0,
                logits,
            };
            let n = prompt.len();
            run((0..3).map(|id| planned(id, 0, n, LogitRows::Last)).collect());
            // Sequence 0: the k known tokens in one step, every row back; sequence 2 one
            // decode token beside it.
            let together = run(vec![
                planned(0, n, k, LogitRows::All),
                planned(2, n, 1, LogitRows::Last),
            ]);
            assert_eq!(together[0].len(), k);
            assert_eq!(together[1].len(), 1);
            // Sequence 1: the same tokens one step at a time.
            let single: Vec<Vec<f32>> = (0..k)
                .map(|j| {
                    run(vec![planned(1, n + j, 1, LogitRows::Last)])
                        .remove(0)
                        .remove(0)
                })
                .collect();
            for (j, (a, b)) in together[0].iter().zip(&single).enumerate() {
                let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "{name}: row {j} differs by {diff}");
                assert_eq!(argmax(a), argmax(b), "{name}: row {j}");
            }
            // A prompt chunk short of its end asks for no rows.
            let none = run(vec![planned(2, n + 1, 2, LogitRows::None)]);
            assert!(none[0].is_empty());
        }
    }
}
