//! The bzImage unpacker (header, payload bounds, LZ4 and gzip) and fw_cfg's setup/kernel split.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = rhyve::boot::bzimage::unpack(data);
    let _ = rhyve::devices::legacy::fw_cfg::split_bzimage(data);
});
