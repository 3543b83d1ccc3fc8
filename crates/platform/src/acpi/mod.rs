//! ACPI tables (ACPI 6.5 ch. 5; bhyve `acpi.c`), built with the acpi_tables crate and written
//! into guest RAM at 0xF2400 as bhyve does, so the RSDP is found by the legacy scan of
//! 0xE0000-0xFFFFF in every boot mode: RSDP, XSDT and RSDT, FADT (PM1a blocks, PM timer, reset
//! register 0xCF9, SCI on IRQ 9), FACS, MADT (LAPICs, I/O APIC, overrides for IRQ 0 and 9),
//! MCFG (ECAM), SPCR (COM1), and a DSDT in AML (PCI0 with _CRS and _PRT, the LPC devices, _S5).

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Name, Package,
    ResourceTemplate, Scope, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

use rhyve_devices::legacy::lpc::COM_PORTS;
use rhyve_devices::legacy::pm;
use rhyve_hypervisor::memory::{ECAM_BASE, IOAPIC_BASE, LAPIC_BASE, PCI_MEM32_BASE, PCI_MEM32_END};
use rhyve_pci::root::{INTX_FIRST_PIN, INTX_PINS};

/// Where bhyve puts its tables; the RSDP comes first.
pub const ACPI_BASE: u64 = 0xf_2400;
/// The tables must end below 1 MiB (the BIOS area).
pub const ACPI_END: u64 = 0x10_0000;
const OEM_ID: [u8; 6] = *b"RHYVE ";
const OEM_TABLE: [u8; 8] = *b"RHYVEVM ";
const OEM_REV: u32 = 1;
const SCI_IRQ: u8 = pm::SCI_IRQ as u8;

/// What the tables describe.
pub struct Platform {
    /// APIC ID of each vCPU, in vCPU order.
    pub apic_ids: Vec<u32>,
    /// COM ports configured, by index into `COM_PORTS`.
    pub com_ports: Vec<usize>,
    /// The 64-bit PCI BAR window.
    pub mem64: (u64, u64),
}

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("the ACPI tables ({0} bytes) do not fit below 1 MiB")]
    TooBig(u64),
}

/// The built tables: where each lands, and the bytes to write there.
pub struct Tables {
    pub blobs: Vec<(u64, Vec<u8>)>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Writes at `at` the byte that makes the first `len` bytes of `t` sum to zero (ACPI and MP
/// tables alike).
pub fn set_checksum(t: &mut [u8], at: usize, len: usize) {
    let c = checksum(t.get(..len).unwrap_or_default());
    if let Some(b) = t.get_mut(at) {
        *b = c;
    }
}

/// The byte that makes `data` sum to zero (ACPI and MP tables alike).
pub fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// ACPI 2.0 RSDP with both the RSDT and the XSDT address. (The crate's `Rsdp` leaves the RSDT
/// address zero; guests that only know ACPI 1.0 need it.)
fn rsdp(rsdt: u32, xsdt: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0);
    r.extend_from_slice(&OEM_ID);
    r.push(2);
    r.extend_from_slice(&rsdt.to_le_bytes());
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt.to_le_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    set_checksum(&mut r, 8, 20);
    let len = r.len();
    set_checksum(&mut r, 32, len);
    r
}

/// The MADT entry of the processor with ACPI UID `uid` and APIC ID `apic`, flags = enabled.
/// A Processor Local APIC structure (type 0, length 8) holds both in a byte, and APIC ID 0xFF
/// is the xAPIC broadcast; from there on the Processor Local x2APIC structure (type 9, length
/// 16) is the one to use (ACPI 6.5 §5.2.12.12), never a truncated ID naming another CPU.
fn local_apic(uid: usize, apic: u32) -> Vec<u8> {
    match (u8::try_from(uid), u8::try_from(apic)) {
        (Ok(uid), Ok(apic)) if apic != 0xff => {
            let mut e = vec![0u8, 8, uid, apic];
            e.extend_from_slice(&1u32.to_le_bytes());
            e
        }
        _ => {
            let mut e = vec![9u8, 16, 0, 0];
            e.extend_from_slice(&apic.to_le_bytes());
            e.extend_from_slice(&1u32.to_le_bytes());
            // vCPU indexes are u32 (KVM's limit is a few thousand).
            e.extend_from_slice(&u32::try_from(uid).unwrap_or(u32::MAX).to_le_bytes());
            e
        }
    }
}

fn madt(p: &Platform) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 4, OEM_ID, OEM_TABLE, OEM_REV);
    t.write_u32(36, LAPIC_BASE as u32);
    t.write_u32(40, 1); // PCAT_COMPAT: there are 8259s too
    for (uid, &apic) in p.apic_ids.iter().enumerate() {
        t.append_slice(&local_apic(uid, apic));
    }
    // I/O APIC 0 at its address, GSI base 0.
    let mut e = vec![1u8, 12, 0, 0];
    e.extend_from_slice(&(IOAPIC_BASE as u32).to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&e);
    // Overrides: the PIT's IRQ 0 arrives on pin 2 (see IrqRouter), and the SCI is level,
    // active high.
    for (irq, gsi, flags) in [(0u8, 2u32, 0u16), (SCI_IRQ, u32::from(SCI_IRQ), 0x000d)] {
        let mut e = vec![2u8, 10, 0, irq];
        e.extend_from_slice(&gsi.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        t.append_slice(&e);
    }
    t.update_checksum();
    t.as_slice().to_vec()
}

