use candle_core::Tensor;

use super::{Linear, Projections, RmsNorm, RotaryEmbedding};
use crate::backend::{self, AttnGeometry, AttnSeq, Backend};
use crate::config::{ModelConfig, QkNorm};
use crate::error::Result;
use crate::kv::KvLayer;
use crate::weights::WeightStore;

/// Where this step's tokens are: shared by every layer of one forward call.
pub struct AttentionContext<'a> {
    /// Position of each token of the batch.
    pub positions: &'a [usize],
    /// Cache slot of each token of the batch.
    pub slots: &'a [usize],
    pub seqs: &'a [AttnSeq<'a>],
    pub block_size: usize,
}

/// Grouped-query self-attention over the paged cache, with the per-architecture options:
/// q/k/v biases, a q/k RMSNorm (per head or over the whole projection), q/k/v clipping.
#[derive(Debug, Clone)]
pub struct Attention {
    /// q, k and v, fused into one matmul where the weights allow.
    qkv: Projections,
    o_proj: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    qk_norm: QkNorm,
    clip_qkv: Option<f64>,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    scale: f32,
    backend: Backend,
}

impl Attention {
    pub fn load(store: &WeightStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let (h, nh, nkv, hd) = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let eps = cfg.rms_norm_eps;
        let (q_norm, k_norm) = match cfg.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (
                Some(RmsNorm::load(store, &format!("{prefix}.q_norm"), hd, eps)?),
                Some(RmsNorm::load(store, &format!("{prefix}.k_norm"), hd, eps)?),
            ),
            QkNorm::Full => (
                Some(RmsNorm::load(store, &format!("{prefix}.q_norm"), nh * hd, eps)?),
                Some(RmsNorm::load(store, &format!("{prefix}.k_norm"), nkv * hd, eps)?),
            ),
        };
        let proj =
            |name: &str, out: usize| Linear::load(store, &format!("{prefix}.{name}"), h, out, cfg.qkv_bias);
        let (q, k, v) = (
            proj("q_proj", nh * hd)?,
            proj("k_proj", nkv * hd)?,
            proj("v_proj", nkv * hd)?,
        );
        Ok(Self {
            qkv: Projections::new(vec![q, k, v], vec![nh * hd, nkv * hd, nkv * hd])?,
            o_proj: Linear::load(store, &format!("{prefix}.o_proj"), nh * hd, h, cfg.o_bias)?,
            q_norm,
            k_norm,
            qk_norm: cfg.qk_norm,
            clip_qkv: cfg.clip_qkv,
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            scale: 1.0 / (hd as f32).sqrt(),
            backend: store.backend(),
        })
    }

    /// `x`: `[tokens, hidden]`. Writes this step's keys and values into `kv` and attends.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rope: &RotaryEmbedding,
        kv: &mut KvLayer,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let [mut q, mut k, mut v]: [Tensor; 3] = self.qkv.forward(x)?.try_into().expect("three projections");
        if let Some(c) = self.clip_qkv {
            q = q.clamp(-c, c)?;
            k = k.clamp(-c, c)?;
            v = v.clamp(-c, c)?;
        }
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            match self.qk_norm {
                // Rows of one head each: the same data viewed `[tokens * heads, head_dim]`.
                QkNorm::PerHead => {
                    q = qn.forward(&q.reshape((t * nh, hd))?)?.reshape((t, nh * hd))?;
                    k = kn.forward(&k.reshape((t * nkv, hd))?)?.reshape((t, nkv * hd))?;
                }
                QkNorm::Full => {
                    q = qn.forward(&q)?;
                    k = kn.forward(&k)?;
                }
                QkNorm::None => {}
            }
        }
        let q = rope.apply(&q, nh, ctx.positions)?;
        let k = rope.apply(&k, nkv, ctx.positions)?;
        let geometry = AttnGeometry {
            num_heads: nh,
            num_kv_heads: nkv,
            head_dim: hd,
            value_dim: hd,
            block_size: ctx.block_size,
            value_offset: None,
            scale: self.scale,
        };
        backend::write_kv(kv, &geometry, ctx.slots, (&k, Some(&v)))?;
        let out = self.backend.paged_attention(&q, kv, ctx.seqs, geometry)?;
        self.o_proj.forward(&out.to_dtype(x.dtype())?)
    }
}
