#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| covey_fuzz::agent_config(data));
