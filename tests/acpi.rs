//! The ACPI tables, parsed back: lengths, checksums and cross-references, and every table
//! disassembled by ACPICA's `iasl -d` (installed by scripts/setup.sh).

use std::collections::HashMap;

use rhyve::acpi::{build, Platform, ACPI_BASE};

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

#[test]
fn tables_are_consistent_and_disassemble_with_iasl() {
    let p = Platform {
        apic_ids: vec![0, 1, 2, 3],
        com_ports: vec![0, 1],
        mem64: (0x4_0000_0000, 0x14_0000_0000),
    };
    let t = build(&p).unwrap();
    let at: HashMap<u64, &Vec<u8>> = t.blobs.iter().map(|(a, b)| (*a, b)).collect();
    // RSDP at bhyve's address, both checksums, pointing at RSDT and XSDT.
    let rsdp = at[&ACPI_BASE];
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(&rsdp[..36]), 0);
    // Found by the legacy scan: 16-byte aligned in 0xE0000-0xFFFFF.
    const { assert!(ACPI_BASE >= 0xe0000 && ACPI_BASE.is_multiple_of(16)) };
    let rsdt = at[&u64::from(u32_at(rsdp, 16))];
    let xsdt = at[&u64_at(rsdp, 24)];
    assert_eq!(&rsdt[..4], b"RSDT");
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut by_sig: HashMap<String, &Vec<u8>> = HashMap::new();
    for (_, b) in &t.blobs {
        if b.len() >= 36 && &b[..8] != b"RSD PTR " {
            let sig = String::from_utf8_lossy(&b[..4]).to_string();
            // Every SDT: its length field is its size, and it sums to zero.
            if sig != "FACS" {
                assert_eq!(u32_at(b, 4) as usize, b.len(), "{sig} length");
                assert_eq!(sum(b), 0, "{sig} checksum");
            }
            by_sig.insert(sig, b);
        }
    }
    // XSDT and RSDT list the same tables.
    let xs: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    let rs: Vec<u64> = (36..rsdt.len())
        .step_by(4)
        .map(|o| u64::from(u32_at(rsdt, o)))
        .collect();
    assert_eq!(xs, rs);
    let listed: Vec<String> = xs
        .iter()
        .map(|a| String::from_utf8_lossy(&at[a][..4]).to_string())
        .collect();
    assert_eq!(listed, ["FACP", "APIC", "MCFG", "SPCR"]);
    // FADT points at FACS and DSDT, and at the PM registers.
    let fadt = by_sig["FACP"];
    assert_eq!(&at[&u64::from(u32_at(fadt, 36))][..4], b"FACS");
    assert_eq!(&at[&u64::from(u32_at(fadt, 40))][..4], b"DSDT");
    assert_eq!(u16::from_le_bytes([fadt[46], fadt[47]]), 9, "SCI on IRQ 9");
    assert_eq!(u32_at(fadt, 64), 0x404, "PM1a_CNT");
    assert_eq!(u32_at(fadt, 76), 0x408, "PM timer");
    assert_eq!(u32_at(fadt, 112) & (1 << 20), 0, "not hardware-reduced");
    // MADT: one enabled LAPIC per vCPU with its APIC ID, one I/O APIC, two overrides.
    let madt = by_sig["APIC"];
    let mut off = 44;
    let (mut lapics, mut ioapics, mut isos) = (Vec::new(), 0, Vec::new());
    while off < madt.len() {
        let (ty, len) = (madt[off], madt[off + 1] as usize);
        match ty {
            0 => lapics.push(madt[off + 3]),
            1 => ioapics += 1,
            2 => isos.push(madt[off + 3]),
            _ => {}
        }
        off += len;
    }
    assert_eq!(lapics, [0, 1, 2, 3]);
    assert_eq!(ioapics, 1);
    assert_eq!(isos, [0, 9]);
    // MCFG: the ECAM window.
    assert_eq!(u64_at(by_sig["MCFG"], 44), 0xe000_0000);

    // iasl must disassemble each table without errors.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (sig, b) in &by_sig {
        let f = dir.join(format!("{}.dat", sig.to_lowercase()));
        std::fs::write(&f, b).unwrap();
        let _ = std::fs::remove_file(f.with_extension("dsl"));
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&f)
            .output()
            .expect("run iasl (Debian package acpica-tools; scripts/setup.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "iasl -d {sig}: {text}");
        assert!(!text.contains("Error"), "iasl -d {sig}: {text}");
        let dsl = std::fs::read_to_string(f.with_extension("dsl")).unwrap();
        if sig == "DSDT" {
            for want in [
                "Device (PCI0)",
                "_PRT",
                "_CRS",
                "Device (COM1)",
                "Device (COM2)",
                "Device (RTC)",
                "Name (_S5,",
                "PNP0A08",
                "PNP0501",
                "PNP0B00",
            ] {
                assert!(dsl.contains(want), "DSDT lacks {want}:\n{dsl}");
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
