//! KVM test of the PCI framework from a guest: enumeration through CONF1 and ECAM, BAR sizing,
//! a BAR move, Command-register decode, and INTx routing, on hostbridge + dummy + lpc.

mod common;
use common::*;

#[test]
fn guest_enumerates_pci_via_conf1_and_ecam_sizes_and_moves_a_bar() {
    let r = run_rom(
        "pci",
        &[
            "-s",
            "0,hostbridge",
            "-s",
            "5,dummy",
            "-s",
            "6:0,dummy",
            "-s",
            "6:3,dummy",
            "-s",
            "31,lpc",
        ],
    );
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = &r.stdout;
    let list = |mech: &str| -> Vec<String> {
        out.lines()
            .filter_map(|l| l.strip_prefix(mech))
            .map(str::to_string)
            .collect()
    };
    let want = [
        "00:00.0 12751275",
        "00:05.0 000110dd",
        "00:06.0 000110dd",
        "00:06.3 000110dd",
        "00:1f.0 70008086",
    ];
    assert_eq!(
        list("CONF1 00:")
            .iter()
            .map(|s| format!("00:{s}"))
            .collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        list("ECAM 00:")
            .iter()
            .map(|s| format!("00:{s}"))
            .collect::<Vec<_>>(),
        want
    );
    assert_eq!(value(out, "CONF1 disabled "), 0xffff_ffff);
    assert_eq!(
        value(out, "ECAM extended "),
        0xffff_ffff,
        "extended space reads all ones"
    );

    // The guest worked on the last dummy it found, 0:6.3: INTA swizzled to I/O APIC pin 22.
    let intx = value(out, "INTx ");
    assert_eq!((intx >> 8) & 0xff, 1, "interrupt pin INTA");
    // Pin 16 + (slot + pin - 1) % 8 with slot 6, INTA.
    assert_eq!(intx & 0xff, 22, "interrupt line: slot 6 INTA");
    let bar0 = value(out, "BAR0 ");
    assert_eq!(bar0 & 1, 1, "BAR0 is an I/O BAR");
    assert!(
        (0x2000..0x10000).contains(&(bar0 & !3)),
        "I/O window: {bar0:#x}"
    );
    let bar1 = value(out, "BAR1 ");
    assert!(
        (0xc000_0000..0xe000_0000).contains(&bar1),
        "MEM32 window: {bar1:#x}"
    );
    let bar2 = value(out, "BAR2 low ");
    assert_eq!(bar2 & 0x6, 0x4, "BAR2 is a 64-bit memory BAR");
    assert!(
        (0xc000_0000..0xe000_0000).contains(&(bar2 & !0xf)),
        "small 64-bit BARs go below 4 GiB"
    );
    assert_eq!(value(out, "BAR2 high "), 0);

    assert_eq!(value(out, "BAR1 size mask "), 0xffff_f000, "4 KiB BAR");
    assert_eq!(value(out, "BAR1 data "), 0x1234_5678);
    assert_eq!(value(out, "BAR1 moved to "), 0xd000_0000);
    assert_eq!(
        value(out, "new address data "),
        0x1234_5678,
        "the registration moved with the BAR"
    );
    assert_eq!(
        value(out, "old address data "),
        0xffff_ffff,
        "nothing left at the old address"
    );
    assert_eq!(
        value(out, "decode off "),
        0xffff_ffff,
        "memory decode off unmaps the BAR"
    );
    assert_eq!(value(out, "decode on "), 0x1234_5678);
    assert_eq!(value(out, "io data "), 0xcafe_babe);
}

#[test]
fn bad_pci_configurations_are_one_line_and_status_4() {
    require_kvm();
    let rom = format!("bootrom,{}", rom("null"));
    for (args, want) in [
        (vec!["-s", "1,lpc", "-s", "2,lpc"], "only one LPC bridge"),
        (vec!["-s", "1:0:0,lpc"], "bus 0"),
        (vec!["-s", "3,dummy,color=red"], "no option 'color'"),
    ] {
        let mut a = args.clone();
        a.extend(["-l", &rom, "vm"]);
        let r = run(&a);
        assert_eq!(r.code(), 4, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim_end().lines().count(), 1, "{}", r.stderr);
    }
}

#[test]
fn msix_vectors_are_delivered_masked_pending_and_released_on_unmask() {
    let r = run_rom("msix", &["-s", "4,dummy"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = &r.stdout;
    for line in [
        "MSI-X vectors: 4",
        "delivered: count 1",
        "vector masked: count 1",
        "PBA 00000002",
        "vector unmasked: count 2",
        "function masked: count 2",
        "function unmasked: count 3",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
}

#[test]
fn msi_is_delivered_held_while_masked_and_silent_when_disabled() {
    let r = run_rom("msi", &["-s", "4,dummy"]);
    assert_eq!(r.code(), 0, "{}", r.stderr);
    let out = &r.stdout;
    // 64-bit address capable, per-vector masking, one message.
    assert_eq!(value(out, "MSI control "), 0x180);
    for line in [
        "delivered: count 1",
        "masked: count 1",
        "pending 00000001",
        "unmasked: count 2",
        "disabled: count 2",
    ] {
        assert!(
            out.lines().any(|l| l == line),
            "missing {line:?} in:\n{out}"
        );
    }
}
