//! The RTC/CMOS ports as a guest drives them: a sequence of (port, value) reads and writes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rhyve::bus::BusDevice;
use rhyve::devices::legacy::rtc::Rtc;
use rhyve::hypervisor::MemoryLayout;

fuzz_target!(|data: &[u8]| {
    let Ok(layout) = MemoryLayout::new(6 << 30) else {
        return;
    };
    let mut rtc = Rtc::new(&layout, false, 2);
    for op in data.chunks(2) {
        let (&a, v) = (op.first().unwrap_or(&0), op.get(1).copied().unwrap_or(0));
        let port = u64::from(a & 1);
        if a & 2 == 0 {
            rtc.write(port, &[v]);
        } else {
            let mut b = [0u8; 1];
            rtc.read(port, &mut b);
        }
    }
});
