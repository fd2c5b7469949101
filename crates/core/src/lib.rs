//! moeserve's model core: configs, weight loading, layers, attention over a paged KV
//! cache, the MoE layer, sampling and tokenization. Nothing here knows about HTTP.

pub mod backend;
pub mod batch;
pub mod chat;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod grammar;
pub mod kv;
pub mod layers;
pub mod models;
pub mod process;
pub mod progress;
pub mod reasoning;
pub mod sampling;
pub mod source;
pub mod spec;
pub mod tokenizer;
pub mod tools;
pub mod weights;

pub use batch::{ForwardBatch, ForwardOutput, LogitRows, SequenceInput};
pub use config::{Architecture, ModelConfig};
pub use error::{Error, Result};
pub use kv::{BlockPool, BlockTable, KvDtype, KvLayout, KvStorage};
pub use models::CausalLm;
pub use source::ModelFiles;
pub use tokenizer::TextCodec;

pub use candle_core::{DType, Device};

/// A compute dtype by name: `f32`, `bf16` or `f16` (for command lines and settings).
pub fn parse_compute_dtype(s: &str) -> std::result::Result<DType, String> {
    match s {
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => Err(format!("unknown dtype {other:?} (f32, bf16 or f16)")),
    }
}

/// The device a `device` setting names: `cpu`, `cuda` (GPU 0) or `cuda:N`. CUDA needs a
/// binary built with `--features cuda` and an NVIDIA GPU; either missing is an error that
/// says so.
pub fn device_from_setting(s: &str) -> std::result::Result<Device, String> {
    let ordinal = match s.trim().to_ascii_lowercase().as_str() {
        "" | "cpu" => return Ok(Device::Cpu),
        "cuda" | "gpu" => 0,
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => n,
            _ => return Err(format!("unknown device {s:?} (cpu, cuda or cuda:N)")),
        },
    };
    if !candle_core::utils::cuda_is_available() {
        return Err(format!(
            "device {s:?}: this moeserve was built without CUDA (build it with `--features cuda`)"
        ));
    }
    Device::new_cuda(ordinal).map_err(|e| format!("device {s:?}: {e}"))
}

/// A dtype setting: `auto` (or empty) leaves the choice to the loader.
pub fn parse_dtype_setting(s: &str) -> std::result::Result<Option<DType>, String> {
    match s {
        "" | "auto" => Ok(None),
        other => parse_compute_dtype(other).map(Some),
    }
}

/// A KV cache dtype setting: `auto` (or empty) leaves the choice to the loader (f16 for
/// quantized GGUF models, else f32); else `f32` or `f16`.
pub fn parse_kv_dtype_setting(s: &str) -> std::result::Result<Option<KvDtype>, String> {
    match s {
        "" | "auto" => Ok(None),
        other => other.parse().map(Some),
    }
}

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype; `None` picks the fastest correct one for the device.
    pub dtype: Option<DType>,
    /// KV cache element type; `None`: f16 for quantized GGUF models (their weights are
    /// already approximate, and llama.cpp caches in f16 too), f32 otherwise.
    pub kv_cache_dtype: Option<KvDtype>,
    /// The kernels the model runs; `None`: the default for the device
    /// ([`backend::Backend::for_device`]: the GPU backend on a GPU, else the CPU kernel
    /// set `MOESERVE_CPU` names or the best the CPU has).
    pub backend: Option<backend::Backend>,
    /// Where download and loading progress goes (default: throttled log lines).
    pub progress: progress::Reporter,
    /// Memory the caller will allocate beside the weights (the KV pool): a model whose
    /// weights and this do not fit in the memory left is refused before it is read.
    pub reserve_bytes: usize,
}

impl LoadOptions {
    /// The backend these options load a model for.
    pub fn backend(&self) -> Result<backend::Backend> {
        match self.backend {
            Some(b) => {
                if let backend::Backend::Cpu(isa) = b {
                    if !isa.supported() || !self.device.is_cpu() {
                        return Err(Error::Backend(format!(
                            "the {isa} CPU kernels cannot run {}",
                            if self.device.is_cpu() {
                                "on this CPU"
                            } else {
                                "a model on a GPU"
                            }
                        )));
                    }
                }
                Ok(b)
            }
            None => backend::Backend::for_device(&self.device),
        }
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: None,
            kv_cache_dtype: None,
            backend: None,
            progress: progress::Reporter::default(),
            reserve_bytes: 0,
        }
    }
}

/// A model ready to run, with its tokenizer.
pub struct LoadedModel {
    pub model: Box<dyn CausalLm>,
    pub codec: TextCodec,
    /// A short name: the checkpoint directory's, the repo's or the GGUF file's.
    pub name: String,
    pub dtype: DType,
    /// The weight files it was loaded from (for [`kv::disk::weights_identity`]).
    pub weight_files: Vec<std::path::PathBuf>,
}

