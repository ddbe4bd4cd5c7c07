//! The `capsync` command; everything lives in the `capsync_cli` library.

fn main() -> std::process::ExitCode {
    capsync_cli::main()
}
