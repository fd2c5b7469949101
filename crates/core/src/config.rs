//! Model configuration.
//!
//! [`HfConfig`] mirrors `config.json` as Hugging Face writes it (the union of the fields of
//! the architectures we support, all optional where some architecture omits them).
//! [`ModelConfig`] is the one normalised description the model code reads: every
//! per-architecture default and quirk is resolved here, once, so the layers never look at
//! the architecture name.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The architectures moeserve implements, by their `architectures[0]` name in `config.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
    Qwen3,
    Mixtral,
    Qwen2Moe,
    Qwen3Moe,
    Olmoe,
    DeepseekV2,
    DeepseekV3,
}

impl Architecture {
    pub const ALL: [(&'static str, Architecture); 9] = [
        ("LlamaForCausalLM", Architecture::Llama),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
        ("MixtralForCausalLM", Architecture::Mixtral),
        ("Qwen2MoeForCausalLM", Architecture::Qwen2Moe),
        ("Qwen3MoeForCausalLM", Architecture::Qwen3Moe),
        ("OlmoeForCausalLM", Architecture::Olmoe),
        ("DeepseekV2ForCausalLM", Architecture::DeepseekV2),
        ("DeepseekV3ForCausalLM", Architecture::DeepseekV3),
    ];

    pub fn from_hf_name(name: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
            .ok_or_else(|| Error::UnsupportedArchitecture {
                name: name.to_string(),
                supported: Self::ALL.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "),
            })
    }

    pub fn hf_name(self) -> &'static str {
        Self::ALL.iter().find(|(_, a)| *a == self).unwrap().0
    }
}

/// The rotary embedding's settings as `config.json` writes them: `rope_scaling` in
/// transformers 4 (`type` in older files, `rope_type` in newer ones, both in files saved
/// in between), or `rope_parameters` in transformers 5, which also holds `rope_theta`
/// (and may hold `partial_rotary_factor`).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct HfRopeScaling {
    pub rope_type: Option<String>,
    /// The older spelling of `rope_type`.
    #[serde(rename = "type")]
    pub legacy_type: Option<String>,
    pub rope_theta: Option<f64>,
    pub partial_rotary_factor: Option<f64>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
    // YaRN
    pub beta_fast: Option<f64>,
    pub beta_slow: Option<f64>,
    pub mscale: Option<f64>,
    pub mscale_all_dim: Option<f64>,
}

impl HfRopeScaling {
    /// `rope_type`, or the older `type`; the two must agree where both are given.
    fn kind(&self) -> std::result::Result<Option<&str>, String> {
        match (self.rope_type.as_deref(), self.legacy_type.as_deref()) {
            (Some(a), Some(b)) if a != b => {
                Err(format!("rope scaling says both rope_type {a:?} and type {b:?}"))
            }
            (a, b) => Ok(a.or(b)),
        }
    }
}

/// `config.json`, field for field. Unknown fields are ignored.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default)]
pub struct HfConfig {
    pub architectures: Vec<String>,
    pub model_type: Option<String>,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    pub rope_scaling: Option<HfRopeScaling>,
    /// transformers 5's replacement of `rope_scaling` and `rope_theta`.
    pub rope_parameters: Option<HfRopeScaling>,
    pub partial_rotary_factor: Option<f64>,
    pub tie_word_embeddings: Option<bool>,
    pub attention_bias: Option<bool>,
    pub mlp_bias: Option<bool>,
    pub hidden_act: Option<String>,
    pub bos_token_id: Option<serde_json::Value>,
    pub eos_token_id: Option<serde_json::Value>,
    pub sliding_window: Option<serde_json::Value>,
    pub use_sliding_window: Option<bool>,
    // Mixture of experts. Mixtral says `num_local_experts`, the others `num_experts`.
    pub num_local_experts: Option<usize>,
    pub num_experts: Option<usize>,
    pub num_experts_per_tok: Option<usize>,
    pub moe_intermediate_size: Option<usize>,
    pub shared_expert_intermediate_size: Option<usize>,
    pub norm_topk_prob: Option<bool>,
    pub decoder_sparse_step: Option<usize>,
    pub mlp_only_layers: Option<Vec<usize>>,
    pub clip_qkv: Option<f64>,
    // DeepSeek-V2/V3: multi-head latent attention and grouped routing.
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: Option<usize>,
    pub qk_rope_head_dim: Option<usize>,
    pub qk_nope_head_dim: Option<usize>,
    pub v_head_dim: Option<usize>,
    pub n_routed_experts: Option<usize>,
    pub n_shared_experts: Option<usize>,
    pub routed_scaling_factor: Option<f64>,
    pub topk_method: Option<String>,
    pub scoring_func: Option<String>,
    pub n_group: Option<usize>,
    pub topk_group: Option<usize>,
    pub first_k_dense_replace: Option<usize>,
    pub moe_layer_freq: Option<usize>,
    /// DeepSeek-V3's multi-token prediction layers, stored after the decoder layers.
    pub num_nextn_predict_layers: Option<usize>,
    pub quantization_config: Option<serde_json::Value>,
}

