//! Attention over the paged KV cache in tensor ops.
//!
//! The cache of a layer is one flat device tensor laid out `[block][kv head][slot in
//! block][dim]`: every cached vector is a row, so a batch's keys and values go into their
//! slots with one row scatter, and a sequence's cache comes out of the pool as whole
//! blocks with one gather along the block dimension. (The CPU kernel keeps keys
//! transposed within a block for its SIMD lanes; the disk tier keys the two layouts
//! apart.) Each sequence then attends with two batched matmuls over its key/value heads,
//! its query heads grouped per key/value head.

use candle_core::{DType, Tensor};

use super::super::{AttnGeometry, AttnSeq, KvBuffer};
use crate::error::{Error, Result};
use crate::kv::KvLayer;

fn device_buffer(b: &KvBuffer) -> Result<&Tensor> {
    b.device_tensor()
        .ok_or_else(|| Error::Backend("a host KV buffer reached the GPU backend".into()))
}

/// The row of the cache (`[block][head][slot][dim]` as `[rows, dim]`) that holds head
/// `h` of cache slot `slot`.
fn row(g: &AttnGeometry, slot: usize, h: usize) -> u32 {
    let (block, at) = (slot / g.block_size, slot % g.block_size);
    ((block * g.num_kv_heads + h) * g.block_size + at) as u32
}

/// Writes a batch's keys (`[T, num_kv_heads * head_dim]`) and values (likewise with
/// `value_dim`, or none for latent attention) into their cache slots.
pub(crate) fn write_kv(
    layer: &mut KvLayer,
    g: &AttnGeometry,
    slots: &[usize],
    (keys, values): (&Tensor, Option<&Tensor>),
) -> Result<()> {
    crate::backend::check_kv_write(g, slots, (keys, values))?;
    let ids: Vec<u32> = slots
        .iter()
        .flat_map(|&slot| (0..g.num_kv_heads).map(move |h| row(g, slot, h)))
        .collect();
    scatter_rows(device_buffer(&layer.keys)?, keys, &ids, g.head_dim)?;
    if let Some(values) = values {
        scatter_rows(device_buffer(&layer.values)?, values, &ids, g.value_dim)?;
    }
    Ok(())
}

/// `buffer` viewed as rows of `dim`: row `rows[i]` := row `i` of `src`.
fn scatter_rows(buffer: &Tensor, src: &Tensor, rows: &[u32], dim: usize) -> Result<()> {
    let total = buffer.elem_count() / dim;
    if let Some(&bad) = rows.iter().find(|&&r| r as usize >= total) {
        return Err(Error::InvalidBatch(format!(
            "cache row {bad} is outside the layer's {total}"
        )));
    }
    let n = rows.len();
    // A view of the same storage: the scatter writes into the pool itself.
    let table = buffer.reshape((total, dim))?;
    let src = src.reshape((n, dim))?.to_dtype(buffer.dtype())?.contiguous()?;
    let ids = Tensor::from_vec(rows.to_vec(), (n, 1), buffer.device())?
        .broadcast_as((n, dim))?
        .contiguous()?;
    table.scatter_set(&ids, &src, 0)?;
    Ok(())
}

