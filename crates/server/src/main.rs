//! The `moeserve` command line.

mod cli;
mod error;
mod loadgen;
mod metrics;
mod openai;
mod routes;
mod server;
mod settings;

fn main() -> std::process::ExitCode {
    // candle runs large elementwise ops on a pool of its own whose idle threads spin
    // (25k iterations) before parking; next to rayon's pool, which already has a thread
    // per core for the matmuls and attention, that spinning takes a core away from them
    // (measured: 13% of all cycles at 64 streams). Our elementwise ops are small, so
    // candle's pool gets no extra threads unless the user asks for them. (Set before any
    // other thread exists.)
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    cli::run()
}