/// How a rotary embedding's frequencies are scaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// YaRN (DeepSeek): frequencies blended between interpolated and extrapolated by a
    /// ramp over the dimensions, and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f64,
        original_max_position_embeddings: usize,
        beta_fast: f64,
        beta_slow: f64,
        mscale: f64,
        mscale_all_dim: f64,
    },
}

impl RopeScaling {
    /// YaRN's `0.1 * m * ln(s) + 1` (1 for `s <= 1`).
    pub fn yarn_mscale(scale: f64, m: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * m * scale.ln() + 1.0
        }
    }

    /// The factor on cos and sin.
    pub fn attention_factor(&self) -> f64 {
        match *self {
            RopeScaling::Yarn {
                factor,
                mscale,
                mscale_all_dim,
                ..
            } => {
                if mscale != 0.0 && mscale_all_dim != 0.0 {
                    Self::yarn_mscale(factor, mscale) / Self::yarn_mscale(factor, mscale_all_dim)
                } else {
                    Self::yarn_mscale(factor, 1.0)
                }
            }
            _ => 1.0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    /// How many leading dimensions of each head rotate (the whole head unless partial).
    pub rotary_dim: usize,
    pub scaling: RopeScaling,
    /// `false`: the two halves of the head form the pairs (Hugging Face's `rotate_half`);
    /// `true`: adjacent elements do (GPT-J / original LLaMA / GGUF layout).
    pub interleaved: bool,
    /// Per-frequency divisors applied after `scaling` (GGUF stores Llama 3 scaling this
    /// way, as the `rope_freqs` tensor).
    pub freq_factors: Option<Vec<f64>>,
}

/// Where a per-projection RMSNorm applies to queries and keys before the rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` (Qwen3, Qwen3-MoE).
    PerHead,
    /// Over the whole projection, all heads at once (OLMoE).
    Full,
}

/// How router logits become expert scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    Softmax,
    Sigmoid,
}

/// How the top-k experts are chosen from the scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// The k best over all experts.
    Greedy,
    /// DeepSeek-V2: experts in `n_group` groups; only the `topk_group` groups with the best
    /// single expert are eligible.
    GroupLimited { n_group: usize, topk_group: usize },
    /// DeepSeek-V3: choose by score plus a per-expert correction bias (which does not
    /// weight); groups ranked by the sum of their two best biased scores.
    NoAuxTc { n_group: usize, topk_group: usize },
}

/// Multi-head latent attention (DeepSeek-V2/V3).
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// `None`: queries are projected directly (V2-Lite).
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_rope_head_dim: usize,
    pub qk_nope_head_dim: usize,
    pub v_head_dim: usize,
    /// Softmax scale: `1/sqrt(nope + rope)`, times YaRN's `mscale_all_dim` correction squared.
    pub softmax_scale: f64,
    /// Attend in the latent space, the up-projections absorbed into the query and output
    /// (the fast form). `false`: up-project the cached latents to per-head keys and values
    /// (the reference form, for tests).
    pub absorb: bool,
}

