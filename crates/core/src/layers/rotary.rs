use std::f64::consts::PI;

use crate::config::{RopeConfig, RopeScaling};
use crate::error::{Error, Result};

/// Rotary position embedding with precomputed cos/sin tables for every position up to
/// the model's context length. Applied by hand to the f32 query and key rows on their
/// way into the paged attention kernel, where each token has its own position (a batch
/// mixes sequences at different offsets), which a table lookup handles directly.
#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    /// `[max_positions, rotary_dim / 2]`
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    max_positions: usize,
    interleaved: bool,
}

impl RotaryEmbedding {
    pub fn new(cfg: &RopeConfig, max_positions: usize) -> Self {
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
        Self {
            cos,
            sin,
            half,
            max_positions,
            interleaved: cfg.interleaved,
        }
    }

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Rotates `x` (`[tokens, num_heads, head_dim]`, row-major) in place; token `t` is at
    /// position `positions[t]`. Only the first `rotary_dim` elements of each head rotate.
    pub fn apply(&self, x: &mut [f32], num_heads: usize, head_dim: usize, positions: &[usize]) -> Result<()> {
        let half = self.half;
        for (t, &pos) in positions.iter().enumerate() {
            if pos >= self.max_positions {
                return Err(Error::InvalidBatch(format!(
                    "position {pos} is beyond the model's {} positions",
                    self.max_positions
                )));
            }
            let cos = &self.cos[pos * half..(pos + 1) * half];
            let sin = &self.sin[pos * half..(pos + 1) * half];
            for h in 0..num_heads {
                let head = &mut x[(t * num_heads + h) * head_dim..][..head_dim];
                if self.interleaved {
                    for i in 0..half {
                        let (a, b) = (head[2 * i], head[2 * i + 1]);
                        head[2 * i] = a * cos[i] - b * sin[i];
                        head[2 * i + 1] = b * cos[i] + a * sin[i];
                    }
                } else {
                    for i in 0..half {
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * cos[i] - b * sin[i];
                        head[i + half] = b * cos[i] + a * sin[i];
                    }
                }
            }
        }
        Ok(())
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
        let rope = RotaryEmbedding::new(&cfg, 16);
        let orig: Vec<f32> = (0..16).map(|i| i as f32 * 0.25 - 1.0).collect();
        let mut x = orig.clone();
        rope.apply(&mut x, 2, 8, &[0]).unwrap();
        assert_eq!(x, orig);
        rope.apply(&mut x, 2, 8, &[5]).unwrap();
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&x) - n(&orig)).abs() < 1e-4);
        assert!(rope.apply(&mut x, 2, 8, &[16]).is_err());
    }
}
