//! Throughput of the packed quantized matmul (`PackedQuantMatrix::matmul`, activation
//! quantization included) per GGUF format and token count, in multiply-adds per second.
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p moeserve-bench --bench packed_matmul -- [--rows 4096] [--cols 1024]
//!
//! One table per kernel set this CPU runs (or the one `MOESERVE_CPU` names), side by side
//! in one run. One thread gives the kernel's own rate; more threads show how row groups
//! spread. Few tokens are batch-1 decode and the experts of a MoE layer at moderate batch.

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
    let tokens = [1usize, 2, 4, 8, 16, 64];
    let sets = match std::env::var("MOESERVE_CPU") {
        Ok(_) => vec![Isa::selected().map_err(candle_core::Error::msg)?],
        Err(_) => Isa::available(),
    };
    for isa in sets {
        table(isa, rows, cols, &w, &tokens)?;
    }
    Ok(())
}

fn table(isa: Isa, rows: usize, cols: usize, w: &Tensor, tokens: &[usize]) -> candle_core::Result<()> {
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
    for dtype in [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q8_0,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
    ] {
        let m = PackedQuantMatrix::from_qtensor(&QTensor::quantize(w, dtype)?, isa)
            .expect("a packable matrix")
            .expect("a packed format");
        let mut row = format!("| {dtype:?} |");
        for &t in tokens {
            let x = Tensor::randn(0f32, 1.0, (t, cols), &dev)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // About 0.2 s of work per measurement at 100 GMAC/s; best of three.
            let reps = (20_000_000_000 / (rows * cols * t)).clamp(2, 2000);
            let mut best = f64::MAX;
            // On a pool thread, as in the model's forward pass: a parallel loop started
            // from outside the pool waits for a worker to wake, each call.
            rayon::scope(|_| {
                for _ in 0..3 {
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