/// Gated-MLP experts and how tokens are routed to them.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    pub expert_intermediate_size: usize,
    /// Renormalise the top-k routing weights to sum to one.
    pub norm_topk_prob: bool,
    /// An always-on expert beside the routed ones (Qwen2-MoE), with its width.
    pub shared_expert_intermediate_size: Option<usize>,
    /// The shared expert's output is scaled by `sigmoid(gate(x))` (Qwen2-MoE).
    pub shared_expert_gated: bool,
    /// Weight names of the experts.
    pub naming: ExpertNaming,
    pub scoring: ScoringFunc,
    pub topk_method: TopkMethod,
    /// Multiplies the routing weights (DeepSeek).
    pub routed_scaling_factor: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNaming {
    /// `block_sparse_moe.experts.N.w1`
    Mixtral,
    /// `mlp.experts.N.gate_proj`, shared `mlp.shared_expert`
    Qwen,
    /// `mlp.experts.N.gate_proj`, shared `mlp.shared_experts`
    DeepSeek,
}

/// The normalised model description that the model code reads.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub qk_norm: QkNorm,
    /// Clamp q, k and v to `[-c, c]` after projection (OLMoE's `clip_qkv`).
    pub clip_qkv: Option<f64>,
    pub moe: Option<MoeConfig>,
    pub mla: Option<MlaConfig>,
    /// Block-quantized FP8 checkpoint (DeepSeek-V3's published format): weights in
    /// float8_e4m3fn with one `weight_scale_inv` per block of this many rows and columns.
    pub fp8_weight_block: Option<(usize, usize)>,
    /// For each layer: does its feed-forward block use the experts (else a dense MLP)?
    pub sparse_layers: Vec<bool>,
    /// Multi-token prediction layers the checkpoint declares (DeepSeek-V3: 1), stored
    /// after the main layers (`model.layers.{num_layers}`); loaded when their weights
    /// are there, for speculative decoding.
    pub num_nextn_predict_layers: usize,
    /// For each MTP layer: does its feed-forward block use the experts?
    pub mtp_sparse_layers: Vec<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Element type of the KV cache: f32 unless the loader or the user picks f16.
    pub kv_cache_dtype: crate::kv::KvDtype,
}

