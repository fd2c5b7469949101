//! The kernel interface: every computation a layer does that is not a plain tensor
//! operation (reshape, narrow, cat, a dense matmul of candle's) goes through a method of
//! [`Backend`], the value a model chooses once at load and each of its layers carries.
//! Layers hold their weights in the types defined here ([`Matrix`], [`StackedMatrix`])
//! and never look at dtypes or instruction sets.
//!
//! Two backends:
//! - [`cpu`]: hand-written kernels on host memory in one of several kernel sets
//!   ([`Isa`]: AVX-512, AVX2, NEON, portable), and the thread-pool policy of a forward
//!   pass;
//! - [`gpu`]: candle's tensor ops, which candle runs on an NVIDIA GPU with cuBLAS and its
//!   own CUDA kernels (built with `--features cuda`). Its weights, activations and KV
//!   storage live on the device; what must come back to the host (router scores,
//!   logits) comes back through [`to_host`], by name, never by a silent copy. It is
//!   device-generic, so it also runs on the CPU (load a model with [`Backend::Gpu`] on
//!   the CPU device): that is how CI, which has no GPU, checks its code against the
//!   reference fixtures.
//!
//! What is data rather than a choice (where a KV pool's blocks live, which form a weight
//! took at load) is read from the data.

pub mod cpu;
pub mod gpu;
mod matrix;
#[cfg(test)]
pub(crate) mod test_util;

use candle_core::{Device, Tensor};

pub use cpu::attention::{AttnGeometry, AttnSeq};
pub use cpu::isa::Isa;
pub use cpu::kv_buffer::KvBuffer;
pub use matrix::{Matrix, Routing, StackedMatrix, StackedMlp};

use crate::error::{Error, Result};
use crate::kv::KvLayer;

/// Which kernels a model runs, chosen once when it loads and carried by every layer (the
/// weights take that backend's form at load, and the KV pool its backend's buffers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The hand-written kernels on host memory, in one kernel set.
    Cpu(Isa),
    /// candle's device-generic ops: on a GPU; or on the CPU, which is how CI (no GPU)
    /// checks the GPU backend's code against the reference fixtures.
    Gpu,
}

impl Backend {
    /// The default for tensors on `device`: the GPU backend on a GPU, else the CPU's
    /// kernel set for this process ([`Isa::selected`]: `MOESERVE_CPU`, or the best the
    /// CPU has). An unknown or unsupported `MOESERVE_CPU` is an error that says so.
    pub fn for_device(device: &Device) -> Result<Backend> {
        if !device.is_cpu() {
            return Ok(Backend::Gpu);
        }
        Isa::selected().map(Backend::Cpu).map_err(Error::Backend)
    }

    /// What logs and metrics call it: `cpu (avx2)`, `cpu (neon (dotprod, i8mm))`, `gpu`.
    pub fn describe(self) -> String {
        match self {
            Backend::Cpu(isa) => format!("cpu ({})", isa.describe()),
            Backend::Gpu => "gpu".to_string(),
        }
    }

    /// The CPU kernel set, for the CPU backend.
    pub fn isa(self) -> Option<Isa> {
        match self {
            Backend::Cpu(isa) => Some(isa),
            Backend::Gpu => None,
        }
    }

    /// `x W^T` (`[.., in]` -> `[.., out]`).
    pub fn matmul(self, w: &Matrix, x: &Tensor) -> Result<Tensor> {
        match self {
            Backend::Cpu(isa) => cpu::matmul(isa, w, x),
            Backend::Gpu => gpu::matmul(w, x),
        }
    }

    /// The routed experts of one MoE layer over `x` (`[tokens, hidden]`): each token
    /// through its experts' gated MLP (`down(silu(gate x) * up x)`, weights stacked per
    /// expert), weighted and summed back into its row. One call per layer: the grouped
    /// kernel.
    pub fn grouped_experts(self, x: &Tensor, routing: &Routing, experts: &StackedMlp) -> Result<Tensor> {
        match self {
            Backend::Cpu(isa) => cpu::experts::forward(isa, x, routing, experts),
            Backend::Gpu => gpu::experts::forward(x, routing, experts),
        }
    }

