//! The kernel interface: every computation a layer does that is not a plain tensor
//! operation (reshape, narrow, cat, a dense matmul of candle's) goes through a function
//! here, which runs the kernel for the device its inputs live on. Layers hold their
//! weights in the types defined here ([`Matrix`], [`StackedMatrix`]) and never look at
//! dtypes or instruction sets.
//!
//! Two backends:
//! - [`cpu`]: hand-written kernels on host memory, and the thread-pool policy of a
//!   forward pass;
//! - [`gpu`]: candle's tensor ops, which candle runs on an NVIDIA GPU with cuBLAS and its
//!   own CUDA kernels (built with `--features cuda`). Its weights, activations and KV
//!   storage live on the device; what must come back to the host (router scores,
//!   logits) comes back through [`to_host`], by name, never by a silent copy. It is
//!   device-generic, so it also runs on the CPU ([`use_gpu_kernels_on_cpu`]): that is
//!   how CI, which has no GPU, checks its code against the reference fixtures.
//!
//! The functions below choose by the device of their inputs (and the KV buffers' kind).

pub mod cpu;
pub mod gpu;
mod matrix;
#[cfg(test)]
pub(crate) mod test_util;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{Device, Tensor};

pub use cpu::attention::{AttnGeometry, AttnSeq};
pub use cpu::kv_buffer::KvBuffer;
pub use matrix::{Matrix, Routing, StackedMatrix, StackedMlp};

use crate::error::{Error, Result};
use crate::kv::KvLayer;

static GPU_KERNELS_ON_CPU: AtomicBool = AtomicBool::new(false);

/// Runs CPU tensors through the GPU backend's kernels instead of the hand-written CPU
/// ones, for the whole process: how the GPU backend's code is tested on a machine with
/// no GPU. Set it before loading a model (weights take their backend's form at load, and
/// the KV pool its backend's buffers).
pub fn use_gpu_kernels_on_cpu(on: bool) {
    GPU_KERNELS_ON_CPU.store(on, Ordering::SeqCst);
}

/// Whether tensors on `device` go through the GPU backend.
pub fn gpu_kernels(device: &Device) -> bool {
    !device.is_cpu() || GPU_KERNELS_ON_CPU.load(Ordering::Relaxed)
}

/// `x W^T` (`[.., in]` -> `[.., out]`).
pub fn matmul(w: &Matrix, x: &Tensor) -> Result<Tensor> {
    if gpu_kernels(x.device()) {
        gpu::matmul(w, x)
    } else {
        cpu::matmul(w, x)
    }
}

/// The routed experts of one MoE layer over `x` (`[tokens, hidden]`): each token through
/// its experts' gated MLP (`down(silu(gate x) * up x)`, weights stacked per expert),
/// weighted and summed back into its row. One call per layer: the grouped kernel.
pub fn grouped_experts(x: &Tensor, routing: &Routing, experts: &StackedMlp) -> Result<Tensor> {
    if gpu_kernels(x.device()) {
        gpu::experts::forward(x, routing, experts)
    } else {
        cpu::experts::forward(x, routing, experts)
    }
}

/// RMS norm of each row of `x` (its last dimension) with `weight` (f32), in f32 whatever
/// the compute dtype, as the reference implementations do.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    if gpu_kernels(x.device()) {
        gpu::rms_norm(x, weight, eps)
    } else {
        cpu::norm::rms_norm(x, weight, eps)
    }
}

/// `(x + residual, rms_norm(x + residual))`: the residual stream after a sublayer and the
/// next sublayer's input, in one pass over the rows.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    if gpu_kernels(x.device()) {
        let sum = (x + residual)?;
        let normed = gpu::rms_norm(&sum, weight, eps)?;
        Ok((sum, normed))
    } else {
        cpu::norm::add_rms_norm(x, residual, weight, eps)
    }
}

/// `x` (`[tokens, sum(widths)]`) cut into its column ranges, each `[tokens, width]`: the
/// parts of a fused projection.
pub fn split_columns(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    if gpu_kernels(x.device()) {
        gpu::split_columns(x, widths)
    } else {
        cpu::split_columns(x, widths)
    }
}

/// `silu(gate) * up` from a fused gate/up output (`[tokens, 2 * width]`, gate first).
pub fn swiglu(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    if gpu_kernels(gate_up.device()) {
        gpu::swiglu(gate_up, width)
    } else {
        cpu::rows::swiglu(gate_up, width)
    }
}

/// `silu(gate) * up` from separate gate and up outputs.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// Rotary position embedding of `x` (`[tokens, heads * head_dim]`): the first
/// `2 * cos.dims()[1]` elements of each head rotated by the angle of its token's position,
/// `cos` and `sin` the `[positions, rotary_dim / 2]` tables; pairs adjacent (`interleaved`)
/// or half a rotary width apart.
pub fn rotary(
    x: &Tensor,
    tables: (&Tensor, &Tensor),
    heads: usize,
    positions: &[usize],
    interleaved: bool,
) -> Result<Tensor> {
    if gpu_kernels(x.device()) {
        gpu::rotary(x, tables, heads, positions, interleaved)
    } else {
        cpu::rotary::rotate(x, tables, heads, positions, interleaved)
    }
}

