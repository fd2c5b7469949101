//! Prometheus metrics: request counts and latencies recorded by the routes, engine
//! gauges read from the engine's counters at scrape time.

use std::sync::atomic::Ordering;

use moeserve_core::engine::EngineStats;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub ttft: HistogramVec,
    pub inter_token: HistogramVec,
    pub e2e: HistogramVec,
    prompt_tokens: IntGauge,
    generation_tokens: IntGauge,
    running: IntGauge,
    waiting: IntGauge,
    kv_used: IntGauge,
    kv_total: IntGauge,
    prefix_hits: IntGauge,
    preemptions: IntGauge,
    expert_tokens: IntGaugeVec,
}

fn latency_buckets() -> Vec<f64> {
    vec![
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
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
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let expert_tokens = IntGaugeVec::new(
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
            prompt_tokens: gauge("moeserve_prompt_tokens_total", "Prompt tokens admitted."),
            generation_tokens: gauge("moeserve_generation_tokens_total", "Tokens generated."),
            running: gauge(
                "moeserve_num_requests_running",
                "Sequences running in the engine.",
            ),
            waiting: gauge("moeserve_num_requests_waiting", "Requests waiting for admission."),
            kv_used: gauge(
                "moeserve_kv_cache_blocks_used",
                "KV cache blocks held by sequences.",
            ),
            kv_total: gauge("moeserve_kv_cache_blocks_total", "KV cache blocks in the pool."),
            prefix_hits: gauge(
                "moeserve_prefix_cache_hit_tokens_total",
                "Prompt tokens served from the prefix cache.",
            ),
            preemptions: gauge(
                "moeserve_preemptions_total",
                "Sequences preempted for lack of KV blocks.",
            ),
            expert_tokens,
            registry,
        }
    }

    /// The Prometheus text exposition, with engine gauges refreshed.
    pub fn render(&self, engine: Option<&EngineStats>) -> String {
        if let Some(s) = engine {
            let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as i64;
            let loadu = |a: &std::sync::atomic::AtomicUsize| a.load(Ordering::Relaxed) as i64;
            self.prompt_tokens.set(load(&s.prompt_tokens));
            self.generation_tokens.set(load(&s.generation_tokens));
            self.running.set(loadu(&s.running));
            self.waiting.set(loadu(&s.waiting));
            self.kv_used.set(loadu(&s.kv_blocks_used));
            self.kv_total.set(loadu(&s.kv_blocks_total));
            self.prefix_hits.set(load(&s.prefix_cache_hit_tokens));
            self.preemptions.set(load(&s.preemptions));
            for (layer, experts) in s.expert_tokens.iter().enumerate() {
                for (e, c) in experts.iter().enumerate() {
                    self.expert_tokens
                        .with_label_values(&[&layer.to_string(), &e.to_string()])
                        .set(load(c));
                }
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8 metrics")
    }
}
