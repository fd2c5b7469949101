//! The engine: many concurrent requests turned into one forward call per step.
//!
//! [`Engine::start`] moves the model and its KV cache onto a dedicated OS thread that
//! runs the step loop ([`core`]): each step planned by the [`scheduler`], executed by the
//! [`runner`], applied by the [`output`] stage. Model compute never runs on the caller's
//! (async) threads. [`Engine::submit`] validates a request, queues it and returns a
//! [`RequestHandle`] that yields [`EngineEvent`]s; dropping the handle aborts the request
//! and its KV blocks are freed at the next step.

mod core;
pub mod detok;
mod disk_load;
mod output;
mod runner;
mod scheduler;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::error::Result;
use crate::kv::disk::{kv_fingerprint, DiskBlockStore, DiskTier};
use crate::kv::{KvLayout, KvStorage};
use crate::models::CausalLm;
pub use crate::sampling::{ParamError, SamplingParams, TokenLogprob};
use crate::spec::SpeculativeConfig;
use crate::tokenizer::TextCodec;

/// How the engine schedules.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// Bytes for the KV block pool.
    pub kv_cache_memory: usize,
    /// Most sequences running at once.
    pub max_num_seqs: usize,
    /// Token budget of one step (prefill chunks plus decodes).
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for admission before `submit` refuses more.
    pub max_waiting_requests: usize,
    /// Most choices (`n`) per request.
    pub max_n: usize,
    pub enable_prefix_caching: bool,
    /// Drafted tokens checked in the batched step (see [`crate::spec`]).
    pub speculative: SpeculativeConfig,
    /// The prefix cache's disk tier; `None`: the pool only.
    pub prefix_cache_disk: Option<DiskCacheConfig>,
}

/// Where and how much of the prefix cache goes to disk (see [`crate::kv::disk`]).
#[derive(Debug, Clone)]
pub struct DiskCacheConfig {
    /// The directory shared by every model; each model's blocks go to a subdirectory
    /// named by its fingerprint.
    pub dir: std::path::PathBuf,
    /// The most bytes of blocks kept for this model.
    pub max_bytes: u64,
    /// The weights' identity ([`crate::kv::disk::weights_identity`]), part of the
    /// fingerprint.
    pub weights_identity: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_cache_memory: 256 << 20,
            max_num_seqs: 64,
            max_num_batched_tokens: 512,
            max_waiting_requests: 256,
            max_n: crate::sampling::DEFAULT_MAX_N,
            enable_prefix_caching: true,
            speculative: SpeculativeConfig::default(),
            prefix_cache_disk: None,
        }
    }
}

/// A generation request: prompt token ids and how to sample.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
}

/// Why a choice ended, as OpenAI names it (`abort` when the engine stopped it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum EngineEvent {
    /// Log-probabilities of the prompt tokens (the first has none); sent once, before
    /// any output, when `prompt_logprobs` was asked for.
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// New output of choice `index`. `text` may be empty while a character or a possible
    /// stop string is incomplete.
    Delta {
        index: usize,
        token_ids: Vec<u32>,
        text: String,
        logprobs: Vec<TokenLogprob>,
    },
    /// Choice `index` ended; `stop` is the stop string that ended it, if one did.
    Finished {
        index: usize,
        reason: FinishReason,
        stop: Option<String>,
    },
    /// Every choice ended; the last event of a request.
    Done(Usage),
    /// The engine failed this request; the last event.
    Error(EngineFailure),
}

/// A request the engine took but could not finish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct EngineFailure {
    pub kind: FailureKind,
    pub message: String,
}

/// Where a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The model's forward call.
    Forward,
    /// Reading the logits back and choosing tokens.
    Sampling,
    /// The engine stopped the request before its end (shutdown after the drain time).
    Aborted,
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FailureKind::Forward => "the forward pass failed",
            FailureKind::Sampling => "sampling failed",
            FailureKind::Aborted => "the server stopped the request",
        })
    }
}

