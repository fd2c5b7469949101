use candle_core::{DType, Tensor};

use super::{Linear, RmsNorm, RotaryEmbedding};
use crate::backend::{self, AttnGeometry, Backend};
use crate::config::{MlaConfig, ModelConfig};
use crate::error::Result;
use crate::kv::KvLayer;
use crate::layers::AttentionContext;
use crate::weights::WeightStore;

enum QueryProjection {
    Direct(Linear),
    /// Compressed: `q_b(norm(q_a(x)))`.
    LowRank {
        a: Linear,
        norm: RmsNorm,
        b: Linear,
    },
}

/// Multi-head latent attention (DeepSeek-V2/V3).
///
/// Each token's keys and values are compressed into one latent vector `c` of
/// `kv_lora_rank` values, plus a small rotary key `k_pe` shared by all heads. The cache
/// holds only `[k_pe, c]` per token (576 values for V2/V3 shapes), never per-head keys
/// and values. Per head, `k_nope = W_uk c` and `v = W_uv c`, so
///
/// ```text
/// q_nope . k_nope = (W_uk^T q_nope) . c        attention output = W_uv (sum_j p_j c_j)
/// ```
///
/// The absorbed form attends directly over the cached latents with the query
/// `[q_pe, W_uk^T q_nope]`: one-"head" keys of 576 values, read in place by the paged
/// kernel, the latent itself serving as the value. The naive form (`absorb: false`)
/// up-projects every cached latent to per-head keys and values, as the reference
/// implementation does; it exists to check the absorbed form.
pub struct LatentAttention {
    q: QueryProjection,
    kv_a: Linear,
    kv_norm: RmsNorm,
    /// `[heads, nope, kv_lora]`: the key up-projection, absorbed into the query.
    w_uk: Tensor,
    /// `[heads, kv_lora, v]`: the value up-projection, applied after attention.
    w_uv_t: Tensor,
    o_proj: Linear,
    num_heads: usize,
    mla: MlaConfig,
    backend: Backend,
}

impl LatentAttention {
    pub fn load(store: &WeightStore, prefix: &str, cfg: &ModelConfig) -> Result<Self> {
        let mla = cfg.mla.clone().expect("latent attention needs an MLA config");
        let (h, nh) = (cfg.hidden_size, cfg.num_heads);
        let qk = mla.qk_nope_head_dim + mla.qk_rope_head_dim;
        let q = match mla.q_lora_rank {
            None => QueryProjection::Direct(Linear::load(
                store,
                &format!("{prefix}.q_proj"),
                h,
                nh * qk,
                false,
            )?),
            Some(r) => QueryProjection::LowRank {
                a: Linear::load(store, &format!("{prefix}.q_a_proj"), h, r, cfg.o_bias)?,
                norm: RmsNorm::load(store, &format!("{prefix}.q_a_layernorm"), r, cfg.rms_norm_eps)?,
                b: Linear::load(store, &format!("{prefix}.q_b_proj"), r, nh * qk, false)?,
            },
        };
        let (lora, nope, v) = (mla.kv_lora_rank, mla.qk_nope_head_dim, mla.v_head_dim);
        // The up-projection split per head into its key and value parts, once. Checkpoints
        // store it whole (kv_b_proj); current llama.cpp GGUFs already split, k_b transposed.
        let (w_uk, w_uv_t) = if store.contains(&format!("{prefix}.kv_b_proj.weight")) {
            let kv_b = store.get(&format!("{prefix}.kv_b_proj.weight"), &[nh * (nope + v), lora])?;
            let kv_b = kv_b.to_dtype(DType::F32)?.reshape((nh, nope + v, lora))?;
            (
                kv_b.narrow(1, 0, nope)?,
                kv_b.narrow(1, nope, v)?.transpose(1, 2)?,
            )
        } else {
            let k_b = store.get(&format!("{prefix}.k_b_proj.weight"), &[nh, lora, nope])?;
            let v_b = store.get(&format!("{prefix}.v_b_proj.weight"), &[nh, v, lora])?;
            (k_b.transpose(1, 2)?, v_b.transpose(1, 2)?)
        };
        let w_uk = w_uk.contiguous()?.to_dtype(store.dtype())?;
        let w_uv_t = w_uv_t.contiguous()?.to_dtype(store.dtype())?;
        Ok(Self {
            q,
            kv_a: Linear::load(
                store,
                &format!("{prefix}.kv_a_proj_with_mqa"),
                h,
                lora + mla.qk_rope_head_dim,
                cfg.o_bias,
            )?,
            kv_norm: RmsNorm::load(store, &format!("{prefix}.kv_a_layernorm"), lora, cfg.rms_norm_eps)?,
            w_uk,
            w_uv_t,
            o_proj: Linear::load(store, &format!("{prefix}.o_proj"), nh * v, h, cfg.o_bias)?,
            num_heads: nh,
            mla,
            backend: store.backend(),
        })
    }

    /// Values cached per token: the rotary key then the latent.
    pub fn cache_width(mla: &MlaConfig) -> usize {
        mla.qk_rope_head_dim + mla.kv_lora_rank
    }

