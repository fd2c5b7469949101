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
}

impl Architecture {
    pub const ALL: [(&'static str, Architecture); 7] = [
        ("LlamaForCausalLM", Architecture::Llama),
        ("Qwen2ForCausalLM", Architecture::Qwen2),
        ("Qwen3ForCausalLM", Architecture::Qwen3),
        ("MixtralForCausalLM", Architecture::Mixtral),
        ("Qwen2MoeForCausalLM", Architecture::Qwen2Moe),
        ("Qwen3MoeForCausalLM", Architecture::Qwen3Moe),
        ("OlmoeForCausalLM", Architecture::Olmoe),
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

/// `rope_scaling` as it appears in `config.json` (`type` in older files, `rope_type` in newer).
#[derive(Debug, Clone, Deserialize, Default)]
pub struct HfRopeScaling {
    #[serde(alias = "type")]
    pub rope_type: Option<String>,
    pub factor: Option<f64>,
    pub low_freq_factor: Option<f64>,
    pub high_freq_factor: Option<f64>,
    pub original_max_position_embeddings: Option<usize>,
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
    /// Weight names of the experts: `Mixtral` (`block_sparse_moe.experts.N.w1`) or `Qwen`
    /// (`mlp.experts.N.gate_proj`).
    pub naming: ExpertNaming,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNaming {
    Mixtral,
    Qwen,
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
    /// For each layer: does its feed-forward block use the experts (else a dense MLP)?
    pub sparse_layers: Vec<bool>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
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
        let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / num_heads);
        let rotary_dim = (head_dim as f64 * hf.partial_rotary_factor.unwrap_or(1.0)) as usize;
        if !rotary_dim.is_multiple_of(2) || rotary_dim == 0 {
            return Err(bad(format!(
                "rotary dimension {rotary_dim} must be even and positive"
            )));
        }
        let scaling = match &hf.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref() {
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
                })
            }
            _ => None,
        };
        let sparse_layers: Vec<bool> = (0..hf.num_hidden_layers)
            .map(|i| match (&moe, architecture) {
                (None, _) => false,
                (Some(_), Qwen2Moe | Qwen3Moe) => {
                    let step = hf.decoder_sparse_step.unwrap_or(1).max(1);
                    let dense = hf.mlp_only_layers.as_deref().unwrap_or(&[]);
                    !dense.contains(&i) && (i + 1) % step == 0
                }
                (Some(_), _) => true,
            })
            .collect();
        if sparse_layers.iter().any(|&s| !s) && hf.intermediate_size == 0 {
            return Err(bad("`intermediate_size` is missing or zero".into()));
        }
        Ok(ModelConfig {
            architecture,
            vocab_size: hf.vocab_size,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: hf.max_position_embeddings,
            rms_norm_eps: hf.rms_norm_eps.unwrap_or(1e-6),
            rope: RopeConfig {
                theta: hf.rope_theta.unwrap_or(10_000.0),
                rotary_dim,
                scaling,
                interleaved: false,
                freq_factors: None,
            },
            tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: hf.mlp_bias.unwrap_or(false),
            qk_norm,
            clip_qkv: hf.clip_qkv,
            moe,
            sparse_layers,
            bos_token_id: token_ids(&hf.bos_token_id).first().copied(),
            eos_token_ids: token_ids(&hf.eos_token_id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
