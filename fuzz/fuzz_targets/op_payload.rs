//! An op's payload for a given kind: parse, fast path against full parse, reclaim of compacted tool output.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| capsync_server::fuzzing::op_payload(data));