    pub fn forward(
        &self,
        x: &Tensor,
        ctx: &AttentionContext,
        rope: &RotaryEmbedding,
        kv: &mut KvLayer,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (nh, m) = (self.num_heads, &self.mla);
        let (rope_d, nope, lora) = (m.qk_rope_head_dim, m.qk_nope_head_dim, m.kv_lora_rank);
        let q = match &self.q {
            QueryProjection::Direct(p) => p.forward(x)?,
            QueryProjection::LowRank { a, norm, b } => b.forward(&norm.forward(&a.forward(x)?)?)?,
        }
        .reshape((t, nh, nope + rope_d))?;
        let q_nope = q.narrow(2, 0, nope)?;
        let q_pe = q.narrow(2, nope, rope_d)?;

        // The cache entry [k_pe, norm(c)], with the rotary part rotated.
        let ckv = self.kv_a.forward(x)?;
        let c = self.kv_norm.forward(&ckv.narrow(1, 0, lora)?)?;
        let k_pe = ckv.narrow(1, lora, rope_d)?;
        let latent = rope.apply(
            &Tensor::cat(&[&k_pe, &c], 1)?.to_dtype(DType::F32)?,
            1,
            ctx.positions,
        )?;
        // One latent vector per token serves as both key and value.
        let g = AttnGeometry {
            num_heads: nh,
            num_kv_heads: 1,
            head_dim: rope_d + lora,
            value_dim: lora,
            block_size: ctx.block_size,
            value_offset: Some(rope_d),
            scale: m.softmax_scale as f32,
        };
        backend::write_kv(kv, &g, ctx.slots, (&latent, None))?;

        let out = if m.absorb {
            // Query in latent space: [q_pe, W_uk^T q_nope] per head.
            let q_lat = q_nope
                .transpose(0, 1)?
                .contiguous()?
                .matmul(&self.w_uk)?
                .transpose(0, 1)?;
            let q_full = Tensor::cat(&[&q_pe, &q_lat], 2)?
                .to_dtype(DType::F32)?
                .reshape((t, nh * (rope_d + lora)))?;
            let q_full = rope.apply(&q_full, nh, ctx.positions)?;
            let o = self.backend.paged_attention(&q_full, kv, ctx.seqs, g)?;
            let o = o.reshape((t, nh, lora))?.to_dtype(x.dtype())?;
            // Per head: W_uv times the attended latent.
            o.transpose(0, 1)?
                .contiguous()?
                .matmul(&self.w_uv_t)?
                .transpose(0, 1)?
        } else {
            self.naive(&q_nope, &q_pe, ctx, rope, kv)?
        };
        self.o_proj
            .forward(&out.contiguous()?.reshape((t, nh * m.v_head_dim))?)
    }

    /// The reference form: per-head keys and values up-projected from every cached
    /// latent, plain causal attention. `[tokens, heads, v]`.
    fn naive(
        &self,
        q_nope: &Tensor,
        q_pe: &Tensor,
        ctx: &AttentionContext,
        rope: &RotaryEmbedding,
        kv: &KvLayer,
    ) -> Result<Tensor> {
        let (nh, m) = (self.num_heads, &self.mla);
        let (rope_d, lora) = (m.qk_rope_head_dim, m.kv_lora_rank);
        let width = rope_d + lora;
        let dev = q_nope.device();
        let dtype = q_nope.dtype();
        let t = q_pe.dim(0)?;
        let q_pe_rot = rope.apply(
            &q_pe.to_dtype(DType::F32)?.reshape((t, nh * rope_d))?,
            nh,
            ctx.positions,
        )?;
        let q_pe = q_pe_rot.reshape(q_pe.shape())?.to_dtype(dtype)?;
        let q = Tensor::cat(&[q_nope, &q_pe], 2)?; // [T, H, nope + rope]
        let w_uk_t = self.w_uk.transpose(1, 2)?; // [H, lora, nope]
        let mut outs = Vec::with_capacity(ctx.seqs.len());
        for s in ctx.seqs {
            let n = s.start_pos + s.len;
            // This sequence's cached latents (positions 0..n), from its blocks.
            let slots: Vec<usize> = (0..n)
                .map(|p| s.block_table[p / ctx.block_size] as usize * ctx.block_size + p % ctx.block_size)
                .collect();
            let cached = backend::read_kv(kv, &slots, width)?.to_dtype(dtype)?;
            let k_pe = cached.narrow(1, 0, rope_d)?; // [n, rope]
            let c = cached.narrow(1, rope_d, lora)?.contiguous()?; // [n, lora]
                                                                   // k_nope[h] = c W_uk[h]^T, v[h] = c W_uv[h]^T.
            let c_h = c.unsqueeze(0)?.broadcast_as((nh, n, lora))?.contiguous()?;
            let k_nope = c_h.matmul(&w_uk_t.contiguous()?)?; // [H, n, nope]
            let v = c_h.matmul(&self.w_uv_t)?; // [H, n, v]
            let k = Tensor::cat(
                &[
                    &k_nope,
                    &k_pe.unsqueeze(0)?.broadcast_as((nh, n, rope_d))?.contiguous()?,
                ],
                2,
            )?;
            let qs = q.narrow(0, s.first_token, s.len)?.transpose(0, 1)?.contiguous()?; // [H, t, qk]
            let scores = (qs.matmul(&k.transpose(1, 2)?.contiguous()?)? * m.softmax_scale)?; // [H, t, n]
            let mask: Vec<f32> = (0..s.len)
                .flat_map(|i| {
                    (0..n).map(move |j| {
                        if j <= s.start_pos + i {
                            0.0
                        } else {
                            f32::NEG_INFINITY
                        }
                    })
                })
                .collect();
            let mask = Tensor::from_vec(mask, (1, s.len, n), dev)?.to_dtype(scores.dtype())?;
            let p = candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask)?)?;
            outs.push(p.matmul(&v)?.transpose(0, 1)?); // [t, H, v]
        }
        Ok(Tensor::cat(&outs, 0)?.contiguous()?)
    }
}