/// Causal attention of every query token (`q`: `[T, num_heads * head_dim]`) over its
/// sequence's cached positions; `[T, num_heads * value_dim]` in f32.
///
/// The one-token sequences of the batch (decodes) attend together: their blocks are
/// gathered into one padded batch and masked past each one's length, a fixed handful of
/// launches whatever the batch size. Each longer sequence (a prompt chunk) attends on its
/// own, causal within the chunk.
pub(crate) fn paged_attention(
    q: &Tensor,
    layer: &KvLayer,
    seqs: &[AttnSeq],
    g: AttnGeometry,
) -> Result<Tensor> {
    let t: usize = seqs.iter().map(|s| s.len).sum();
    if q.elem_count() != t * g.num_heads * g.head_dim
        || g.num_kv_heads == 0
        || !g.num_heads.is_multiple_of(g.num_kv_heads)
    {
        return Err(Error::InvalidBatch(format!(
            "a query of {} values for {t} tokens of geometry {g:?}",
            q.elem_count()
        )));
    }
    let cache = CacheView::new(layer, &g)?;
    let q = q.to_dtype(DType::F32)?.reshape((t, g.num_heads * g.head_dim))?;
    let mut next_token = 0;
    for s in seqs {
        if s.first_token != next_token {
            return Err(Error::InvalidBatch(format!(
                "sequences out of order: one starts at token {}, expected {next_token}",
                s.first_token
            )));
        }
        next_token += s.len;
        let n = s.start_pos + s.len;
        let table = s.block_table.get(..n.div_ceil(g.block_size)).ok_or_else(|| {
            Error::InvalidBatch(format!(
                "{n} positions need {} blocks, the table has {}",
                n.div_ceil(g.block_size),
                s.block_table.len()
            ))
        })?;
        if let Some(&bad) = table.iter().find(|&&b| b as usize >= cache.num_blocks) {
            return Err(Error::InvalidBatch(format!(
                "block id {bad} is outside the pool of {} blocks",
                cache.num_blocks
            )));
        }
    }
    let (decodes, chunks): (Vec<&AttnSeq>, Vec<&AttnSeq>) = seqs.iter().partition(|s| s.len == 1);
    // Outputs in the order computed (the decodes' rows, then each chunk's), and the token
    // each row belongs to, to put them back in batch order with one gather.
    let mut parts = Vec::with_capacity(chunks.len() + 1);
    let mut order: Vec<u32> = Vec::with_capacity(t);
    if !decodes.is_empty() {
        parts.push(cache.attend_decodes(&q, &decodes)?);
        order.extend(decodes.iter().map(|s| s.first_token as u32));
    }
    for s in &chunks {
        parts.push(cache.attend_chunk(&q, s)?);
        order.extend(s.first_token as u32..(s.first_token + s.len) as u32);
    }
    let out = Tensor::cat(&parts, 0)?;
    if order.iter().enumerate().all(|(i, &tok)| i == tok as usize) {
        return Ok(out);
    }
    // Row r of the output is the computed row that belongs to token r.
    let mut inverse = vec![0u32; t];
    for (row, &tok) in order.iter().enumerate() {
        inverse[tok as usize] = row as u32;
    }
    Ok(out.index_select(&Tensor::from_vec(inverse, t, q.device())?, 0)?)
}

/// `[1, width]`: 0, 1, .. `width - 1` (cache positions), made on the device.
fn position_row(width: usize, device: &candle_core::Device) -> Result<Tensor> {
    Ok(Tensor::arange(0u32, width as u32, device)?.reshape((1, width))?)
}

/// 0 where `visible` is 1, -1e30 where it is 0: added to the scores, the hidden
/// positions get no weight (the mask is built on the device, nothing uploaded).
fn additive_mask(visible: &Tensor) -> Result<Tensor> {
    Ok(visible.to_dtype(DType::F32)?.affine(1e30, -1e30)?)
}

/// A layer's cache as blocks: `[blocks, kv heads, block size, dim]` views of the keys
/// and (unless read from the keys) the values.
struct CacheView<'a> {
    g: &'a AttnGeometry,
    num_blocks: usize,
    keys: Tensor,
    values: Option<Tensor>,
}

impl<'a> CacheView<'a> {
    fn new(layer: &KvLayer, g: &'a AttnGeometry) -> Result<Self> {
        let (nkv, bs) = (g.num_kv_heads, g.block_size);
        let keys = device_buffer(&layer.keys)?;
        let num_blocks = keys.elem_count() / (nkv * bs * g.head_dim);
        Ok(Self {
            g,
            num_blocks,
            keys: keys.reshape((num_blocks, nkv, bs, g.head_dim))?,
            values: match g.value_offset {
                None => Some(device_buffer(&layer.values)?.reshape((num_blocks, nkv, bs, g.value_dim))?),
                Some(_) => None,
            },
        })
    }

    /// Keys and values of `seqs` blocks each (`ids`: `[seqs * blocks]`), as `[seqs * kv
    /// heads, blocks * block size, dim]` in f32.
    fn gather(&self, ids: &[u32], seqs: usize) -> Result<(Tensor, Tensor)> {
        let (g, nkv) = (self.g, self.g.num_kv_heads);
        let nb = ids.len() / seqs;
        let ids = Tensor::from_vec(ids.to_vec(), ids.len(), self.keys.device())?;
        let take = |blocks: &Tensor, dim: usize| -> Result<Tensor> {
            Ok(blocks
                .index_select(&ids, 0)?
                .reshape((seqs, nb, nkv, g.block_size, dim))?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((seqs * nkv, nb * g.block_size, dim))?
                .to_dtype(DType::F32)?)
        };
        let k = take(&self.keys, g.head_dim)?;
        let v = match (&self.values, g.value_offset) {
            (Some(values), _) => take(values, g.value_dim)?,
            (None, Some(offset)) => k.narrow(2, offset, g.value_dim)?.contiguous()?,
            (None, None) => unreachable!("values are stored unless read from the keys"),
        };
        Ok((k, v))
    }

