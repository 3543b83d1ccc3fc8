//! A `-k` config file's text, then the checks that run on the whole tree.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut cfg = rhyve::config::Config::new();
    if cfg.load_str(&text, "fuzz.conf").is_ok() {
        let _ = cfg.get("memory.size");
        let _ = cfg.pairs();
        let _ = format!("{cfg}");
    }
});