/// SPCR revision 2 for COM1, a 16550 at 0x3F8 on IRQ 4, 115200 8N1.
fn spcr() -> Vec<u8> {
    let mut t = Sdt::new(*b"SPCR", 80, 2, OEM_ID, OEM_TABLE, OEM_REV);
    t.write_u8(36, 0); // interface type: full 16550
                       // Base address: GAS, I/O space, 8 bits, byte access.
    t.write_bytes(40, &[1, 8, 0, 1]);
    t.write_bytes(44, &0x3f8u64.to_le_bytes());
    t.write_u8(52, 0x01 | 0x02); // 8259 IRQ and I/O APIC interrupt
    t.write_u8(53, 4);
    t.write_u32(54, 4);
    t.write_u8(58, 7); // 115200 baud
    t.write_u8(59, 0);
    t.write_u8(60, 1);
    t.write_u8(61, 0);
    t.write_u8(62, 0);
    t.write_u8(63, 0); // VT100
    t.write_u16(64, 0xffff); // not a PCI device
    t.write_u16(66, 0xffff);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn fadt(facs: u64, dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE, OEM_REV)
        .firmware_ctrl_32(facs as u32)
        .dsdt_32(dsdt as u32)
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup);
    f.sci_int = u16::from(SCI_IRQ).into();
    f.smi_cmd = (pm::SMI_CMD as u32).into();
    f.acpi_enable = pm::ACPI_ENABLE;
    f.acpi_disable = pm::ACPI_DISABLE;
    f.pm1a_evt_blk = (pm::PM1A_EVT as u32).into();
    f.pm1a_cnt_blk = (pm::PM1A_CNT as u32).into();
    f.pm_tmr_blk = (pm::PM_TMR as u32).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.century = 0x32;
    // Legacy devices and an 8042 are present.
    f.iapc_boot_arch = 0x0003u16.into();
    f.reset_reg = GAS::new(GasSpace::SystemIo, 8, 0, AccessSize::ByteAccess, 0xcf9);
    f.reset_value = 0x06;
    f.x_pm1a_evt_blk = GAS::new(
        GasSpace::SystemIo,
        32,
        0,
        AccessSize::DwordAccess,
        pm::PM1A_EVT,
    );
    f.x_pm1a_cnt_blk = GAS::new(
        GasSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        pm::PM1A_CNT,
    );
    f.x_pm_tmr_blk = GAS::new(
        GasSpace::SystemIo,
        32,
        0,
        AccessSize::DwordAccess,
        pm::PM_TMR,
    );
    f.x_dsdt = dsdt.into();
    bytes(&f.finalize())
}

