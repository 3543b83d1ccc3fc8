//! The emulation-assist decoder: guest instruction bytes in 16-, 32- and 64-bit code.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, insn)) = data.split_first() else {
        return;
    };
    let bitness = [16, 32, 64][usize::from(mode % 3)];
    let _ = rhyve::vmm::assist::decode_insn(insn, bitness);
    let _ = rhyve::vmm::assist::describe_insn(insn, bitness);
});
