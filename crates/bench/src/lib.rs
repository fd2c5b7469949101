//! Benchmarks of moeserve, apart from the server: in-process measurements of the model
//! and the engine ([`measure`]), and a load generator for any OpenAI-compatible server
//! ([`loadgen`]), its comparison of speculative decoding off and on ([`speculative`]), and a soak with churn
//! ([`soak`]). The `moeserve-bench` binary runs them; `cargo bench -p moeserve-bench`
//! runs the kernel microbenchmarks.

pub mod loadgen;
pub mod measure;
pub mod reference;
pub mod soak;
pub mod speculative;
