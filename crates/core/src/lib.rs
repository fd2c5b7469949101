//! moeserve's model core: configs, weight loading, layers, attention over a paged KV
//! cache, the MoE layer, sampling and tokenization. Nothing here knows about HTTP.

pub mod attention;
pub mod batch;
pub mod config;
pub mod error;
pub mod generate;
pub mod kv;
pub mod layers;
pub mod models;
pub mod sampling;
pub mod source;
pub mod tokenizer;
pub mod weights;

pub use batch::{ForwardBatch, ForwardOutput, SequenceInput};
pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use kv::{BlockAllocator, BlockTable, KvCache, KvLayout};
pub use models::CausalLm;
pub use source::ModelFiles;
pub use tokenizer::TextCodec;

pub use candle_core::{DType, Device};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; `None` picks the fastest correct one for the device.
    pub dtype: Option<DType>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
        }
    }
}

/// A model ready to run, with its tokenizer.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub codec: TextCodec,
    pub files: ModelFiles,
    pub dtype: DType,
}

/// Resolves `spec` (a checkpoint directory or a Hugging Face repo id) and loads it.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let files = source::resolve(spec)?;
    let cfg = ModelConfig::from_file(&files.config)?;
    let dtype = opts
        .dtype
        .unwrap_or_else(|| models::default_dtype(&opts.device));
    tracing::info!(
        "loading {} ({}, {} layers, {:?}) from {}",
        files.name,
        cfg.architecture.hf_name(),
        cfg.num_layers,
        dtype,
        files
            .config
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let store = weights::WeightStore::from_safetensors(&files.weights, dtype, &opts.device)?;
    let model = models::build_model(&cfg, &store)?;
    let codec = TextCodec::from_files(&files, cfg.bos_token_id, &cfg.eos_token_ids)?;
    Ok(LoadedModel {
        model,
        codec,
        files,
        dtype,
    })
}

/// Parses a memory size: plain bytes (`1048576`) or with a unit (`512MiB`, `2GiB`,
/// `64MB`, `1.5G`).
pub fn parse_memory_size(s: &str) -> std::result::Result<usize, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a memory size"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown memory unit {other:?} in {s:?} (use B, KiB, MiB or GiB)"
            ))
        }
    };
    Ok((value * mult) as usize)
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_sizes_parse() {
        assert_eq!(super::parse_memory_size("1024").unwrap(), 1024);
        assert_eq!(super::parse_memory_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(super::parse_memory_size("2 GiB").unwrap(), 2 << 30);
        assert!(super::parse_memory_size("12 parsecs").is_err());
    }
}
