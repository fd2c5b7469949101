//! Prometheus metrics: request counts and latencies recorded by the routes, engine
//! gauges read from the engine's counters at scrape time.

use std::sync::atomic::Ordering;

use moeserve_core::engine::EngineStats;
use moeserve_core::kv::disk::DiskTier;
use prometheus::{
    Counter, Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub e2e: HistogramVec,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    running: IntGauge,
    /// Prometheus' standard process gauge (what a soak watches for leaks).
    resident_memory: IntGauge,
    waiting: IntGauge,
    kv_used: IntGauge,
    kv_total: IntGauge,
    /// The Gateway API Inference Extension's model-server metrics: KV-cache use as a
    /// 0-1 fraction, and the pool's shape as labels.
    kv_usage: Gauge,
    cache_config_info: IntGaugeVec,
    kernels_info: IntGaugeVec,
    prefix_hits: IntCounter,
    /// The prefix cache by tier (pool, disk), in blocks.
    prefix_block_hits: IntCounterVec,
    prefix_block_misses: IntCounterVec,
    disk_blocks: IntGauge,
    disk_bytes: IntGauge,
    disk_read_bytes: IntCounter,
    disk_read_seconds: Counter,
    disk_written_bytes: IntCounter,
    disk_write_seconds: Counter,
    disk_load_seconds: Counter,
    disk_corrupt: IntCounter,
    disk_dropped_writes: IntCounter,
    disk_write_errors: IntCounter,
    preemptions: IntCounter,
    aborted: IntCounter,
    expert_tokens: IntCounterVec,
    steps: IntCounter,
    step_seconds: Counter,
    forward_seconds: Counter,
    sample_seconds: Counter,
    detokenize_seconds: Counter,
    constraint_seconds: Counter,
    spec_drafts: IntCounter,
    spec_draft_tokens: IntCounter,
    spec_accepted_tokens: IntCounter,
    spec_accepted_per_position: IntCounterVec,
    /// Scrapes bring counters up to date one at a time (two at once would double-count).
    scrape: std::sync::Mutex<()>,
}

/// Brings a counter up to the engine's running total.
fn catch_up(c: &IntCounter, total: u64) {
    let seen = c.get();
    if total > seen {
        c.inc_by(total - seen);
    }
}

