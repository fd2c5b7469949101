use std::f64::consts::PI;

use candle_core::{Device, Tensor};

use crate::backend::Backend;
use crate::config::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

/// Rotary position embedding with precomputed cos/sin tables for every position up to
/// the model's context length. Applied to the query and key rows on their way into the
/// paged attention kernel, where each token has its own position (a batch mixes
/// sequences at different offsets), which a table lookup handles directly.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, rotary_dim / 2]`, f32.
    cos: Tensor,
    sin: Tensor,
    max_positions: usize,
    interleaved: bool,
    backend: Backend,
}

impl RotaryEmbedding {
    pub fn new(cfg: &RopeConfig, max_positions: usize, device: &Device, backend: Backend) -> Result<Self> {
        let half = cfg.rotary_dim / 2;
        let mut inv_freq = inverse_frequencies(cfg);
        if let Some(factors) = &cfg.freq_factors {
            for (f, d) in inv_freq.iter_mut().zip(factors) {
                *f /= d;
            }
        }
        // YaRN scales cos and sin (1 for the other schemes).
        let amp = cfg.scaling.attention_factor();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for p in 0..max_positions {
            for f in &inv_freq {
                let angle = p as f64 * f;
                cos.push((angle.cos() * amp) as f32);
                sin.push((angle.sin() * amp) as f32);
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, half), device)?,
            max_positions,
            interleaved: cfg.interleaved,
            backend,
        })
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// `x` (`[tokens, num_heads * head_dim]`) with each head's first `rotary_dim` values
    /// rotated by its token's position (`positions[t]`), in f32.
    pub fn apply(&self, x: &Tensor, num_heads: usize, positions: &[usize]) -> Result<Tensor> {
        if let Some(&pos) = positions.iter().find(|&&p| p >= self.max_positions) {
            return Err(Error::InvalidBatch(format!(
                "position {pos} is beyond the model's {} positions",
                self.max_positions
            )));
        }
        self.backend
            .rotary(x, (&self.cos, &self.sin), num_heads, positions, self.interleaved)
    }
}

/// The per-pair rotation frequencies, with the configured long-context scaling.
fn inverse_frequencies(cfg: &RopeConfig) -> Vec<f64> {
    let dim = cfg.rotary_dim as f64;
    let base: Vec<f64> = (0..cfg.rotary_dim / 2)
        .map(|i| 1.0 / cfg.theta.powf(2.0 * i as f64 / dim))
        .collect();
    match cfg.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            // Long wavelengths are slowed down by `factor`, short ones kept, and the band
            // between them interpolated smoothly (Llama 3.1's scheme).
            let old_len = original_max_position_embeddings as f64;
            let low_freq_wavelen = old_len / low_freq_factor;
            let high_freq_wavelen = old_len / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * PI / f;
                    if wavelen < high_freq_wavelen {
                        f
                    } else if wavelen > low_freq_wavelen {
                        f / factor
                    } else {
                        let smooth =
                            (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
        RopeScaling::Yarn {
            factor,
            original_max_position_embeddings,
            beta_fast,
            beta_slow,
            ..
        } => {
            // The dimensions that rotate fewer than `beta_slow` times over the original
            // context are interpolated, those over `beta_fast` kept, a linear ramp between.
            let correction_dim = |rotations: f64| {
                dim * (original_max_position_embeddings as f64 / (rotations * 2.0 * PI)).ln()
                    / (2.0 * cfg.theta.ln())
            };
            let low = correction_dim(beta_fast).floor().max(0.0);
            let mut high = correction_dim(beta_slow).ceil().min(dim - 1.0);
            if low == high {
                high += 0.001;
            }
            base.iter()
                .enumerate()
                .map(|(i, &f)| {
                    let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                    let extrapolation = 1.0 - ramp;
                    (f / factor) * (1.0 - extrapolation) + f * extrapolation
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_is_identity_at_zero() {
        let cfg = RopeConfig {
            theta: 10_000.0,
            rotary_dim: 8,
            scaling: RopeScaling::None,
            interleaved: false,
            freq_factors: None,
        };
        let rope = RotaryEmbedding::new(
            &cfg,
            16,
            &Device::Cpu,
            crate::backend::Backend::Cpu(crate::backend::Isa::best()),
        )
        .unwrap();
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
        let x = Tensor::from_vec(orig.clone(), (1, 16), &Device::Cpu).unwrap();
        let at = |p: usize| {
            rope.apply(&x, 2, &[p])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(at(0), orig);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&at(5)) - n(&orig)).abs() < 1e-4);
        assert!(rope.apply(&x, 2, &[16]).is_err());
    }
}
