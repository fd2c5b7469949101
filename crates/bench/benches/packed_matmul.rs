//! Throughput of the packed quantized matmul (`PackedQuantMatrix::matmul`, activation
//! quantization included) per GGUF format and token count, in multiply-adds per second.
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p moeserve-bench --bench packed_matmul -- [--rows 4096] [--cols 1024]
//!
//! One table per kernel set this CPU runs (or the one `MOESERVE_CPU` names), side by side
//! in one run. One thread gives the kernel's own rate; more threads show how row groups
//! spread. Few tokens are batch-1 decode and the experts of a MoE layer at moderate batch.
//!
//! `--tokens 1,8`, `--formats Q4_0,Q4K` and `--reps N` (exactly N calls per measurement,
//! instead of about 0.2 s, best of three) narrow a run: bench/neon-instructions.sh counts
//! the NEON kernels' instructions under emulation with one call each.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use moeserve_bench::measure::arg;
use moeserve_core::backend::cpu::quant::PackedQuantMatrix;
use moeserve_core::backend::Isa;

fn main() -> candle_core::Result<()> {
    let (rows, cols) = (arg("--rows", 4096), arg("--cols", 1024));
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (rows, cols), &dev)?;
    let list = |name: &str, default: &str| -> Vec<String> {
        arg::<String>(name, default.into())
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let tokens: Vec<usize> = list("--tokens", "1,2,4,8,16,64")
        .iter()
        .map(|t| t.parse().map_err(candle_core::Error::msg))
        .collect::<candle_core::Result<_>>()?;
    let formats: Vec<GgmlDType> = list("--formats", "Q4_0,Q4_1,Q8_0,Q4K,Q5K,Q6K")
        .iter()
        .map(|f| format_named(f).ok_or_else(|| candle_core::Error::msg(format!("unknown format {f}"))))
        .collect::<candle_core::Result<_>>()?;
    let reps = arg::<usize>("--reps", 0);
    let sets = match std::env::var("MOESERVE_CPU") {
        Ok(_) => vec![Isa::selected().map_err(candle_core::Error::msg)?],
        Err(_) => Isa::available(),
    };
    for isa in sets {
        table(isa, rows, cols, &w, &tokens, &formats, reps)?;
    }
    Ok(())
}

fn format_named(name: &str) -> Option<GgmlDType> {
    use GgmlDType::*;
    [Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K, Q3K, Q4K, Q5K, Q6K]
        .into_iter()
        .find(|d| {
            format!("{d:?}").eq_ignore_ascii_case(name)
                || format!("{d:?}")
                    .replace('_', "")
                    .eq_ignore_ascii_case(&name.replace('_', ""))
        })
}

fn table(
    isa: Isa,
    rows: usize,
    cols: usize,
    w: &Tensor,
    tokens: &[usize],
    formats: &[GgmlDType],
    fixed_reps: usize,
) -> candle_core::Result<()> {
    let dev = Device::Cpu;
    println!(
        "\n{}: [{rows} x {cols}] weights, {} threads; GMAC/s",
        isa.describe(),
        rayon::current_num_threads()
    );
    println!(
        "| format |{}\n|---|{}",
        tokens.iter().map(|t| format!(" t={t} |")).collect::<String>(),
        "---:|".repeat(tokens.len())
    );
    for &dtype in formats {
        let Some(m) = PackedQuantMatrix::from_qtensor(&QTensor::quantize(w, dtype)?, isa)
            .map_err(|e| candle_core::Error::msg(e.to_string()))?
        else {
            println!("| {dtype:?} | (candle's quantized matmul on this CPU) |");
            continue;
        };
        let mut row = format!("| {dtype:?} |");
        for &t in tokens {
            let x = Tensor::randn(0f32, 1.0, (t, cols), &dev)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // About 0.2 s of work per measurement at 100 GMAC/s; best of three.
            let reps = match fixed_reps {
                0 => (20_000_000_000 / (rows * cols * t)).clamp(2, 2000),
                n => n,
            };
            let mut best = f64::MAX;
            // On a pool thread, as in the model's forward pass: a parallel loop started
            // from outside the pool waits for a worker to wake, each call.
            rayon::scope(|_| {
                for _ in 0..if fixed_reps > 0 { 1 } else { 3 } {
                    let start = Instant::now();
                    for _ in 0..reps {
                        std::hint::black_box(m.matmul(&x).expect("matmul"));
                    }
                    best = best.min(start.elapsed().as_secs_f64() / reps as f64);
                }
            });
            row.push_str(&format!(" {:.0} |", (rows * cols * t) as f64 / best / 1e9));
        }
        println!("{row}");
    }
    Ok(())
}
