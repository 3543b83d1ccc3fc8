//! The long test: the project's Debian test guest (scripts/build-debian-guest.sh: Debian's
//! cloud kernel, a busybox initramfs, an ext4 disk) booted by rhyve as far as the host allows.
//!
//! On this project's PVM hosts the guest kernel's own code is emulated, so a boot takes
//! fifteen minutes or more. One boot keeps what only a PVM host shows (issue: keep the long PVM
//! boots to what they uniquely prove; the guest-side decompressor, the 64-bit boot protocol
//! and user space are tested on hardware-style KVM by tests/real_guest.rs):
//! - PVM's default path: the bzImage unpacked by rhyve (boot.unpack_bzimage) and its kernel
//!   ELF entered through the PVH note runs the whole kernel initialisation: rhyve's E820 map,
//!   ACPI tables, both vCPUs (PVM's IA32_APIC_BASE answered by rhyve), the virtio-blk and -rnd
//!   functions on PCI, ttyS0, then the init process;
//! - user space then stops at its first system call: the 64-bit busybox's `syscall` lands on
//!   the kernel's entry_SYSCALL_64 still at CPL3 (CS 0x33), which faults. This is a PVM
//!   defect; the test pins it down so that a host that fixes it is noticed (the 32-bit
//!   `int 0x80` path is turned into #UD as well, README.md "What runs where");
//! - the kernel's own panic reboot (`panic=1`) resets through rhyve: status 0.
//!
//! The firmware tests show how far qboot, SeaBIOS and OVMF get on PVM.
//!
//! On a host without those defects (hardware KVM, or the nested harness) the same boots go on
//! into user space: tests/real_guest.rs runs them there (`real_guest_debian_guest_*`). These
//! tests are about PVM and fail on any other host, saying so; scripts/test.sh runs them only
//! on PVM hosts.
//!
//! Run on its own (a PVM host): `cargo test --release --test linux -- --nocapture`.

mod common;
use common::*;

use std::time::Duration;

/// How long one boot may take here in all; the kernel's initialisation alone takes minutes on
/// PVM, and a shared machine makes it longer. Progress is what is judged: a boot fails when
/// its console is silent for `STALL`.
const BOOT_LIMIT: Duration = Duration::from_secs(3600);
const STALL: Duration = Duration::from_secs(600);

/// Kernel options for every boot: console on COM1, the 32-bit user space's int 0x80 path,
/// and fewer things the emulated kernel would spend minutes on.
const CMDLINE: &str = "console=ttyS0 vdso32=0 mitigations=off nowatchdog no-kvmclock rodata=off \
                       cryptomgr.notests init_on_alloc=0 panic=1";

/// Boots the Debian test guest on this PVM host with `args` and the kernel options `extra`,
/// reading its console to the end.
fn boot(tag: &str, child: std::process::Child) -> (LinuxGuest, Run) {
    let mut g = LinuxGuest::new(tag, child);
    g.stall = STALL;
    g.limit = BOOT_LIMIT;
    let r = g.finish();
    (g, r)
}

/// Panics unless this host's KVM is PVM: these tests pin down what PVM does.
fn require_pvm() {
    require_kvm();
    assert!(
        rhyve::hypervisor::cpuid::host_is_pvm(),
        "this test is about PVM hosts and this host's KVM is not PVM; the same guest's user \
         space is tested by tests/real_guest.rs"
    );
}

/// The kernel's initialisation lines every boot must show.
const KERNEL_INIT: &[&str] = &[
    "Linux version 6.",
    "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
    "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved",
    "ACPI: RSDP 0x00000000000F2400",
    "ACPI: INT_SRC_OVR (bus 0 bus_irq 0 global_irq 2 dfl dfl)",
    "PCI: MMCONFIG at [mem 0xe0000000-0xefffffff] reserved in E820",
    "ACPI: 1 ACPI AML tables successfully acquired and loaded",
    "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00-ff])",
    "Serial: 8250/16550 driver",
];

/// What a PVM host adds to the command line (boot.pvm_cmdline), as the kernel echoes it.
const PVM_CMDLINE_ECHO: &str = "noxsave clearcpuid=popcnt,smap,ssse3 tsc_early_khz=";

