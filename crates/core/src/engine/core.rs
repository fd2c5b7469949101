//! The engine's state and its loop: requests and their sequences, commands from the
//! [`Engine`](super::Engine) handle, and one step after another, each in three stages:
//! the scheduler plans it ([`StepPlan`], plain data), the runner executes the plan as
//! one forward call, the output stage applies the result (sampling, reasoning budget,
//! detokenizing, stops, events).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::detok::{Detokenizer, StopChecker};
use super::disk_load::{DiskLoader, DiskLookup};
use super::scheduler::StepPlan;
use super::{
    Command, EngineConfig, EngineEvent, EngineFailure, EngineStats, FailureKind, FinishReason, Usage,
};
use crate::grammar::Constraint;
use crate::kv::disk::DiskTier;
use crate::kv::{BlockPool, BlockTable, KvStorage};
use crate::models::CausalLm;
use crate::sampling::{Sampler, SamplingParams, TokenLogprob};
use crate::spec::DraftLength;
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

pub(super) struct Request {
    pub(super) params: SamplingParams,
    pub(super) max_tokens: usize,
    pub(super) eos: Vec<u32>,
    pub(super) events: UnboundedSender<EngineEvent>,
    pub(super) prompt_len: usize,
    /// Choices not finished yet.
    pub(super) live: usize,
    pub(super) forked: bool,
    pub(super) admitted: bool,
    pub(super) seqs: Vec<u64>,
    pub(super) usage: Usage,
    pub(super) prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
}

pub(super) struct Sequence {
    pub(super) request: u64,
    /// The choice index.
    pub(super) index: usize,
    /// Prompt then generated tokens.
    pub(super) tokens: Vec<u32>,
    pub(super) prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    pub(super) computed: usize,
    pub(super) table: BlockTable,
    /// Chained hashes of the full blocks registered in the prefix cache so far.
    pub(super) hashes: Vec<u64>,
    pub(super) sampler: Sampler,
    /// Where this choice stands in its structured-output grammar; `None`: unconstrained.
    pub(super) constraint: Option<Constraint>,
    pub(super) detok: Detokenizer,
    pub(super) stop: StopChecker,
    /// Inside a reasoning model's thought, and how many tokens it has had (for
    /// `reasoning`).
    pub(super) thinking: bool,
    pub(super) thought_tokens: usize,
    /// Tokens guessed to follow, checked in the next step (see [`crate::spec`]).
    pub(super) drafts: Vec<u32>,
    /// How many to guess next; `None` when this sequence does not speculate.
    pub(super) draft_len: Option<DraftLength>,
    /// Its prefix blocks on disk, while it waits.
    pub(super) disk: DiskLookup,
}

pub(super) struct EngineCore {
    pub(super) model: Box<dyn CausalLm>,
    pub(super) kv: KvStorage,
    pub(super) pool: BlockPool,
    pub(super) codec: Arc<TextCodec>,
    pub(super) cfg: EngineConfig,
    pub(super) stats: Arc<EngineStats>,
    pub(super) requests: HashMap<u64, Request>,
    pub(super) seqs: HashMap<u64, Sequence>,
    pub(super) next_seq: u64,
    pub(super) waiting: VecDeque<u64>,
    /// In admission order: the last is the first to be preempted.
    pub(super) running: Vec<u64>,
    /// The prefix cache's disk tier, if configured, and the thread that reads from it.
    pub(super) disk: Option<Arc<DiskTier>>,
    pub(super) loader: Option<DiskLoader>,
}

impl EngineCore {
    pub(super) fn new(
        model: Box<dyn CausalLm>,
        kv: KvStorage,
        codec: Arc<TextCodec>,
        cfg: EngineConfig,
        stats: Arc<EngineStats>,
        disk: Option<Arc<DiskTier>>,
    ) -> Self {
        let pool = BlockPool::new(kv.num_blocks());
        Self {
            model,
            kv,
            pool,
            codec,
            cfg,
            stats,
            requests: HashMap::new(),
            seqs: HashMap::new(),
            next_seq: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            disk,
            loader: None,
        }
    }

