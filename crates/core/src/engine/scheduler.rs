//! The scheduler: which sequences compute how many tokens this step, under one token
//! budget, in the manner of vLLM's V1 scheduler. Its output is a [`StepPlan`], plain
//! data that the runner executes and the output stage applies.
//!
//! 1. every running sequence gets its next tokens (its uncomputed tokens: a prompt chunk,
//!    one decode token, or several tokens to check at once), oldest first, within
//!    `max_num_batched_tokens`; when the pool cannot hold them, the most recently
//!    admitted sequence is preempted (its blocks are freed; it goes back to the front of
//!    the queue and is recomputed later);
//! 2. if nothing was preempted, waiting sequences are admitted first come, first served
//!    while the budget, `max_num_seqs` and free blocks allow, reusing cached prefix blocks;
//!    one whose prefix goes on from the pool onto the disk tier is passed over until the
//!    loader has read those blocks (see [`super::disk_load`]).

use std::sync::atomic::Ordering;

use super::core::EngineCore;
use super::disk_load::DiskLookup;
use crate::batch::LogitRows;
use crate::kv::{prefix_blocks, BlockTable};

/// What one step computes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct StepPlan {
    pub seqs: Vec<PlannedSeq>,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PlannedSeq {
    pub seq: u64,
    /// Its first input token's position: how many of its tokens the cache holds.
    pub start: usize,
    /// Input tokens this step.
    pub len: usize,
    /// How many of them (the last) are drafted tokens to check.
    pub drafts: usize,
    /// The logits rows wanted back.
    pub logits: LogitRows,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

impl EngineCore {
    /// Plans the step: every running sequence's uncomputed tokens (as far as the budget
    /// and the pool allow), then admissions. Blocks for the planned tokens are reserved.
    pub(super) fn schedule(&mut self) -> StepPlan {
        let bs = self.kv.block_size();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled: Vec<(u64, usize)> = Vec::new();
        let mut preempted = false;

        // 1. Running sequences, oldest first.
        let draft = self.cfg.speculative.drafts_in_batch_of(self.running.len());
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let sid = self.running[i];
            let seq = &self.seqs[&sid];
            let chunk = (seq.tokens.len() - seq.computed).min(budget);
            let upto = seq.computed + chunk;
            let before = self.running.len();
            if !self.make_room(sid, upto) {
                preempted = true;
                break;
            }
            preempted |= self.running.len() < before;
            let drafts = if draft && upto == self.seqs[&sid].tokens.len() {
                self.fit_drafts(sid, budget - chunk)
            } else {
                self.seqs.get_mut(&sid).unwrap().drafts.clear();
                0
            };
            scheduled.push((sid, chunk + drafts));
            budget -= chunk + drafts;
            i += 1;
        }

        // 2. Admissions, first come first served, unless this step had to preempt.
        // Sequences whose prefix is being read from disk are passed over until it has
        // arrived; the others keep their order.
        let mut next = 0;
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&sid) = self.waiting.get(next) else { break };
            let (rid, index, fresh) = {
                let s = &self.seqs[&sid];
                (s.request, s.index, s.computed == 0 && s.table.is_empty())
            };
            let req = &self.requests[&rid];
            let use_cache = (self.cfg.enable_prefix_caching || index > 0) && req.prompt_logprobs.is_none();
            if fresh && use_cache && self.wait_for_disk(sid) {
                next += 1;
                continue;
            }
            let (cached, lookups) = if fresh && use_cache {
                self.attach_cached_prefix(sid)
            } else {
                (0, PrefixLookups::default())
            };
            let seq = self.seqs.get_mut(&sid).unwrap();
            seq.computed = cached;
            let chunk = (seq.tokens.len() - cached).min(budget);
            let need = BlockTable::blocks_for(cached + chunk, bs) - seq.table.len();
            if need > self.pool.num_free() {
                seq.table.release_all(&mut self.pool);
                seq.hashes.clear();
                seq.computed = 0;
                break;
            }
            seq.table
                .reserve(&mut self.pool, cached + chunk, bs)
                .expect("checked free blocks");
            // Counted once admitted (a sequence that must wait for blocks tries again).
            lookups.count(&self.stats);
            seq.disk = DiskLookup::Done(None);
            self.waiting.remove(next);
            self.running.push(sid);
            let req = self.requests.get_mut(&rid).unwrap();
            if !req.admitted && index == 0 {
                req.admitted = true;
                req.usage.cached_tokens = cached;
                self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                self.stats
                    .prompt_tokens
                    .fetch_add(req.prompt_len as u64, Ordering::Relaxed);
                self.stats
                    .prefix_cache_hit_tokens
                    .fetch_add(cached as u64, Ordering::Relaxed);
            }
            scheduled.push((sid, chunk));
            budget -= chunk;
        }
        StepPlan {
            seqs: scheduled
                .into_iter()
                .map(|(sid, len)| self.plan_seq(sid, len))
                .collect(),
        }
    }

    /// `sid`'s part of the step: `len` tokens from its computed ones (its drafts last),
    /// and the rows of logits it needs: every row for prompt logprobs, the last once all
    /// its tokens are computed (its next token is sampled) and one more per draft, none
    /// for a prompt chunk short of the end.
    fn plan_seq(&self, sid: u64, len: usize) -> PlannedSeq {
        let s = &self.seqs[&sid];
        let drafts = s.drafts.len();
        let wants_prompt = self.requests[&s.request].prompt_logprobs.is_some() && s.index == 0;
        let logits = if wants_prompt && s.computed < s.prompt_len {
            LogitRows::All
        } else if drafts > 0 {
            LogitRows::Tail(1 + drafts)
        } else if s.computed + len == s.tokens.len() {
            LogitRows::Last
        } else {
            LogitRows::None
        };
        PlannedSeq {
            seq: sid,
            start: s.computed,
            len,
            drafts,
            logits,
        }
    }

    /// Trims `sid`'s drafts to what this step can check and reserves their KV slots:
    /// no more than `budget` tokens, than can still be emitted before `max_tokens` (a
    /// step emits its drafts plus one) or fit the context, and only into free blocks
    /// (a draft never preempts anyone). Returns how many are kept.
    fn fit_drafts(&mut self, sid: u64, budget: usize) -> usize {
        let bs = self.kv.block_size();
        let context = self.model.config().max_position_embeddings;
        let seq = &self.seqs[&sid];
        if seq.drafts.is_empty() {
            return 0;
        }
        let req = &self.requests[&seq.request];
        let len = seq.tokens.len();
        let generated = len - seq.prompt_len;
        let room = (seq.table.len() + self.pool.num_free()) * bs - len;
        let keep = seq
            .drafts
            .len()
            .min(budget)
            .min(req.max_tokens.saturating_sub(generated + 1))
            .min(context.saturating_sub(len))
            .min(room);
        let seq = self.seqs.get_mut(&sid).unwrap();
        seq.drafts.truncate(keep);
        seq.table
            .reserve(&mut self.pool, len + keep, bs)
            .expect("drafts kept within the free blocks");
        keep
    }

    /// Frees a running sequence's blocks and sends it back to the front of the queue.
    fn preempt(&mut self, sid: u64) {
        self.running.retain(|&s| s != sid);
        let seq = self.seqs.get_mut(&sid).expect("running sequence exists");
        seq.table.release_all(&mut self.pool);
        seq.computed = 0;
        seq.hashes.clear();
        seq.drafts.clear();
        // Its blocks may have left the pool by the time it is admitted again.
        seq.disk = DiskLookup::Unchecked;
        self.waiting.push_front(sid);
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
    }

    /// Grows `sid`'s table to hold `tokens` positions, preempting the most recently
    /// admitted sequences as needed. Returns false if `sid` itself had to go.
    fn make_room(&mut self, sid: u64, tokens: usize) -> bool {
        let bs = self.kv.block_size();
        loop {
            let seq = &self.seqs[&sid];
            let need = BlockTable::blocks_for(tokens, bs).saturating_sub(seq.table.len());
            if need <= self.pool.num_free() {
                let seq = self.seqs.get_mut(&sid).unwrap();
                seq.table
                    .reserve(&mut self.pool, tokens, bs)
                    .expect("checked free blocks");
                return true;
            }
            let victim = *self.running.last().expect("sid is running");
            self.preempt(victim);
            if victim == sid {
                return false;
            }
        }
    }

    /// Shares the longest cached prefix of `sid`'s tokens (never the last token, whose
    /// logits are needed): blocks in the pool are shared; a block the pool lacks that the
    /// disk loader read for this sequence is copied into a fresh pool block and
    /// registered there. Returns the number of tokens covered and the lookups by tier.
    fn attach_cached_prefix(&mut self, sid: u64) -> (usize, PrefixLookups) {
        let bs = self.kv.block_size();
        let disk_on = self.disk.is_some();
        let seq = self.seqs.get_mut(&sid).unwrap();
        let loaded = match &seq.disk {
            DiskLookup::Done(Some(l)) => Some(l.clone()),
            _ => None,
        };
        let mut n = PrefixLookups::default();
        let started = std::time::Instant::now();
        for (b, h, toks) in prefix_blocks(&seq.tokens, bs) {
            let from_disk = loaded.as_ref().and_then(|l| l.bytes_of(b, h));
            if let Some(block) = self.pool.lookup(h, toks) {
                seq.table.push_shared(&mut self.pool, block);
                if from_disk.is_some() {
                    // Read for it, then found in the pool (another sequence's copy).
                    n.pool_misses += 1;
                    n.disk_hits += 1;
                } else {
                    n.pool_hits += 1;
                }
            } else {
                n.pool_misses += 1;
                let installed = from_disk.and_then(|bytes| {
                    let block = self.pool.allocate()?;
                    if let Err(e) = self.kv.set_block_bytes(block, bytes) {
                        // The fingerprint covers the layout: only a damaged store gets here.
                        tracing::warn!("prefix cache on disk: {e}");
                        self.pool.release(block);
                        return None;
                    }
                    self.pool.register(block, h, toks);
                    Some(block)
                });
                let Some(block) = installed else {
                    n.disk_misses += disk_on as u64;
                    break;
                };
                seq.table.push_owned(block);
                n.disk_hits += 1;
            }
            seq.hashes.push(h);
        }
        if loaded.is_some() {
            self.stats
                .prefix_disk_load_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        (seq.hashes.len() * bs, n)
    }
}

/// One admission's prefix-cache lookups, in blocks, by tier.
#[derive(Debug, Default, Clone, Copy)]
struct PrefixLookups {
    pool_hits: u64,
    pool_misses: u64,
    disk_hits: u64,
    disk_misses: u64,
}

impl PrefixLookups {
    fn count(self, s: &super::EngineStats) {
        s.prefix_pool_hits.fetch_add(self.pool_hits, Ordering::Relaxed);
        s.prefix_pool_misses
            .fetch_add(self.pool_misses, Ordering::Relaxed);
        s.prefix_disk_hits.fetch_add(self.disk_hits, Ordering::Relaxed);
        s.prefix_disk_misses
            .fetch_add(self.disk_misses, Ordering::Relaxed);
    }
}
