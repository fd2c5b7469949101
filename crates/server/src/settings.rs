//! One `Settings` from config/default.toml (built in), then a config file, then
//! `MOESERVE_*` environment variables, then flags (highest precedence).

use std::path::PathBuf;

use clap::Args;
use moeserve_core::spec::SpeculativeConfig;
use serde::Deserialize;

const DEFAULTS: &str = include_str!("../../../config/default.toml");

/// The log formats `log_format` takes.
pub const LOG_FORMATS: [&str; 2] = ["text", "json"];

/// Every setting, as the TOML file names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub model: String,
    pub served_model_name: String,
    pub dtype: String,
    pub device: String,
    pub host: String,
    pub port: u16,
    pub api_keys: Vec<String>,
    pub public_metrics: bool,
    pub kv_cache_memory: String,
    pub kv_cache_dtype: String,
    pub block_size: usize,
    pub enable_prefix_caching: bool,
    pub prefix_cache_dir: String,
    pub prefix_cache_disk_bytes: String,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_waiting_requests: usize,
    pub max_n: usize,
    pub max_output_tokens: usize,
    pub default_temperature: f32,
    pub speculative_method: String,
    pub num_speculative_tokens: usize,
    pub ngram_prompt_lookup_min: usize,
    pub ngram_prompt_lookup_max: usize,
    pub speculative_disable_by_batch_size: usize,
    pub reasoning_parser: String,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout_secs: f64,
    pub request_timeout_secs: f64,
    pub sse_keepalive_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub responses_store_max: usize,
    pub responses_store_ttl_secs: u64,
    pub log_format: String,
    pub web_ui: bool,
}