fn dsdt(p: &Platform) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE, OEM_REV);
    // PCI0's resources: the bus range, the CONF1 ports, the I/O and memory windows the BAR
    // allocator uses.
    let bus = AddressSpace::new_bus_number(0u16, 255u16);
    let conf1 = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let mem32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MEM32_BASE as u32,
        (PCI_MEM32_END - 1) as u32,
        None,
    );
    let mem64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        p.mem64.0,
        p.mem64.1.saturating_sub(1),
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &conf1, &io_lo, &io_hi, &mem32, &mem64]);
    // _PRT: INTA-INTD of every slot, swizzled onto I/O APIC pins 16-23 as the PCI root does.
    let mut prt_entries: Vec<(u32, u8, u32)> = Vec::new();
    for slot in 0u32..32 {
        for pin in 0u8..4 {
            // slot < 32 and pin < 4: nothing here comes near overflow.
            #[allow(clippy::arithmetic_side_effects)]
            let gsi = u32::from(INTX_FIRST_PIN) + (slot + u32::from(pin)) % u32::from(INTX_PINS);
            prt_entries.push(((slot << 16) | 0xffff, pin, gsi));
        }
    }
    let zero = aml::Zero {};
    let prt_pkgs: Vec<Package> = prt_entries
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &zero, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_pkgs.iter().map(|p| p as &dyn Aml).collect();
    let prt = Package::new(prt_refs);

    // The LPC bridge's devices: the configured COM ports and the RTC. An index that is not
    // one of COM_PORTS is left out, with its name and _UID, so the others keep theirs.
    let coms: Vec<(usize, u16, u32)> = p
        .com_ports
        .iter()
        .filter_map(|&i| COM_PORTS.get(i).map(|&(_, base, irq)| (i, base, irq)))
        .collect();
    let com_res: Vec<(IO, Interrupt)> = coms
        .iter()
        .map(|&(_, base, irq)| {
            (
                IO::new(base, base, 1, 8),
                Interrupt::new(true, true, false, false, irq),
            )
        })
        .collect();
    let com_crs: Vec<ResourceTemplate> = com_res
        .iter()
        .map(|(io, irq)| ResourceTemplate::new(vec![io, irq]))
        .collect();
    let hid_com = EISAName::new("PNP0501");
    // `i` indexes COM_PORTS (4 entries), so it fits a byte.
    let uids: Vec<u8> = coms
        .iter()
        .map(|&(i, ..)| u8::try_from(i).unwrap_or(u8::MAX).saturating_add(1))
        .collect();
    let com_children: Vec<Vec<Name>> = com_crs
        .iter()
        .zip(&uids)
        .map(|(crs, uid)| {
            vec![
                Name::new("_HID".into(), &hid_com),
                Name::new("_UID".into(), uid),
                Name::new("_CRS".into(), crs),
            ]
        })
        .collect();
    let com_names: Vec<String> = coms
        .iter()
        .map(|&(i, ..)| format!("COM{}", i.saturating_add(1)))
        .collect();
    let com_devs: Vec<Device> = com_children
        .iter()
        .zip(&com_names)
        .map(|(children, name)| {
            Device::new(
                name.as_str().into(),
                children.iter().map(|c| c as &dyn Aml).collect(),
            )
        })
        .collect();
    let rtc_io = IO::new(0x70, 0x70, 1, 2);
    let rtc_irq = Interrupt::new(true, true, false, false, 8);
    let rtc_crs = ResourceTemplate::new(vec![&rtc_io, &rtc_irq]);
    let hid_rtc = EISAName::new("PNP0B00");
    let rtc_hid = Name::new("_HID".into(), &hid_rtc);
    let rtc_crs_name = Name::new("_CRS".into(), &rtc_crs);
    let rtc = Device::new("RTC_".into(), vec![&rtc_hid, &rtc_crs_name]);
    let isa_adr_v: u32 = 0x001f_0000;
    let isa_adr = Name::new("_ADR".into(), &isa_adr_v);
    let mut isa_children: Vec<&dyn Aml> = vec![&isa_adr, &rtc];
    isa_children.extend(com_devs.iter().map(|d| d as &dyn Aml));
    let isa = Device::new("ISA_".into(), isa_children);

    let hid_pci = EISAName::new("PNP0A08");
    let cid_pci = EISAName::new("PNP0A03");
    let zero_u = 0u8;
    let pci_children: Vec<Name> = vec![
        Name::new("_HID".into(), &hid_pci),
        Name::new("_CID".into(), &cid_pci),
        Name::new("_SEG".into(), &zero_u),
        Name::new("_UID".into(), &zero_u),
        Name::new("_BBN".into(), &zero_u),
        Name::new("_ADR".into(), &zero_u),
        Name::new("_CRS".into(), &crs),
        Name::new("_PRT".into(), &prt),
    ];
    let mut pci_refs: Vec<&dyn Aml> = pci_children.iter().map(|n| n as &dyn Aml).collect();
    pci_refs.push(&isa);
    let pci0 = Device::new("PCI0".into(), pci_refs);
    let sb = Scope::new("_SB_".into(), vec![&pci0]);
    // \_S5: the SLP_TYP value PM1a_CNT understands as power-off.
    let s5v = pm::SLP_TYP_S5 as u8;
    let s5pkg = Package::new(vec![&s5v, &s5v, &zero_u, &zero_u]);
    let s5 = Name::new("_S5_".into(), &s5pkg);
    sb.to_aml_bytes(&mut t);
    s5.to_aml_bytes(&mut t);
    t.update_checksum();
    t.as_slice().to_vec()
}