/// Brings a seconds counter up to the engine's running total of nanoseconds.
fn catch_up_seconds(c: &Counter, total_ns: u64) {
    let (seen, total) = (c.get(), total_ns as f64 * 1e-9);
    if total > seen {
        c.inc_by(total - seen);
    }
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let hist = |name: &str, help: &str| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(latency_buckets()),
                &["endpoint"],
            )
            .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let total = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let seconds = |name: &str, help: &str| {
            let c = Counter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let expert_tokens = IntCounterVec::new(
            Opts::new(
                "moeserve_expert_routed_tokens_total",
                "Tokens routed to each expert, per layer.",
            ),
            &["layer", "expert"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(expert_tokens.clone()))
            .expect("unique metric");
        let kv_usage = Gauge::new(
            "moeserve_kv_cache_usage_perc",
            "KV-cache use as a fraction from 0 to 1: blocks held by sequences over the pool's blocks (vLLM's kv_cache_usage_perc).",
        )
        .expect("valid metric");
        registry
            .register(Box::new(kv_usage.clone()))
            .expect("unique metric");
        let cache_config_info = IntGaugeVec::new(
            Opts::new(
                "moeserve_cache_config_info",
                "The KV pool's shape, as labels: tokens per block and blocks (value 1).",
            ),
            &["block_size", "num_gpu_blocks"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(cache_config_info.clone()))
            .expect("unique metric");
        let kernels_info = IntGaugeVec::new(
            Opts::new(
                "moeserve_kernels_info",
                "The kernels the model runs, as labels (value 1): the backend (cpu or gpu), the CPU kernel set (avx512, avx2, neon, portable; MOESERVE_CPU forces one) and the optional extensions it uses.",
            ),
            &["backend", "cpu_set", "extensions"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(kernels_info.clone()))
            .expect("unique metric");
        let spec_accepted_per_position = IntCounterVec::new(
            Opts::new(
                "moeserve_spec_decode_num_accepted_tokens_per_pos_total",
                "Drafts whose token at this position (0-based) was accepted.",
            ),
            &["position"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(spec_accepted_per_position.clone()))
            .expect("unique metric");
        Self {
            requests: counter(
                "moeserve_requests_total",
                "HTTP requests by endpoint and status.",
                &["endpoint", "status"],
            ),
            ttft: hist(
                "moeserve_time_to_first_token_seconds",
                "Time from request to first token.",
            ),
            inter_token: hist(
                "moeserve_inter_token_latency_seconds",
                "Time between consecutive streamed tokens.",
            ),
            e2e: hist(
                "moeserve_e2e_request_latency_seconds",
                "Time from request to last token.",
            ),
            prompt_tokens: total("moeserve_prompt_tokens_total", "Prompt tokens admitted."),
            generation_tokens: total("moeserve_generation_tokens_total", "Tokens generated."),
            running: gauge(
                "moeserve_num_requests_running",
                "Sequences running in the engine.",
            ),
            waiting: gauge("moeserve_num_requests_waiting", "Requests waiting for admission."),
            resident_memory: gauge("process_resident_memory_bytes", "Resident memory size in bytes."),
            kv_used: gauge(
                "moeserve_kv_cache_blocks_used",
                "KV cache blocks held by sequences.",
            ),
            kv_total: gauge("moeserve_kv_cache_blocks_total", "KV cache blocks in the pool."),
            kv_usage,
            cache_config_info,
            kernels_info,
            prefix_hits: total(
                "moeserve_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache (pool and disk).",
            ),
            prefix_block_hits: counter(
                "moeserve_prefix_cache_hits_total",
                "Prefix-cache blocks found, by tier: shared from the pool, or read from disk into it.",
                &["tier"],
            ),
            prefix_block_misses: counter(
                "moeserve_prefix_cache_misses_total",
                "Prefix-cache blocks looked for and not found, by tier (a pool miss is then looked for on disk, when it is on).",
                &["tier"],
            ),
            disk_blocks: gauge(
                "moeserve_prefix_cache_disk_blocks",
                "KV blocks in the prefix cache on disk (this model's).",
            ),
            disk_bytes: gauge(
                "moeserve_prefix_cache_disk_bytes",
                "Bytes of KV blocks in the prefix cache on disk (this model's).",
            ),
            disk_read_bytes: total(
                "moeserve_prefix_cache_disk_read_bytes_total",
                "Bytes read from the prefix cache on disk.",
            ),
            disk_read_seconds: seconds(
                "moeserve_prefix_cache_disk_read_seconds_total",
                "Time reading and checking block files, summed over the loader's parallel reads (throughput per reader: bytes over seconds).",
            ),
            disk_written_bytes: total(
                "moeserve_prefix_cache_disk_written_bytes_total",
                "Bytes written to the prefix cache on disk.",
            ),
            disk_write_seconds: seconds(
                "moeserve_prefix_cache_disk_write_seconds_total",
                "Time writing block files, on the writer thread.",
            ),
            disk_load_seconds: seconds(
                "moeserve_prefix_cache_disk_load_seconds_total",
                "Time the engine spent copying blocks read from disk into the pool (the reading is the loader thread's: disk_read_seconds).",
            ),
            disk_corrupt: total(
                "moeserve_prefix_cache_disk_corrupt_total",
                "Block files found corrupt, truncated or foreign (each a miss, and removed).",
            ),
            disk_dropped_writes: total(
                "moeserve_prefix_cache_disk_dropped_writes_total",
                "Blocks not written because the writer's queue was full.",
            ),
            disk_write_errors: total(
                "moeserve_prefix_cache_disk_write_errors_total",
                "Block writes that failed (a full disk, a permission).",
            ),
            preemptions: total(
                "moeserve_preemptions_total",
                "Sequences preempted for lack of KV blocks.",
            ),
            aborted: total(
                "moeserve_requests_aborted_total",
                "Requests the engine stopped before their end (the client went away, the shutdown's drain time ran out, a failed forward call); their KV blocks are freed.",
            ),
            expert_tokens,
            steps: total(
                "moeserve_engine_steps_total",
                "Engine steps (one forward call each).",
            ),
            step_seconds: seconds(
                "moeserve_engine_step_seconds_total",
                "Time in engine steps: scheduling, the forward call, sampling and streaming.",
            ),
            forward_seconds: seconds(
                "moeserve_engine_forward_seconds_total",
                "Time in the model's forward calls.",
            ),
            sample_seconds: seconds(
                "moeserve_engine_sample_seconds_total",
                "Time in choosing the next tokens: logit processors, sampling and logprobs.",
            ),
            detokenize_seconds: seconds(
                "moeserve_engine_detokenize_seconds_total",
                "Time in detokenization and stop-string checks.",
            ),
            constraint_seconds: seconds(
                "moeserve_engine_constraint_seconds_total",
                "Time in structured-output grammars (token masks, checks, forced tokens), summed over sampling threads.",
            ),
            spec_drafts: total(
                "moeserve_spec_decode_num_drafts_total",
                "Speculative drafts checked (one per sequence and step with drafted tokens).",
            ),
            spec_draft_tokens: total(
                "moeserve_spec_decode_num_draft_tokens_total",
                "Drafted tokens checked.",
            ),
            spec_accepted_tokens: total(
                "moeserve_spec_decode_num_accepted_tokens_total",
                "Drafted tokens accepted (mean accepted length = 1 + accepted / drafts).",
            ),
            spec_accepted_per_position,
            scrape: std::sync::Mutex::new(()),
            registry,
        }
    }

    /// Time to first token summed over the endpoints: bucket upper bounds (seconds, the
    /// last `+Inf`), the cumulative count at each, and the count.
    pub fn ttft_buckets(&self) -> (Vec<f64>, Vec<u64>, u64) {
        use prometheus::core::Collector;
        let mut le: Vec<f64> = latency_buckets();
        le.push(f64::INFINITY);
        let mut cumulative = vec![0u64; le.len()];
        let mut count = 0;
        for family in self.ttft.collect() {
            for m in family.get_metric() {
                let h = m.get_histogram();
                for (i, b) in h.get_bucket().iter().enumerate().take(le.len() - 1) {
                    cumulative[i] += b.cumulative_count();
                }
                count += h.get_sample_count();
            }
        }
        *cumulative.last_mut().unwrap() = count;
        (le, cumulative, count)
    }

    /// The Prometheus text exposition, with engine gauges refreshed (`block_size`: the
    /// pool's tokens per block).
    /// Names the kernels the model runs (once, at start).
    pub fn set_kernels(&self, backend: moeserve_core::backend::Backend) {
        use moeserve_core::backend::Backend;
        let (name, set, extensions) = match backend {
            Backend::Cpu(isa) => ("cpu", isa.name(), isa.extensions().join(",")),
            Backend::Gpu => ("gpu", "", String::new()),
        };
        self.kernels_info.reset();
        self.kernels_info
            .with_label_values(&[name, set, &extensions])
            .set(1);
    }

    pub fn render(&self, engine: Option<&EngineStats>, disk: Option<&DiskTier>, block_size: usize) -> String {
        let _one_at_a_time = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = engine {
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let loadu = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as i64;
            catch_up(&self.prompt_tokens, load(&s.prompt_tokens));
            catch_up(&self.generation_tokens, load(&s.generation_tokens));
            self.running.set(loadu(&s.running));
            self.waiting.set(loadu(&s.waiting));
            self.kv_used.set(loadu(&s.kv_blocks_used));
            self.kv_total.set(loadu(&s.kv_blocks_total));
            let (used, total) = (loadu(&s.kv_blocks_used), loadu(&s.kv_blocks_total));
            self.kv_usage.set(if total > 0 {
                used as f64 / total as f64
            } else {
                0.0
            });
            // One series (reset first: a series of another shape would linger).
            self.cache_config_info.reset();
            self.cache_config_info
                .with_label_values(&[&block_size.to_string(), &total.to_string()])
                .set(1);
            catch_up(&self.prefix_hits, load(&s.prefix_cache_hit_tokens));
            let tier = |v: &IntCounterVec, t: &str, total: u64| catch_up(&v.with_label_values(&[t]), total);
            tier(&self.prefix_block_hits, "pool", load(&s.prefix_pool_hits));
            tier(&self.prefix_block_misses, "pool", load(&s.prefix_pool_misses));
            if disk.is_some() {
                tier(&self.prefix_block_hits, "disk", load(&s.prefix_disk_hits));
                tier(&self.prefix_block_misses, "disk", load(&s.prefix_disk_misses));
            }
            catch_up_seconds(&self.disk_load_seconds, load(&s.prefix_disk_load_ns));
            catch_up(&self.preemptions, load(&s.preemptions));
            catch_up(&self.aborted, load(&s.aborted_requests));
            catch_up(&self.steps, load(&s.steps));
            catch_up_seconds(&self.step_seconds, load(&s.step_ns));
            catch_up_seconds(&self.forward_seconds, load(&s.forward_ns));
            catch_up_seconds(&self.sample_seconds, load(&s.sample_ns));
            catch_up_seconds(&self.detokenize_seconds, load(&s.detokenize_ns));
            catch_up_seconds(&self.constraint_seconds, load(&s.constraint_ns));
            catch_up(&self.spec_drafts, load(&s.spec_drafts));
            catch_up(&self.spec_draft_tokens, load(&s.spec_draft_tokens));
            catch_up(&self.spec_accepted_tokens, load(&s.spec_accepted_tokens));
            for (i, c) in s.spec_accepted_per_position.iter().enumerate() {
                let counter = self
                    .spec_accepted_per_position
                    .with_label_values(&[&i.to_string()]);
                catch_up(&counter, load(c));
            }
            for (layer, experts) in s.expert_tokens.iter().enumerate() {
                for (e, c) in experts.iter().enumerate() {
                    let counter = self
                        .expert_tokens
                        .with_label_values(&[&layer.to_string(), &e.to_string()]);
                    catch_up(&counter, load(c));
                }
            }
        }
        if let Some(d) = disk {
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            let st = d.stats();
            self.disk_blocks.set(d.store().len() as i64);
            self.disk_bytes.set(d.store().bytes_on_disk() as i64);
            catch_up(&self.disk_read_bytes, load(&st.bytes_read));
            catch_up_seconds(&self.disk_read_seconds, load(&st.read_ns));
            catch_up(&self.disk_written_bytes, load(&st.bytes_written));
            catch_up_seconds(&self.disk_write_seconds, load(&st.write_ns));
            catch_up(&self.disk_corrupt, load(&st.corrupt));
            catch_up(&self.disk_dropped_writes, load(&st.dropped_writes));
            catch_up(&self.disk_write_errors, load(&st.write_errors));
        }
        if let Some(rss) = resident_memory_bytes() {
            self.resident_memory.set(rss as i64);
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}

/// This process's resident set, from /proc (Linux); None elsewhere.
fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}