/// The same settings as flags; each also reads `MOESERVE_<NAME>` from the environment.
/// Unset flags fall through to the config file, then to the built-in defaults.
#[derive(Debug, Clone, Default, Args)]
pub struct SettingsArgs {
    /// A TOML file with any of the settings below (see config/default.toml).
    #[arg(long, env = "MOESERVE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model: a .gguf file, a checkpoint directory or a Hugging Face repo id (owner/name[@rev]).
    #[arg(long, env = "MOESERVE_MODEL")]
    pub model: Option<String>,
    /// Model id clients send and see (default: the model's name).
    #[arg(long, env = "MOESERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Compute dtype for safetensors checkpoints: f32, bf16, f16 (default: fastest on the device).
    #[arg(long, env = "MOESERVE_DTYPE")]
    pub dtype: Option<String>,
    /// Where the model runs: cpu, or cuda[:N] for an NVIDIA GPU (a binary built with
    /// --features cuda).
    #[arg(long, env = "MOESERVE_DEVICE")]
    pub device: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "MOESERVE_HOST")]
    pub host: Option<String>,
    /// Port to listen on.
    #[arg(long, env = "MOESERVE_PORT")]
    pub port: Option<u16>,
    /// API key clients must send as `Authorization: Bearer <key>` (repeat, or comma-separate in the env).
    #[arg(long = "api-key", env = "MOESERVE_API_KEY", value_delimiter = ',')]
    pub api_keys: Option<Vec<String>>,
    /// Serve /metrics without the API key (for scrapers that cannot send one, such as
    /// the inference gateway's endpoint picker) (true/false).
    #[arg(long, env = "MOESERVE_PUBLIC_METRICS")]
    pub public_metrics: Option<bool>,
    /// KV cache memory budget: bytes, or 512MiB, 2GiB.
    #[arg(long, env = "MOESERVE_KV_CACHE_MEMORY")]
    pub kv_cache_memory: Option<String>,
    /// KV cache element type: auto (f16 for quantized GGUF models, else f32), f32 or f16.
    #[arg(long, env = "MOESERVE_KV_CACHE_DTYPE")]
    pub kv_cache_dtype: Option<String>,
    /// Tokens per KV cache block.
    #[arg(long, env = "MOESERVE_BLOCK_SIZE")]
    pub block_size: Option<usize>,
    /// Reuse KV blocks of shared prompt prefixes (true/false).
    #[arg(long, env = "MOESERVE_ENABLE_PREFIX_CACHING")]
    pub enable_prefix_caching: Option<bool>,
    /// Keep the prefix cache's KV blocks on disk under this directory too, across
    /// restarts (unset or empty: off).
    #[arg(long, env = "MOESERVE_PREFIX_CACHE_DIR")]
    pub prefix_cache_dir: Option<String>,
    /// Most bytes of KV blocks kept on disk per model: bytes, or 512MiB, 8GiB.
    #[arg(long, env = "MOESERVE_PREFIX_CACHE_DISK_BYTES")]
    pub prefix_cache_disk_bytes: Option<String>,
    /// Most sequences running at once.
    #[arg(long, env = "MOESERVE_MAX_NUM_SEQS")]
    pub max_num_seqs: Option<usize>,
    /// Token budget per engine step.
    #[arg(long, env = "MOESERVE_MAX_NUM_BATCHED_TOKENS")]
    pub max_num_batched_tokens: Option<usize>,
    /// Requests that may wait before new ones get 429.
    #[arg(long, env = "MOESERVE_MAX_WAITING_REQUESTS")]
    pub max_waiting_requests: Option<usize>,
    /// Most choices (n) per request.
    #[arg(long, env = "MOESERVE_MAX_N")]
    pub max_n: Option<usize>,
    /// Most tokens one request may generate, whatever it asks (0: up to the context).
    #[arg(long, env = "MOESERVE_MAX_OUTPUT_TOKENS")]
    pub max_output_tokens: Option<usize>,
    /// Temperature for requests that name none (1, OpenAI's default; 0 is greedy).
    #[arg(long, env = "MOESERVE_DEFAULT_TEMPERATURE")]
    pub default_temperature: Option<f32>,
    /// Speculative decoding: ngram, mtp (models with MTP weights) or none.
    #[arg(long, env = "MOESERVE_SPECULATIVE_METHOD")]
    pub speculative_method: Option<String>,
    /// Most drafted tokens per sequence per step.
    #[arg(long, env = "MOESERVE_NUM_SPECULATIVE_TOKENS")]
    pub num_speculative_tokens: Option<usize>,
    /// Shortest n-gram the ngram proposer matches.
    #[arg(long, env = "MOESERVE_NGRAM_PROMPT_LOOKUP_MIN")]
    pub ngram_prompt_lookup_min: Option<usize>,
    /// Longest n-gram the ngram proposer matches.
    #[arg(long, env = "MOESERVE_NGRAM_PROMPT_LOOKUP_MAX")]
    pub ngram_prompt_lookup_max: Option<usize>,
    /// Check drafts only in steps with at most this many running sequences (0: always).
    #[arg(long, env = "MOESERVE_SPECULATIVE_DISABLE_BY_BATCH_SIZE")]
    pub speculative_disable_by_batch_size: Option<usize>,
    /// Reasoning output: auto, deepseek-r1 or none.
    #[arg(long, env = "MOESERVE_REASONING_PARSER")]
    pub reasoning_parser: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, env = "MOESERVE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<usize>,
    /// Largest request head (request line and headers) in bytes; larger gets 431.
    #[arg(long, env = "MOESERVE_MAX_HEADER_BYTES")]
    pub max_header_bytes: Option<usize>,
    /// Seconds a connection gets to send a request head.
    #[arg(long, env = "MOESERVE_HEADER_READ_TIMEOUT_SECS")]
    pub header_read_timeout_secs: Option<f64>,
    /// Per-request deadline in seconds, fractions allowed (0: none).
    #[arg(long, env = "MOESERVE_REQUEST_TIMEOUT_SECS")]
    pub request_timeout_secs: Option<f64>,
    /// SSE keep-alive interval in seconds.
    #[arg(long, env = "MOESERVE_SSE_KEEPALIVE_SECS")]
    pub sse_keepalive_secs: Option<u64>,
    /// Seconds in-flight requests get to finish on SIGTERM/SIGINT.
    #[arg(long, env = "MOESERVE_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// Most responses the Responses API keeps for `previous_response_id` (0: none kept).
    #[arg(long, env = "MOESERVE_RESPONSES_STORE_MAX")]
    pub responses_store_max: Option<usize>,
    /// Seconds a stored response is kept.
    #[arg(long, env = "MOESERVE_RESPONSES_STORE_TTL_SECS")]
    pub responses_store_ttl_secs: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "MOESERVE_LOG_FORMAT")]
    pub log_format: Option<String>,
    /// Serve the built-in page (chat and dashboard) at / (true/false).
    #[arg(long, env = "MOESERVE_WEB_UI")]
    pub web_ui: Option<bool>,
    /// Do not serve the built-in page (the same as --web-ui false).
    #[arg(long, conflicts_with = "web_ui")]
    pub no_web_ui: bool,
}

impl Settings {
    /// What the server's settings make of a request's sampling: its output limit cut
    /// to `max_output_tokens` (and set to it when the request names none, as
    /// llama-server's `--n-predict` does), and `default_temperature` when it sent none.
    pub fn apply_request_defaults(
        &self,
        params: &mut moeserve_core::engine::SamplingParams,
        temperature_sent: bool,
    ) {
        if self.max_output_tokens > 0 {
            let cap = self.max_output_tokens;
            params.max_tokens = Some(params.max_tokens.map_or(cap, |t| t.min(cap)));
        }
        if !temperature_sent {
            params.temperature = self.default_temperature;
        }
    }

