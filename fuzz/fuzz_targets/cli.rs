//! The bhyve command line: arguments split at NUL bytes. Any input is an answer or one error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    // `-k FILE` would read host files: the config file format has its own target.
    let args: Vec<&str> = text.split('\0').filter(|a| !a.starts_with("-k")).collect();
    let _ = rhyve::cli::parse(&args);
});
