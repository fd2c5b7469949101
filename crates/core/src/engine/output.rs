//! The output stage: a step's forward output applied to its sequences. Computed tokens
//! are counted and full blocks registered in the prefix cache; prompt logprobs are
//! collected; every sequence whose input is all computed chooses its next token (in
//! parallel), which then goes through the reasoning budget, the detokenizer and the stop
//! conditions and is streamed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use rayon::prelude::*;

use super::core::{EngineCore, Sequence};
use super::scheduler::StepPlan;
use super::{EngineEvent, EngineFailure, FailureKind, FinishReason};
use crate::batch::{ForwardOutput, LogitRows};
use crate::kv::block_hash;
use crate::sampling::{token_logprob, StepConstraints, TokenLogprob};

impl EngineCore {
    /// Applies `out`, the forward output of `plan`.
    pub(super) fn apply(&mut self, plan: &StepPlan, out: ForwardOutput) {
        for (layer, load) in out.expert_load.iter().enumerate() {
            for (e, &n) in load.iter().enumerate() {
                if let Some(c) = self.stats.expert_tokens.get(layer).and_then(|l| l.get(e)) {
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        let mut to_sample = Vec::with_capacity(plan.seqs.len());
        let mut drafted: HashMap<u64, Vec<u32>> = HashMap::new();
        for (k, p) in plan.seqs.iter().enumerate() {
            let rows = out.rows[k].clone();
            let seq = self.seqs.get_mut(&p.seq).unwrap();
            // Drafted tokens count as computed only once verification accepts them.
            seq.computed += p.len - p.drafts;
            if p.drafts > 0 {
                drafted.insert(p.seq, std::mem::take(&mut seq.drafts));
            }
            self.register_full_blocks(p.seq);
            let rid = self.seqs[&p.seq].request;
            if self.requests[&rid].prompt_logprobs.is_some() && p.drafts == 0 {
                self.collect_prompt_logprobs(p.seq, p.start, &out.logits, rows.clone());
            }
            let seq = &self.seqs[&p.seq];
            if seq.computed < seq.tokens.len() || rows.is_empty() {
                continue; // more input to compute
            }
            // The row of the last token before the drafts; the drafts' rows follow it.
            to_sample.push((p.seq, rows.end - 1 - p.drafts));
        }
        for &(sid, _) in &to_sample {
            self.fork_choices(sid);
        }
        let vocab = out.logits.dims().last().copied().unwrap_or(0);
        let logits = out.logits.clone();
        let applied = crate::backend::with_host_f32(&logits, |all| {
            let started = Instant::now();
            let chosen = self.choose_tokens(&to_sample, all, vocab);
            self.stats
                .sample_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            for (&(sid, row), choice) in to_sample.iter().zip(chosen) {
                if !self.seqs.contains_key(&sid) {
                    continue; // a sibling choice's failure ended the request
                }
                match choice {
                    Ok((token, logprob)) => {
                        self.advance(sid, token, logprob);
                        if let Some(drafts) = drafted.remove(&sid) {
                            self.verify_drafts(sid, token, &drafts, all, row, vocab);
                        }
                        self.append_forced_tokens(sid);
                    }
                    Err(message) => self.fail_sequence(sid, message),
                }
            }
        });
        match applied {
            Ok(()) => match &out.hidden {
                Some(hidden) => self.draft_with_mtp(plan, hidden),
                None => {
                    for &(sid, _) in &to_sample {
                        self.propose_drafts(sid);
                    }
                }
            },
            Err(e) => {
                for (sid, _) in to_sample {
                    self.fail_sequence(sid, e.to_string());
                }
            }
        }
    }

    /// Checks `sid`'s drafted tokens against the rows that follow `row` (whose sampled
    /// token was `first`): while the token sampled from a row equals the draft before it,
    /// the draft is accepted (its KV, written this step, becomes part of the sequence) and
    /// the next row is sampled, through the same sampler, grammar, budget and stop checks
    /// as any token. See [`crate::spec`] for why this is lossless. The blocks past the
    /// accepted tokens go back to the pool.
    fn verify_drafts(&mut self, sid: u64, first: u32, drafts: &[u32], all: &[f32], row: usize, vocab: usize) {
        let mut token = first;
        let mut accepted = 0;
        for (j, &draft) in drafts.iter().enumerate() {
            if token != draft || !self.seqs.contains_key(&sid) {
                break;
            }
            accepted += 1;
            self.seqs.get_mut(&sid).unwrap().computed += 1;
            self.register_full_blocks(sid);
            let started = Instant::now();
            let chosen = self.choose_tokens(&[(sid, row + 1 + j)], all, vocab).pop();
            self.stats
                .sample_ns
                .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match chosen.expect("one choice per sequence") {
                Ok((next, logprob)) => {
                    self.advance(sid, next, logprob);
                    token = next;
                }
                Err(message) => {
                    self.fail_sequence(sid, message);
                    break;
                }
            }
        }
        let s = &self.stats;
        s.spec_drafts.fetch_add(1, Ordering::Relaxed);
        s.spec_draft_tokens
            .fetch_add(drafts.len() as u64, Ordering::Relaxed);
        s.spec_accepted_tokens
            .fetch_add(accepted as u64, Ordering::Relaxed);
        for c in s.spec_accepted_per_position.iter().take(accepted) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let bs = self.kv.block_size();
        if let Some(seq) = self.seqs.get_mut(&sid) {
            if let Some(d) = seq.draft_len.as_mut() {
                d.record(drafts.len(), accepted);
            }
            seq.table.truncate(&mut self.pool, seq.tokens.len(), bs);
        }
    }

    /// Runs the MTP module over the positions this step computed and kept, for every
    /// sequence that drafts: its KV for them is written, and each sequence ready to decode
    /// gets the module's greedy guess of the token after its newest one as a one-token
    /// draft (q is one-hot, so checking it by sampling stays exact; see [`crate::spec`]).
    /// The module at position i reads the main model's hidden state there and token
    /// i + 1, so it runs one token behind the main model, after sampling.
    fn draft_with_mtp(&mut self, plan: &StepPlan, hidden: &candle_core::Tensor) {
        let mut rows: Vec<u32> = Vec::new();
        let mut runs: Vec<(u64, usize, usize, bool)> = Vec::new();
        let mut offset = 0;
        for p in &plan.seqs {
            let base = offset;
            offset += p.len;
            let Some(seq) = self.seqs.get(&p.seq) else {
                continue; // finished
            };
            if seq.draft_len.is_none() {
                continue;
            }
            // Positions start..start + kept hold verified tokens whose next token is known.
            let kept = seq
                .computed
                .min(seq.tokens.len().saturating_sub(1))
                .saturating_sub(p.start)
                .min(p.len);
            if kept == 0 {
                continue;
            }
            let decoding = seq.computed + 1 == seq.tokens.len() && seq.computed == p.start + kept;
            rows.extend(base as u32..(base + kept) as u32);
            runs.push((p.seq, p.start, kept, decoding));
        }
        if runs.is_empty() {
            return;
        }
        let started = Instant::now();
        let result = (|| {
            let ids = candle_core::Tensor::new(rows.as_slice(), hidden.device())?;
            let hidden = hidden.index_select(&ids, 0)?;
            let inputs = runs
                .iter()
                .map(|&(sid, start, kept, decoding)| {
                    let s = &self.seqs[&sid];
                    crate::batch::SequenceInput {
                        tokens: &s.tokens[start + 1..start + 1 + kept],
                        start_pos: start,
                        block_table: s.table.blocks(),
                        logits: if decoding {
                            LogitRows::Last
                        } else {
                            LogitRows::None
                        },
                    }
                })
                .collect();
            let out =
                self.model
                    .forward_mtp(&crate::batch::ForwardBatch::new(inputs), &hidden, &mut self.kv)?;
            let guesses = crate::backend::with_host_f32(&out.logits, |all| {
                let vocab = out.logits.dims().last().copied().unwrap_or(1);
                out.rows
                    .iter()
                    .map(|r| {
                        (!r.is_empty())
                            .then(|| crate::sampling::argmax(&all[(r.end - 1) * vocab..r.end * vocab]))
                    })
                    .collect::<Vec<_>>()
            })?;
            Ok::<_, crate::Error>(guesses)
        })();
        self.stats
            .forward_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let guesses = match result {
            Ok(g) => g,
            Err(e) => {
                // A failed draft costs only the speedup: the sequences decode on without.
                tracing::warn!("multi-token prediction failed: {e}");
                return;
            }
        };
        for (&(sid, ..), guess) in runs.iter().zip(guesses) {
            let (Some(guess), Some(seq)) = (guess, self.seqs.get_mut(&sid)) else {
                continue;
            };
            if seq.draft_len.as_mut().is_some_and(|d| d.next_len() > 0) {
                seq.drafts = vec![guess];
            }
        }
    }

    /// Guesses the tokens after `sid`'s latest one, for the next step to check.
    fn propose_drafts(&mut self, sid: u64) {
        let spec = self.cfg.speculative;
        if spec.method != crate::spec::SpeculativeMethod::Ngram {
            return;
        }
        let Some(seq) = self.seqs.get_mut(&sid) else {
            return;
        };
        let Some(k) = seq.draft_len.as_mut().map(|d| d.next_len()) else {
            return;
        };
        seq.drafts = crate::spec::ngram::propose(&seq.tokens, spec.ngram_min, spec.ngram_max, k);
    }

    /// Choosing `sid`'s next token failed: its request gets the error and ends.
    fn fail_sequence(&mut self, sid: u64, message: String) {
        let Some(seq) = self.seqs.get(&sid) else { return };
        let rid = seq.request;
        let failure = EngineFailure {
            kind: FailureKind::Sampling,
            message,
        };
        let _ = self.requests[&rid].events.send(EngineEvent::Error(failure));
        self.abort(rid);
    }

    /// Tokens a structured-output grammar forces after `sid`'s last token (the rest of a
    /// fixed key, the closing brackets) are appended at once, without a choice; the next
    /// step computes them together and yields one logits row for the token after them.
    /// Not with logprobs, which every token must have from a forward.
    fn append_forced_tokens(&mut self, sid: u64) {
        let Some(seq) = self.seqs.get_mut(&sid) else {
            return;
        };
        if seq.thinking || self.requests[&seq.request].params.logprobs.is_some() {
            return;
        }
        let Some(constraint) = seq.constraint.as_mut() else {
            return;
        };
        let started = Instant::now();
        let forced = constraint.forced_tokens();
        self.stats
            .constraint_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        for token in forced {
            if !self.seqs.contains_key(&sid) {
                break; // a stop condition ended it
            }
            self.advance(sid, token, None);
        }
    }

    /// Registers the blocks that became full and computed, so later requests can share
    /// them, and hands each to the disk tier's writer (a copy of its bytes: the pool may
    /// reuse the block before the writer gets to it).
    fn register_full_blocks(&mut self, sid: u64) {
        let bs = self.kv.block_size();
        let seq = self.seqs.get_mut(&sid).unwrap();
        while (seq.hashes.len() + 1) * bs <= seq.computed {
            let b = seq.hashes.len();
            let toks = &seq.tokens[b * bs..(b + 1) * bs];
            let h = block_hash(seq.hashes.last().copied().unwrap_or(0), toks);
            let block = seq.table.blocks()[b];
            self.pool.register(block, h, toks);
            if let Some(disk) = self.disk.as_ref().filter(|d| d.wants(h)) {
                // A block that cannot be read back (a device error) is not cached on disk.
                match self.kv.block_bytes(block) {
                    Ok(bytes) => disk.write(h, toks, bytes),
                    Err(e) => tracing::warn!("block {block} not written to the disk cache: {e}"),
                }
            }
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
            // `acc[i]` is token i's; a prompt recomputed after preemption passes the
            // positions it has already reported again.
            if acc.len() != pos + 1 {
                continue;
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
    /// asked, through the sequence's sampler and the step's constraints: EOS and stop ids
    /// banned before `min_tokens`, the mask of the sequence's grammar (outside a
    /// thought), the reasoning budget's forced end of thought. Each sequence reads its
    /// row of `all` in place (a decode batch of 64 is 64 rows of 49k values; copying each
    /// out first cost more than the sampling). They sample in parallel on the pool; each has its own generator, so
    /// what a seeded sequence draws depends neither on its batch nor on the threads.
    fn choose_tokens(
        &mut self,
        to_sample: &[(u64, usize)],
        all: &[f32],
        vocab: usize,
    ) -> Vec<Result<(u32, Option<TokenLogprob>), String>> {
        /// One sequence's choice and what it depends on.
        struct Choice<'a> {
            seq: &'a mut Sequence,
            logits: &'a [f32],
            banned: Vec<u32>,
            forced: Option<u32>,
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
            let req = &self.requests[&seq.request];
            let params = &req.params;
            let generated = seq.tokens.len() - seq.prompt_len;
            let banned = if generated < params.min_tokens {
                req.eos.iter().chain(&params.stop_token_ids).copied().collect()
            } else {
                Vec::new()
            };
            let forced = params
                .reasoning
                .filter(|b| seq.thinking && b.max_tokens.is_some_and(|m| seq.thought_tokens >= m))
                .map(|b| b.end_token);
            choices[j] = Some(Choice {
                logits: &all[row * vocab..(row + 1) * vocab],
                banned,
                forced,
                seq,
            });
        }
        let constraint_ns = &self.stats.constraint_ns;
        let choose = |c: Option<Choice>| {
            let c = c.expect("every sequence to sample is running");
            let Sequence {
                tokens,
                prompt_len,
                sampler,
                constraint,
                thinking,
                ..
            } = c.seq;
            let (prompt, output) = tokens.split_at(*prompt_len);
            let mut step = StepConstraints {
                banned: &c.banned,
                mask: None,
                forced: c.forced,
            };
            let grammar = constraint.as_mut().filter(|_| !*thinking && c.forced.is_none());
            let Some(grammar) = grammar else {
                return Ok(sampler.sample(c.logits, prompt, output, &step));
            };
            let started = Instant::now();
            // The fast path: choose freely and keep the token when the grammar allows it
            // (most tokens of a JSON string or number), else mask and choose again. Exact
            // for greedy and plain temperature sampling: a draw from p kept when allowed,
            // else redrawn from p restricted, has p restricted's distribution. Top-k,
            // top-p and min-p cut the distribution before the mask would, and logprobs
            // are of the masked distribution: those always mask first.
            if sampler.masks_by_rejection() {
                let (token, logprob) = sampler.sample(c.logits, prompt, output, &step);
                if grammar.allows(token) {
                    constraint_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
                    return Ok((token, logprob));
                }
            }
            let mask = grammar.mask();
            constraint_ns.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
            let mask = mask.map_err(|e| format!("structured output: {e}"))?;
            if mask.is_empty() {
                return Err("structured output: the grammar allows no token here".into());
            }
            if !mask.allows_any_except(step.banned) {
                // The grammar allows only what min_tokens bans (its end): the grammar wins.
                step.banned = &[];
            }
            step.mask = Some(&mask);
            Ok(sampler.sample(c.logits, prompt, output, &step))
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
        let Some(seq) = self.seqs.get_mut(&sid) else {
            return;
        };
        let req = self.requests.get_mut(&seq.request).unwrap();
        let generated = seq.tokens.len() - seq.prompt_len;
        let was_thinking = seq.thinking;
        if let Some(b) = req.params.reasoning {
            if token == b.start_token {
                seq.thinking = true;
            } else if token == b.end_token {
                seq.thinking = false;
            } else if seq.thinking {
                seq.thought_tokens += 1;
            }
        }
        // A grammar allows EOS where it can end; chosen there, it ends the answer even
        // with ignore_eos (the grammar allows nothing after it).
        let grammar_eos =
            seq.constraint.is_some() && !was_thinking && self.codec.eos_token_ids().contains(&token);
        let is_stop_token =
            grammar_eos || req.eos.contains(&token) || req.params.stop_token_ids.contains(&token);
        let mut grammar_done = false;
        if let (Some(g), false, false) = (seq.constraint.as_mut(), was_thinking, is_stop_token) {
            if let Err(e) = g.consume(token) {
                let message = format!("structured output: {e}");
                self.fail_sequence(sid, message);
                return;
            }
            grammar_done = g.is_finished();
        }
        let seq = self.seqs.get_mut(&sid).unwrap();
        let req = self.requests.get_mut(&seq.request).unwrap();
        seq.tokens.push(token);
        req.usage.completion_tokens += 1;
        self.stats.generation_tokens.fetch_add(1, Ordering::Relaxed);

        let started = Instant::now();
        let mut finish = None;
        let mut text = String::new();
        if is_stop_token {
            // The stop token itself is not part of the text.
            finish = Some(FinishReason::Stop);
        } else {
            let delta = seq.detok.push(&self.codec, token);
            let (emit, stopped) = seq.stop.push(&delta);
            text = emit;
            if stopped.is_some() || grammar_done {
                // A complete grammar allows nothing but EOS: no forward to choose it.
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
}
