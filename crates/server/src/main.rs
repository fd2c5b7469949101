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
    cli::run()
}