    pub(super) fn run(&mut self, commands: mpsc::Receiver<Command>) {
        loop {
            // Idle (or every waiting sequence waits for the disk loader, whose answer
            // comes as a command): block until a command comes.
            if !self.has_work() {
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
            if self.has_work() {
                self.step();
            }
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(r) => self.add_request(*r),
            Command::Loaded(blocks) => self.loaded(*blocks),
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

    pub(super) fn new_sequence(
        &mut self,
        request: u64,
        index: usize,
        tokens: Vec<u32>,
        params: &SamplingParams,
    ) -> u64 {
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
                constraint: params.constraint.as_deref().cloned(),
                detok: Detokenizer::new(params.skip_special_tokens),
                stop: StopChecker::new(params.stop.clone()),
                thinking: params.reasoning.is_some_and(|b| b.starts_open),
                thought_tokens: 0,
                drafts: Vec::new(),
                draft_len: (self.cfg.speculative.enabled() && params.speculative)
                    .then(|| DraftLength::new(self.cfg.speculative.num_speculative_tokens)),
                disk: DiskLookup::Unchecked,
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

    pub(super) fn abort(&mut self, id: u64) {
        let Some(req) = self.requests.remove(&id) else {
            return;
        };
        self.stats.aborted_requests.fetch_add(1, Ordering::Relaxed);
        if !req.admitted {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        for sid in &req.seqs {
            if let Some(mut seq) = self.seqs.remove(sid) {
                seq.table.release_all(&mut self.pool);
                let _ = req.events.send(EngineEvent::Finished {
                    index: seq.index,
                    reason: FinishReason::Abort,
                    stop: None,
                });
            }
            self.running.retain(|s| s != sid);
            self.waiting.retain(|s| s != sid);
        }
        let _ = req.events.send(EngineEvent::Done(req.usage));
        self.publish_gauges();
    }

    pub(super) fn publish_gauges(&self) {
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats
            .kv_blocks_used
            .store(self.pool.num_used(), Ordering::Relaxed);
    }

    /// Whether drafts come from the model's MTP module (which needs the hidden states).
    fn drafts_with_mtp(&self) -> bool {
        self.cfg.speculative.method == crate::spec::SpeculativeMethod::Mtp && self.model.has_mtp()
    }

    /// One step: plan (scheduler), execute (runner), apply (output stage).
    fn step(&mut self) {
        let started = Instant::now();
        self.abort_disconnected();
        let plan = self.schedule();
        if !plan.is_empty() {
            let forward = Instant::now();
            let seqs = &self.seqs;
            let hidden = self.drafts_with_mtp();
            let result = super::runner::execute(self.model.as_ref(), &mut self.kv, &plan, hidden, |id| {
                let s = &seqs[&id];
                (s.tokens.as_slice(), s.drafts.as_slice(), s.table.blocks())
            });
            self.stats
                .forward_ns
                .fetch_add(forward.elapsed().as_nanos() as u64, Ordering::Relaxed);
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(out) => self.apply(&plan, out),
                Err(e) => self.fail(&plan, e),
            }
        }
        self.publish_gauges();
        self.stats
            .step_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Requests whose client went away are aborted before they take any more compute.
    fn abort_disconnected(&mut self) {
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id);
        }
    }

    /// A failed forward call fails every request of the step.
    fn fail(&mut self, plan: &StepPlan, e: crate::Error) {
        tracing::error!("forward failed: {e}");
        let failure = EngineFailure {
            kind: FailureKind::Forward,
            message: e.to_string(),
        };
        let rids: Vec<u64> = plan.seqs.iter().map(|p| self.seqs[&p.seq].request).collect();
        for rid in rids {
            if let Some(r) = self.requests.get(&rid) {
                let _ = r.events.send(EngineEvent::Error(failure.clone()));
            }
            self.abort(rid);
        }
    }

    pub(super) fn finish(&mut self, sid: u64, reason: FinishReason) {
        let mut seq = self.seqs.remove(&sid).unwrap();
        seq.table.release_all(&mut self.pool);
        self.running.retain(|&s| s != sid);
        let req = self.requests.get_mut(&seq.request).unwrap();
        let _ = req.events.send(EngineEvent::Finished {
            index: seq.index,
            reason,
            stop: seq.stop.matched().map(String::from),
        });
        req.live -= 1;
        if req.live == 0 {
            let req = self.requests.remove(&seq.request).unwrap();
            let _ = req.events.send(EngineEvent::Done(req.usage));
        }
    }
}
