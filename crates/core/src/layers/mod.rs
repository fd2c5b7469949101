//! The building blocks the model files are made of. Each has `load(store, prefix, ..)`
//! (weights by their canonical Hugging Face names under `prefix`) and `forward`.

mod latent_attention;
mod linear;
mod mlp;
mod moe;
mod norm;
mod rotary;
mod self_attention;

pub use crate::backend::Routing;
pub use latent_attention::LatentAttention;
pub use linear::{Linear, Projections};
pub use mlp::GatedMlp;
pub use moe::{ExpertRouter, MoeBlock};
pub use norm::RmsNorm;
pub use rotary::RotaryEmbedding;
pub use self_attention::{Attention, AttentionContext};
