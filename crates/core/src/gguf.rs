//! GGUF (llama.cpp's format): files, metadata, quantized tensors.
//!
//! A GGUF checkpoint runs through the same model code as a safetensors one. This module
//! maps GGUF metadata onto [`HfConfig`] (so the same [`ModelConfig`] resolution applies)
//! and canonical Hugging Face tensor names onto GGUF names (so the layers ask for the same
//! names whatever the file). Quantized matrices stay quantized (candle's `QTensor`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use crate::config::{HfConfig, HfRopeScaling, ModelConfig};
use crate::error::{Error, Result};

/// One mapped GGUF file with its parsed header.
pub struct GgufFile {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
    pub content: Content,
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::CorruptWeights {
            path: path.to_path_buf(),
            message,
        };
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: mapped read-only; the file must not change while the server runs.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            return Err(bad("not a GGUF file (wrong magic; expected \"GGUF\")".into()));
        }
        let content = Content::read(&mut std::io::Cursor::new(&mmap[..])).map_err(|e| {
            let msg = e.to_string();
            if msg.contains("unknown dtype") {
                bad(format!("unknown quantization type ({msg})"))
            } else {
                bad(format!("cannot parse the GGUF header: {msg}"))
            }
        })?;
        for (name, info) in &content.tensor_infos {
            // Dimensions come from the file: their product may overflow, or not fill
            // whole quantization blocks; either is a corrupt file, refused before any
            // size is computed from them.
            let dims = info.shape.dims();
            let elems = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    bad(format!(
                        "tensor {name:?} has dimensions {dims:?} too large to address"
                    ))
                })?;
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(bad(format!(
                    "tensor {name:?} has {elems} elements, not whole blocks of {block} for {:?}",
                    info.ggml_dtype
                )));
            }
            let end = (elems / block)
                .checked_mul(info.ggml_dtype.type_size())
                .and_then(|bytes| {
                    content
                        .tensor_data_offset
                        .checked_add(info.offset)?
                        .checked_add(bytes as u64)
                })
                .ok_or_else(|| bad(format!("tensor {name:?} lies beyond any file size")))?;
            if end > mmap.len() as u64 {
                return Err(bad(format!(
                    "truncated: tensor {name:?} ends at byte {end} but the file has {} bytes",
                    mmap.len()
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    fn raw(&self, name: &str) -> Option<(&[u8], GgmlDType, Vec<usize>)> {
        let info = self.content.tensor_infos.get(name)?;
        let start = (self.content.tensor_data_offset + info.offset) as usize;
        let len = tensor_bytes(info.ggml_dtype, info.shape.elem_count());
        Some((
            &self.mmap[start..start + len],
            info.ggml_dtype,
            info.shape.dims().to_vec(),
        ))
    }
}

impl GgufFile {
    /// Drops `bytes` (a slice of the mapping whose contents were copied) from this
    /// process's resident memory. Every tensor is read once into storage of its own
    /// (repacked for the kernels, or candle's copy); without this its mapped pages would
    /// stay resident beside that copy, so loading would end holding the file twice (an
    /// 18 GB model in 36 GB). The pages stay in the page cache, which the kernel may
    /// reclaim, and are read again if touched.
    fn release(&self, bytes: &[u8]) {
        let offset = bytes.as_ptr() as usize - self.mmap.as_ptr() as usize;
        #[cfg(unix)]
        // SAFETY: a read-only shared mapping of a file: a dropped page reads back the
        // file's bytes; nothing holds a reference to these bytes past this call.
        let _ = unsafe {
            self.mmap
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, bytes.len())
        };
        #[cfg(not(unix))]
        let _ = offset;
    }
}

fn tensor_bytes(dtype: GgmlDType, elems: usize) -> usize {
    elems / dtype.block_size() * dtype.type_size()
}

/// The shards of one GGUF checkpoint (`name-00001-of-00003.gguf`: given the first, all).
pub struct GgufCheckpoint {
    pub files: Vec<GgufFile>,
    index: HashMap<String, usize>,
}

/// `model-00001-of-00003.gguf` -> the paths of all three shards.
pub fn shard_paths(first: &Path) -> Vec<PathBuf> {
    let name = first
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parse = || -> Option<(String, usize)> {
        let stem = name.strip_suffix(".gguf")?;
        let (rest, total) = stem.rsplit_once("-of-")?;
        let (prefix, idx) = rest.rsplit_once('-')?;
        (idx.len() == 5 && total.len() == 5 && idx.parse::<usize>().ok()? == 1)
            .then_some((prefix.to_string(), total.parse().ok()?))
    };
    match parse() {
        Some((prefix, total)) => (1..=total)
            .map(|i| first.with_file_name(format!("{prefix}-{i:05}-of-{total:05}.gguf")))
            .collect(),
        None => vec![first.to_path_buf()],
    }
}

impl GgufCheckpoint {
    pub fn open(first: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut index = HashMap::new();
        for path in shard_paths(first) {
            let f = GgufFile::open(&path)?;
            for name in f.content.tensor_infos.keys() {
                index.insert(name.clone(), files.len());
            }
            files.push(f);
        }
        Ok(Self { files, index })
    }

    /// Metadata of the first shard (the others repeat or omit it).
    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.files[0].content.metadata
    }

    pub fn path(&self) -> &Path {
        &self.files[0].path
    }

    /// Bytes of weights one token reads at batch-1 decode: every tensor, except that a
    /// stacked expert tensor (`*_exps`) counts `top_k / num_experts` of its bytes (only
    /// the routed experts are read), the token embedding counts none when a separate
    /// output matrix exists (the lookup reads one row), and multi-token prediction blocks
    /// (after the main layers) count none. The numerator of the memory-bandwidth bound on
    /// batch-1 decode.
    pub fn bytes_per_token(&self, cfg: &crate::config::ModelConfig) -> f64 {
        let tied = !self.has_tensor("output.weight");
        let block = |name: &str| {
            let rest = name.strip_prefix("blk.")?;
            rest.split_once('.')?.0.parse::<usize>().ok()
        };
        let mut total = 0.0;
        for f in &self.files {
            for (name, info) in &f.content.tensor_infos {
                let bytes = tensor_bytes(info.ggml_dtype, info.shape.elem_count()) as f64;
                total += if block(name).is_some_and(|b| b >= cfg.num_layers) {
                    0.0
                } else if name.contains("_exps") {
                    cfg.moe
                        .as_ref()
                        .map_or(1.0, |m| m.top_k as f64 / m.num_experts as f64)
                        * bytes
                } else if name == "token_embd.weight" && !tied {
                    0.0
                } else {
                    bytes
                };
            }
        }
        total
    }

    /// The bytes of all tensors.
    pub fn tensor_bytes(&self) -> u64 {
        self.files
            .iter()
            .flat_map(|f| f.content.tensor_infos.values())
            .map(|t| tensor_bytes(t.ggml_dtype, t.shape.elem_count()) as u64)
            .sum()
    }

    /// Does any tensor use a quantized (not F32/F16/BF16) type?
    pub fn is_quantized(&self) -> bool {
        self.files.iter().any(|f| {
            f.content
                .tensor_infos
                .values()
                .any(|t| !matches!(t.ggml_dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
        })
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn tensor_dims(&self, name: &str) -> Option<Vec<usize>> {
        let f = &self.files[*self.index.get(name)?];
        Some(f.content.tensor_infos[name].shape.dims().to_vec())
    }

    /// Reads a GGUF tensor, or expert `expert` of a stacked `[experts, ..]` tensor.
    pub fn qtensor(&self, name: &str, expert: Option<usize>, device: &Device) -> Result<(QTensor, String)> {
        let i = *self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            files: self
                .files
                .iter()
                .map(|f| f.path.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
        let file = &self.files[i];
        let (mut raw, dtype, mut dims) = file.raw(name).expect("indexed tensor exists");
        if let Some(e) = expert {
            let n = dims[0];
            if e >= n {
                return Err(Error::ShapeMismatch {
                    file: file.path.display().to_string(),
                    name: name.to_string(),
                    expected: vec![e + 1],
                    actual: dims,
                });
            }
            let per = raw.len() / n;
            raw = &raw[e * per..(e + 1) * per];
            dims.remove(0);
        }
        let storage = QStorage::from_data(Cow::Borrowed(raw), device, dtype)?;
        // The storage holds its own copy (on the CPU `from_data` copies; on a GPU it is
        // in device memory).
        file.release(raw);
        Ok((QTensor::new(storage, dims)?, file.path.display().to_string()))
    }
}

/// A canonical tensor name in a GGUF file: the GGUF name, and for routed experts stored
/// stacked (`ffn_gate_exps`), which expert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufName {
    pub name: String,
    pub expert: Option<usize>,
}

/// Maps a Hugging Face tensor name onto llama.cpp's name. `stacked_experts` tells whether
/// the file stores experts as one `[experts, ..]` tensor (current llama.cpp) or one tensor
/// per expert (`blk.N.ffn_gate.E.weight`, old Mixtral conversions).
pub fn gguf_name(hf: &str, stacked_experts: bool) -> Option<GgufName> {
    let plain = |n: String| {
        Some(GgufName {
            name: n,
            expert: None,
        })
    };
    match hf {
        "model.embed_tokens.weight" => return plain("token_embd.weight".into()),
        "model.norm.weight" => return plain("output_norm.weight".into()),
        "lm_head.weight" => return plain("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    if rest == "mlp.gate.e_score_correction_bias" {
        return plain(format!("blk.{layer}.exp_probs_b.bias"));
    }
    let (stem, suffix) = rest.rsplit_once('.')?; // suffix: weight | bias
                                                 // The multi-token prediction module's own tensors (its decoder layer has the usual
                                                 // names): llama.cpp's `blk.{N}.nextn.*`, N counting on after the main layers.
    let nextn = match stem {
        "eh_proj" | "enorm" | "hnorm" | "embed_tokens" => Some(stem),
        "shared_head.head" => Some("shared_head_head"),
        "shared_head.norm" => Some("shared_head_norm"),
        _ => None,
    };
    if let Some(nextn) = nextn {
        return plain(format!("blk.{layer}.nextn.{nextn}.{suffix}"));
    }
    let blk = |n: &str| plain(format!("blk.{layer}.{n}.{suffix}"));
    // Routed experts: `mlp.experts.E.gate_proj` or `block_sparse_moe.experts.E.w1`.
    for moe in ["mlp.experts.", "block_sparse_moe.experts."] {
        if let Some(e) = stem.strip_prefix(moe) {
            let (e, proj) = e.split_once('.')?;
            let e: usize = e.parse().ok()?;
            let kind = match proj {
                "gate_proj" | "w1" => "gate",
                "up_proj" | "w3" => "up",
                "down_proj" | "w2" => "down",
                _ => return None,
            };
            return Some(if stacked_experts {
                GgufName {
                    name: format!("blk.{layer}.ffn_{kind}_exps.{suffix}"),
                    expert: Some(e),
                }
            } else {
                GgufName {
                    name: format!("blk.{layer}.ffn_{kind}.{e}.{suffix}"),
                    expert: None,
                }
            });
        }
    }
    let gguf = match stem {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "mlp.shared_expert.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_expert.up_proj" => "ffn_up_shexp",
        "mlp.shared_expert.down_proj" => "ffn_down_shexp",
        "mlp.shared_expert_gate" => "ffn_gate_inp_shexp",
        // DeepSeek: shared experts and latent attention (the split k_b/v_b form is how
        // current llama.cpp stores kv_b_proj).
        "mlp.shared_experts.gate_proj" => "ffn_gate_shexp",
        "mlp.shared_experts.up_proj" => "ffn_up_shexp",
        "mlp.shared_experts.down_proj" => "ffn_down_shexp",
        "self_attn.q_a_proj" => "attn_q_a",
        "self_attn.q_a_layernorm" => "attn_q_a_norm",
        "self_attn.q_b_proj" => "attn_q_b",
        "self_attn.kv_a_proj_with_mqa" => "attn_kv_a_mqa",
        "self_attn.kv_a_layernorm" => "attn_kv_a_norm",
        "self_attn.kv_b_proj" => "attn_kv_b",
        "self_attn.k_b_proj" => "attn_k_b",
        "self_attn.v_b_proj" => "attn_v_b",
        _ => return None,
    };
    blk(gguf)
}

fn meta_u64(md: &HashMap<String, Value>, key: &str) -> Option<u64> {
    md.get(key).and_then(|v| {
        v.to_u64()
            .ok()
            .or_else(|| v.to_u32().ok().map(u64::from))
            .or_else(|| v.to_i32().ok().map(|x| x as u64))
    })
}

fn meta_f64(md: &HashMap<String, Value>, key: &str) -> Option<f64> {
    md.get(key)
        .and_then(|v| v.to_f32().ok().map(f64::from).or_else(|| v.to_f64().ok()))
}

pub(crate) fn meta_str<'a>(md: &'a HashMap<String, Value>, key: &str) -> Option<&'a str> {
    md.get(key).and_then(|v| v.to_string().ok()).map(String::as_str)
}

/// The GGUF architectures we run, and the Hugging Face architecture each one is.
const ARCHITECTURES: [(&str, &str); 7] = [
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("qwen2moe", "Qwen2MoeForCausalLM"),
    ("qwen3moe", "Qwen3MoeForCausalLM"),
    ("olmoe", "OlmoeForCausalLM"),
    ("deepseek2", "DeepseekV2ForCausalLM"),
];

/// Builds the model configuration from GGUF metadata and the tensors present.
pub fn model_config(ckpt: &GgufCheckpoint) -> Result<ModelConfig> {
    let md = ckpt.metadata();
    let path = ckpt.path().to_path_buf();
    let bad = |message: String| Error::Config {
        path: path.clone(),
        message,
    };
    let arch = meta_str(md, "general.architecture").ok_or_else(|| bad("no general.architecture".into()))?;
    let Some(&(_, hf_arch)) = ARCHITECTURES.iter().find(|(a, _)| *a == arch) else {
        return Err(Error::UnsupportedArchitecture {
            name: format!("{arch} (GGUF general.architecture in {})", path.display()),
            supported: ARCHITECTURES
                .iter()
                .map(|(a, _)| *a)
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let key = |k: &str| format!("{arch}.{k}");
    let num = |k: &str| meta_u64(md, &key(k)).map(|v| v as usize);
    let need = |k: &str| num(k).ok_or_else(|| bad(format!("missing metadata {}", key(k))));
    let expert_count = num("expert_count").unwrap_or(0);
    // llama.cpp's block_count counts the multi-token prediction blocks stored after the
    // main layers; nextn_predict_layers says how many of them there are.
    let nextn = num("nextn_predict_layers").unwrap_or(0);
    let blocks = need("block_count")?;
    if nextn >= blocks {
        return Err(bad(format!(
            "{} ({nextn}) leaves no main layers of {} ({blocks})",
            key("nextn_predict_layers"),
            key("block_count")
        )));
    }
    let hf_arch = match arch {
        "llama" if expert_count > 0 => "MixtralForCausalLM",
        // V3 routes with sigmoid scores (expert_gating_func 2).
        "deepseek2" if num("expert_gating_func") == Some(2) => "DeepseekV3ForCausalLM",
        _ => hf_arch,
    };
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let vocab = match ckpt.tensor_dims("token_embd.weight") {
        Some(d) if d.len() == 2 => d[0],
        _ => return Err(bad("no 2-D token_embd.weight tensor".into())),
    };
    let rope_scaling = match meta_str(md, &key("rope.scaling.type")) {
        Some("linear") => Some(HfRopeScaling {
            rope_type: Some("linear".into()),
            factor: meta_f64(md, &key("rope.scaling.factor")),
            ..Default::default()
        }),
        Some("yarn") => {
            // llama.cpp stores DeepSeek's 0.1 * mscale_all_dim as the log multiplier.
            let mscale_all_dim = meta_f64(md, &key("rope.scaling.yarn_log_multiplier")).map(|m| m / 0.1);
            Some(HfRopeScaling {
                rope_type: Some("yarn".into()),
                factor: meta_f64(md, &key("rope.scaling.factor")),
                original_max_position_embeddings: num("rope.scaling.original_context_length"),
                mscale: mscale_all_dim,
                mscale_all_dim,
                ..Default::default()
            })
        }
        Some("none") | None => None,
        Some(other) => return Err(bad(format!("rope scaling {other:?} is not supported"))),
    };
    let head_dim = num("attention.key_length")
        .or(num("rope.dimension_count"))
        .unwrap_or(hidden / heads);
    let deepseek = arch == "deepseek2";
    let mut hf = HfConfig {
        architectures: vec![hf_arch.to_string()],
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: num("feed_forward_length").unwrap_or(0),
        num_hidden_layers: blocks - nextn,
        num_nextn_predict_layers: (nextn > 0).then_some(nextn),
        num_attention_heads: heads,
        num_key_value_heads: num("attention.head_count_kv"),
        head_dim: Some(head_dim),
        max_position_embeddings: need("context_length")?,
        rms_norm_eps: meta_f64(md, &key("attention.layer_norm_rms_epsilon")),
        rope_theta: meta_f64(md, &key("rope.freq_base")),
        rope_scaling,
        partial_rotary_factor: num("rope.dimension_count").map(|d| d as f64 / head_dim as f64),
        tie_word_embeddings: Some(!ckpt.has_tensor("output.weight")),
        attention_bias: Some(
            ckpt.has_tensor("blk.0.attn_q.bias") || ckpt.has_tensor("blk.0.attn_output.bias"),
        ),
        num_experts: (expert_count > 0).then_some(expert_count),
        num_experts_per_tok: num("expert_used_count"),
        moe_intermediate_size: num("expert_feed_forward_length"),
        shared_expert_intermediate_size: num("expert_shared_feed_forward_length"),
        norm_topk_prob: md
            .get(&key("expert_weights_norm"))
            .and_then(|v| v.to_bool().ok())
            .or(Some(arch == "qwen3moe")),
        bos_token_id: meta_u64(md, "tokenizer.ggml.bos_token_id").map(|v| v.into()),
        eos_token_id: meta_u64(md, "tokenizer.ggml.eos_token_id").map(|v| v.into()),
        ..Default::default()
    };
    if deepseek {
        apply_deepseek_fields(&mut hf, md, expert_count);
    }
    let mut cfg = ModelConfig::from_hf(&hf).map_err(|e| match e {
        Error::Config { message, .. } => bad(message),
        other => other,
    })?;
    // Which layers are sparse is whatever the file holds (it encodes decoder_sparse_step
    // and mlp_only_layers by having a router or not).
    if cfg.moe.is_some() {
        let sparse = |i: usize| ckpt.has_tensor(&format!("blk.{i}.ffn_gate_inp.weight"));
        cfg.sparse_layers = (0..cfg.num_layers).map(sparse).collect();
        cfg.mtp_sparse_layers = (cfg.num_layers..blocks).map(sparse).collect();
    }
    // llama.cpp's converter permutes the q/k rows of `llama` models into the interleaved
    // rotary layout; the other architectures keep Hugging Face's half-split layout.
    // DeepSeek's weights are interleaved as published (llama.cpp's NORM rope type).
    cfg.rope.interleaved = arch == "llama" || deepseek;
    // Llama 3 long-context scaling is stored as precomputed per-frequency divisors.
    if ckpt.has_tensor("rope_freqs.weight") {
        let (t, _) = ckpt.qtensor("rope_freqs.weight", None, &Device::Cpu)?;
        cfg.rope.freq_factors = Some(
            t.dequantize(&Device::Cpu)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect(),
        );
    }
    Ok(cfg)
}

/// DeepSeek's latent-attention and routing fields, as llama.cpp's `deepseek2` stores them.
fn apply_deepseek_fields(hf: &mut HfConfig, md: &HashMap<String, Value>, expert_count: usize) {
    let num = |k: &str| meta_u64(md, &format!("deepseek2.{k}")).map(|v| v as usize);
    let rope = num("rope.dimension_count").unwrap_or(64);
    // Current files: key_length is the latent width, key_length_mla the per-head q/k width.
    let qk = num("attention.key_length_mla")
        .or(num("attention.key_length"))
        .unwrap_or(rope + 128);
    let v = num("attention.value_length_mla")
        .or(num("attention.value_length"))
        .unwrap_or(128);
    let n_group = num("expert_group_count").filter(|&g| g > 1);
    let sigmoid = num("expert_gating_func") == Some(2);
    // llama.cpp writes the latent attention as one key/value head; the model has `heads`.
    hf.num_key_value_heads = num("attention.head_count");
    hf.head_dim = None;
    hf.partial_rotary_factor = None;
    // llama.cpp writes (and reads) 0 for a model without query compression
    // (DeepSeek-V2-Lite's `q_lora_rank: null`).
    hf.q_lora_rank = num("attention.q_lora_rank").filter(|&r| r > 0);
    hf.kv_lora_rank = num("attention.kv_lora_rank");
    hf.qk_rope_head_dim = Some(rope);
    hf.qk_nope_head_dim = Some(qk - rope);
    hf.v_head_dim = Some(v);
    hf.n_routed_experts = (expert_count > 0).then_some(expert_count);
    hf.n_shared_experts = num("expert_shared_count");
    hf.routed_scaling_factor = meta_f64(md, "deepseek2.expert_weights_scale");
    hf.norm_topk_prob = Some(
        md.get("deepseek2.expert_weights_norm")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false),
    );
    hf.first_k_dense_replace = num("leading_dense_block_count");
    hf.scoring_func = Some(if sigmoid { "sigmoid" } else { "softmax" }.into());
    hf.topk_method = Some(
        match (sigmoid, n_group) {
            (true, _) => "noaux_tc",
            (false, Some(_)) => "group_limited_greedy",
            (false, None) => "greedy",
        }
        .into(),
    );
    hf.n_group = n_group.or(Some(1));
    hf.topk_group = num("expert_group_used_count").or(Some(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_onto_llama_cpp() {
        let n = |s: &str, stacked| gguf_name(s, stacked).map(|g| (g.name, g.expert));
        assert_eq!(
            n("model.embed_tokens.weight", true),
            Some(("token_embd.weight".into(), None))
        );
        assert_eq!(
            n("model.layers.3.self_attn.q_proj.bias", true),
            Some(("blk.3.attn_q.bias".into(), None))
        );
        assert_eq!(
            n("model.layers.0.mlp.experts.5.down_proj.weight", true),
            Some(("blk.0.ffn_down_exps.weight".into(), Some(5)))
        );
        assert_eq!(
            n("model.layers.1.block_sparse_moe.experts.2.w3.weight", false),
            Some(("blk.1.ffn_up.2.weight".into(), None))
        );
        assert_eq!(
            n("model.layers.1.block_sparse_moe.gate.weight", true),
            Some(("blk.1.ffn_gate_inp.weight".into(), None))
        );
        assert_eq!(
            n("model.layers.1.mlp.shared_expert_gate.weight", true),
            Some(("blk.1.ffn_gate_inp_shexp.weight".into(), None))
        );
        assert_eq!(
            n("model.layers.61.shared_head.head.weight", true),
            Some(("blk.61.nextn.shared_head_head.weight".into(), None))
        );
        assert_eq!(
            n("model.layers.61.eh_proj.weight", true),
            Some(("blk.61.nextn.eh_proj.weight".into(), None))
        );
        assert_eq!(n("model.layers.1.self_attn.rotary.weight", true), None);
    }

    #[test]
    fn shards_are_found_from_the_first() {
        let p = shard_paths(Path::new("/m/big-00001-of-00003.gguf"));
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], Path::new("/m/big-00003-of-00003.gguf"));
        assert_eq!(
            shard_paths(Path::new("/m/one.gguf")),
            vec![PathBuf::from("/m/one.gguf")]
        );
    }
}