/// Checks a rotary call's shapes (both backends' kernels start here) and returns the
/// head dimension and the number of rotated pairs per head.
pub(crate) fn check_rotary(
    x: &Tensor,
    cos: &Tensor,
    heads: usize,
    positions: &[usize],
) -> Result<(usize, usize)> {
    let (t, width) = x.dims2()?;
    let (max_positions, half) = cos.dims2()?;
    if t != positions.len() || heads == 0 || width % heads != 0 || 2 * half > width / heads {
        return Err(Error::InvalidBatch(format!(
            "rotary embedding of {t} tokens of {width} values in {heads} heads, {} positions, {half} pairs",
            positions.len()
        )));
    }
    if let Some(&p) = positions.iter().find(|&&p| p >= max_positions) {
        return Err(Error::InvalidBatch(format!(
            "position {p} is beyond the rotary table's {max_positions}"
        )));
    }
    Ok((width / heads, half))
}

/// Checks that a batch's keys and values fill exactly the cache rows of its `slots`
/// (both backends' writes start here).
pub(crate) fn check_kv_write(
    g: &AttnGeometry,
    slots: &[usize],
    (keys, values): (&Tensor, Option<&Tensor>),
) -> Result<()> {
    let rows = slots.len() * g.num_kv_heads;
    if keys.elem_count() != rows * g.head_dim || values.is_some_and(|v| v.elem_count() != rows * g.value_dim)
    {
        return Err(Error::InvalidBatch(format!(
            "keys/values of {} tokens do not fit the cache geometry {g:?}",
            slots.len()
        )));
    }
    Ok(())
}

/// Writes a batch's keys (`[tokens, kv_heads * head_dim]`) and values (`[tokens, kv_heads
/// * value_dim]`, or none for latent attention) into their cache slots.
pub fn write_kv(
    layer: &mut KvLayer,
    g: &AttnGeometry,
    slots: &[usize],
    kv: (&Tensor, Option<&Tensor>),
) -> Result<()> {
    match layer.keys {
        KvBuffer::Device(_) => gpu::attention::write_kv(layer, g, slots, kv),
        _ => cpu::attention::write_kv_tensors(layer, g, slots, kv),
    }
}

/// Causal attention of every query token (`q`: `[tokens, heads * head_dim]`) over its
/// sequence's cached positions, reading the cache in place through the block tables.
/// Returns `[tokens, heads * value_dim]` in f32.
pub fn paged_attention(q: &Tensor, layer: &KvLayer, seqs: &[AttnSeq], g: AttnGeometry) -> Result<Tensor> {
    match layer.keys {
        KvBuffer::Device(_) => gpu::attention::paged_attention(q, layer, seqs, g),
        _ => cpu::attention::attend_tensor(q, layer, seqs, g),
    }
}

/// The cached key vectors (`width` values each) at `slots`, as `[slots, width]` f32: the
/// reference form of latent attention reads its latents back this way.
pub fn read_kv(layer: &KvLayer, slots: &[usize], width: usize) -> Result<Tensor> {
    match layer.keys {
        KvBuffer::Device(_) => gpu::attention::read_keys(layer, slots, width),
        _ => cpu::attention::read_keys(layer, slots, width),
    }
}

/// A tensor's values on the host, in f32 (router scores, logits for sampling). On the
/// CPU a contiguous f32 tensor is read without a copy by [`with_host_f32`].
pub fn to_host(t: &Tensor) -> Result<Vec<f32>> {
    with_host_f32(t, |v| v.to_vec())
}

/// Runs `f` on a tensor's values on the host in f32: in place for a contiguous f32 CPU
/// tensor (a forward pass's logits), else after one copy.
pub fn with_host_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    match t.device() {
        Device::Cpu => cpu::host::with_f32(t, f),
        _ => {
            let v = t
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            Ok(f(&v))
        }
    }
}

/// Runs a forward pass (`f`) under the backend's execution policy: on the CPU, on a
/// worker of the thread pool with the other workers kept spinning for work until it
/// returns ([`cpu::pool::with_hot_workers`]).
pub fn forward_pass<R: Send>(device: &Device, f: impl FnOnce() -> R + Send) -> R {
    if gpu_kernels(device) {
        f()
    } else {
        cpu::pool::with_hot_workers(f)
    }
}

/// A zeroed KV buffer of `len` elements for `device`.
pub fn kv_buffer(device: &Device, dtype: crate::kv::KvDtype, len: usize) -> Result<KvBuffer> {
    if gpu_kernels(device) {
        KvBuffer::zeros_on(dtype, len, device)
    } else {
        Ok(KvBuffer::zeros(dtype, len))
    }
}