#[test]
fn debian_guest_boots_two_cpus_through_pvh_finds_its_virtio_devices_and_user_space_faults_on_pvm() {
    require_pvm();
    let g = debian_guest();
    let disk = std::env::temp_dir().join(format!("rhyve-linux-{}.ext4", std::process::id()));
    std::fs::copy(g.join("disk.ext4"), &disk).expect("copy the test disk");
    let blk = format!("2,virtio-blk,{}", disk.display());
    // PVM's default path: rhyve unpacks the bzImage and enters its kernel ELF through the PVH
    // note. The 64-bit busybox shell as init, to show what its first system call does.
    let args = with_debian_guest(
        &g,
        &[
            "-v",
            "-c",
            "2",
            "-m",
            "512M",
            "-l",
            "com1,stdio",
            "-s",
            &blk,
            "-s",
            "3,virtio-rnd",
        ],
        &format!("{CMDLINE} rdinit=/bin64/sh"),
        "debian",
    );
    let (guest, r) = boot(
        "PVH",
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    let _ = std::fs::remove_file(&disk);
    guest.assert_lines(&r, KERNEL_INIT);
    // No decompressor ran in the guest.
    assert!(
        r.stderr.contains("unpacked its") && r.stderr.contains("entry Pvh"),
        "rhyve did not unpack the bzImage for PVH: {}",
        r.stderr
    );
    guest.assert_lines(
        &r,
        &[
            PVM_CMDLINE_ECHO,
            "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable",
            // PVM answers IA32_APIC_BASE reads with 0; rhyve's MSR filter answers them, so
            // Linux keeps its local APIC and starts the second vCPU with INIT/SIPI.
            "x2apic enabled",
            "smp: Brought up 1 node, 2 CPUs",
            // The two virtio functions, modern (1040 + type).
            "pci 0000:00:02.0: [1af4:1042] type 00 class 0x018000",
            "pci 0000:00:03.0: [1af4:1044] type 00 class 0xff0000",
            "Run /bin64/sh as init process",
            // PVM defect: `syscall` from 64-bit user mode reaches the kernel's entry still at
            // CPL3 (CS 0x33), where fetching kernel text faults.
            "sh[1]: segfault at ffffffff",
            "RIP: 0033:entry_SYSCALL_64",
            "Kernel panic - not syncing: Attempted to kill init!",
        ],
    );
    assert_eq!(
        r.code(),
        0,
        "the kernel's panic reboot is bhyve's reset status 0: {}",
        r.stderr
    );
}

/// Boots firmware `rom` on this PVM host with the i440fx chipset and fw_cfg, the test guest's
/// boot disk `disk` (if any) on virtio-blk, and `extra` rhyve options.
fn boot_firmware_on_pvm(
    tag: &str,
    rom: &str,
    disk: Option<&str>,
    extra: &[&str],
) -> (LinuxGuest, Run) {
    require_pvm();
    let mut args = firmware_args(rom, "256M");
    if let Some(d) = disk {
        args.extend(["-s".into(), format!("2,virtio-blk,{d}")]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args.push(tag.into());
    boot(
        tag,
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()),
    )
}

/// A copy of the test guest's file `name` (a boot disk, a variable store) in a directory of
/// this test's own, removed on drop.
fn copy_of(dir: &common::api::Dir, from: &std::path::Path) -> String {
    let name = from.file_name().expect("a file name");
    let to = dir.path(&name.to_string_lossy());
    std::fs::copy(from, &to).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    to.display().to_string()
}

#[test]
fn firmware_seabios_boots_syslinux_from_virtio_blk_until_its_32_bit_iret_on_pvm() {
    // SeaBIOS runs from the reset vector through PAM, its POST and its own virtio-blk driver,
    // and boots the MBR; SYSLINUX then returns from an interrupt with a 32-bit `iret` at CPL0,
    // which PVM's emulator cannot run (the guest's kernel-mode code is emulated here).
    let dir = common::api::Dir::new("seabios-pvm");
    let disk = copy_of(&dir, &debian_guest().join("bios.img"));
    let (g, r) = boot_firmware_on_pvm(
        "seabios-pvm",
        "/usr/share/seabios/bios.bin",
        Some(&disk),
        &[],
    );
    g.assert_lines(
        &r,
        &[
            "SeaBIOS (version",
            "Booting from Hard Disk",
            "SYSLINUX 6.04",
        ],
    );
    assert!(
        r.stderr
            .contains("KVM cannot emulate `iret` (cf) in 32-bit code"),
        "SeaBIOS's boot stopped elsewhere: {}",
        r.stderr
    );
    assert_eq!(
        r.code(),
        4,
        "an emulation failure is bhyve's error status 4"
    );
}

#[test]
fn firmware_ovmf_stops_at_its_first_x87_instruction_on_pvm() {
    // OVMF's SEC phase sets the x87 control word (`fldcw`) before anything else it prints;
    // KVM's instruction emulator has no x87, so PVM, which emulates the guest's kernel-mode
    // code, stops there: the 4 MiB build in 32-bit code, the single-file build in 64-bit code.
    let dir = common::api::Dir::new("ovmf-pvm");
    let vars = copy_of(
        &dir,
        std::path::Path::new("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    );
    for (rom, mode) in [
        (format!("/usr/share/OVMF/OVMF_CODE_4M.fd,{vars}"), "32-bit"),
        ("/usr/share/ovmf/OVMF.fd".to_string(), "64-bit"),
    ] {
        let (_, r) = boot_firmware_on_pvm("ovmf-pvm", &rom, None, &[]);
        assert!(
            r.stderr.contains("KVM cannot emulate `fldcw")
                && r.stderr.contains(&format!("in {mode} code")),
            "{rom}: OVMF stopped elsewhere: {}",
            r.stderr
        );
        assert_eq!(
            r.code(),
            4,
            "{rom}: an emulation failure is bhyve's error status 4"
        );
    }
}

#[test]
fn firmware_qboot_hands_the_kernel_its_memory_map_and_acpi_tables_on_pvm() {
    // qboot runs from the reset vector, shadows itself through PAM, installs rhyve's ACPI
    // tables from fw_cfg's table loader and boots the kernel fw_cfg carries: nothing stops it
    // here. The kernel then goes as far as a directly booted one (the test above), so this
    // test stops once the kernel has printed qboot's memory map and found the tables qboot
    // installed (earlyprintk shows them as they are parsed, minutes before the console).
    require_pvm();
    let g = debian_guest();
    let mut opts = firmware_args("/usr/share/qemu/qboot.rom", "256M");
    opts.push("-v".into());
    let opts: Vec<&str> = opts.iter().map(String::as_str).collect();
    let args = with_debian_guest(
        &g,
        &opts,
        &format!("{CMDLINE} earlyprintk=ttyS0"),
        "qboot-pvm",
    );
    let mut guest = LinuxGuest::new(
        "qboot",
        spawn(&args.iter().map(String::as_str).collect::<Vec<_>>()),
    );
    guest.stall = STALL;
    guest.limit = BOOT_LIMIT;
    let found = guest.wait_for("ACPI: SPCR 0x");
    let r = guest.stop();
    assert!(
        found.is_some(),
        "the kernel never listed the SPCR table qboot installed; rhyve's stderr: {}\nconsole:\n{}",
        r.stderr,
        guest.console
    );
    assert!(
        r.stderr.contains("handed to the firmware through fw_cfg"),
        "rhyve did not give the kernel to qboot: {}",
        r.stderr
    );
    guest.assert_lines(
        &r,
        &[
            "Linux version 6.",
            // qboot's own memory map: what it reserves for its copy of the tables.
            "BIOS-e820: [mem 0x00000000000d0000-",
            // The ECAM window fw_cfg's map reserves.
            "BIOS-e820: [mem 0x00000000e0000000-0x00000000efffffff] reserved",
            "ACPI: RSDP 0x00000000000F",
            "ACPI: XSDT 0x",
            "ACPI: DSDT 0x",
        ],
    );
    assert!(
        !guest.console.contains("ACPI: RSDP 0x00000000000F2400"),
        "the kernel found rhyve's direct-boot tables, not the ones qboot installed"
    );
}