/// Token ids in `config.json` are an int, a list of ints, or null.
pub(crate) fn token_ids(v: &Option<serde_json::Value>) -> Vec<u32> {
    match v {
        Some(serde_json::Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Self::from_hf(&hf).map_err(|e| match e {
            Error::Config { message, .. } => Error::Config {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_hf(hf: &HfConfig) -> Result<Self> {
        let bad = |message: String| Error::Config {
            path: "config.json".into(),
            message,
        };
        let arch_name = hf
            .architectures
            .first()
            .ok_or_else(|| bad("no `architectures` entry".into()))?;
        let architecture = Architecture::from_hf_name(arch_name)?;
        for (name, v) in [
            ("vocab_size", hf.vocab_size),
            ("hidden_size", hf.hidden_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("num_attention_heads", hf.num_attention_heads),
            ("max_position_embeddings", hf.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(format!("`{name}` is missing or zero")));
            }
        }
        if let Some(act) = &hf.hidden_act {
            if act != "silu" {
                return Err(bad(format!("hidden_act {act:?} is not supported (only silu)")));
            }
        }
        let num_heads = hf.num_attention_heads;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}"
            )));
        }
        let is_deepseek = matches!(architecture, Architecture::DeepseekV2 | Architecture::DeepseekV3);
        // DeepSeek's rotary part is its own slice of each head (`qk_rope_head_dim`).
        let head_dim = if is_deepseek {
            hf.qk_rope_head_dim.unwrap_or(64)
        } else {
            hf.head_dim.unwrap_or(hf.hidden_size / num_heads)
        };
        // transformers 5's `rope_parameters` first, then `rope_scaling`, then the
        // top-level `rope_theta` and `partial_rotary_factor` of older files.
        let rope_params = hf.rope_parameters.as_ref().or(hf.rope_scaling.as_ref());
        let rope_theta = rope_params
            .and_then(|r| r.rope_theta)
            .or(hf.rope_theta)
            .unwrap_or(10_000.0);
        let partial_rotary_factor = rope_params
            .and_then(|r| r.partial_rotary_factor)
            .or(hf.partial_rotary_factor)
            .unwrap_or(1.0);
        let rotary_dim = (head_dim as f64 * partial_rotary_factor) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
            return Err(bad(format!(
                "rotary dimension {rotary_dim} must be even and positive"
            )));
        }
        let scaling = match rope_params {
            None => RopeScaling::None,
            Some(s) => match s.kind().map_err(bad)? {
                None | Some("default") => RopeScaling::None,
                Some("linear") => RopeScaling::Linear {
                    factor: s
                        .factor
                        .ok_or_else(|| bad("linear rope_scaling needs `factor`".into()))?,
                },
                Some("llama3") => RopeScaling::Llama3 {
                    factor: s.factor.unwrap_or(8.0),
                    low_freq_factor: s.low_freq_factor.unwrap_or(1.0),
                    high_freq_factor: s.high_freq_factor.unwrap_or(4.0),
                    original_max_position_embeddings: s.original_max_position_embeddings.unwrap_or(8192),
                },
                Some("yarn") => RopeScaling::Yarn {
                    factor: s
                        .factor
                        .ok_or_else(|| bad("yarn rope_scaling needs `factor`".into()))?,
                    original_max_position_embeddings: s
                        .original_max_position_embeddings
                        .unwrap_or(hf.max_position_embeddings),
                    beta_fast: s.beta_fast.unwrap_or(32.0),
                    beta_slow: s.beta_slow.unwrap_or(1.0),
                    mscale: s.mscale.unwrap_or(0.0),
                    mscale_all_dim: s.mscale_all_dim.unwrap_or(0.0),
                },
                Some(other) => return Err(bad(format!("rope_scaling type {other:?} is not supported"))),
            },
        };
        use Architecture::*;
        let attention_bias = hf.attention_bias.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            // Qwen2 and Qwen2-MoE always have q/k/v biases and never an output bias.
            Qwen2 | Qwen2Moe => (true, false),
            Llama | Olmoe => (attention_bias, attention_bias),
            Qwen3 | Qwen3Moe => (attention_bias, attention_bias),
            Mixtral => (false, false),
            DeepseekV2 | DeepseekV3 => (false, attention_bias),
        };
        let qk_norm = match architecture {
            Qwen3 | Qwen3Moe => QkNorm::PerHead,
            Olmoe => QkNorm::Full,
            _ => QkNorm::None,
        };
        let moe = match architecture {
            Mixtral | Qwen2Moe | Qwen3Moe | Olmoe => {
                let num_experts = hf.num_local_experts.or(hf.num_experts).unwrap_or(0);
                let top_k = hf.num_experts_per_tok.unwrap_or(0);
                if num_experts == 0 || top_k == 0 || top_k > num_experts {
                    return Err(bad(format!(
                        "a MoE model needs 0 < num_experts_per_tok ({top_k}) <= number of experts ({num_experts})"
                    )));
                }
                let expert_intermediate_size = match architecture {
                    Mixtral | Olmoe => hf.intermediate_size,
                    _ => hf.moe_intermediate_size.unwrap_or(hf.intermediate_size),
                };
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate_size,
                    // Mixtral always renormalises; the others follow their config.
                    norm_topk_prob: architecture == Mixtral || hf.norm_topk_prob.unwrap_or(false),
                    shared_expert_intermediate_size: match architecture {
                        Qwen2Moe => hf.shared_expert_intermediate_size.filter(|&s| s > 0),
                        _ => None,
                    },
                    shared_expert_gated: architecture == Qwen2Moe,
                    naming: if architecture == Mixtral {
                        ExpertNaming::Mixtral
                    } else {
                        ExpertNaming::Qwen
                    },
                    scoring: ScoringFunc::Softmax,
                    topk_method: TopkMethod::Greedy,
                    routed_scaling_factor: 1.0,
                })
            }
            DeepseekV2 | DeepseekV3 => {
                let num_experts = hf.n_routed_experts.unwrap_or(0);
                let top_k = hf.num_experts_per_tok.unwrap_or(0);
                if num_experts == 0 || top_k == 0 || top_k > num_experts {
                    return Err(bad(format!(
                        "a MoE model needs 0 < num_experts_per_tok ({top_k}) <= n_routed_experts ({num_experts})"
                    )));
                }
                let groups = || -> Result<(usize, usize)> {
                    let (g, k) = (hf.n_group.unwrap_or(1).max(1), hf.topk_group.unwrap_or(1).max(1));
                    if !num_experts.is_multiple_of(g) || k > g {
                        return Err(bad(format!(
                            "{num_experts} experts cannot form {g} groups with topk_group {k}"
                        )));
                    }
                    Ok((g, k))
                };
                let default_method = if architecture == DeepseekV3 {
                    "noaux_tc"
                } else {
                    "greedy"
                };
                let topk_method = match hf.topk_method.as_deref().unwrap_or(default_method) {
                    "greedy" => TopkMethod::Greedy,
                    "group_limited_greedy" => {
                        let (n_group, topk_group) = groups()?;
                        TopkMethod::GroupLimited { n_group, topk_group }
                    }
                    "noaux_tc" => {
                        let (n_group, topk_group) = groups()?;
                        TopkMethod::NoAuxTc { n_group, topk_group }
                    }
                    other => return Err(bad(format!("topk_method {other:?} is not supported"))),
                };
                let scoring = match hf.scoring_func.as_deref() {
                    Some("sigmoid") => ScoringFunc::Sigmoid,
                    Some("softmax") => ScoringFunc::Softmax,
                    None if architecture == DeepseekV3 => ScoringFunc::Sigmoid,
                    None => ScoringFunc::Softmax,
                    Some(other) => return Err(bad(format!("scoring_func {other:?} is not supported"))),
                };
                let width = hf.moe_intermediate_size.unwrap_or(hf.intermediate_size);
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    expert_intermediate_size: width,
                    norm_topk_prob: hf.norm_topk_prob.unwrap_or(architecture == DeepseekV3),
                    shared_expert_intermediate_size: hf
                        .n_shared_experts
                        .filter(|&n| n > 0)
                        .map(|n| n * width),
                    shared_expert_gated: false,
                    naming: ExpertNaming::DeepSeek,
                    scoring,
                    topk_method,
                    routed_scaling_factor: hf.routed_scaling_factor.unwrap_or(1.0),
                })
            }
            _ => None,
        };
        let mla = if is_deepseek {
            let kv_lora_rank = hf
                .kv_lora_rank
                .ok_or_else(|| bad("`kv_lora_rank` is missing".into()))?;
            let qk_nope_head_dim = hf.qk_nope_head_dim.unwrap_or(128);
            let qk_head_dim = qk_nope_head_dim + head_dim;
            let mut softmax_scale = 1.0 / (qk_head_dim as f64).sqrt();
            // DeepSeek's YaRN correction of the softmax temperature.
            if let RopeScaling::Yarn {
                factor,
                mscale_all_dim,
                ..
            } = scaling
            {
                if mscale_all_dim != 0.0 {
                    let m = RopeScaling::yarn_mscale(factor, mscale_all_dim);
                    softmax_scale *= m * m;
                }
            }
            Some(MlaConfig {
                q_lora_rank: hf.q_lora_rank,
                kv_lora_rank,
                qk_rope_head_dim: head_dim,
                qk_nope_head_dim,
                v_head_dim: hf.v_head_dim.unwrap_or(128),
                softmax_scale,
                absorb: true,
            })
        } else {
            None
        };
        let nextn = hf.num_nextn_predict_layers.unwrap_or(0);
        let mut sparse_layers: Vec<bool> = (0..hf.num_hidden_layers + nextn)
            .map(|i| match (&moe, architecture) {
                (None, _) => false,
                (Some(_), Qwen2Moe | Qwen3Moe) => {
                    let step = hf.decoder_sparse_step.unwrap_or(1).max(1);
                    let dense = hf.mlp_only_layers.as_deref().unwrap_or(&[]);
                    !dense.contains(&i) && (i + 1) % step == 0
                }
                (Some(_), DeepseekV2 | DeepseekV3) => {
                    i >= hf.first_k_dense_replace.unwrap_or(0)
                        && i % hf.moe_layer_freq.unwrap_or(1).max(1) == 0
                }
                (Some(_), _) => true,
            })
            .collect();
        let mtp_sparse_layers = sparse_layers.split_off(hf.num_hidden_layers);
        if sparse_layers.iter().any(|&s| !s) && hf.intermediate_size == 0 {
            return Err(bad("`intermediate_size` is missing or zero".into()));
        }
        let fp8_weight_block = match &hf.quantization_config {
            None => None,
            Some(q) => {
                let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
                let fmt = q.get("fmt").and_then(|m| m.as_str()).unwrap_or("e4m3");
                if method != "fp8" || fmt != "e4m3" {
                    return Err(bad(format!(
                        "quantization_config {method:?} ({fmt}) is not supported (fp8 e4m3 block scales are)"
                    )));
                }
                let block: Vec<usize> = q
                    .get("weight_block_size")
                    .and_then(|b| serde_json::from_value(b.clone()).ok())
                    .unwrap_or_else(|| vec![128, 128]);
                match block[..] {
                    [r, c] if r > 0 && c > 0 => Some((r, c)),
                    _ => {
                        return Err(bad(format!(
                            "weight_block_size {block:?} must be two positive sizes"
                        )))
                    }
                }
            }
        };
        Ok(ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: match sliding_window(hf, architecture) {
                // Attention over the last `w` positions is full attention while the
                // context holds no more than `w`: the context stops there, which keeps
                // every output exact without a windowed kernel.
                Some(w) if w < hf.max_position_embeddings => {
                    tracing::warn!(
                        "the model attends over a sliding window of {w} tokens: its context \
                         is limited to {w} (of max_position_embeddings {}), where full \
                         attention is the same",
                        hf.max_position_embeddings
                    );
                    w
                }
                _ => hf.max_position_embeddings,
            },
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope: RopeConfig {
                theta: rope_theta,
                rotary_dim,
                scaling,
                // DeepSeek rotates adjacent pairs (its weights are laid out for that).
                interleaved: is_deepseek,
                freq_factors: None,
            },
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: hf.mlp_bias.unwrap_or(false),
            qk_norm,
            clip_qkv: hf.clip_qkv,
            moe,
            mla,
            fp8_weight_block,
            sparse_layers,
            num_nextn_predict_layers: nextn,
            mtp_sparse_layers,
            bos_token_id: token_ids(&hf.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&hf.eos_token_id),
            kv_cache_dtype: Default::default(),
        })
    }
}