    /// `softmax(q k^T * scale + mask) v` for query rows grouped `[batch, rows, dim]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let scores = (q.matmul(&k.t()?)? * self.g.scale as f64)?.broadcast_add(mask)?;
        Ok(candle_nn::ops::softmax_last_dim(&scores)?.matmul(v)?)
    }

    /// One-token sequences together: `[decodes, heads * value_dim]`, in `decodes`' order.
    fn attend_decodes(&self, q: &Tensor, decodes: &[&AttnSeq]) -> Result<Tensor> {
        let g = self.g;
        let (nkv, group, d) = (g.num_kv_heads, g.num_heads / g.num_kv_heads, decodes.len());
        let lens: Vec<usize> = decodes.iter().map(|s| s.start_pos + 1).collect();
        let nb = lens.iter().max().copied().unwrap_or(1).div_ceil(g.block_size);
        // Padded with block 0 (any block does: the mask hides it).
        let mut ids = vec![0u32; d * nb];
        for (i, (s, &n)) in decodes.iter().zip(&lens).enumerate() {
            let used = n.div_ceil(g.block_size);
            ids[i * nb..][..used].copy_from_slice(&s.block_table[..used]);
        }
        let (k, v) = self.gather(&ids, d)?;
        let rows: Vec<u32> = decodes.iter().map(|s| s.first_token as u32).collect();
        let qs = q
            .index_select(&Tensor::from_vec(rows, d, q.device())?, 0)?
            .reshape((d * nkv, group, g.head_dim))?;
        let width = nb * g.block_size;
        let lens: Vec<u32> = lens.iter().map(|&n| n as u32).collect();
        let lens = Tensor::from_vec(lens, (d, 1), q.device())?;
        let mask = additive_mask(&position_row(width, q.device())?.broadcast_lt(&lens)?)?
            .reshape((d, 1, 1, width))?
            .broadcast_as((d, nkv, 1, width))?
            .reshape((d * nkv, 1, width))?;
        Ok(self
            .attend(&qs, &k, &v, &mask)?
            .reshape((d, g.num_heads * g.value_dim))?)
    }

    /// One prompt chunk, causal within itself: `[len, heads * value_dim]`.
    fn attend_chunk(&self, q: &Tensor, s: &AttnSeq) -> Result<Tensor> {
        let g = self.g;
        let (nkv, group) = (g.num_kv_heads, g.num_heads / g.num_kv_heads);
        let n = s.start_pos + s.len;
        let nb = n.div_ceil(g.block_size);
        let (k, v) = self.gather(&s.block_table[..nb], 1)?;
        // Query heads grouped by their key/value head: `[kv heads, group * tokens, dim]`.
        let qs = q
            .narrow(0, s.first_token, s.len)?
            .reshape((s.len, nkv, group, g.head_dim))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((nkv, group * s.len, g.head_dim))?;
        // Token i sees positions up to start_pos + i (and none of the padding past n).
        let width = nb * g.block_size;
        let last_seen = Tensor::arange(s.start_pos as u32, n as u32, q.device())?.reshape((s.len, 1))?;
        let mask = additive_mask(&position_row(width, q.device())?.broadcast_le(&last_seen)?)?
            .unsqueeze(0)?
            .broadcast_as((group, s.len, width))?
            .reshape((1, group * s.len, width))?;
        Ok(self
            .attend(&qs, &k, &v, &mask)?
            .reshape((nkv, group, s.len, g.value_dim))?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((s.len, g.num_heads * g.value_dim))?)
    }
}