/// Why `submit` refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// A sampling parameter is out of range (named as in the OpenAI API).
    #[error("{0}")]
    InvalidParameter(ParamError),
    /// The prompt itself is unusable: empty, or a token outside the vocabulary.
    #[error("{0}")]
    InvalidPrompt(String),
    /// The prompt, or the prompt plus `max_tokens`, does not fit the context (or the KV
    /// pool, when that is smaller).
    #[error("{}", context_message(*.prompt_tokens, *.max_tokens, *.limit, *.by_kv_pool))]
    ContextLengthExceeded {
        prompt_tokens: usize,
        /// The request's `max_tokens`, when it is what does not fit (else the prompt
        /// alone leaves no room to generate).
        max_tokens: Option<usize>,
        limit: usize,
        /// The KV pool, not the model's context, sets the limit.
        by_kv_pool: bool,
    },
    /// `limit` requests are already waiting.
    #[error("the request queue is full ({waiting} waiting, at most {limit})")]
    QueueFull { waiting: usize, limit: usize },
    /// The engine has stopped.
    #[error("the engine has stopped")]
    Stopped,
}

fn context_message(
    prompt_tokens: usize,
    max_tokens: Option<usize>,
    limit: usize,
    by_kv_pool: bool,
) -> String {
    let what = if by_kv_pool { "KV cache" } else { "context" };
    match max_tokens {
        None => format!(
            "the prompt has {prompt_tokens} tokens, but the model's {what} holds {limit} (leaving no room to generate)"
        ),
        Some(m) => format!(
            "the prompt ({prompt_tokens} tokens) plus max_tokens ({m}) exceeds the model's {what} of {limit} tokens"
        ),
    }
}

/// Live counters, readable from any thread (the server exports them as metrics).
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicUsize,
    pub waiting: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    pub prefix_cache_hit_tokens: AtomicU64,
    /// Prefix-cache lookups by tier, in blocks: found in the pool, not in the pool, read
    /// from disk, not on disk (a lookup stops at its first miss in the last tier), and
    /// the step loop's time copying blocks read from disk into the pool (the reading is
    /// the loader thread's, in the disk tier's own counters).
    pub prefix_pool_hits: AtomicU64,
    pub prefix_pool_misses: AtomicU64,
    pub prefix_disk_hits: AtomicU64,
    pub prefix_disk_misses: AtomicU64,
    pub prefix_disk_load_ns: AtomicU64,
    pub preemptions: AtomicU64,
    /// Requests the engine stopped before their end: the client went away, the
    /// shutdown's drain time ran out, or the forward call failed.
    pub aborted_requests: AtomicU64,
    pub steps: AtomicU64,
    /// Time in whole engine steps (scheduling, forward, sampling, streaming), in the
    /// model's forward calls, in choosing the next tokens (logit processing, sampling,
    /// logprobs), and in detokenization and stop checks.
    pub step_ns: AtomicU64,
    pub forward_ns: AtomicU64,
    pub sample_ns: AtomicU64,
    pub detokenize_ns: AtomicU64,
    /// Time in structured-output grammars (masks, checks, forced tokens), summed over
    /// the threads that sample.
    pub constraint_ns: AtomicU64,
    /// Tokens routed to each expert, per layer (empty rows for dense layers).
    pub expert_tokens: Vec<Vec<AtomicU64>>,
    /// Speculative decoding, in the meaning of vLLM's `spec_decode` counters: drafts
    /// checked, drafted tokens, accepted drafted tokens, and accepted drafted tokens by
    /// position in the draft (entry `i`: drafts whose token `i` was accepted).
    pub spec_drafts: AtomicU64,
    pub spec_draft_tokens: AtomicU64,
    pub spec_accepted_tokens: AtomicU64,
    pub spec_accepted_per_position: Vec<AtomicU64>,
}

enum Command {
    Submit(Box<core::NewRequest>),
    /// Prefix blocks the disk loader read for a waiting sequence.
    Loaded(Box<disk_load::LoadedBlocks>),
    Abort(u64),
    AbortAll,
    Shutdown,
}

/// The stream of one request's events. Dropping it aborts the request.
pub struct RequestHandle {
    id: u64,
    events: UnboundedReceiver<EngineEvent>,
    commands: mpsc::Sender<Command>,
}

impl RequestHandle {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The next event; `None` after the last one.
    pub async fn next(&mut self) -> Option<EngineEvent> {
        self.events.recv().await
    }

