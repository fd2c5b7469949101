//! The step loop: scheduling under one token budget, one forward call per step,
//! sampling, stop checks, streaming events.
//!
//! Each step, in the manner of vLLM's V1 scheduler:
//! 1. every running sequence gets its next tokens (one for a decode, a chunk for an
//!    unfinished prompt), oldest first, within `max_num_batched_tokens`; when the pool
//!    cannot hold them, the most recently admitted sequence is preempted (its blocks are
//!    freed; it goes back to the front of the queue and is recomputed later);
//! 2. if nothing was preempted, waiting sequences are admitted first come, first served
//!    while the budget, `max_num_seqs` and free blocks allow, reusing cached prefix blocks;
//! 3. one forward call runs the mixed batch;
//! 4. sequences whose tokens are all computed sample their next token (in parallel on
//!    the pool, each with its own generator), which is then detokenized, checked against
//!    the stop conditions and streamed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::detok::{Detokenizer, StopChecker};
use super::{Command, EngineConfig, EngineEvent, EngineStats, FinishReason, Usage};
use crate::batch::{ForwardBatch, SequenceInput};
use crate::kv::{block_hash, BlockPool, BlockTable, KvStorage};
use crate::models::CausalLm;
use crate::sampling::{token_logprob, Sampler, SamplingParams, TokenLogprob};
use crate::tokenizer::TextCodec;

pub(super) struct NewRequest {
    pub id: u64,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    /// End-of-sequence ids (empty with `ignore_eos`).
    pub eos: Vec<u32>,
    pub events: UnboundedSender<EngineEvent>,
}

struct Request {
    params: SamplingParams,
    max_tokens: usize,
    eos: Vec<u32>,
    events: UnboundedSender<EngineEvent>,
    prompt_len: usize,
    /// Choices not finished yet.
    live: usize,
    forked: bool,
    admitted: bool,
    seqs: Vec<u64>,
    usage: Usage,
    prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

struct Sequence {
    request: u64,
    /// The choice index.
    index: usize,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    table: BlockTable,
    /// Chained hashes of the full blocks registered in the prefix cache so far.
    hashes: Vec<u64>,
    sampler: Sampler,
    detok: Detokenizer,
    stop: StopChecker,
    /// Inside a reasoning model's thought, and how many tokens it has had (for
    /// `reasoning_budget`).
    thinking: bool,
    thought_tokens: usize,
}

pub(super) struct EngineCore {
    model: Box<dyn CausalLm>,
    kv: KvStorage,
    alloc: BlockPool,
    codec: Arc<TextCodec>,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    requests: HashMap<u64, Request>,
    seqs: HashMap<u64, Sequence>,
    next_seq: u64,
    waiting: VecDeque<u64>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<u64>,
}

impl EngineCore {
    pub fn new(
        model: Box<dyn CausalLm>,
        kv: KvStorage,
        codec: Arc<TextCodec>,
        cfg: EngineConfig,
        stats: Arc<EngineStats>,
    ) -> Self {
        let alloc = BlockPool::new(kv.num_blocks());
        Self {
            model,
            kv,
            alloc,
            codec,
            cfg,
            stats,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn run(&mut self, commands: mpsc::Receiver<Command>) {
        loop {
            if self.running.is_empty() && self.waiting.is_empty() {
                match commands.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(_) => return,
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            return;
                        }
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => return,
                }
            }
            if !self.running.is_empty() || !self.waiting.is_empty() {
                self.step();
            }
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(r) => self.add_request(*r),
            Command::Abort(id) => self.abort(id),
            Command::AbortAll => self.abort_all(),
            Command::Shutdown => {
                self.abort_all();
                return false;
            }
        }
        true
    }