    /// RMS norm of each row of `x` (its last dimension) with `weight` (f32), in f32
    /// whatever the compute dtype, as the reference implementations do.
    pub fn rms_norm(self, x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
        match self {
            Backend::Cpu(isa) => cpu::norm::rms_norm(isa, x, weight, eps),
            Backend::Gpu => gpu::rms_norm(x, weight, eps),
        }
    }

    /// `(x + residual, rms_norm(x + residual))`: the residual stream after a sublayer and
    /// the next sublayer's input, in one pass over the rows.
    pub fn add_rms_norm(
        self,
        x: &Tensor,
        residual: &Tensor,
        weight: &Tensor,
        eps: f32,
    ) -> Result<(Tensor, Tensor)> {
        match self {
            Backend::Cpu(isa) => cpu::norm::add_rms_norm(isa, x, residual, weight, eps),
            Backend::Gpu => {
                let sum = (x + residual)?;
                let normed = gpu::rms_norm(&sum, weight, eps)?;
                Ok((sum, normed))
            }
        }
    }

    /// `x` (`[tokens, sum(widths)]`) cut into its column ranges, each `[tokens, width]`:
    /// the parts of a fused projection.
    pub fn split_columns(self, x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
        match self {
            Backend::Cpu(_) => cpu::split_columns(x, widths),
            Backend::Gpu => gpu::split_columns(x, widths),
        }
    }

    /// `silu(gate) * up` from a fused gate/up output (`[tokens, 2 * width]`, gate first).
    pub fn swiglu(self, gate_up: &Tensor, width: usize) -> Result<Tensor> {
        match self {
            Backend::Cpu(isa) => cpu::rows::swiglu(isa, gate_up, width),
            Backend::Gpu => gpu::swiglu(gate_up, width),
        }
    }

    /// `silu(gate) * up` from separate gate and up outputs.
    pub fn silu_mul(self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        Ok((gate.silu()? * up)?)
    }

    /// Rotary position embedding of `x` (`[tokens, heads * head_dim]`): the first
    /// `2 * cos.dims()[1]` elements of each head rotated by the angle of its token's
    /// position, `cos` and `sin` the `[positions, rotary_dim / 2]` tables; pairs adjacent
    /// (`interleaved`) or half a rotary width apart.
    pub fn rotary(
        self,
        x: &Tensor,
        tables: (&Tensor, &Tensor),
        heads: usize,
        positions: &[usize],
        interleaved: bool,
    ) -> Result<Tensor> {
        match self {
            Backend::Cpu(_) => cpu::rotary::rotate(x, tables, heads, positions, interleaved),
            Backend::Gpu => gpu::rotary(x, tables, heads, positions, interleaved),
        }
    }

    /// Causal attention of every query token (`q`: `[tokens, heads * head_dim]`) over its
    /// sequence's cached positions, reading the cache in place through the block tables.
    /// Returns `[tokens, heads * value_dim]` in f32.
    pub fn paged_attention(
        self,
        q: &Tensor,
        layer: &KvLayer,
        seqs: &[AttnSeq],
        g: AttnGeometry,
    ) -> Result<Tensor> {
        match (self, &layer.keys) {
            (Backend::Cpu(isa), KvBuffer::F32(_) | KvBuffer::F16(_)) => {
                cpu::attention::attend_tensor(isa, q, layer, seqs, g)
            }
            (Backend::Gpu, KvBuffer::Device(_)) => gpu::attention::paged_attention(q, layer, seqs, g),
            _ => Err(Error::Backend(format!(
                "the {} backend's attention over a KV pool of another backend",
                self.describe()
            ))),
        }
    }

    /// Runs a forward pass (`f`) under the backend's execution policy: on the CPU, on a
    /// worker of the thread pool with the other workers kept spinning for work until it
    /// returns ([`cpu::pool::with_hot_workers`]).
    pub fn forward_pass<R: Send>(self, f: impl FnOnce() -> R + Send) -> R {
        match self {
            Backend::Cpu(_) => cpu::pool::with_hot_workers(f),
            Backend::Gpu => f(),
        }
    }

    /// A zeroed KV buffer of `len` elements for this backend's kernels on `device`.
    pub fn kv_buffer(self, device: &Device, dtype: crate::kv::KvDtype, len: usize) -> Result<KvBuffer> {
        match self {
            Backend::Cpu(_) => Ok(KvBuffer::zeros(dtype, len)),
            Backend::Gpu => KvBuffer::zeros_on(dtype, len, device),
        }
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