    /// The next event, blocking the thread (not for async code).
    pub fn blocking_next(&mut self) -> Option<EngineEvent> {
        self.events.blocking_recv()
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        // Finished requests ignore it; a stopped engine cannot receive it.
        let _ = self.commands.send(Command::Abort(self.id));
    }
}

/// What callers need to know about the model to validate requests.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    pub vocab_size: usize,
    pub context_length: usize,
    /// Tokens the whole KV pool holds.
    pub pool_tokens: usize,
    pub max_waiting_requests: usize,
    pub max_n: usize,
}

pub struct Engine {
    commands: mpsc::Sender<Command>,
    disk: Option<Arc<DiskTier>>,
    stats: Arc<EngineStats>,
    codec: Arc<TextCodec>,
    limits: EngineLimits,
    next_id: AtomicU64,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Allocates the KV pool and starts the step loop on its own thread.
    pub fn start(model: Box<dyn CausalLm>, codec: Arc<TextCodec>, config: EngineConfig) -> Result<Self> {
        let layout: KvLayout = model.kv_layout();
        let kv = KvStorage::with_memory_budget_on(
            layout,
            config.block_size,
            config.kv_cache_memory,
            model.device(),
            model.backend(),
        )?;
        let cfg = model.config();
        let stats = Arc::new(EngineStats {
            expert_tokens: cfg
                .sparse_layers
                .iter()
                .map(|&sparse| {
                    let n = if sparse {
                        cfg.moe.as_ref().map_or(0, |m| m.num_experts)
                    } else {
                        0
                    };
                    (0..n).map(|_| AtomicU64::new(0)).collect()
                })
                .collect(),
            spec_accepted_per_position: (0..config.speculative.num_speculative_tokens)
                .map(|_| AtomicU64::new(0))
                .collect(),
            ..EngineStats::default()
        });
        stats.kv_blocks_total.store(kv.num_blocks(), Ordering::Relaxed);
        let limits = EngineLimits {
            vocab_size: cfg.vocab_size,
            context_length: cfg.max_position_embeddings,
            pool_tokens: kv.num_blocks() * kv.block_size(),
            max_waiting_requests: config.max_waiting_requests,
            max_n: config.max_n,
        };
        tracing::info!(
            "KV cache: {} blocks of {} tokens ({} tokens, {:.1} MiB, {} bytes per token)",
            kv.num_blocks(),
            kv.block_size(),
            limits.pool_tokens,
            config.kv_cache_memory as f64 / (1 << 20) as f64,
            layout.bytes_per_token()
        );
        let disk = match &config.prefix_cache_disk {
            Some(d) if config.enable_prefix_caching => Some(Arc::new(open_disk_tier(d, &*model, &kv)?)),
            Some(_) => {
                tracing::warn!("prefix caching is off: the prefix cache directory is not used");
                None
            }
            None => None,
        };
        let (tx, rx) = mpsc::channel();
        let loader =
            match &disk {
                Some(d) => Some(disk_load::DiskLoader::start(d.clone(), tx.clone()).map_err(|e| {
                    crate::Error::KvCache(format!("cannot start the prefix cache loader: {e}"))
                })?),
                None => None,
            };
        let mut core = core::EngineCore::new(model, kv, codec.clone(), config, stats.clone(), disk.clone());
        core.loader = loader;
        let thread = std::thread::Builder::new()
            .name("moeserve-engine".into())
            .spawn(move || core.run(rx))
            .map_err(|e| crate::Error::KvCache(format!("cannot start the engine thread: {e}")))?;
        Ok(Self {
            commands: tx,
            disk,
            stats,
            codec,
            limits,
            next_id: AtomicU64::new(1),
            thread: Some(thread),
        })
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn codec(&self) -> &Arc<TextCodec> {
        &self.codec
    }

    /// The prefix cache's disk tier, when one is configured.
    pub fn disk_tier(&self) -> Option<&DiskTier> {
        self.disk.as_deref()
    }

    /// Waits (at most `timeout`) for the blocks queued for disk to be written: at
    /// shutdown, so that a restart finds the latest prefixes. Returns whether all were.
    pub fn flush_prefix_cache(&self, timeout: std::time::Duration) -> bool {
        self.disk.as_ref().is_none_or(|d| d.flush(timeout))
    }

    pub fn limits(&self) -> EngineLimits {
        self.limits
    }

    /// Validates and queues a request. Refuses at once when the waiting queue is full.
    pub fn submit(&self, request: GenerateRequest) -> std::result::Result<RequestHandle, SubmitError> {
        let max_tokens = self.check(&request)?;
        let waiting = self.stats.waiting.load(Ordering::Relaxed);
        if waiting >= self.limits.max_waiting_requests {
            return Err(SubmitError::QueueFull {
                waiting,
                limit: self.limits.max_waiting_requests,
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx): (UnboundedSender<EngineEvent>, _) = tokio::sync::mpsc::unbounded_channel();
        self.stats.waiting.fetch_add(1, Ordering::Relaxed);
        let eos = if request.params.ignore_eos {
            vec![]
        } else {
            self.codec.eos_token_ids().to_vec()
        };
        let new = core::NewRequest {
            id,
            prompt: request.prompt,
            params: request.params,
            max_tokens,
            eos,
            events: tx,
        };
        if self.commands.send(Command::Submit(Box::new(new))).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(SubmitError::Stopped);
        }
        Ok(RequestHandle {
            id,
            events: rx,
            commands: self.commands.clone(),
        })
    }

    /// Stops a request; its KV blocks are freed at the next step.
    pub fn abort(&self, id: u64) {
        let _ = self.commands.send(Command::Abort(id));
    }

    /// Stops every request (shutdown after the drain timeout).
    pub fn abort_all(&self) {
        let _ = self.commands.send(Command::AbortAll);
    }

    /// Returns the request's effective `max_tokens`.
    fn check(&self, r: &GenerateRequest) -> std::result::Result<usize, SubmitError> {
        let l = self.limits;
        r.params
            .validate(l.vocab_size, l.max_n)
            .map_err(SubmitError::InvalidParameter)?;
        if r.prompt.is_empty() {
            return Err(SubmitError::InvalidPrompt("the prompt is empty".into()));
        }
        if let Some(&t) = r.prompt.iter().find(|&&t| t as usize >= l.vocab_size) {
            return Err(SubmitError::InvalidPrompt(format!(
                "token id {t} is outside the vocabulary of {}",
                l.vocab_size
            )));
        }
        let limit = l.context_length.min(l.pool_tokens);
        let exceeded = |max_tokens| SubmitError::ContextLengthExceeded {
            prompt_tokens: r.prompt.len(),
            max_tokens,
            limit,
            by_kv_pool: l.pool_tokens < l.context_length,
        };
        let n = r.prompt.len();
        if n >= limit {
            return Err(exceeded(None));
        }
        let max_tokens = r.params.max_tokens.unwrap_or(limit - n);
        if n + max_tokens > limit {
            return Err(exceeded(Some(max_tokens)));
        }
        Ok(max_tokens)
    }
}

/// Opens the model's subdirectory of the disk tier and starts its writer.
fn open_disk_tier(d: &DiskCacheConfig, model: &dyn CausalLm, kv: &KvStorage) -> Result<DiskTier> {
    let fingerprint = kv_fingerprint(
        d.weights_identity,
        model.config(),
        kv.layout(),
        kv.record_format(),
        kv.block_size(),
    );
    let fail = |e: std::io::Error| {
        crate::Error::KvCache(format!("the prefix cache directory {}: {e}", d.dir.display()))
    };
    let store = DiskBlockStore::open(&d.dir, fingerprint, d.max_bytes).map_err(fail)?;
    tracing::info!(
        "prefix cache on disk: {} ({} blocks, {:.1} of {:.1} MiB; {})",
        store.dir().display(),
        store.len(),
        store.bytes_on_disk() as f64 / (1 << 20) as f64,
        d.max_bytes as f64 / (1 << 20) as f64,
        if store.is_owner() {
            "this server writes"
        } else {
            "another server owns it: read only"
        }
    );
    // A queue of at most 64 MiB of blocks between the step loop and the writer.
    DiskTier::start(store, kv.block_record_len(), 64 << 20).map_err(fail)
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests;
