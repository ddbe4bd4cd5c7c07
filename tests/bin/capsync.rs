//! The `capsync` command line, built as a binary of this package so that its tests can
//! start it (`CARGO_BIN_EXE_capsync-under-test`): the opencode plugin tests install the
//! plugin with it, and the plugin runs it as the shipper.

fn main() -> std::process::ExitCode {
    capsync_tests::cli::main()
}