    fn add_request(&mut self, r: NewRequest) {
        let prompt_logprobs = r.params.prompt_logprobs.map(|_| vec![None]);
        let seq = self.new_sequence(r.id, 0, r.prompt.clone(), &r.params);
        self.requests.insert(
            r.id,
            Request {
                live: r.params.n,
                params: r.params,
                max_tokens: r.max_tokens,
                eos: r.eos,
                events: r.events,
                prompt_len: r.prompt.len(),
                forked: false,
                admitted: false,
                seqs: vec![seq],
                usage: Usage {
                    prompt_tokens: r.prompt.len(),
                    ..Usage::default()
                },
                prompt_logprobs,
            },
        );
        self.waiting.push_back(seq);
    }

    fn new_sequence(&mut self, request: u64, index: usize, tokens: Vec<u32>, params: &SamplingParams) -> u64 {
        let id = self.next_seq;
        self.next_seq += 1;
        // Each choice has its own generator: a seeded request samples the same tokens
        // whatever else is in the batch.
        let seed = match params.seed {
            Some(s) => s.wrapping_add(index as u64),
            None => rand::random(),
        };
        self.seqs.insert(
            id,
            Sequence {
                request,
                index,
                prompt_len: tokens.len(),
                tokens,
                computed: 0,
                table: BlockTable::new(),
                hashes: Vec::new(),
                sampler: Sampler::from_params(params, seed),
                detok: Detokenizer::new(params.skip_special_tokens),
                stop: StopChecker::new(params.stop.clone()),
                thinking: params.reasoning_budget.is_some_and(|b| b.starts_open),
                thought_tokens: 0,
            },
        );
        id
    }

    fn abort_all(&mut self) {
        let ids: Vec<u64> = self.requests.keys().copied().collect();
        for id in ids {
            self.abort(id);
        }
    }

