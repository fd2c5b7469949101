//! The kernel interface: every computation a layer does that is not a plain tensor
//! operation (reshape, narrow, cat, a dense matmul of candle's) goes through a function
//! here, which runs the kernel for the device its inputs live on. Layers hold their
//! weights in the types defined here ([`Matrix`], [`StackedMatrix`]) and never look at
//! dtypes or instruction sets.
//!
//! Only the CPU backend exists ([`cpu`]: hand-written kernels on host memory, and the
//! thread-pool policy of a forward pass). A GPU backend is a sibling folder with the same
//! functions, chosen in the `match`es below; its KV storage, weights and activations live
//! on its device, and what must come back to the host (router scores, logits) comes back
//! through [`to_host`], by name, never by a silent copy.

pub mod cpu;
mod matrix;

use candle_core::{Device, Tensor};

pub use cpu::attention::{AttnGeometry, AttnSeq};
pub use cpu::kv_buffer::KvBuffer;
pub use matrix::{Matrix, Routing, StackedMatrix, StackedMlp};

use crate::error::{Error, Result};
use crate::kv::KvLayer;

/// The error for a kernel that `device` has no implementation of.
fn no_kernel(op: &str, device: &Device) -> Error {
    Error::Backend(format!(
        "no {op} kernel for device {device:?} (only the CPU backend is built)"
    ))
}

/// `x W^T` (`[.., in]` -> `[.., out]`).
pub fn matmul(w: &Matrix, x: &Tensor) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => cpu::matmul(w, x),
        other => Err(no_kernel("matmul", other)),
    }
}

/// The routed experts of one MoE layer over `x` (`[tokens, hidden]`): each token through
/// its experts' gated MLP (`down(silu(gate x) * up x)`, weights stacked per expert),
/// weighted and summed back into its row. One call per layer: the grouped kernel.
pub fn grouped_experts(x: &Tensor, routing: &Routing, experts: &StackedMlp) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => cpu::experts::forward(x, routing, experts),
        other => Err(no_kernel("grouped experts", other)),
    }
}

/// RMS norm of each row of `x` (its last dimension) with `weight` (f32), in f32 whatever
/// the compute dtype, as the reference implementations do.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    match x.device() {
        Device::Cpu => cpu::norm::rms_norm(x, weight, eps),
        other => Err(no_kernel("rms_norm", other)),
    }
}

/// `(x + residual, rms_norm(x + residual))`: the residual stream after a sublayer and the
/// next sublayer's input, in one pass over the rows.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    match x.device() {
        Device::Cpu => cpu::norm::add_rms_norm(x, residual, weight, eps),
        other => Err(no_kernel("add_rms_norm", other)),
    }
}

/// `x` (`[tokens, sum(widths)]`) cut into its column ranges, each `[tokens, width]`: the
/// parts of a fused projection.
pub fn split_columns(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    match x.device() {
        Device::Cpu => cpu::split_columns(x, widths),
        other => Err(no_kernel("split_columns", other)),
    }
}

/// `silu(gate) * up` from a fused gate/up output (`[tokens, 2 * width]`, gate first).
pub fn swiglu(gate_up: &Tensor, width: usize) -> Result<Tensor> {
    match gate_up.device() {
        Device::Cpu => cpu::rows::swiglu(gate_up, width),
        other => Err(no_kernel("swiglu", other)),
    }
}

/// `silu(gate) * up` from separate gate and up outputs.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    match gate.device() {
        Device::Cpu => Ok((gate.silu()? * up)?),
        other => Err(no_kernel("silu_mul", other)),
    }
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
    match x.device() {
        Device::Cpu => cpu::rotary::rotate(x, tables, heads, positions, interleaved),
        other => Err(no_kernel("rotary", other)),
    }
}

/// Writes a batch's keys (`[tokens, kv_heads * head_dim]`) and values (`[tokens, kv_heads
/// * value_dim]`, or none for latent attention) into their cache slots.
pub fn write_kv(
    layer: &mut KvLayer,
    g: &AttnGeometry,
    slots: &[usize],
    kv: (&Tensor, Option<&Tensor>),
) -> Result<()> {
    match kv.0.device() {
        Device::Cpu => cpu::attention::write_kv_tensors(layer, g, slots, kv),
        other => Err(no_kernel("write_kv", other)),
    }
}

/// Causal attention of every query token (`q`: `[tokens, heads * head_dim]`) over its
/// sequence's cached positions, reading the cache in place through the block tables.
/// Returns `[tokens, heads * value_dim]` in f32.
pub fn paged_attention(q: &Tensor, layer: &KvLayer, seqs: &[AttnSeq], g: AttnGeometry) -> Result<Tensor> {
    match q.device() {
        Device::Cpu => cpu::attention::attend_tensor(q, layer, seqs, g),
        other => Err(no_kernel("paged_attention", other)),
    }
}

/// The cached key vectors (`width` values each) at `slots`, as `[slots, width]` f32: the
/// reference form of latent attention reads its latents back this way.
pub fn read_kv(layer: &KvLayer, slots: &[usize], width: usize, device: &Device) -> Result<Tensor> {
    match device {
        Device::Cpu => cpu::attention::read_keys(layer, slots, width),
        other => Err(no_kernel("read_kv", other)),
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
    match device {
        Device::Cpu => cpu::pool::with_hot_workers(f),
        _ => f(),
    }
}

/// A zeroed KV buffer of `len` elements for `device`.
pub fn kv_buffer(device: &Device, dtype: crate::kv::KvDtype, len: usize) -> Result<KvBuffer> {
    match device {
        Device::Cpu => Ok(KvBuffer::zeros(dtype, len)),
        other => Err(no_kernel("KV storage", other)),
    }
}