fn align(v: u64, a: u64) -> u64 {
    v.div_ceil(a).saturating_mul(a)
}

/// The tables laid out from `start`: where each lands and the pointers between them.
struct Layout {
    rsdp: Vec<u8>,
    tables: Vec<(u64, Vec<u8>)>,
    fadt_at: u64,
    xsdt_at: u64,
    rsdt_at: u64,
    /// How many tables the XSDT and RSDT list.
    entries: usize,
    end: u64,
}

fn lay_out(p: &Platform, start: u64) -> Layout {
    // Sizes do not depend on addresses, except through fixed-size fields.
    let mut at = start;
    let mut place = |len: usize, a: u64| {
        let base = align(at, a);
        at = base.saturating_add(len as u64);
        base
    };
    let dsdt_b = dsdt(p);
    let madt_b = madt(p);
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE, OEM_REV);
    mcfg.add_ecam(ECAM_BASE, 0, 0, 255);
    let mcfg_b = bytes(&mcfg);
    let spcr_b = (!p.com_ports.is_empty() && p.com_ports.contains(&0)).then(spcr);
    let facs_b = bytes(&FACS::new());
    let facs_at = place(facs_b.len(), 64);
    let dsdt_at = place(dsdt_b.len(), 16);
    let fadt_b = fadt(facs_at, dsdt_at);
    let fadt_at = place(fadt_b.len(), 16);
    let madt_at = place(madt_b.len(), 16);
    let mcfg_at = place(mcfg_b.len(), 16);
    let spcr_at = spcr_b.as_ref().map(|b| place(b.len(), 16));
    let mut entries = vec![fadt_at, madt_at, mcfg_at];
    entries.extend(spcr_at);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, OEM_REV);
    for e in &entries {
        xsdt.add_entry(*e);
    }
    let xsdt_b = bytes(&xsdt);
    let xsdt_at = place(xsdt_b.len(), 16);
    let mut rsdt = Sdt::new(*b"RSDT", 36, 1, OEM_ID, OEM_TABLE, OEM_REV);
    for e in &entries {
        rsdt.append_slice(&(*e as u32).to_le_bytes());
    }
    rsdt.update_checksum();
    let rsdt_b = rsdt.as_slice().to_vec();
    let rsdt_at = place(rsdt_b.len(), 16);
    let mut tables = vec![
        (facs_at, facs_b),
        (dsdt_at, dsdt_b),
        (fadt_at, fadt_b),
        (madt_at, madt_b),
        (mcfg_at, mcfg_b),
        (xsdt_at, xsdt_b),
        (rsdt_at, rsdt_b),
    ];
    if let (Some(a), Some(b)) = (spcr_at, spcr_b) {
        tables.push((a, b));
    }
    Layout {
        rsdp: rsdp(rsdt_at as u32, xsdt_at),
        tables,
        fadt_at,
        xsdt_at,
        rsdt_at,
        entries: entries.len(),
        end: at,
    }
}