/// The cached vectors (`width` values each) at `slots` of a one-head cache (latent
/// attention's), as `[slots, width]` in f32.
pub(crate) fn read_keys(layer: &KvLayer, slots: &[usize], width: usize) -> Result<Tensor> {
    let keys = device_buffer(&layer.keys)?;
    let total = keys.elem_count() / width;
    if let Some(&bad) = slots.iter().find(|&&s| s >= total) {
        return Err(Error::InvalidBatch(format!(
            "cache slot {bad} is outside the layer"
        )));
    }
    let ids: Vec<u32> = slots.iter().map(|&s| s as u32).collect();
    let ids = Tensor::from_vec(ids, slots.len(), keys.device())?;
    Ok(keys
        .reshape((total, width))?
        .index_select(&ids, 0)?
        .to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_util::{max_diff, random_values as random};
    use crate::kv::KvDtype;
    use candle_core::Device;

    fn layers(g: &AttnGeometry, blocks: usize, dtype: KvDtype) -> (KvLayer, KvLayer) {
        let slots = blocks * g.block_size * g.num_kv_heads;
        let values = if g.value_offset.is_some() { 0 } else { g.value_dim };
        let host = KvLayer {
            keys: KvBuffer::zeros(dtype, slots * g.head_dim),
            values: KvBuffer::zeros(dtype, slots * values),
        };
        let device = KvLayer {
            keys: KvBuffer::zeros_on(dtype, slots * g.head_dim, &Device::Cpu).unwrap(),
            values: KvBuffer::zeros_on(dtype, slots * values, &Device::Cpu).unwrap(),
        };
        (host, device)
    }

    /// A mixed batch (a prompt chunk after a cached prefix, decodes, a fresh prompt)
    /// written and attended by both backends gives the same output, for grouped-query
    /// attention and for latent attention (values read from the keys), in f32 and f16.
    #[test]
    fn attention_matches_the_cpu_kernel() {
        let gqa = AttnGeometry {
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            value_dim: 16,
            block_size: 4,
            value_offset: None,
            scale: 0.25,
        };
        let latent = AttnGeometry {
            num_heads: 3,
            num_kv_heads: 1,
            head_dim: 12,
            value_dim: 8,
            block_size: 4,
            value_offset: Some(4),
            scale: 0.3,
        };
        for g in [gqa, latent] {
            for dtype in [KvDtype::F32, KvDtype::F16] {
                let (mut host, mut device) = layers(&g, 16, dtype);
                // (table, cached positions, new tokens)
                // Decodes (one new token) interleaved with prompt chunks: the decodes
                // attend as one padded batch, the chunks one by one.
                let seqs_spec: [(Vec<u32>, usize, usize); 5] = [
                    (vec![3, 9, 1], 5, 4),
                    (vec![7, 2], 6, 1),
                    (vec![12, 0, 5, 14], 0, 13),
                    (vec![4, 6, 8, 10], 14, 1),
                    (vec![11], 0, 1),
                ];
                // Fill the cached prefixes first, then the batch.
                for step in 0..2 {
                    let mut slots = Vec::new();
                    let mut seqs = Vec::new();
                    for (table, cached, new) in &seqs_spec {
                        let (start, len) = if step == 0 { (0, *cached) } else { (*cached, *new) };
                        if len == 0 {
                            continue;
                        }
                        seqs.push(AttnSeq {
                            first_token: slots.len(),
                            len,
                            start_pos: start,
                            block_table: table,
                        });
                        for p in start..start + len {
                            slots.push(table[p / g.block_size] as usize * g.block_size + p % g.block_size);
                        }
                    }
                    let t = slots.len();
                    let k = Tensor::from_vec(
                        random(t * g.num_kv_heads * g.head_dim, 11 + step),
                        (t, g.num_kv_heads * g.head_dim),
                        &Device::Cpu,
                    )
                    .unwrap();
                    let v = Tensor::from_vec(
                        random(t * g.num_kv_heads * g.value_dim, 12 + step),
                        (t, g.num_kv_heads * g.value_dim),
                        &Device::Cpu,
                    )
                    .unwrap();
                    let v = g.value_offset.is_none().then_some(&v);
                    crate::backend::cpu::attention::write_kv_tensors(&mut host, &g, &slots, (&k, v)).unwrap();
                    write_kv(&mut device, &g, &slots, (&k, v)).unwrap();
                    let q = Tensor::from_vec(
                        random(t * g.num_heads * g.head_dim, 13 + step),
                        (t, g.num_heads * g.head_dim),
                        &Device::Cpu,
                    )
                    .unwrap();
                    let want = crate::backend::cpu::attention::attend_tensor(
                        crate::backend::Isa::best(),
                        &q,
                        &host,
                        &seqs,
                        g,
                    )
                    .unwrap();
                    let got = paged_attention(&q, &device, &seqs, g).unwrap();
                    let diff = max_diff(&want, &got);
                    assert!(diff < 1e-5, "{g:?} {dtype:?} step {step}: {diff}");
                }
                if g.value_offset.is_some() {
                    let slots = [13usize, 0, 37];
                    let want = crate::backend::cpu::attention::read_keys(&host, &slots, g.head_dim).unwrap();
                    let got = read_keys(&device, &slots, g.head_dim).unwrap();
                    assert_eq!(want.to_vec2::<f32>().unwrap(), got.to_vec2::<f32>().unwrap());
                }
            }
        }
    }

    /// Bad batches are errors, not panics: a block outside the pool, a short table.
    #[test]
    fn bad_batches_are_errors() {
        let g = AttnGeometry {
            num_heads: 2,
            num_kv_heads: 1,
            head_dim: 4,
            value_dim: 4,
            block_size: 4,
            value_offset: None,
            scale: 0.5,
        };
        let (_, device) = layers(&g, 2, KvDtype::F32);
        let q = Tensor::zeros((1, 8), DType::F32, &Device::Cpu).unwrap();
        for table in [vec![5u32], vec![], vec![2]] {
            let seqs = [AttnSeq {
                first_token: 0,
                len: 1,
                start_pos: 2,
                block_table: &table,
            }];
            assert!(paged_attention(&q, &device, &seqs, g).is_err());
        }
    }
}
