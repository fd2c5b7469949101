//! Keeps rayon's other workers awake for the length of a forward pass.
//!
//! A forward pass is a chain of a few hundred short parallel sections (each matmul, the
//! attention of each layer, the experts of each MoE layer) separated by short serial
//! stretches (norms, rotary embeddings, residual adds). Between sections rayon's idle
//! workers yield, then go to sleep, and each section then waits for them to be woken
//! (futex calls and a trip through the scheduler), which at batch 1 costs as much as a
//! small matmul itself (docs/MEASUREMENTS.md). llama.cpp's thread pool spins for the same
//! reason. So for the duration of the pass,
//! every other worker runs a job that polls rayon for work and spins when there is none;
//! the work itself still goes through rayon (work stealing, nested parallelism), only
//! the idle threads stay hot.

use std::sync::atomic::{AtomicBool, Ordering};

/// Runs `f` on a rayon worker with the pool's other workers spinning for work until it
/// returns.
pub fn with_hot_workers<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    let threads = rayon::current_num_threads();
    if threads < 2 {
        return rayon::scope(|_| f());
    }
    let done = AtomicBool::new(false);
    rayon::scope(|s| {
        let owner = rayon::current_thread_index();
        for _ in 1..threads {
            let done = &done;
            s.spawn(move |_| {
                // A helper that the owner itself picks up (while it waits inside a
                // parallel section, or when the scope ends) must not spin on its own
                // thread: the owner is the one that would set `done`.
                if rayon::current_thread_index() == owner {
                    return;
                }
                let mut idle = 0u32;
                while !done.load(Ordering::Acquire) {
                    match rayon::yield_now() {
                        Some(rayon::Yield::Executed) => idle = 0,
                        _ => {
                            idle = idle.wrapping_add(1);
                            // Now and then let the OS run something else on this core
                            // (the server's I/O threads), as rayon's own idle loop does.
                            if idle.is_multiple_of(256) {
                                std::thread::yield_now();
                            } else {
                                std::hint::spin_loop();
                            }
                        }
                    }
                }
            });
        }
        let r = f();
        done.store(true, Ordering::Release);
        r
    })
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    /// Nested parallel work inside finishes with the right result, repeatedly, and the
    /// call returns (no helper is left spinning on the owner's thread).
    #[test]
    fn parallel_work_inside_completes() {
        for n in [0usize, 1, 7, 1000, 100_000] {
            let sum = with_hot_workers(|| (0..n).into_par_iter().map(|i| i as u64).sum::<u64>());
            assert_eq!(sum, (n as u64) * (n as u64).saturating_sub(1) / 2);
        }
        // Called from inside the pool as well as from outside it.
        let inner = rayon::scope(|_| with_hot_workers(|| with_hot_workers(|| 42)));
        assert_eq!(inner, 42);
    }
}
