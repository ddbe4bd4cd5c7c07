//! The `capsync` command; everything lives in `capsync_client::cli`.

fn main() -> std::process::ExitCode {
    capsync_client::cli::main()
}
