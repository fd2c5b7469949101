//! The `moeserve` command line.

mod cli;
mod error;
mod metrics;
mod openai;
mod routes;
mod server;
mod settings;

fn main() -> std::process::ExitCode {
    moeserve_core::process::prepare();
    cli::run()
}
