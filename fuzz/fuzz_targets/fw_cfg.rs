//! fw_cfg as firmware drives it: selector writes, data reads, and DMA requests whose control
//! words and addresses come from the input, over 1 MiB of guest memory the input also fills.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rhyve::bus::BusDevice;
use rhyve::devices::legacy::fw_cfg::{FwCfgBuilder, FwCfgDma};
use rhyve::hypervisor::memory::GuestMem;
use vm_memory::{Bytes, GuestAddress};

fuzz_target!(|data: &[u8]| {
    let Ok(mem) = GuestMem::from_ranges(&[(GuestAddress(0), 1 << 20)]) else {
        return;
    };
    let mut b = FwCfgBuilder::new();
    b.item(0x0e, vec![1, 2, 3, 4]);
    if b.file("etc/fuzz", vec![0x5a; 300]).is_err() || b.file("etc/e820", vec![0; 20]).is_err() {
        return;
    }
    let Ok(dev) = b.build(mem.clone()) else {
        return;
    };
    let dev = std::sync::Arc::new(std::sync::Mutex::new(dev));
    let mut dma = FwCfgDma(dev.clone());
    for op in data.chunks(9) {
        let Some((&kind, rest)) = op.split_first() else {
            break;
        };
        match kind % 4 {
            0 => {
                let sel = [rest.first().copied().unwrap_or(0), rest.get(1).copied().unwrap_or(0)];
                dev.lock().unwrap_or_else(|p| p.into_inner()).write(0, &sel);
            }
            1 => {
                let mut buf = [0u8; 4];
                let n = usize::from(rest.first().copied().unwrap_or(1) % 4) + 1;
                dev.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read(1, &mut buf[..n]);
            }
            2 => {
                // A DMA descriptor (control, length, address; big-endian) at an address the
                // input picks, then its address written to the DMA register.
                let at = u64::from(u32::from_le_bytes([
                    rest.first().copied().unwrap_or(0),
                    rest.get(1).copied().unwrap_or(0),
                    rest.get(2).copied().unwrap_or(0) & 0x1f,
                    0,
                ]));
                let mut desc = [0u8; 16];
                for (d, s) in desc.iter_mut().zip(rest.iter().skip(3).cycle()) {
                    *d = *s;
                }
                let _ = mem.write_slice(&desc, GuestAddress(at));
                let addr = at.to_be_bytes();
                dma.write(0, &addr[..4]);
                dma.write(4, &addr[4..]);
            }
            _ => {
                let mut sig = [0u8; 8];
                dma.read(0, &mut sig);
            }
        }
    }
});