    fn abort(&mut self, id: u64) {
        let Some(req) = self.requests.remove(&id) else {
            return;
        };
        if !req.admitted {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        for sid in &req.seqs {
            if let Some(mut seq) = self.seqs.remove(sid) {
                seq.table.release_all(&mut self.alloc);
                let _ = req.events.send(EngineEvent::Finished {
                    index: seq.index,
                    reason: FinishReason::Abort,
                });
            }
            self.running.retain(|s| s != sid);
            self.waiting.retain(|s| s != sid);
        }
        let _ = req.events.send(EngineEvent::Done(req.usage));
        self.publish_gauges();
    }

    fn publish_gauges(&self) {
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats
            .kv_blocks_used
            .store(self.alloc.num_used(), Ordering::Relaxed);
    }

    /// Frees a running sequence's blocks and sends it back to the front of the queue.
    fn preempt(&mut self, sid: u64) {
        self.running.retain(|&s| s != sid);
        let seq = self.seqs.get_mut(&sid).expect("running sequence exists");
        seq.table.release_all(&mut self.alloc);
        seq.computed = 0;
        seq.hashes.clear();
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
            if need <= self.alloc.num_free() {
                let seq = self.seqs.get_mut(&sid).unwrap();
                seq.table
                    .reserve(&mut self.alloc, tokens, bs)
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
    /// logits are needed). Returns the number of tokens it covers.
    fn attach_cached_prefix(&mut self, sid: u64) -> usize {
        let bs = self.kv.block_size();
        let seq = self.seqs.get_mut(&sid).unwrap();
        let mut parent = 0;
        for b in 0..(seq.tokens.len() - 1) / bs {
            let toks = &seq.tokens[b * bs..(b + 1) * bs];
            let h = block_hash(parent, toks);
            match self.alloc.lookup(h, toks) {
                Some(block) => {
                    seq.table.push_shared(&mut self.alloc, block);
                    seq.hashes.push(h);
                    parent = h;
                }
                None => break,
            }
        }
        seq.hashes.len() * bs
    }

    fn step(&mut self) {
        let started = Instant::now();
        self.schedule_and_run();
        self.stats
            .step_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn schedule_and_run(&mut self) {
        // Requests whose client went away are aborted before they take any more compute.
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id);
        }
        let bs = self.kv.block_size();
        let mut budget = self.cfg.max_num_batched_tokens;
        let mut scheduled: Vec<(u64, usize)> = Vec::new();
        let mut preempted = false;

        // 1. Running sequences, oldest first.
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
            scheduled.push((sid, chunk));
            budget -= chunk;
            i += 1;
        }

        // 2. Admissions, first come first served, unless this step had to preempt.
        while !preempted && budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&sid) = self.waiting.front() else { break };
            let (rid, index, fresh) = {
                let s = &self.seqs[&sid];
                (s.request, s.index, s.computed == 0 && s.table.is_empty())
            };
            let req = &self.requests[&rid];
            let use_cache = (self.cfg.enable_prefix_caching || index > 0) && req.prompt_logprobs.is_none();
            let cached = if fresh && use_cache {
                self.attach_cached_prefix(sid)
            } else {
                0
            };
            let seq = self.seqs.get_mut(&sid).unwrap();
            seq.computed = cached;
            let chunk = (seq.tokens.len() - cached).min(budget);
            let need = BlockTable::blocks_for(cached + chunk, bs) - seq.table.len();
            if need > self.alloc.num_free() {
                seq.table.release_all(&mut self.alloc);
                seq.hashes.clear();
                seq.computed = 0;
                break;
            }
            seq.table
                .reserve(&mut self.alloc, cached + chunk, bs)
                .expect("checked free blocks");
            self.waiting.pop_front();
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
        if scheduled.is_empty() {
            self.publish_gauges();
            return;
        }

        // 3. One forward call.
        let started = Instant::now();
        let result = {
            let inputs = scheduled
                .iter()
                .map(|&(sid, chunk)| {
                    let s = &self.seqs[&sid];
                    let wants_prompt = self.requests[&s.request].prompt_logprobs.is_some() && s.index == 0;
                    SequenceInput {
                        tokens: &s.tokens[s.computed..s.computed + chunk],
                        start_pos: s.computed,
                        block_table: s.table.blocks(),
                        all_logits: wants_prompt && s.computed < s.prompt_len,
                    }
                })
                .collect();
            self.model.forward(&ForwardBatch::new(inputs), &mut self.kv)
        };
        self.stats
            .forward_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                tracing::error!("forward failed: {e}");
                let rids: Vec<u64> = scheduled.iter().map(|(sid, _)| self.seqs[sid].request).collect();
                for rid in rids {
                    if let Some(r) = self.requests.get(&rid) {
                        let _ = r.events.send(EngineEvent::Error(e.to_string()));
                    }
                    self.abort(rid);
                }
                return;
            }
        };
        for (layer, load) in out.expert_load.iter().enumerate() {
            for (e, &n) in load.iter().enumerate() {
                if let Some(c) = self.stats.expert_tokens.get(layer).and_then(|l| l.get(e)) {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }

        // 4. Bookkeeping, then the next token of each sequence whose tokens are all
        //    computed, then streaming.
        let mut to_sample = Vec::with_capacity(scheduled.len());
        for (k, &(sid, chunk)) in scheduled.iter().enumerate() {
            let rows = out.rows[k].clone();
            let start = self.seqs[&sid].computed;
            self.seqs.get_mut(&sid).unwrap().computed += chunk;
            self.register_full_blocks(sid);
            let rid = self.seqs[&sid].request;
            if self.requests[&rid].prompt_logprobs.is_some() {
                self.collect_prompt_logprobs(sid, start, &out.logits, rows.clone());
            }
            let seq = &self.seqs[&sid];
            if seq.computed < seq.tokens.len() {
                continue; // more prompt to prefill
            }
            to_sample.push((sid, rows.end - 1));
        }
        for &(sid, _) in &to_sample {
            self.fork_choices(sid);
        }
        let vocab = out.logits.dims().last().copied().unwrap_or(0);
        let started = Instant::now();
        let chosen =
            crate::backend::with_host_f32(&out.logits, |all| self.choose_tokens(&to_sample, all, vocab));
        self.stats
            .sample_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match chosen {
            Ok(chosen) => {
                for (&(sid, _), (token, logprob)) in to_sample.iter().zip(chosen) {
                    self.advance(sid, token, logprob);
                }
            }
            Err(e) => {
                for (sid, _) in to_sample {
                    let rid = self.seqs[&sid].request;
                    let _ = self.requests[&rid].events.send(EngineEvent::Error(e.to_string()));
                    self.abort(rid);
                }
            }
        }
        self.publish_gauges();
    }

    /// Registers the blocks that became full and computed, so later requests can share them.
    fn register_full_blocks(&mut self, sid: u64) {
        let bs = self.kv.block_size();
        let seq = self.seqs.get_mut(&sid).unwrap();
        while (seq.hashes.len() + 1) * bs <= seq.computed {
            let b = seq.hashes.len();
            let toks = &seq.tokens[b * bs..(b + 1) * bs];
            let h = block_hash(seq.hashes.last().copied().unwrap_or(0), toks);
            self.alloc.register(seq.table.blocks()[b], h, toks);
            seq.hashes.push(h);
        }
    }

    /// Prompt logprobs for the rows of a prefill chunk starting at position `start`.
    fn collect_prompt_logprobs(
        &mut self,
        sid: u64,
        start: usize,
        logits: &candle_core::Tensor,
        rows: std::ops::Range<usize>,
    ) {
        let seq = &self.seqs[&sid];
        let req = self.requests.get_mut(&seq.request).unwrap();
        let (Some(k), Some(acc)) = (req.params.prompt_logprobs, req.prompt_logprobs.as_mut()) else {
            return;
        };
        for (j, row) in rows.enumerate() {
            let pos = start + j;
            if pos + 1 >= seq.prompt_len {
                break;
            }
            if let Ok(l) = logits.get(row).and_then(|r| r.to_vec1::<f32>()) {
                acc.push(Some(token_logprob(&l, seq.tokens[pos + 1], k)));
            }
        }
        if acc.len() == seq.prompt_len {
            let lp = req.prompt_logprobs.take().unwrap();
            let _ = req.events.send(EngineEvent::PromptLogprobs(lp));
        }
    }

    /// When the first choice of an `n > 1` request has its prompt computed, the other
    /// choices start: they share its full prompt blocks through the prefix cache and
    /// recompute only the partial last block.
    fn fork_choices(&mut self, sid: u64) {
        let rid = self.seqs[&sid].request;
        let req = &self.requests[&rid];
        if req.forked || req.params.n == 1 {
            return;
        }
        let (n, params) = (req.params.n, req.params.clone());
        let prompt = self.seqs[&sid].tokens[..self.seqs[&sid].prompt_len].to_vec();
        let mut new = Vec::new();
        for index in 1..n {
            new.push(self.new_sequence(rid, index, prompt.clone(), &params));
        }
        for &s in new.iter().rev() {
            self.waiting.push_front(s);
        }
        let req = self.requests.get_mut(&rid).unwrap();
        req.forked = true;
        req.seqs.extend(new);
    }

    /// The next token of each `(sequence, logits row)`, with its log-probabilities when
    /// asked. Each sequence reads its row of `all` in place (a decode batch of 64 is 64
    /// rows of 49k values; copying each out first cost more than the sampling). They
    /// sample in parallel on the pool; each has its own generator, so what a seeded
    /// sequence draws depends neither on its batch nor on the threads.
    fn choose_tokens(
        &mut self,
        to_sample: &[(u64, usize)],
        all: &[f32],
        vocab: usize,
    ) -> Vec<(u32, Option<TokenLogprob>)> {
        /// One sequence's choice and what it depends on.
        struct Choice<'a> {
            seq: &'a mut Sequence,
            logits: &'a [f32],
            /// EOS and stop ids before `min_tokens`.
            banned: Vec<u32>,
            /// The reasoning budget's end of thought, when the thought has had its budget.
            forced: Option<u32>,
            logprobs: Option<usize>,
        }
        let slot: HashMap<u64, usize> = to_sample
            .iter()
            .enumerate()
            .map(|(j, &(sid, _))| (sid, j))
            .collect();
        let mut choices: Vec<Option<Choice>> = to_sample.iter().map(|_| None).collect();
        for (sid, seq) in self.seqs.iter_mut() {
            let Some(&j) = slot.get(sid) else { continue };
            let row = to_sample[j].1;
            let params = &self.requests[&seq.request].params;
            let generated = seq.tokens.len() - seq.prompt_len;
            let banned = if generated < params.min_tokens {
                let eos = &self.requests[&seq.request].eos;
                eos.iter().chain(&params.stop_token_ids).copied().collect()
            } else {
                Vec::new()
            };
            let forced = params
                .reasoning_budget
                .filter(|b| seq.thinking && seq.thought_tokens >= b.max_tokens)
                .map(|b| b.end_token);
            choices[j] = Some(Choice {
                logits: &all[row * vocab..(row + 1) * vocab],
                banned,
                forced,
                logprobs: params.logprobs,
                seq,
            });
        }
        let choose = |c: Option<Choice>| {
            let c = c.expect("every sequence to sample is running");
            match c.forced {
                Some(t) => (t, c.logprobs.map(|k| token_logprob(c.logits, t, k))),
                None => {
                    let (prompt, output) = c.seq.tokens.split_at(c.seq.prompt_len);
                    c.seq.sampler.sample(c.logits, prompt, output, &c.banned)
                }
            }
        };
        if choices.len() < 2 {
            choices.into_iter().map(choose).collect()
        } else {
            choices.into_par_iter().map(choose).collect()
        }
    }