/// The sliding attention window the reference implementation applies, if any: Mixtral
/// and Mistral whenever `sliding_window` is set, the Qwen families only with
/// `use_sliding_window` (their configs carry a window they do not use by default).
fn sliding_window(hf: &HfConfig, architecture: Architecture) -> Option<usize> {
    let window = hf.sliding_window.as_ref()?.as_u64()? as usize;
    let used = match architecture {
        Architecture::Mixtral => true,
        Architecture::Qwen2 | Architecture::Qwen3 | Architecture::Qwen2Moe | Architecture::Qwen3Moe => {
            hf.use_sliding_window == Some(true)
        }
        _ => false,
    };
    (used && window > 0).then_some(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sliding window the model uses limits the context to it (where full attention is
    /// the same); one the reference ignores changes nothing.
    #[test]
    fn a_used_sliding_window_limits_the_context() {
        let cfg = |arch: &str, extra: &str| {
            parse(&format!(
                r#"{{"architectures":["{arch}"],"vocab_size":8,"hidden_size":8,"intermediate_size":8,
                "num_hidden_layers":1,"num_attention_heads":1,"max_position_embeddings":32768,
                "num_local_experts":2,"num_experts":2,"num_experts_per_tok":1,"moe_intermediate_size":8
                {extra}}}"#
            ))
            .unwrap()
            .max_position_embeddings
        };
        assert_eq!(cfg("MixtralForCausalLM", r#","sliding_window":4096"#), 4096);
        assert_eq!(cfg("MixtralForCausalLM", r#","sliding_window":null"#), 32768);
        assert_eq!(
            cfg(
                "Qwen2ForCausalLM",
                r#","sliding_window":4096,"use_sliding_window":false"#
            ),
            32768
        );
        assert_eq!(
            cfg(
                "Qwen2ForCausalLM",
                r#","sliding_window":4096,"use_sliding_window":true"#
            ),
            4096
        );
        assert_eq!(
            cfg(
                "Qwen3MoeForCausalLM",
                r#","sliding_window":4096,"use_sliding_window":true"#
            ),
            4096
        );
        assert_eq!(cfg("LlamaForCausalLM", r#","sliding_window":4096"#), 32768);
    }

    fn parse(json: &str) -> Result<ModelConfig> {
        ModelConfig::from_hf(&serde_json::from_str(json).unwrap())
    }

    #[test]
    fn unknown_architecture_is_named() {
        let err = parse(
            r#"{"architectures":["GPTNeoXForCausalLM"],"vocab_size":8,"hidden_size":8,
            "num_hidden_layers":1,"num_attention_heads":1,"max_position_embeddings":8}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("GPTNeoXForCausalLM"), "{err}");
        assert!(err.contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn qwen2_moe_sparse_layers_follow_step_and_mlp_only_layers() {
        let cfg = parse(
            r#"{"architectures":["Qwen2MoeForCausalLM"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":4,"num_attention_heads":2,
            "max_position_embeddings":8,"num_experts":4,"num_experts_per_tok":2,
            "decoder_sparse_step":2,"mlp_only_layers":[3]}"#,
        )
        .unwrap();
        assert_eq!(cfg.sparse_layers, vec![false, true, false, false]);
        assert!(cfg.qkv_bias && !cfg.o_bias);
    }

    /// The same rotary settings in the three ways `config.json` has carried them: the
    /// top-level `rope_theta` with `rope_scaling` (`type` or `rope_type`, or both, as
    /// files saved by transformers 4.4x have them), and transformers 5's
    /// `rope_parameters` (which holds the theta).
    #[test]
    fn rope_settings_in_every_style() {
        let head = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":64,
            "num_hidden_layers":1,"num_attention_heads":2,"max_position_embeddings":8,
            "intermediate_size":16,"#;
        let llama3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        };
        let params = r#""factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64"#;
        for style in [
            format!(r#""rope_theta":500000.0,"rope_scaling":{{"type":"llama3",{params}}}}}"#),
            format!(r#""rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3",{params}}}}}"#),
            format!(
                r#""rope_theta":500000.0,"rope_scaling":{{"rope_type":"llama3","type":"llama3",{params}}}}}"#
            ),
            format!(r#""rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,{params}}}}}"#),
            // rope_parameters wins over a stale top-level theta.
            format!(
                r#""rope_theta":10000.0,"rope_parameters":{{"rope_type":"llama3","rope_theta":500000.0,{params}}}}}"#
            ),
        ] {
            let cfg = parse(&format!("{head}{style}")).unwrap_or_else(|e| panic!("{style}: {e}"));
            assert_eq!(cfg.rope.theta, 500000.0, "{style}");
            assert_eq!(cfg.rope.scaling, llama3, "{style}");
        }
        let plain = parse(&format!(r#"{head}"rope_parameters":{{"rope_type":"default","rope_theta":1000000.0,"partial_rotary_factor":0.5}}}}"#)).unwrap();
        assert_eq!(
            (plain.rope.theta, plain.rope.scaling, plain.rope.rotary_dim),
            (1e6, RopeScaling::None, 16)
        );
        let err = parse(&format!(
            r#"{head}"rope_scaling":{{"rope_type":"llama3","type":"linear","factor":2.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("rope_type") && err.contains("linear"), "{err}");
    }

    #[test]
    fn top_k_above_expert_count_is_rejected() {
        let err = parse(
            r#"{"architectures":["MixtralForCausalLM"],"vocab_size":8,"hidden_size":8,
            "intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,
            "max_position_embeddings":8,"num_local_experts":2,"num_experts_per_tok":3}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("num_experts_per_tok"), "{err}");
    }
}
