//! What the handlers share: the settings, the loaded engine (once loading is done),
//! metrics and the draining flag; and how the model is loaded into an engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use moeserve_core::chat::ChatTemplate;
use moeserve_core::engine::{DiskCacheConfig, Engine, EngineConfig};
use moeserve_core::grammar::GrammarCompiler;
use moeserve_core::reasoning::ReasoningTags;
use moeserve_core::spec::SpeculativeMethod;
use moeserve_core::tools::ToolFormat;
use moeserve_core::LoadOptions;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::settings::Settings;

/// What the handlers share.
pub struct AppState {
    pub settings: Settings,
    /// Set once the model is loaded and the engine runs.
    pub model: OnceLock<LoadedEngine>,
    pub metrics: Metrics,
    /// Set on SIGTERM/SIGINT: /ready answers 503 and new requests are refused.
    pub draining: AtomicBool,
    pub started: u64,
    /// The Responses API's stored responses.
    pub responses: crate::store::ResponseStore,
    /// The load's latest step while the model loads, for /health.
    pub loading: Arc<crate::progress::LoadStatus>,
}

pub struct LoadedEngine {
    pub engine: Engine,
    /// The id clients use.
    pub id: String,
    pub template: Option<ChatTemplate>,
    /// Set when chat output is split into reasoning and content.
    pub reasoning: Option<ReasoningTags>,
    /// Compiles structured-output constraints against the model's vocabulary (`None`
    /// for a vocabulary llguidance cannot read: constraints are then refused).
    pub grammars: Option<GrammarCompiler>,
    /// How the model writes tool calls.
    pub tool_format: ToolFormat,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    /// The engine, or 503 while loading or draining.
    pub fn engine(&self) -> Result<&LoadedEngine, ApiError> {
        if self.draining.load(Ordering::Relaxed) {
            return Err(ApiError::Unavailable("The server is shutting down."));
        }
        self.model
            .get()
            .ok_or(ApiError::Unavailable("The model is still loading."))
    }

    /// What a 429 tells the client to wait: the queue ahead of it drains `max_num_seqs`
    /// at a time, each batch taking about as long as requests have taken on average.
    pub fn retry_after_secs(&self) -> u64 {
        let waiting = self
            .model
            .get()
            .map_or(0, |m| m.engine.stats().waiting.load(Ordering::Relaxed));
        let (mut sum, mut count) = (0.0, 0u64);
        for family in prometheus::core::Collector::collect(&self.metrics.e2e) {
            for m in family.get_metric() {
                let h = m.get_histogram();
                sum += h.get_sample_sum();
                count += h.get_sample_count();
            }
        }
        retry_after_secs(
            waiting,
            self.settings.max_num_seqs,
            (count > 0).then(|| sum / count as f64),
        )
    }

    /// Checks the request's `model` against the served one.
    pub fn engine_for(&self, model: &str) -> Result<&LoadedEngine, ApiError> {
        let m = self.engine()?;
        if model != m.id {
            return Err(ApiError::ModelNotFound(model.to_string()));
        }
        Ok(m)
    }
}

