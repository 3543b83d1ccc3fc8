//! The VM as bhyve's `main()` builds it: config tree -> VM -> guest memory -> vCPUs -> platform
//! devices -> boot payload -> start vCPUs -> wait for the VM to stop.

pub mod assist;
pub mod control;
pub mod exit_stats;
pub mod main_loop;
pub mod migration;
pub mod profile;
pub mod run_page;
pub mod snapshot;
pub mod vcpu;
pub mod vm_loop;
pub mod vmexit;
pub mod xmsr;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{Kvm, VmFd};
use rhyve_hypervisor::memory::GuestMem;
use vm_memory::Bytes;

use control::{SuspendReason, VmControl};
use rhyve_base::lifecycle::{DeviceState, Lifecycle, StateError};
use rhyve_bus::{Bus, BusDevice, BusError};
use rhyve_config::parse_cpulist;
use rhyve_config::{parse_memsize, Config, ConfigError};
use rhyve_devices::legacy::pm::Pm;
use rhyve_devices::legacy::{fw_cfg, i8042, lpc, post, resetctl, rtc, uart, uart_backend};
use rhyve_hypervisor::irq::IrqLine;
use rhyve_hypervisor::irq::IrqRouter;
use rhyve_hypervisor::shadow::{self, Shadow};
use rhyve_hypervisor::{self as hypervisor, cpuid, GuestRam, HvError, MemoryLayout};
use rhyve_pci::{
    self as pci,
    root::{Conf1Address, Conf1Data, Ecam, PciRoot, ECAM_SIZE},
    PciInitCtx,
};
use rhyve_platform::acpi;
use rhyve_platform::boot::linux;
use vcpu::VcpuSpec;

/// Errors building or starting a VM; each says what the user should change.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    #[error(transparent)]
    Memory(#[from] hypervisor::memory::MemoryError),
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    #[error("{0}")]
    Device(String),
    #[error("nothing to boot: give a firmware ROM with -l bootrom,FILE or a kernel with -o boot.kernel=FILE")]
    NoBootPayload,
    #[error(transparent)]
    Boot(#[from] linux::BootError),
    #[error("{0} is not supported yet")]
    Unsupported(&'static str),
    #[error("cannot start vcpu thread: {0}")]
    Thread(std::io::Error),
}

/// Kernel command-line additions on PVM hosts (`boot.pvm_cmdline`).
pub const PVM_CMDLINE: &str = " noxsave clearcpuid=popcnt,smap,ssse3";

/// What the vCPU threads and devices share.
pub struct VmShared {
    pub ctl: Arc<VmControl>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    /// `-e` / x86.strictio: an unassigned port access stops the VM.
    pub strictio: bool,
    /// x86.strictmsr (cleared by `-w`): unimplemented MSRs raise #GP.
    pub strictmsr: bool,
    /// The CPU vendor the guest sees, which decides the vendor MSRs rhyve answers (`xmsr`).
    pub vendor: cpuid::Vendor,
    /// Exit counts and RIP samples, when asked for (`debug.exit_stats`, `debug.rip_samples`).
    pub profile: Option<Arc<profile::Profile>>,
    /// Exits by vCPU and kind with their latency histograms, always kept (`exit_stats`).
    pub exit_stats: Arc<exit_stats::ExitStats>,
}

/// A built VM, ready to start.
pub struct Vm {
    _kvm: Kvm,
    pub vm_fd: Arc<VmFd>,
    pub router: Arc<IrqRouter>,
    /// ACPI power management: the power button lives here.
    pub pm: Pm,
    pub shared: Arc<VmShared>,
    pub ram: GuestRam,
    pub pci: Arc<PciRoot>,
    /// The LPC-side devices, by name, for pausing, resuming, saving and restoring them.
    legacy: Vec<LegacyDevice>,
    vcpus: Vec<VcpuSpec>,
    threads: Vec<JoinHandle<()>>,
    run_size: usize,
}

/// A VM dropped while its vCPUs still run (a caller that never called `wait`, or an error
/// after `start`) stops and joins them first: they run on memory `ram` owns (the boot ROM and
/// variable-store mappings), which must outlive them.
impl Drop for Vm {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shared.ctl.suspend(SuspendReason::Error);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
        // The buses and the PCI root hold each other: without this nothing of the VM would
        // be freed (a VM rebooted over the API would leak its RAM and keep stdio).
        self.shared.pio.clear();
        self.shared.mmio.clear();
    }
}

/// A PCI function's address, emulation name and I/O counters (`Vm::device_counters`).
pub type DeviceCounters = (pci::PciAddr, &'static str, Vec<(&'static str, u64)>);

