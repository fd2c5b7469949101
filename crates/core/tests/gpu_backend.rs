//! The GPU backend's kernels (candle's tensor ops: cuBLAS and candle's CUDA kernels on a
//! GPU) checked where CI can run them, on the CPU: the whole reference suite again
//! (every architecture's logits, logprobs and greedy tokens against transformers,
//! batching, chunked prefill, latent attention, the MTP module) with every layer routed
//! through `backend::gpu` and the KV pool in its device-tensor form.

const GPU_KERNELS: bool = true;

#[path = "reference.rs"]
mod reference;
