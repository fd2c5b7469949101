//! Rotary position embedding over host rows: a table lookup per token (each token of a
//! mixed batch has its own position), the rotation written straight into a new buffer.

use candle_core::Tensor;

use super::host::with_f32;
use crate::error::Result;

/// `x` (`[tokens, heads * head_dim]`) rotated: in each head, the first `2 * half` values
/// as `half` pairs (adjacent when `interleaved`, else `half` apart), by the angles of row
/// `positions[t]` of the `[positions, half]` cos/sin tables. Values past the rotary part
/// are copied.
pub(crate) fn rotate(
    x: &Tensor,
    (cos, sin): (&Tensor, &Tensor),
    heads: usize,
    positions: &[usize],
    interleaved: bool,
) -> Result<Tensor> {
    let (head_dim, half) = crate::backend::check_rotary(x, cos, heads, positions)?;
    let t = positions.len();
    let out = with_f32(cos, |cos| {
        with_f32(sin, |sin| {
            with_f32(x, |x| {
                let mut out = x.to_vec();
                for (tok, &pos) in positions.iter().enumerate() {
                    let (cos, sin) = (
                        &cos[pos * half..(pos + 1) * half],
                        &sin[pos * half..(pos + 1) * half],
                    );
                    for h in 0..heads {
                        let head = &mut out[(tok * heads + h) * head_dim..][..head_dim];
                        if interleaved {
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
                out
            })
        })
    })???;
    Ok(Tensor::from_vec(out, (t, heads * head_dim), x.device())?)
}