/// A legacy device's name and its lifecycle (the same device its port range dispatches to).
type LegacyDevice = (&'static str, Arc<Mutex<dyn Lifecycle>>);

fn insert_pio(
    shared: &VmShared,
    name: &str,
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
) -> Result<(), VmError> {
    shared
        .pio
        .insert(name, base, len, dev)
        .map_err(VmError::from)
}

impl Vm {
    /// Builds the VM the config tree describes (bhyve `main` up to starting the vCPUs), in
    /// the order ARCHITECTURE.md gives: memory and the boot ROM before the irqchip, vCPUs
    /// before the kernel (its PVM command line carries their TSC frequency), devices, then the
    /// tables that describe them, then the BSP's start state.
    pub fn create(cfg: &Config) -> Result<Vm, VmError> {
        for (key, what) in [
            ("gdb.port", "the gdb stub (-G)"),
            ("restore.file", "restoring a checkpoint (-r)"),
        ] {
            if cfg.get(key)?.is_some() {
                return Err(VmError::Unsupported(what));
            }
        }
        let cpus = cfg.get_u64("cpus")?.unwrap_or(1) as u32;
        let topo = Self::topology(cfg, cpus)?;
        let memsize = cfg
            .get("memory.size")?
            .and_then(|s| parse_memsize(&s))
            .unwrap_or(256 << 20);
        let layout = MemoryLayout::new(memsize)?;

        let kvm = hypervisor::open()?;
        let pvm = cpuid::host_is_pvm();
        if pvm {
            log::info!("host KVM is PVM (software virtualization): guest kernel code is emulated; CX16 hidden from the guest");
        }
        let vm_fd = Arc::new(hypervisor::create_vm(&kvm, cpus)?);
        let mut ram = Self::map_memory(cfg, &vm_fd, layout)?;
        let fwcfg = cfg.get("lpc.fwcfg")?.is_some();
        let firmware = cfg.get("lpc.bootrom")?.is_some();
        let kernel = Self::boot_payload(cfg, &vm_fd, &mut ram, fwcfg)?;
        hypervisor::create_irqchip(&vm_fd, pvm)?;

        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|err| HvError::Kvm {
                what: "KVM_GET_SUPPORTED_CPUID",
                err,
            })?;
        let shared = Arc::new(VmShared {
            ctl: Arc::new(VmControl::new()),
            pio: Arc::new(Bus::new()),
            mmio: Arc::new(Bus::new()),
            strictio: cfg.get_bool("x86.strictio", false)?,
            strictmsr: cfg.get_bool("x86.strictmsr", true)?,
            vendor: cpuid::Vendor::of(&supported),
            profile: Self::profile(cfg)?,
            exit_stats: Arc::new(exit_stats::ExitStats::new(cpus)),
        });
        let vcpus = Self::create_vcpus(cfg, &vm_fd, &supported, cpus, &topo, pvm)?;
        let kernel_entry = match kernel {
            Some(kernel) => Some(Self::load_kernel(cfg, &ram, &layout, &kernel, &vcpus, pvm)?),
            None => None,
        };

        let mut legacy = Self::init_platform(cfg, &vm_fd, &shared, &layout, cpus)?;
        let pm = Pm::new(vm_fd.clone(), shared.ctl.clone());
        for (name, base, len, dev) in pm.devices() {
            insert_pio(&shared, name, base, len, dev)?;
        }
        legacy.push(("pm", pm.lifecycle()));
        let router =
            Arc::new(IrqRouter::new(vm_fd.clone()).map_err(|e| VmError::Device(e.to_string()))?);
        // QEMU's pc chipset (PAM, PIIX4 PM) when a host bridge asks for it (model=i440fx).
        let i440fx = pci::configured_devices(cfg)?.iter().any(|(addr, name)| {
            name == "hostbridge" && pci::hostbridge::has_pam(cfg, &addr.config_prefix())
        });
        let shadow = Self::shadow(&vm_fd, &mut ram, &shared, i440fx && firmware)?;
        if let Some(f) = ram.flash() {
            let dev = Arc::new(Mutex::new(FlashExits(f.clone(), Default::default())));
            shared
                .mmio
                .insert("uefi variable flash", f.base(), f.size(), dev.clone())
                .map_err(|e| VmError::Device(e.to_string()))?;
            legacy.push(("flash", dev));
        }
        let pci = Self::init_pci(
            cfg,
            &PciInitCtx {
                router: router.clone(),
                mem: ram.mem.clone(),
                shadow,
            },
            &shared,
            &layout,
            i440fx,
        )?;
        let platform = Self::acpi_platform(cfg, &topo, cpus, &pci);
        if fwcfg {
            let dev = Self::fw_cfg(cfg, &ram, &layout, memsize, cpus, &platform, &vcpus, pvm)?;
            insert_pio(
                &shared,
                "fw_cfg",
                fw_cfg::PORT_BASE,
                fw_cfg::PORT_LEN,
                dev.clone(),
            )?;
            insert_pio(
                &shared,
                "fw_cfg dma",
                fw_cfg::DMA_BASE,
                fw_cfg::DMA_LEN,
                Arc::new(Mutex::new(fw_cfg::FwCfgDma(dev.clone()))),
            )?;
            legacy.push(("fw_cfg", dev));
        }
        // Firmware that reads fw_cfg installs the tables it hands over where it chooses; the
        // F-segment is its own.
        if !(fwcfg && firmware) {
            Self::write_tables(cfg, &ram, &topo, cpus, &platform)?;
        }
        if let Some(bsp) = vcpus.first() {
            match kernel_entry {
                Some(entry) => linux::setup_bsp(&bsp.fd, entry)?,
                None => hypervisor::vcpu_reset(&bsp.fd)?,
            }
        }

        Ok(Vm {
            run_size: kvm.get_vcpu_mmap_size().map_err(|err| HvError::Kvm {
                what: "KVM_GET_VCPU_MMAP_SIZE",
                err,
            })?,
            _kvm: kvm,
            vm_fd,
            router,
            pm,
            shared,
            ram,
            pci,
            legacy,
            vcpus,
            threads: Vec::new(),
        })
    }

    /// `-c N,sockets=S,cores=C,threads=T`, or one socket of `cpus` cores.
    fn topology(cfg: &Config, cpus: u32) -> Result<cpuid::Topology, VmError> {
        Ok(
            match (
                cfg.get_u64("sockets")?,
                cfg.get_u64("cores")?,
                cfg.get_u64("threads")?,
            ) {
                (Some(s), Some(c), Some(t)) => cpuid::Topology {
                    sockets: s as u32,
                    cores: c as u32,
                    threads: t as u32,
                },
                _ => cpuid::Topology::flat(cpus),
            },
        )
    }

    /// All guest memory by the layout: left out of core dumps unless `-C`, locked with `-S`.
    fn map_memory(cfg: &Config, vm_fd: &VmFd, layout: MemoryLayout) -> Result<GuestRam, VmError> {
        let ram = GuestRam::new(vm_fd, layout)?;
        if !cfg.get_bool("memory.guest_in_core", false)? {
            ram.exclude_from_core();
        }
        if cfg.get_bool("memory.wired", false)? {
            ram.wire()?;
        }
        Ok(ram)
    }

    /// The boot payload: a firmware ROM, started from the reset vector on the BSP (mapped now,
    /// with the rest of guest memory, before the irqchip: see `create_irqchip`), or a Linux
    /// kernel entered directly, returned to be loaded once the vCPUs exist.
    /// With fw_cfg (`fwcfg`) a ROM and a kernel go together: the firmware boots the kernel it
    /// reads from fw_cfg.
    fn boot_payload(
        cfg: &Config,
        vm_fd: &Arc<VmFd>,
        ram: &mut GuestRam,
        fwcfg: bool,
    ) -> Result<Option<String>, VmError> {
        match (cfg.get("lpc.bootrom")?, cfg.get("boot.kernel")?) {
            (Some(_), Some(_)) if !fwcfg => Err(VmError::Device(
                "give either a boot ROM (-l bootrom) or a kernel (boot.kernel), not both, or add -l fwcfg,qemu to hand the kernel to the firmware".into(),
            )),
            (None, None) => Err(VmError::NoBootPayload),
            (Some(_), None) if cfg.get("boot.initrd")?.is_some() => Err(VmError::Device(
                "boot.initrd is given without boot.kernel: an initramfs goes with a kernel (add -o boot.kernel=PATH)".into(),
            )),
            (Some(rom), _) => {
                let vars = cfg.get("lpc.bootvars")?;
                let rom_base = ram.map_bootrom(vm_fd, &rom, vars.as_deref(), fwcfg)?;
                log::info!("boot ROM {rom} mapped at {rom_base:#x}");
                Ok(None)
            }
            (None, Some(kernel)) => Ok(Some(kernel)),
        }
    }

    /// The BIOS area routed by PAM (0xC0000-0xFFFFF), for a host bridge model that has PAM
    /// registers and a boot ROM to alias there (`rhyve_hypervisor::shadow`); its exits (writes
    /// to the ROM side, reads where nothing is mapped) come to it over the MMIO bus.
    fn shadow(
        vm_fd: &Arc<VmFd>,
        ram: &mut GuestRam,
        shared: &Arc<VmShared>,
        wanted: bool,
    ) -> Result<Option<Arc<Shadow>>, VmError> {
        if !wanted {
            return Ok(None);
        }
        let s = ram.enable_shadow(vm_fd)?;
        shared
            .mmio
            .insert(
                "bios shadow (pam)",
                shadow::BASE,
                shadow::END - shadow::BASE,
                Arc::new(Mutex::new(ShadowExits(s.clone()))),
            )
            .map_err(|e| VmError::Device(e.to_string()))?;
        Ok(Some(s))
    }

    /// The vCPUs with their CPUID and `-p` host CPU sets: KVM wants them created before the
    /// guest runs; their threads start in `start`.
    fn create_vcpus(
        cfg: &Config,
        vm_fd: &VmFd,
        supported: &kvm_bindings::CpuId,
        cpus: u32,
        topo: &cpuid::Topology,
        pvm: bool,
    ) -> Result<Vec<VcpuSpec>, VmError> {
        (0..cpus)
            .map(|id| {
                let table = cpuid::for_vcpu(supported, id, topo, pvm);
                let fd = hypervisor::create_vcpu(vm_fd, id, &table)?;
                let cpuset = match cfg.get(&format!("vcpu.{id}.cpuset"))? {
                    Some(s) => Some(parse_cpulist(&s).ok_or_else(|| ConfigError::Invalid {
                        key: format!("vcpu.{id}.cpuset"),
                        msg: format!("'{s}' is not a host CPU list"),
                    })?),
                    None => None,
                };
                Ok(VcpuSpec { id, fd, cpuset })
            })
            .collect()
    }

    /// Loads the kernel, initrd and command line (with PVM's additions) and writes the boot
    /// tables; returns the entry point.
    fn load_kernel(
        cfg: &Config,
        ram: &GuestRam,
        layout: &MemoryLayout,
        kernel: &str,
        vcpus: &[VcpuSpec],
        pvm: bool,
    ) -> Result<linux::Entry, VmError> {
        let initrd = cfg.get("boot.initrd")?;
        let cmdline = Self::kernel_cmdline(cfg, vcpus, pvm)?;
        // On PVM the bzImage's decompressor would run emulated for over a minute.
        let unpack = cfg.get_bool("boot.unpack_bzimage", pvm)?;
        let entry = linux::load(
            &ram.mem,
            layout,
            kernel,
            initrd.as_deref(),
            &cmdline,
            unpack,
        )?;
        linux::write_boot_tables(&ram.mem, entry)?;
        log::info!("kernel {kernel} loaded, entry {entry:?}, command line {cmdline:?}");
        Ok(entry)
    }

    /// `boot.cmdline`, with PVM's additions (`boot.pvm_cmdline`).
    fn kernel_cmdline(cfg: &Config, vcpus: &[VcpuSpec], pvm: bool) -> Result<String, VmError> {
        let mut cmdline = cfg.get("boot.cmdline")?.unwrap_or_default();
        if pvm && cfg.get_bool("boot.pvm_cmdline", true)? {
            // What PVM's emulator cannot run: XSAVE state instructions, popcnt, the SMAP and
            // SSSE3 paths. -o boot.pvm_cmdline=false drops it.
            cmdline.push_str(PVM_CMDLINE);
            // Linux calibrates the TSC against the PIT or the PM timer in loops that emulation
            // makes too slow to trust (it then falls back to the PM timer, an exit per clock
            // read); KVM knows the frequency.
            if let Some(khz) = vcpus.first().and_then(|v| v.fd.get_tsc_khz().ok()) {
                cmdline.push_str(&format!(" tsc_early_khz={khz}"));
            }
        }
        Ok(cmdline)
    }

    /// QEMU's fw_cfg (`lpc.fwcfg=qemu`) with what firmware reads: the CPU count and RAM size,
    /// the memory map, the ACPI tables through the loader script, the boot-failure wait and
    /// boot order, and, with a ROM, the kernel, initrd and command line it is to boot.
    #[allow(clippy::too_many_arguments)]
    fn fw_cfg(
        cfg: &Config,
        ram: &GuestRam,
        layout: &MemoryLayout,
        memsize: u64,
        cpus: u32,
        platform: &acpi::Platform,
        vcpus: &[VcpuSpec],
        pvm: bool,
    ) -> Result<Arc<Mutex<fw_cfg::FwCfg>>, VmError> {
        use fw_cfg::key;
        let err = |e: fw_cfg::FwCfgError| VmError::Device(e.to_string());
        let mut b = fw_cfg::FwCfgBuilder::new();
        let ncpus = u16::try_from(cpus)
            .unwrap_or(u16::MAX)
            .to_le_bytes()
            .to_vec();
        b.item(key::RAM_SIZE, memsize.to_le_bytes().to_vec())
            .item(key::NB_CPUS, ncpus.clone())
            .item(key::MAX_CPUS, ncpus)
            .item(key::IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
        use fw_cfg::{E820_RAM, E820_RESERVED};
        use hypervisor::memory::{ECAM_BASE, HIGHMEM_BASE};
        // RAM, and the ECAM window reserved (firmware copies the map to the guest, and Linux
        // uses MMCONFIG only where the map reserves it).
        let mut e820 = vec![
            (0, layout.lowmem, E820_RAM),
            (ECAM_BASE, ECAM_SIZE, E820_RESERVED),
        ];
        if layout.highmem > 0 {
            e820.push((HIGHMEM_BASE, layout.highmem, E820_RAM));
        }
        b.file("etc/e820", fw_cfg::e820_file(&e820)).map_err(err)?;
        // Milliseconds SeaBIOS waits after a failed boot before it resets the machine.
        b.file("etc/boot-fail-wait", 5000u32.to_le_bytes().to_vec())
            .map_err(err)?;
        b.file("bootorder", Vec::new()).map_err(err)?;
        if cfg.get("lpc.com1.path")?.is_some() {
            // There is no display: SeaBIOS's text output (its own, a boot loader's) goes to
            // COM1, and its keyboard input comes from there.
            b.file("etc/sercon-port", 0x3f8u16.to_le_bytes().to_vec())
                .map_err(err)?;
        }
        if cfg.get_bool("acpi_tables", true)? {
            let t = acpi::build_for_loader(platform);
            b.file(acpi::LOADER_TABLES, t.tables).map_err(err)?;
            b.file(acpi::LOADER_RSDP, t.rsdp).map_err(err)?;
            b.file(acpi::LOADER_SCRIPT, t.script).map_err(err)?;
        }
        if let (Some(_), Some(kernel)) = (cfg.get("lpc.bootrom")?, cfg.get("boot.kernel")?) {
            let read = |p: &str| std::fs::read(p).map_err(|e| VmError::Device(format!("{p}: {e}")));
            let image = read(&kernel)?;
            let initrd = match cfg.get("boot.initrd")? {
                Some(p) => Some(read(&p)?),
                None => None,
            };
            let cmdline = Self::kernel_cmdline(cfg, vcpus, pvm)?;
            fw_cfg::add_linux(&mut b, &image, initrd, &cmdline, layout.lowmem)
                .map_err(|m| VmError::Device(format!("{kernel}: {m}")))?;
            log::info!("kernel {kernel} handed to the firmware through fw_cfg");
        }
        Ok(Arc::new(Mutex::new(b.build(ram.mem.clone()).map_err(err)?)))
    }

    /// The MP table (unless `-Y`) and the ACPI tables (unless `-A` is off), written into RAM.
    fn write_tables(
        cfg: &Config,
        ram: &GuestRam,
        topo: &cpuid::Topology,
        cpus: u32,
        platform: &acpi::Platform,
    ) -> Result<(), VmError> {
        if cfg.get_bool("x86.mptable", true)? {
            let ids: Vec<u32> = (0..cpus).map(|i| topo.apic_id(i)).collect();
            match rhyve_platform::mptable::build(&ids) {
                Some(t) => ram
                    .mem
                    .write_slice(
                        &t,
                        vm_memory::GuestAddress(rhyve_platform::mptable::MPTABLE_BASE),
                    )
                    .map_err(|e| VmError::Device(format!("writing the MP table: {e}")))?,
                None => {
                    log::warn!("MP table left out: {cpus} vCPUs do not fit it (-Y silences this)")
                }
            }
        }
        if cfg.get_bool("acpi_tables", true)? {
            let tables = acpi::build(platform).map_err(|e| VmError::Device(e.to_string()))?;
            for (at, blob) in tables.blobs {
                ram.mem
                    .write_slice(&blob, vm_memory::GuestAddress(at))
                    .map_err(|e| VmError::Device(format!("writing ACPI tables: {e}")))?;
            }
        }
        Ok(())
    }

    /// What the ACPI tables describe.
    fn acpi_platform(
        cfg: &Config,
        topo: &cpuid::Topology,
        cpus: u32,
        pci: &PciRoot,
    ) -> acpi::Platform {
        acpi::Platform {
            apic_ids: (0..cpus).map(|i| topo.apic_id(i)).collect(),
            com_ports: (0..lpc::COM_PORTS.len())
                .filter(|i| {
                    lpc::COM_PORTS
                        .get(*i)
                        .is_some_and(|p| cfg.get_raw(&format!("lpc.{}.path", p.0)).is_some())
                })
                .collect(),
            mem64: pci.mem64_window(),
        }
    }

    /// The LPC-side platform: COM ports, RTC, reset ports, POST port, i8042 (bhyve `init_pci`'s
    /// lpc part, `atkbdc_init` and the `inout` handlers registered at start-up). Returns the
    /// devices' lifecycles, by name.
    fn init_platform(
        cfg: &Config,
        vm_fd: &VmFd,
        shared: &Arc<VmShared>,
        layout: &MemoryLayout,
        cpus: u32,
    ) -> Result<Vec<LegacyDevice>, VmError> {
        let mut legacy: Vec<LegacyDevice> = Vec::new();
        for (name, base, irq) in lpc::COM_PORTS {
            let Some(path) = cfg.get(&format!("lpc.{name}.path"))? else {
                continue;
            };
            let spec = uart_backend::BackendSpec::parse(&path)
                .map_err(|m| VmError::Device(format!("{name}: {m}")))?;
            let backend =
                uart_backend::open(&spec).map_err(|m| VmError::Device(format!("{name}: {m}")))?;
            let line = IrqLine::new(vm_fd, irq)
                .map_err(|e| VmError::Device(format!("{name}: IRQ {irq}: {e}")))?;
            let dev = uart::Uart::start(name, line, backend);
            insert_pio(shared, name, u64::from(base), 8, dev.clone())?;
            legacy.push((name, dev));
        }
        let localtime = cfg.get_bool("rtc.use_localtime", true)?;
        let rtc = Arc::new(Mutex::new(rtc::Rtc::new(layout, localtime, cpus)));
        let irq8 =
            IrqLine::new(vm_fd, 8).map_err(|e| VmError::Device(format!("RTC IRQ 8: {e}")))?;
        rtc::start_timer(rtc.clone(), irq8)
            .map_err(|e| VmError::Device(format!("RTC timer: {e}")))?;
        insert_pio(shared, "rtc", 0x70, 2, rtc.clone())?;
        legacy.push(("rtc", rtc));
        let boot_timer = cfg.get_bool("debug.boot_timer", false)?;
        let post = Arc::new(Mutex::new(post::PostPort::new(boot_timer)));
        insert_pio(shared, "post", 0x80, 1, post.clone())?;
        legacy.push(("post", post));
        let ctl = shared.ctl.clone();
        let reset = Arc::new(Mutex::new(resetctl::ResetControl::new(ctl.clone())));
        insert_pio(shared, "reset control", 0xcf9, 1, reset.clone())?;
        legacy.push(("reset control", reset));
        let isa_line = |irq: u32| -> Result<i8042::Line, VmError> {
            let line = IrqLine::new(vm_fd, irq)
                .map_err(|e| VmError::Device(format!("i8042 IRQ {irq}: {e}")))?;
            Ok(Box::new(line))
        };
        let kbc = Arc::new(Mutex::new(i8042::I8042::new(
            ctl,
            isa_line(1)?,
            isa_line(12)?,
        )));
        insert_pio(
            shared,
            "i8042",
            i8042::I8042::BASE,
            i8042::I8042::LEN,
            kbc.clone(),
        )?;
        legacy.push(("i8042", kbc));
        Ok(legacy)
    }

    /// PCI (bhyve `init_pci`): every configured function's `init`, then BAR allocation and
    /// registration, then the configuration mechanisms (CONF1 ports and ECAM).
    fn init_pci(
        cfg: &Config,
        ctx: &PciInitCtx,
        shared: &Arc<VmShared>,
        layout: &MemoryLayout,
        i440fx: bool,
    ) -> Result<Arc<PciRoot>, VmError> {
        let top_of_ram = if layout.highmem > 0 {
            hypervisor::memory::HIGHMEM_BASE + layout.highmem
        } else {
            layout.lowmem
        };
        let mut root = PciRoot::new(shared.pio.clone(), shared.mmio.clone(), top_of_ram);
        let devices = pci::configured_devices(cfg)?;
        let lpcs: Vec<_> = devices.iter().filter(|(_, d)| d == "lpc").collect();
        if lpcs.len() > 1 {
            return Err(VmError::Device(
                "only one LPC bridge (-s N,lpc) is allowed".into(),
            ));
        }
        if let Some((addr, _)) = lpcs.first() {
            if addr.bus != 0 {
                return Err(VmError::Device(format!(
                    "the LPC bridge must be on bus 0, not at {addr}"
                )));
            }
        }
        let mut devices = devices;
        // An i440fx brings its PIIX4 PM function at 0:1.3 when slot 1 is free: alone there it
        // is invisible to enumeration (no function 0), so only OVMF, which reads it directly,
        // finds it. Next to a function 0, SeaBIOS would enumerate it and set up SMM through
        // ports rhyve does not have; `-s 1:3,piix4-pm` places it by hand.
        let piix4 = pci::PciAddr {
            bus: 0,
            slot: 1,
            func: 3,
        };
        let slot1_free = devices.iter().all(|(a, _)| a.bus != 0 || a.slot != 1);
        if i440fx && slot1_free {
            devices.push((piix4, "piix4-pm".to_string()));
        } else if i440fx {
            log::info!(
                "hostbridge model=i440fx: slot 1 is taken, so there is no PIIX4 PM function at 0:1.3 (OVMF needs it)"
            );
        }
        for (addr, name) in devices {
            let emul = crate::emulations::find_emulation(&name).ok_or_else(|| {
                VmError::Device(format!("PCI {addr}: unknown emulation '{name}'"))
            })?;
            let dev = (emul.init)(ctx, cfg, &addr.config_prefix())
                .map_err(|m| VmError::Device(format!("PCI {addr} ({name}): {m}")))?;
            root.add(addr, dev)
                .map_err(|e| VmError::Device(e.to_string()))?;
        }
        root.finish_init()
            .map_err(|e| VmError::Device(e.to_string()))?;
        let root = Arc::new(root);
        insert_pio(
            shared,
            "pci conf1 address",
            0xcf8,
            1,
            Arc::new(Mutex::new(Conf1Address(root.clone()))),
        )?;
        insert_pio(
            shared,
            "pci conf1 data",
            0xcfc,
            4,
            Arc::new(Mutex::new(Conf1Data(root.clone()))),
        )?;
        shared.mmio.insert(
            "pci ecam",
            Ecam::BASE,
            ECAM_SIZE,
            Arc::new(Mutex::new(Ecam(root.clone()))),
        )?;
        Ok(root)
    }

    /// The profile `debug.exit_stats` and `debug.rip_samples` ask for, if any.
    fn profile(cfg: &Config) -> Result<Option<Arc<profile::Profile>>, VmError> {
        let hz = match cfg.get("debug.rip_sample_hz")? {
            Some(v) => u32::try_from(rhyve_config::parse_u64(&v).unwrap_or(0))
                .ok()
                .filter(|hz| (1..=10_000).contains(hz))
                .ok_or_else(|| ConfigError::Invalid {
                    key: "debug.rip_sample_hz".into(),
                    msg: format!("'{v}' is not a rate from 1 to 10000 per second"),
                })?,
            None => 100,
        };
        let path = cfg.get("debug.rip_samples")?;
        let p = profile::Profile::new(
            cfg.get_bool("debug.exit_stats", false)?,
            path.as_deref().map(|p| (p, hz)),
        )
        .map_err(|e| VmError::Device(format!("debug.rip_samples: {e}")))?;
        Ok(p.map(Arc::new))
    }

    /// Guest RAM, for tests and tools that inspect the guest.
    pub fn guest_memory(&self) -> &GuestMem {
        &self.ram.mem
    }

    pub fn control(&self) -> Arc<VmControl> {
        self.shared.ctl.clone()
    }

    /// Exits by vCPU and kind, with their latency histograms.
    pub fn exit_stats(&self) -> &exit_stats::ExitStats {
        &self.shared.exit_stats
    }

    /// Every PCI function's I/O counters that has any, in address order.
    pub fn device_counters(&self) -> Vec<DeviceCounters> {
        let mut out: Vec<_> = self
            .pci
            .devices()
            .filter_map(|(a, d)| {
                let d = d.lock().unwrap_or_else(|p| p.into_inner());
                let c = d.counters();
                (!c.is_empty()).then(|| (*a, d.name(), c))
            })
            .collect();
        out.sort_by_key(|(a, _, _)| (a.bus, a.slot, a.func));
        out
    }

    /// Starts every vCPU thread, the BSP first (bhyve's `bhyve_start_vcpu` loop).
    pub fn start(&mut self) -> Result<(), VmError> {
        for spec in self.vcpus.drain(..) {
            let h = vcpu::start_vcpu(self.shared.clone(), spec, self.run_size).map_err(|e| {
                self.shared.ctl.suspend(SuspendReason::Error);
                VmError::Thread(e)
            })?;
            self.threads.push(h);
        }
        if let Some(p) = &self.shared.profile {
            p.start_sampler(self.shared.ctl.clone())
                .map_err(VmError::Thread)?;
        }
        Ok(())
    }

    /// Waits until every vCPU has left its loop and returns why the VM stopped, meanwhile
    /// running the main event loop's halt check (`main_loop`).
    pub fn wait(&mut self) -> SuspendReason {
        self.run(None)
    }

    /// As `wait`, with the control signals read from `signals` handed to `on_signal` on this
    /// (the main) thread.
    pub fn run(
        &mut self,
        signals: Option<(&main_loop::Signals, &mut dyn FnMut(i32))>,
    ) -> SuspendReason {
        let (sigs, mut on_signal) = match signals {
            Some((s, f)) => (Some(s), Some(f)),
            None => (None, None),
        };
        main_loop::run(Some(&self.shared.ctl), sigs, None, &mut |ev| {
            if let (main_loop::Event::Signal(sig), Some(f)) = (ev, on_signal.as_mut()) {
                f(sig);
            }
            main_loop::Flow::Continue
        });
        self.finish()
    }

    /// After the vCPUs have left their loops (the VM is stopped): joins their threads,
    /// flushes the variable store, prints the statistics asked for, and says why it stopped.
    pub fn finish(&mut self) -> SuspendReason {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.ram.sync();
        if let Some(p) = &self.shared.profile {
            eprint!("{}", p.finish());
            eprint!("{}", self.shared.exit_stats.table().replace('\n', "\r\n"));
        }
        self.shared
            .ctl
            .suspend_reason()
            .unwrap_or(SuspendReason::Error)
    }

    /// Pauses all vCPUs (kicked out of KVM_RUN and parked), then every device: PCI, then the
    /// legacy ones (whose timer and input threads then stop raising interrupts).
    pub fn pause(&self) -> Result<(), String> {
        self.shared.ctl.pause(Duration::from_secs(5))?;
        self.pci.pause_all();
        for (_, dev) in &self.legacy {
            dev.lock().unwrap_or_else(|p| p.into_inner()).pause();
        }
        Ok(())
    }

    /// Resumes the devices, the legacy ones first, then the vCPUs.
    pub fn resume(&self) {
        for (_, dev) in &self.legacy {
            dev.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
        self.pci.resume_all();
        self.shared.ctl.resume();
    }

    /// Every device's saved state, PCI functions as `pci/B:S.F` (and `pci/root`), legacy
    /// devices as `lpc/NAME`. The VM must be paused.
    pub fn save_devices(&self) -> Result<Vec<(String, DeviceState)>, StateError> {
        let mut out: Vec<(String, DeviceState)> = self
            .pci
            .save_all()?
            .into_iter()
            .map(|(k, s)| (format!("pci/{k}"), s))
            .collect();
        for (name, dev) in &self.legacy {
            let s = dev.lock().unwrap_or_else(|p| p.into_inner()).save()?;
            out.push((format!("lpc/{name}"), s));
        }
        Ok(out)
    }

    /// Restores what `save_devices` gave into this VM's devices (built from the same
    /// configuration, paused, not started by the guest). A state for a device this VM does not
    /// have, or a device without a state, is refused.
    pub fn restore_devices(&self, states: &[(String, DeviceState)]) -> Result<(), StateError> {
        let bad = |why: String| StateError::Malformed {
            kind: "vm".into(),
            why,
        };
        let mut pci = Vec::new();
        for (key, s) in states {
            match key.split_once('/') {
                Some(("pci", k)) => pci.push((k.to_string(), s.clone())),
                Some(("lpc", name)) if self.legacy.iter().any(|(n, _)| *n == name) => {}
                _ => {
                    return Err(bad(format!(
                        "a state for {key}, which this VM does not have"
                    )))
                }
            }
        }
        for (name, dev) in &self.legacy {
            let key = format!("lpc/{name}");
            let s = states
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, s)| s)
                .ok_or_else(|| bad(format!("no saved state for {key}")))?;
            dev.lock().unwrap_or_else(|p| p.into_inner()).restore(s)?;
        }
        self.pci.restore_all(&pci)
    }

    /// Every vCPU's state (the VM must be paused), with the MSRs KVM says can be saved.
    pub fn save_vcpus(&self) -> Result<Vec<vcpu::VcpuState>, String> {
        let msrs = self
            ._kvm
            .get_msr_index_list()
            .map_err(|e| format!("KVM_GET_MSR_INDEX_LIST: {e}"))?
            .as_slice()
            .to_vec();
        // By id: a vCPU that has left its loop is not asked (and does not shift the others).
        let cpus = self.shared.ctl.active_cpus();
        cpus.ids()
            .map(|id| {
                self.shared
                    .ctl
                    .save_vcpu(id, msrs.clone(), Duration::from_secs(5))
            })
            .collect()
    }

    /// The legacy (LPC-side) devices by name: the COM ports (`com1`..`com4`, those
    /// configured), `rtc`, `post`, `reset control`, `i8042` and `pm`, for saving and restoring
    /// them while the VM is paused. Lock one at a time (ARCHITECTURE.md "Lock order").
    pub fn legacy_devices(&self) -> impl Iterator<Item = (&str, &Arc<Mutex<dyn Lifecycle>>)> {
        self.legacy.iter().map(|(name, dev)| (*name, dev))
    }
}