    /// Built-in defaults, overridden by the config file, then by flags and environment.
    pub fn resolve(args: &SettingsArgs) -> anyhow::Result<Self> {
        let mut table: toml::Table = toml::from_str(DEFAULTS).expect("built-in defaults parse");
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
            let file: toml::Table =
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("config file {}: {e}", path.display()))?;
            for (k, v) in file {
                if !table.contains_key(&k) {
                    anyhow::bail!("config file {}: unknown setting {k:?}", path.display());
                }
                table.insert(k, v);
            }
        }
        let mut s: Settings = toml::Value::Table(table).try_into()?;
        macro_rules! over {
            ($($field:ident),*) => {$(
                if let Some(v) = &args.$field {
                    s.$field = v.clone();
                }
            )*};
        }
        over!(
            model,
            served_model_name,
            dtype,
            device,
            host,
            port,
            api_keys,
            public_metrics,
            kv_cache_memory,
            kv_cache_dtype,
            block_size,
            enable_prefix_caching,
            prefix_cache_dir,
            prefix_cache_disk_bytes,
            max_num_seqs,
            max_num_batched_tokens,
            max_waiting_requests,
            max_n,
            max_output_tokens,
            default_temperature,
            speculative_method,
            num_speculative_tokens,
            ngram_prompt_lookup_min,
            ngram_prompt_lookup_max,
            speculative_disable_by_batch_size,
            reasoning_parser,
            max_body_bytes,
            max_header_bytes,
            header_read_timeout_secs,
            request_timeout_secs,
            sse_keepalive_secs,
            shutdown_timeout_secs,
            responses_store_max,
            responses_store_ttl_secs,
            log_format,
            web_ui
        );
        if args.no_web_ui {
            s.web_ui = false;
        }
        s.api_keys.retain(|k| !k.is_empty());
        anyhow::ensure!(
            s.request_timeout_secs >= 0.0
                && std::time::Duration::try_from_secs_f64(s.request_timeout_secs).is_ok(),
            "request_timeout_secs must be a number of seconds, 0 or more; got {}",
            s.request_timeout_secs
        );
        s.speculative().map_err(anyhow::Error::msg)?;
        s.check().map_err(anyhow::Error::msg)?;
        Ok(s)
    }

    /// Settings that would make the server misbehave rather than fail (a busy-looping
    /// engine, a keep-alive every 0 s, text logs asked for as "jsno") are refused at start.
    fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_n", self.max_n),
            ("block_size", self.block_size),
            ("sse_keepalive_secs", self.sse_keepalive_secs as usize),
            ("max_body_bytes", self.max_body_bytes),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1, got 0"));
            }
        }
        if !(0.0..=2.0).contains(&self.default_temperature) {
            return Err(format!(
                "default_temperature must be from 0 to 2, got {}",
                self.default_temperature
            ));
        }
        if self.max_header_bytes < 8192 {
            return Err(format!(
                "max_header_bytes must be at least 8192, got {}",
                self.max_header_bytes
            ));
        }
        if !(self.header_read_timeout_secs > 0.0
            && std::time::Duration::try_from_secs_f64(self.header_read_timeout_secs).is_ok())
        {
            return Err(format!(
                "header_read_timeout_secs must be a number of seconds above 0, got {}",
                self.header_read_timeout_secs
            ));
        }
        moeserve_core::parse_memory_size(&self.prefix_cache_disk_bytes)
            .map_err(|e| format!("prefix_cache_disk_bytes: {e}"))?;
        if !LOG_FORMATS.contains(&self.log_format.as_str()) {
            return Err(format!(
                "log_format must be one of {}, got {:?}",
                LOG_FORMATS.join(", "),
                self.log_format
            ));
        }
        Ok(())
    }

    /// The connection limits of the HTTP listener.
    pub fn connection_limits(&self) -> crate::listener::ConnectionLimits {
        crate::listener::ConnectionLimits {
            max_header_bytes: self.max_header_bytes,
            header_read_timeout: std::time::Duration::from_secs_f64(self.header_read_timeout_secs),
        }
    }

    /// The speculative decoding settings, checked.
    pub fn speculative(&self) -> Result<SpeculativeConfig, String> {
        let c = SpeculativeConfig {
            method: self.speculative_method.parse()?,
            num_speculative_tokens: self.num_speculative_tokens,
            ngram_min: self.ngram_prompt_lookup_min,
            ngram_max: self.ngram_prompt_lookup_max,
            disable_by_batch_size: self.speculative_disable_by_batch_size,
        };
        c.validate()?;
        Ok(c)
    }

    /// The prefix cache's directory, when it is on.
    pub fn prefix_cache_dir(&self) -> Option<PathBuf> {
        let d = self.prefix_cache_dir.trim();
        (!d.is_empty()).then(|| PathBuf::from(d))
    }

    /// The per-request deadline, if any.
    pub fn request_deadline(&self) -> Option<std::time::Duration> {
        (self.request_timeout_secs > 0.0)
            .then(|| std::time::Duration::from_secs_f64(self.request_timeout_secs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that used to be taken and then misbehaved (0 busy-looped the engine or
    /// became 1; an unknown log format meant text) are refused, naming the setting.
    #[test]
    fn settings_that_cannot_work_are_refused() {
        let cases: Vec<(SettingsArgs, &str)> = vec![
            (
                SettingsArgs {
                    max_num_seqs: Some(0),
                    ..Default::default()
                },
                "max_num_seqs",
            ),
            (
                SettingsArgs {
                    max_num_batched_tokens: Some(0),
                    ..Default::default()
                },
                "max_num_batched_tokens",
            ),
            (
                SettingsArgs {
                    max_n: Some(0),
                    ..Default::default()
                },
                "max_n",
            ),
            (
                SettingsArgs {
                    sse_keepalive_secs: Some(0),
                    ..Default::default()
                },
                "sse_keepalive_secs",
            ),
            (
                SettingsArgs {
                    log_format: Some("jsno".into()),
                    ..Default::default()
                },
                "log_format",
            ),
            (
                SettingsArgs {
                    max_header_bytes: Some(100),
                    ..Default::default()
                },
                "max_header_bytes",
            ),
            (
                SettingsArgs {
                    header_read_timeout_secs: Some(0.0),
                    ..Default::default()
                },
                "header_read_timeout_secs",
            ),
            (
                SettingsArgs {
                    prefix_cache_disk_bytes: Some("8 furlongs".into()),
                    ..Default::default()
                },
                "prefix_cache_disk_bytes",
            ),
        ];
        for (args, name) in cases {
            let err = Settings::resolve(&args).unwrap_err().to_string();
            assert!(err.contains(name), "{name}: {err}");
        }
        assert!(Settings::resolve(&SettingsArgs {
            log_format: Some("json".into()),
            ..Default::default()
        })
        .is_ok());
    }

    /// The disk tier is off unless a directory is given; an empty one is off too.
    #[test]
    fn the_prefix_cache_dir_is_off_when_unset_or_empty() {
        let s = Settings::resolve(&SettingsArgs::default()).unwrap();
        assert_eq!(s.prefix_cache_dir(), None);
        let with = |d: &str| SettingsArgs {
            prefix_cache_dir: Some(d.into()),
            ..Default::default()
        };
        assert_eq!(Settings::resolve(&with(" ")).unwrap().prefix_cache_dir(), None);
        assert_eq!(
            Settings::resolve(&with("/var/cache/m"))
                .unwrap()
                .prefix_cache_dir(),
            Some(PathBuf::from("/var/cache/m"))
        );
    }

    #[test]
    fn precedence_is_flags_then_file_then_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "port = 9001\nmax_num_seqs = 3\n").unwrap();
        let args = SettingsArgs {
            config: Some(path.clone()),
            port: Some(9002),
            ..SettingsArgs::default()
        };
        let s = Settings::resolve(&args).unwrap();
        assert_eq!((s.port, s.max_num_seqs, s.block_size), (9002, 3, 16));
        std::fs::write(&path, "prot = 1\n").unwrap();
        let err = Settings::resolve(&args).unwrap_err().to_string();
        assert!(err.contains("unknown setting \"prot\""), "{err}");
    }

    /// The deadline takes fractions of a second, from a flag or as a whole number in the
    /// config file; 0 is none, and a negative or unrepresentable one is refused.
    #[test]
    fn request_deadline_in_fractional_seconds() {
        let flag = |v: f64| {
            Settings::resolve(&SettingsArgs {
                request_timeout_secs: Some(v),
                ..SettingsArgs::default()
            })
        };
        let ms = |v| flag(v).unwrap().request_deadline().map(|d| d.as_millis());
        assert_eq!((ms(0.25), ms(0.0), ms(3.0)), (Some(250), None, Some(3000)));
        for bad in [-1.0, f64::NAN, 1e30] {
            let err = flag(bad).unwrap_err().to_string();
            assert!(err.contains("request_timeout_secs"), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "request_timeout_secs = 2\n").unwrap();
        let s = Settings::resolve(&SettingsArgs {
            config: Some(path),
            ..SettingsArgs::default()
        })
        .unwrap();
        assert_eq!(s.request_deadline(), Some(std::time::Duration::from_secs(2)));
        assert_eq!(
            Settings::resolve(&SettingsArgs::default())
                .unwrap()
                .request_deadline(),
            None
        );
    }
}
