//! What the KV cache holds per token, and in which element type.

/// The element type of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    #[default]
    F32,
    F16,
}

impl KvDtype {
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(KvDtype::F32),
            "f16" | "float16" => Ok(KvDtype::F16),
            other => Err(format!("unknown KV cache dtype {other:?} (use f32 or f16)")),
        }
    }
}

/// What one token stores per layer. Standard attention stores `num_kv_heads` key and value
/// vectors; latent attention (DeepSeek) stores one latent vector and no values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub key_dim: usize,
    /// 0 when the cache holds no separate values.
    pub value_dim: usize,
    pub dtype: KvDtype,
}

impl KvLayout {
    /// Values (keys and values together) per token per layer.
    pub fn floats_per_token_layer(&self) -> usize {
        self.num_kv_heads * (self.key_dim + self.value_dim)
    }

    pub fn bytes_per_token(&self) -> usize {
        self.num_layers * self.floats_per_token_layer() * self.dtype.size()
    }
}
