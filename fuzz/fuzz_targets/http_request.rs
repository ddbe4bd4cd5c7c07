//! The HTTP gateway's bearer header, ops query and event-stream start (Last-Event-ID, ?after=).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| capsync_server::fuzzing::http_request(data));