/// The variable store's flash: its commands, and the reads outside read-array mode; its
/// command state is saved with the VM (the store's bytes are the varfile itself).
struct FlashExits(Arc<hypervisor::flash::Flash>, rhyve_base::lifecycle::Paused);

#[derive(serde::Serialize, serde::Deserialize)]
struct FlashState {
    mode: u8,
    erase_at: u64,
    status: u8,
}

const FLASH_KIND: &str = "flash";
const FLASH_VERSION: u32 = 1;

impl Lifecycle for FlashExits {
    fn pause(&mut self) {
        self.1.set(true);
    }
    fn resume(&mut self) {
        self.1.set(false);
    }
    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.1.check(FLASH_KIND)?;
        let (mode, erase_at, status) = self.0.state();
        DeviceState::new(
            FLASH_KIND,
            FLASH_VERSION,
            &FlashState {
                mode,
                erase_at,
                status,
            },
        )
    }
    fn restore(&mut self, s: &DeviceState) -> Result<(), StateError> {
        self.1.check(FLASH_KIND)?;
        let st: FlashState = s.parse(FLASH_KIND, FLASH_VERSION)?;
        self.0
            .set_state(st.mode, st.erase_at, st.status)
            .map_err(|why| StateError::Malformed {
                kind: FLASH_KIND.into(),
                why,
            })
    }
}

impl rhyve_bus::BusDevice for FlashExits {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(offset, data);
    }
}

/// The MMIO side of the PAM-routed BIOS area: the accesses its KVM slots let exit.
struct ShadowExits(Arc<Shadow>);

impl rhyve_bus::BusDevice for ShadowExits {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.read(shadow::BASE.saturating_add(offset), data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.write(shadow::BASE.saturating_add(offset), data);
    }
}

#[cfg(test)]
mod pm_base_tests {
    #[test]
    fn the_piix4_pm_function_names_the_pm_block_rhyve_has() {
        assert_eq!(
            u64::from(rhyve_pci::lpc_bridge::ACPI_PM_BASE),
            rhyve_devices::legacy::pm::PM1A_EVT
        );
    }
}