/// Builds every table and lays them out from `ACPI_BASE` (the RSDP first).
pub fn build(p: &Platform) -> Result<Tables, AcpiError> {
    let l = lay_out(p, ACPI_BASE + 36);
    if l.end > ACPI_END {
        return Err(AcpiError::TooBig(l.end.saturating_sub(ACPI_BASE)));
    }
    let mut blobs = vec![(ACPI_BASE, l.rsdp)];
    blobs.extend(l.tables);
    Ok(Tables { blobs })
}

/// The fw_cfg file names QEMU gives the tables, which firmware looks for.
pub const LOADER_TABLES: &str = "etc/acpi/tables";
pub const LOADER_RSDP: &str = "etc/acpi/rsdp";
pub const LOADER_SCRIPT: &str = "etc/table-loader";

/// The tables as QEMU hands them to firmware over fw_cfg: one blob holding every table (its
/// pointers are offsets into the blob), the RSDP on its own (pointing into the blob), and the
/// loader script that places both in guest memory, adds the blob's address to each pointer
/// and recomputes the checksums of the tables it patched. Those checksum bytes are zero in
/// the blobs, so firmware that computes the checksum of the rest (OVMF) and firmware that
/// subtracts the sum (SeaBIOS, qboot) get the same result.
pub struct LoaderTables {
    pub tables: Vec<u8>,
    pub rsdp: Vec<u8>,
    pub script: Vec<u8>,
}