pub(crate) fn load(
    settings: &Settings,
    backend: moeserve_core::backend::Backend,
    progress: moeserve_core::progress::Reporter,
) -> anyhow::Result<LoadedEngine> {
    let kv_cache_memory =
        moeserve_core::parse_memory_size(&settings.kv_cache_memory).map_err(anyhow::Error::msg)?;
    let opts = LoadOptions {
        reserve_bytes: kv_cache_memory,
        device: moeserve_core::device_from_setting(&settings.device).map_err(anyhow::Error::msg)?,
        dtype: moeserve_core::parse_dtype_setting(&settings.dtype).map_err(anyhow::Error::msg)?,
        kv_cache_dtype: moeserve_core::parse_kv_dtype_setting(&settings.kv_cache_dtype)
            .map_err(anyhow::Error::msg)?,
        backend: Some(backend),
        progress,
    };
    let loaded = moeserve_core::load(&settings.model, &opts)?;
    let template = match loaded.codec.chat_template() {
        Some(src) => {
            let tok = |id: Option<u32>| id.and_then(|i| loaded.codec.tokenizer().id_to_token(i));
            Some(ChatTemplate::new(
                src,
                tok(loaded.codec.bos_token_id()),
                tok(loaded.codec.eos_token_ids().first().copied()),
            )?)
        }
        None => {
            tracing::warn!("the model has no chat template: /v1/chat/completions will refuse requests");
            None
        }
    };
    let config = EngineConfig {
        block_size: settings.block_size,
        kv_cache_memory,
        max_num_seqs: settings.max_num_seqs,
        max_num_batched_tokens: settings.max_num_batched_tokens,
        max_waiting_requests: settings.max_waiting_requests,
        max_n: settings.max_n,
        enable_prefix_caching: settings.enable_prefix_caching,
        speculative: settings.speculative().map_err(anyhow::Error::msg)?,
        prefix_cache_disk: match settings.prefix_cache_dir() {
            Some(dir) => Some(DiskCacheConfig {
                dir,
                max_bytes: moeserve_core::parse_memory_size(&settings.prefix_cache_disk_bytes)
                    .map_err(anyhow::Error::msg)? as u64,
                weights_identity: moeserve_core::kv::disk::weights_identity(&loaded.weight_files)
                    .map_err(|e| anyhow::anyhow!("reading the weight files' identity: {e}"))?,
            }),
            None => None,
        },
    };
    if config.speculative.method == SpeculativeMethod::Mtp && !loaded.model.has_mtp() {
        let layers = loaded.model.config().num_nextn_predict_layers;
        anyhow::bail!(
            "--speculative-method mtp: {}; use ngram or none",
            if layers == 0 {
                "the model has no multi-token prediction weights (num_nextn_predict_layers is 0)".to_string()
            } else {
                format!(
                    "the model declares {layers} MTP layer(s) but the checkpoint holds no weights for them \
                     (model.layers.{}.eh_proj.weight)",
                    loaded.model.config().num_layers
                )
            }
        );
    }
    let id = if settings.served_model_name.is_empty() {
        loaded.name.clone()
    } else {
        settings.served_model_name.clone()
    };
    let tags = ReasoningTags::from_codec(&loaded.codec);
    let reasoning = match settings.reasoning_parser.as_str() {
        "none" => None,
        "deepseek-r1" => Some(tags.ok_or_else(|| {
            anyhow::anyhow!(
                "--reasoning-parser deepseek-r1: the model's vocabulary has no <think> and </think> tokens"
            )
        })?),
        "auto" => tags.filter(|t| {
            loaded
                .codec
                .chat_template()
                .is_some_and(|tpl| tpl.contains(&t.start))
        }),
        other => anyhow::bail!("unknown reasoning parser {other:?} (auto, deepseek-r1 or none)"),
    };
    if let Some(t) = &reasoning {
        tracing::info!(
            "reasoning output: text between {} and {} goes to reasoning_content",
            t.start,
            t.end
        );
    }
    let started = std::time::Instant::now();
    let grammars = match GrammarCompiler::new(&loaded.codec, loaded.model.config().vocab_size) {
        Ok(g) => {
            tracing::info!(
                "structured outputs: vocabulary indexed in {:.0} ms",
                started.elapsed().as_secs_f64() * 1e3
            );
            Some(g)
        }
        Err(e) => {
            tracing::warn!("structured outputs and tool grammars are off: {e}");
            None
        }
    };
    let tool_format = ToolFormat::detect(&loaded.codec);
    tracing::info!("tool calls: the {} format", tool_format.name());
    let engine = Engine::start(loaded.model, Arc::new(loaded.codec), config)?;
    Ok(LoadedEngine {
        engine,
        id,
        template,
        reasoning,
        grammars,
        tool_format,
    })
}

/// [`AppState::retry_after_secs`]'s estimate, from 1 s (nothing measured yet, or a short
/// queue) to 60 s.
pub fn retry_after_secs(waiting: usize, max_num_seqs: usize, mean_request_secs: Option<f64>) -> u64 {
    let batches = waiting.div_ceil(max_num_seqs.max(1)) as f64;
    let secs = batches * mean_request_secs.unwrap_or(1.0);
    (secs.ceil() as u64).clamp(1, 60)
}

#[cfg(test)]
mod tests {
    #[test]
    fn retry_after_follows_the_queue() {
        use super::retry_after_secs as r;
        assert_eq!(r(0, 64, None), 1);
        assert_eq!(r(256, 64, None), 4);
        assert_eq!(r(256, 64, Some(2.5)), 10);
        assert_eq!(r(10, 64, Some(0.2)), 1);
        assert_eq!(r(10_000, 1, Some(30.0)), 60);
    }
}
