//! What the handlers share: the settings, the loaded engine (once loading is done),
//! metrics and the draining flag; and how the model is loaded into an engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use moeserve_core::chat::ChatTemplate;
use moeserve_core::engine::{Engine, EngineConfig};
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

    /// Checks the request's `model` against the served one.
    pub fn engine_for(&self, model: &str) -> Result<&LoadedEngine, ApiError> {
        let m = self.engine()?;
        if model != m.id {
            return Err(ApiError::ModelNotFound(model.to_string()));
        }
        Ok(m)
    }
}

pub(crate) fn load(settings: &Settings) -> anyhow::Result<LoadedEngine> {
    let opts = LoadOptions {
        dtype: moeserve_core::parse_dtype_setting(&settings.dtype).map_err(anyhow::Error::msg)?,
        kv_cache_dtype: moeserve_core::parse_kv_dtype_setting(&settings.kv_cache_dtype)
            .map_err(anyhow::Error::msg)?,
        ..LoadOptions::default()
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
        kv_cache_memory: moeserve_core::parse_memory_size(&settings.kv_cache_memory)
            .map_err(anyhow::Error::msg)?,
        max_num_seqs: settings.max_num_seqs,
        max_num_batched_tokens: settings.max_num_batched_tokens,
        max_waiting_requests: settings.max_waiting_requests,
        enable_prefix_caching: settings.enable_prefix_caching,
        speculative: settings.speculative().map_err(anyhow::Error::msg)?,
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