/// Resolves `spec` (a `.gguf` file, a checkpoint directory or a Hugging Face repo id) and
/// loads it.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    // An unworkable kernel choice fails before anything is fetched or read.
    opts.backend()?;
    let path = std::path::Path::new(spec);
    if path.extension().is_some_and(|e| e == "gguf") {
        if !path.is_file() {
            return Err(Error::ModelNotFound {
                spec: spec.into(),
                message: "no such GGUF file".into(),
            });
        }
        return load_gguf(path, opts);
    }
    let files = source::resolve_with(spec, &opts.progress)?;
    let mut cfg = ModelConfig::from_file(&files.config)?;
    // On a GPU the cache is f16 unless asked otherwise: attention there reads bf16-sized
    // values anyway, and the budget holds twice the tokens.
    cfg.kv_cache_dtype = opts.kv_cache_dtype.unwrap_or(if opts.device.is_cpu() {
        KvDtype::F32
    } else {
        KvDtype::F16
    });
    let dtype = opts.dtype.unwrap_or_else(|| models::default_dtype(&opts.device));
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
    let store = weights::WeightStore::from_safetensors(&files.weights, dtype, &opts.device)?
        .with_backend(opts.backend()?)
        .with_fp8_blocks(cfg.fp8_weight_block)
        .with_reporter(opts.progress.clone());
    let model = models::build_model(&cfg, &store)?;
    let codec = TextCodec::from_files(&files, cfg.bos_token_id, &cfg.eos_token_ids)?;
    Ok(LoadedModel {
        model,
        codec,
        name: files.name,
        dtype,
        weight_files: files.weights,
    })
}

/// Refuses weights of `weight_bytes` (held once in memory, repacked) that, with the
/// caller's reserve, do not fit in the memory this process may use; on the CPU only (a
/// GPU holds them in its own memory).
fn check_memory(weight_bytes: u64, opts: &LoadOptions) -> Result<()> {
    let Some(available) = process::available_memory().filter(|_| opts.device.is_cpu()) else {
        return Ok(());
    };
    let needed = weight_bytes + opts.reserve_bytes as u64;
    if needed > available {
        let gb = |b: u64| b as f64 / 1e9;
        return Err(Error::OutOfMemory(format!(
            "the model needs {:.1} GB ({:.1} GB of weights and a {:.1} GB KV pool) but {:.1} GB of memory is available: \
             use a smaller model or quantization, a smaller --kv-cache-memory, or a machine (or container limit) with more memory",
            gb(needed),
            gb(weight_bytes),
            gb(opts.reserve_bytes as u64),
            gb(available)
        )));
    }
    Ok(())
}

fn load_gguf(path: &std::path::Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let ckpt = gguf::GgufCheckpoint::open(path)?;
    check_memory(ckpt.tensor_bytes(), opts)?;
    let mut cfg = gguf::model_config(&ckpt)?;
    cfg.kv_cache_dtype = opts
        .kv_cache_dtype
        .unwrap_or(if ckpt.is_quantized() || !opts.device.is_cpu() {
            KvDtype::F16
        } else {
            KvDtype::F32
        });
    let codec = TextCodec::from_gguf(ckpt.metadata(), path)?;
    let weight_files = ckpt.files.iter().map(|f| f.path.clone()).collect();
    if opts.dtype.is_some_and(|d| d != DType::F32) {
        tracing::warn!(
            "GGUF models compute in f32 (quantized matmuls take f32 activations); ignoring --dtype"
        );
    }
    tracing::info!(
        "loading {} ({} as {}, {} layers, {} file(s), {:?} KV cache)",
        path.display(),
        gguf::meta_str(ckpt.metadata(), "general.architecture").unwrap_or("?"),
        cfg.architecture.hf_name(),
        cfg.num_layers,
        ckpt.files.len(),
        cfg.kv_cache_dtype
    );
    let store = weights::WeightStore::from_gguf(ckpt, &opts.device)
        .with_backend(opts.backend()?)
        .with_reporter(opts.progress.clone());
    let model = models::build_model(&cfg, &store)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
        .unwrap_or_default();
    Ok(LoadedModel {
        model,
        codec,
        name,
        dtype: DType::F32,
        weight_files,
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
    let value: f64 = num.parse().map_err(|_| format!("{s:?} is not a memory size"))?;
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

    /// Device settings: the CPU by any of its names; a GPU by ordinal, refused with the
    /// way out when this build has no CUDA; anything else named as unknown.
    #[test]
    fn device_settings_parse() {
        for cpu in ["", "cpu", "CPU"] {
            assert!(super::device_from_setting(cpu).unwrap().is_cpu());
        }
        for bad in ["tpu", "cuda:x", "cuda:-1"] {
            let e = super::device_from_setting(bad).unwrap_err();
            assert!(e.contains("unknown device"), "{e}");
        }
        if !candle_core::utils::cuda_is_available() {
            let e = super::device_from_setting("cuda:1").unwrap_err();
            assert!(e.contains("--features cuda"), "{e}");
        }
    }
}