    /// Appends `sid`'s chosen token, streams it, and ends the choice when a stop
    /// condition holds.
    fn advance(&mut self, sid: u64, token: u32, logprob: Option<TokenLogprob>) {
        let seq = self.seqs.get_mut(&sid).unwrap();
        let req = self.requests.get_mut(&seq.request).unwrap();
        let generated = seq.tokens.len() - seq.prompt_len;
        let budget = req.params.reasoning_budget;
        if let Some(b) = budget {
            if token == b.start_token {
                seq.thinking = true;
            } else if token == b.end_token {
                seq.thinking = false;
            } else if seq.thinking {
                seq.thought_tokens += 1;
            }
        }
        seq.tokens.push(token);
        req.usage.completion_tokens += 1;
        self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);

        let started = Instant::now();
        let mut finish = None;
        let mut text = String::new();
        if req.eos.contains(&token) || req.params.stop_token_ids.contains(&token) {
            // The stop token itself is not part of the text.
            finish = Some(FinishReason::Stop);
        } else {
            let delta = seq.detok.push(&self.codec, token);
            let (emit, stopped) = seq.stop.push(&delta);
            text = emit;
            if stopped.is_some() {
                finish = Some(FinishReason::Stop);
            }
        }
        let generated = generated + 1;
        if finish.is_none()
            && (generated >= req.max_tokens
                || seq.tokens.len() >= self.model.config().max_position_embeddings)
        {
            finish = Some(FinishReason::Length);
        }
        if finish.is_some() && !seq.stop.stopped() {
            // Whatever the detokenizer and the stop checker held back is final now.
            let rest = seq.detok.flush(&self.codec);
            let (emit, _) = seq.stop.push(&rest);
            text.push_str(&emit);
            text.push_str(&seq.stop.flush());
        }
        self.stats
            .detokenize_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let _ = req.events.send(EngineEvent::Delta {
            index: seq.index,
            token_ids: vec![token],
            text,
            logprobs: logprob.into_iter().collect(),
        });
        if let Some(reason) = finish {
            self.finish(sid, reason);
        }
    }

    fn finish(&mut self, sid: u64, reason: FinishReason) {
        let mut seq = self.seqs.remove(&sid).unwrap();
        seq.table.release_all(&mut self.alloc);
        self.running.retain(|&s| s != sid);
        let req = self.requests.get_mut(&seq.request).unwrap();
        let _ = req.events.send(EngineEvent::Finished {
            index: seq.index,
            reason,
        });
        req.live -= 1;
        if req.live == 0 {
            let req = self.requests.remove(&seq.request).unwrap();
            let _ = req.events.send(EngineEvent::Done(req.usage));
        }
    }
}
