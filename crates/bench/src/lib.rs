//! Benchmarks of moeserve, apart from the server: in-process measurements of the model
//! and the engine ([`measure`]), and a load generator for any OpenAI-compatible server
//! ([`loadgen`]), and its comparison of speculative decoding off and on ([`speculative`]). The `moeserve-bench` binary runs them; `cargo bench -p moeserve-bench`
//! runs the kernel microbenchmarks.

pub mod loadgen;
pub mod measure;
pub mod speculative;
