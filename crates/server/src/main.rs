//! The `moeserve` command line (the server itself is the library).

fn main() -> std::process::ExitCode {
    moeserve_core::process::prepare();
    moeserve::cli::run()
}
