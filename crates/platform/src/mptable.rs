//! The Intel MultiProcessor table (MP spec 1.4; bhyve `mptbl.c`), for guests without ACPI:
//! the floating pointer and configuration table at 0xF0000, listing the processors, the PCI
//! and ISA buses, the I/O APIC and how every ISA IRQ and PCI INTx line reaches it (the same
//! routing the ACPI tables and the PCI root describe). `-Y` leaves it out, as in bhyve.

use crate::acpi::set_checksum;
use rhyve_hypervisor::memory::{IOAPIC_BASE, LAPIC_BASE};
use rhyve_pci::root::{INTX_FIRST_PIN, INTX_PINS};

pub const MPTABLE_BASE: u64 = 0xf_0000;
/// Room up to the ACPI tables at 0xF2400.
pub const MPTABLE_MAX: usize = 0x2400;
const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;
const IOAPIC_ID: u8 = 0;

/// Builds the table for vCPUs with `apic_ids` (vCPU 0 is the BSP); None if it would not fit.
pub fn build(apic_ids: &[u32]) -> Option<Vec<u8>> {
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |e: &[u8]| {
        entries.extend_from_slice(e);
        // At most a few hundred entries (checked against MPTABLE_MAX below).
        count = count.saturating_add(1);
    };
    for (i, &id) in apic_ids.iter().enumerate() {
        let id = u8::try_from(id).ok()?;
        let flags = if i == 0 { 0x3 } else { 0x1 }; // enabled, BSP
        let mut e = vec![0u8, id, 0x14, flags];
        e.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        e.extend_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        e.extend_from_slice(&[0; 8]);
        push(&e);
    }
    push(&[1, PCI_BUS, b'P', b'C', b'I', b' ', b' ', b' ']);
    push(&[1, ISA_BUS, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut io = vec![2u8, IOAPIC_ID, 0x11, 1];
    io.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    push(&io);
    // ISA IRQs: the PIT (IRQ 0) on pin 2, IRQ 2 is the cascade, the SCI (9) level-triggered.
    for irq in 0u8..16 {
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { 2 } else { irq };
        let flags: u16 = if irq == 9 { 0x000d } else { 0 };
        let f = flags.to_le_bytes();
        push(&[3, 0, f[0], f[1], ISA_BUS, irq, IOAPIC_ID, pin]);
    }
    // PCI INTx: source IRQ = slot << 2 | pin, level-triggered active low, swizzled as the root.
    for slot in 0u8..32 {
        for pin in 0u8..4 {
            // slot < 32 and pin < 4: nothing here comes near overflow.
            #[allow(clippy::arithmetic_side_effects)]
            let intin = INTX_FIRST_PIN + (slot + pin) % INTX_PINS;
            push(&[3, 0, 0x0f, 0, PCI_BUS, (slot << 2) | pin, IOAPIC_ID, intin]);
        }
    }
    // ExtINT to LINT0 and NMI to LINT1 of every local APIC.
    push(&[4, 3, 0, 0, ISA_BUS, 0, 0xff, 0]);
    push(&[4, 1, 0, 0, ISA_BUS, 0, 0xff, 1]);

    let base_len = entries.len().saturating_add(44);
    if base_len.saturating_add(16) > MPTABLE_MAX {
        return None;
    }
    let cfg_addr = (MPTABLE_BASE + 16) as u32;
    let mut t = Vec::with_capacity(base_len.saturating_add(16));
    // Floating pointer: "_MP_", config table address, 1 paragraph, spec 1.4.
    t.extend_from_slice(b"_MP_");
    t.extend_from_slice(&cfg_addr.to_le_bytes());
    t.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    set_checksum(&mut t, 10, 16);
    // Configuration table header.
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"PCMP");
    h.extend_from_slice(&(base_len as u16).to_le_bytes());
    h.push(4);
    h.push(0);
    h.extend_from_slice(b"RHYVE   ");
    h.extend_from_slice(b"0.1         ");
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&count.to_le_bytes());
    h.extend_from_slice(&(LAPIC_BASE as u32).to_le_bytes());
    h.extend_from_slice(&[0, 0, 0, 0]);
    let mut body = h;
    body.extend_from_slice(&entries);
    let len = body.len();
    set_checksum(&mut body, 7, len);
    t.extend_from_slice(&body);
    Some(t)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn pointer_table_and_entries() {
        let t = build(&[0, 1, 2, 3]).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf0010);
        let cfg = &t[16..];
        assert_eq!(&cfg[..4], b"PCMP");
        let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
        assert_eq!(len, cfg.len());
        assert_eq!(sum(cfg), 0);
        // Walk the entries: 4 processors (the first is the BSP), 2 buses, 1 I/O APIC.
        let (mut off, mut cpus, mut bsp, mut buses, mut ioapics, mut ints) = (44, 0, 0, 0, 0, 0);
        while off < cfg.len() {
            match cfg[off] {
                0 => {
                    cpus += 1;
                    bsp += usize::from(cfg[off + 3] & 2 != 0);
                    off += 20;
                }
                1 => {
                    buses += 1;
                    off += 8;
                }
                2 => {
                    ioapics += 1;
                    off += 8;
                }
                3 | 4 => {
                    ints += 1;
                    off += 8;
                }
                t => panic!("unknown entry type {t}"),
            }
        }
        assert_eq!((cpus, bsp, buses, ioapics), (4, 1, 2, 1));
        assert_eq!(ints, 15 + 128 + 2);
        assert_eq!(u16::from_le_bytes([cfg[34], cfg[35]]), 4 + 2 + 1 + 145);
        // Too many CPUs for the space below the ACPI tables: refused, not overflowed.
        assert!(build(&(0..400).collect::<Vec<u32>>()).is_none());
        assert!(
            build(&[300]).is_none(),
            "APIC IDs above 255 do not fit an MP table"
        );
    }
}
