//! Agent text rendered to share-page HTML: only allowed elements, attributes and link schemes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| capsync_server::fuzzing::markdown(data));