// The offsets are into a blob of a few KiB this function builds (nothing the guest gives).
#[allow(clippy::arithmetic_side_effects)]
pub fn build_for_loader(p: &Platform) -> LoaderTables {
    use rhyve_devices::legacy::fw_cfg::{TableLoader, Zone};
    let l = lay_out(p, 0);
    let mut tables = vec![0u8; l.end as usize];
    for (at, blob) in &l.tables {
        if let Some(dst) = tables.get_mut(*at as usize..(*at as usize).saturating_add(blob.len())) {
            dst.copy_from_slice(blob);
        }
    }
    let mut rsdp = l.rsdp;
    let len_of = |at: u64| {
        tables
            .get(at as usize + 4..at as usize + 8)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    let (fadt, xsdt, rsdt) = (l.fadt_at as u32, l.xsdt_at as u32, l.rsdt_at as u32);
    let patched = [
        (fadt, len_of(l.fadt_at)),
        (xsdt, len_of(l.xsdt_at)),
        (rsdt, len_of(l.rsdt_at)),
    ];
    for (at, _) in patched {
        if let Some(c) = tables.get_mut(at as usize + 9) {
            *c = 0;
        }
    }
    for at in [8, 32] {
        if let Some(c) = rsdp.get_mut(at) {
            *c = 0;
        }
    }
    let mut s = TableLoader::default();
    s.allocate(LOADER_RSDP, 16, Zone::Fseg);
    s.allocate(LOADER_TABLES, 64, Zone::High);
    // The FADT's FIRMWARE_CTRL (FACS), DSDT and X_DSDT.
    for (off, size) in [(36, 4), (40, 4), (140, 8)] {
        s.add_pointer(LOADER_TABLES, LOADER_TABLES, fadt + off, size);
    }
    for i in 0..l.entries as u32 {
        s.add_pointer(LOADER_TABLES, LOADER_TABLES, xsdt + 36 + 8 * i, 8);
        s.add_pointer(LOADER_TABLES, LOADER_TABLES, rsdt + 36 + 4 * i, 4);
    }
    for (at, len) in patched {
        s.add_checksum(LOADER_TABLES, at + 9, at, len);
    }
    s.add_pointer(LOADER_RSDP, LOADER_TABLES, 16, 4);
    s.add_pointer(LOADER_RSDP, LOADER_TABLES, 24, 8);
    s.add_checksum(LOADER_RSDP, 8, 0, 20);
    s.add_checksum(LOADER_RSDP, 32, 0, 36);
    LoaderTables {
        tables,
        rsdp,
        script: s.into_bytes(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;

    fn platform(apic_ids: Vec<u32>, com_ports: Vec<usize>) -> Platform {
        Platform {
            apic_ids,
            com_ports,
            mem64: (1 << 32, (1 << 32) + (64 << 30)),
        }
    }

    /// The MADT's processor entries as (type, UID, APIC ID).
    fn madt_cpus(t: &[u8]) -> Vec<(u8, u32, u32)> {
        assert_eq!(&t[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        let mut out = Vec::new();
        let mut off = 44;
        while off < t.len() {
            let (ty, len) = (t[off], usize::from(t[off + 1]));
            let e = &t[off..off + len];
            match ty {
                0 => out.push((0, u32::from(e[2]), u32::from(e[3]))),
                9 => out.push((
                    9,
                    u32::from_le_bytes(e[12..16].try_into().unwrap()),
                    u32::from_le_bytes(e[4..8].try_into().unwrap()),
                )),
                _ => {}
            }
            off += len;
        }
        out
    }

    #[test]
    fn madt_lists_every_cpu_under_its_own_apic_id() {
        let cpus = madt_cpus(&madt(&platform(vec![0, 1, 2, 3], vec![0])));
        assert_eq!(cpus, vec![(0, 0, 0), (0, 1, 1), (0, 2, 2), (0, 3, 3)]);
        // 300 vCPUs (or a sparse topology) give APIC IDs and UIDs past a byte: from APIC ID
        // 0xFF on they are x2APIC entries, not a truncated ID that names the BSP again.
        let ids: Vec<u32> = (0..300).collect();
        let cpus = madt_cpus(&madt(&platform(ids, vec![])));
        assert_eq!(cpus.len(), 300);
        for (i, &(ty, uid, apic)) in cpus.iter().enumerate() {
            assert_eq!((uid, apic), (i as u32, i as u32));
            assert_eq!(ty, if i < 0xff { 0 } else { 9 }, "CPU {i}");
        }
        let cpus = madt_cpus(&madt(&platform(vec![0, 0x100, 0x1_0000], vec![])));
        assert_eq!(cpus, vec![(0, 0, 0), (9, 1, 0x100), (9, 2, 0x1_0000)]);
        assert!(build(&platform((0..300).collect(), vec![0])).is_ok());
    }

    #[test]
    fn com_devices_keep_their_names_past_an_unknown_port() {
        let d = dsdt(&platform(vec![0], vec![9, 1]));
        let has = |n: &[u8]| d.windows(n.len()).any(|w| w == n);
        assert!(has(b"COM2"));
        assert!(
            !has(b"COM1") && !has(b"COM10"),
            "the unknown index is left out"
        );
    }
    /// Runs a loader script the way firmware does (qboot's and SeaBIOS's reading of the
    /// format): each file placed at its own base, pointers patched, checksums subtracted.
    fn run_loader(l: &LoaderTables, rsdp_base: u64, tables_base: u64) -> (Vec<u8>, Vec<u8>) {
        let (mut rsdp, mut tables) = (l.rsdp.clone(), l.tables.clone());
        let name = |b: &[u8]| -> String {
            b.iter()
                .take_while(|c| **c != 0)
                .map(|c| *c as char)
                .collect()
        };
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let mut allocated = Vec::new();
        for c in l.script.chunks(128) {
            assert_eq!(c.len(), 128);
            match u32_at(c, 0) {
                1 => allocated.push(name(&c[4..60])),
                2 => {
                    let (dest, src) = (name(&c[4..60]), name(&c[60..116]));
                    assert!(allocated.contains(&dest) && allocated.contains(&src));
                    let (off, size) = (u32_at(c, 116) as usize, usize::from(c[120]));
                    let base = if src == LOADER_RSDP {
                        rsdp_base
                    } else {
                        tables_base
                    };
                    let f = if dest == LOADER_RSDP {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let mut v = [0u8; 8];
                    v[..size].copy_from_slice(&f[off..off + size]);
                    let p = u64::from_le_bytes(v) + base;
                    f[off..off + size].copy_from_slice(&p.to_le_bytes()[..size]);
                }
                3 => {
                    let f = if name(&c[4..60]) == LOADER_RSDP {
                        &mut rsdp
                    } else {
                        &mut tables
                    };
                    let (off, start, len) = (
                        u32_at(c, 60) as usize,
                        u32_at(c, 64) as usize,
                        u32_at(c, 68) as usize,
                    );
                    let sum = f[start..start + len]
                        .iter()
                        .fold(0u8, |a, b| a.wrapping_add(*b));
                    f[off] = f[off].wrapping_sub(sum);
                }
                other => panic!("loader command {other}"),
            }
        }
        (rsdp, tables)
    }

    #[test]
    fn loader_tables_resolve_from_the_rsdp_at_any_base() {
        let l = build_for_loader(&platform(vec![0, 1], vec![0]));
        let sums = |b: &[u8]| b.iter().fold(0u8, |a, b| a.wrapping_add(*b));
        for (rb, tb) in [(0xf_0000u64, 0x7fff_0000u64), (0xe_5a40, 0x10_0000)] {
            let (rsdp, tables) = run_loader(&l, rb, tb);
            assert_eq!(&rsdp[..8], b"RSD PTR ");
            assert_eq!(sums(&rsdp[..20]), 0);
            assert_eq!(sums(&rsdp[..36]), 0);
            let at = |addr: u64| (addr - tb) as usize;
            let table = |addr: u64| {
                let o = at(addr);
                let len = u32::from_le_bytes(tables[o + 4..o + 8].try_into().unwrap()) as usize;
                let t = &tables[o..o + len];
                assert_eq!(
                    sums(t),
                    0,
                    "checksum of {}",
                    String::from_utf8_lossy(&t[..4])
                );
                t
            };
            let rsdt = table(u64::from(u32::from_le_bytes(
                rsdp[16..20].try_into().unwrap(),
            )));
            let xsdt = table(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
            assert_eq!(
                (&rsdt[..4], &xsdt[..4]),
                (b"RSDT".as_slice(), b"XSDT".as_slice())
            );
            let listed: Vec<&[u8]> = xsdt[36..]
                .chunks(8)
                .map(|e| &table(u64::from_le_bytes(e.try_into().unwrap()))[..4])
                .collect();
            assert_eq!(listed, [b"FACP".as_slice(), b"APIC", b"MCFG", b"SPCR"]);
            let r: Vec<u64> = rsdt[36..]
                .chunks(4)
                .map(|e| u64::from(u32::from_le_bytes(e.try_into().unwrap())))
                .collect();
            let x: Vec<u64> = xsdt[36..]
                .chunks(8)
                .map(|e| u64::from_le_bytes(e.try_into().unwrap()))
                .collect();
            assert_eq!(r, x);
            let fadt = table(x[0]);
            let dsdt = u64::from(u32::from_le_bytes(fadt[40..44].try_into().unwrap()));
            assert_eq!(dsdt, u64::from_le_bytes(fadt[140..148].try_into().unwrap()));
            assert_eq!(&table(dsdt)[..4], b"DSDT");
            let facs = at(u64::from(u32::from_le_bytes(
                fadt[36..40].try_into().unwrap(),
            )));
            assert_eq!(&tables[facs..facs + 4], b"FACS");
        }
    }
}
