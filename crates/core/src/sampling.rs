//! Choosing the next token from logits.

use rand::{rngs::StdRng, Rng, SeedableRng};

/// Greedy (temperature 0) or temperature sampling with its own seeded RNG.
pub struct Sampler {
    temperature: f32,
    rng: StdRng,
}

impl Sampler {
    pub fn new(temperature: f32, seed: u64) -> Self {
        Self {
            temperature,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f32> = logits
            .iter()
            .map(|l| ((l - max) / self.temperature).exp())
            .collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.random_range(0.0..total);
        for (i, w) in weights.iter().enumerate() {
            if r < *w {
                return i as u32;
            }
            r -= w;
        }
        argmax(logits)
    }
}

/// Index of the largest value; the lowest index wins ties (as `torch.argmax` does).
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

/// `log_softmax` of one row of logits, in f64 for accuracy.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = logits.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln() + max;
    logits.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.1, 2.0, -1.0, 2.0];
        assert_eq!(Sampler::new(0.0, 0).sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(1.0, seed);
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let lp = log_softmax(&logits);
        let total: f64 = lp.iter().map(|&x| (x as f64).exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }
}
