//! A file given to `capsync push`/`sync`: ops (JSON array or Lines) or an opencode-style export, read into ops.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| capsync_client::fuzzing::export_reader(data));
