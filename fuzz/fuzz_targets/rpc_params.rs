//! A capnp message read as the params of any server RPC method, through its handler's reading code.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| capsync_server::fuzzing::rpc_params(data));
