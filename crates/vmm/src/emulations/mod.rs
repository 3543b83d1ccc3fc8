//! The device registry (bhyve's `PCI_EMUL_SET` linker set and `pci_lpc.c`'s device list): every
//! PCI emulation `-s` can name, its config keys and legacy option parser, and the `-l` side in
//! `lpc`. It sits above `pci` and `virtio`, so neither needs to know the other's devices; the
//! command line (`cli`) and VM assembly (`vmm`) look emulations up here.
//!
//! Lifecycle, as in bhyve: `-s` names an emulation and fills its config node; at VM creation
//! every configured function's `init` builds its device from that node; then the root allocates
//! BARs largest first, routes INTx, and registers BARs on the buses (`pci::root`); from then on
//! guest config writes move BARs and switch their decoding.

pub mod lpc;

use rhyve_config::{Config, ConfigError};
use rhyve_pci::device::PciDevice;
use rhyve_pci::{
    dummy, hostbridge, lpc_bridge, parse_addr, parse_backend_options, parse_generic_options,
    PciEmulation, PciInitCtx,
};
use rhyve_virtio::blk::Blk;
use rhyve_virtio::console::{self, Console};
use rhyve_virtio::net::Net;
use rhyve_virtio::pci::VirtioPci;
use rhyve_virtio::rng::Rng;

fn virtio_rnd(ctx: &PciInitCtx, cfg: &Config, prefix: &str) -> Result<Box<dyn PciDevice>, String> {
    VirtioPci::create(ctx, Box::new(Rng::new(cfg, prefix)?))
}

fn virtio_blk(ctx: &PciInitCtx, cfg: &Config, prefix: &str) -> Result<Box<dyn PciDevice>, String> {
    VirtioPci::create(ctx, Box::new(Blk::new(cfg, prefix)?))
}

fn virtio_console(
    ctx: &PciInitCtx,
    cfg: &Config,
    prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    VirtioPci::create(ctx, Box::new(Console::new(cfg, prefix)?))
}

fn virtio_net(ctx: &PciInitCtx, cfg: &Config, prefix: &str) -> Result<Box<dyn PciDevice>, String> {
    VirtioPci::create(ctx, Box::new(Net::new(cfg, prefix)?))
}

/// Every emulation `-s` accepts. `-s help` prints this list.
pub static PCI_EMULATIONS: &[PciEmulation] = &[
    PciEmulation {
        name: "hostbridge",
        description: "host bridge (0:0.0); model=i440fx presents QEMU pc's (PAM, PIIX4 PM at 0:1.3) for its firmware",
        keys: &["vendor", "devid", "model"],
        legacy_config: None,
        init: hostbridge::init,
    },
    PciEmulation {
        name: "amd_hostbridge",
        description: "host bridge with AMD's IDs",
        keys: &["vendor", "devid"],
        legacy_config: None,
        init: hostbridge::init_amd,
    },
    PciEmulation {
        name: "lpc",
        description: "LPC (ISA) bridge carrying the -l devices",
        keys: &[],
        legacy_config: None,
        init: lpc_bridge::init,
    },
    PciEmulation {
        name: "piix4-pm",
        description: "PIIX4 power management (0:1.3 with model=i440fx): where OVMF finds the ACPI PM block",
        keys: &[],
        legacy_config: None,
        init: lpc_bridge::init_piix4_pm,
    },
    PciEmulation {
        name: "dummy",
        description: "test device: I/O, 32-bit and 64-bit memory BARs backed by storage",
        keys: &[],
        legacy_config: None,
        init: dummy::Dummy::init,
    },
    PciEmulation {
        name: "virtio-blk",
        description:
            "virtio disk: PATH[,ro][,sectorsize=L[/P]][,nocache][,direct][,nodelete][,ser=ID]",
        keys: &[
            "path",
            "ro",
            "sectorsize",
            "nocache",
            "direct",
            "nodelete",
            "ser",
        ],
        legacy_config: Some(blk_options),
        init: virtio_blk,
    },
    PciEmulation {
        name: "virtio-net",
        description: "virtio network: tapN or /dev/tapN path[,mac=xx:xx:xx:xx:xx:xx][,mtu=N]",
        keys: &["backend", "mac", "mtu"],
        legacy_config: Some(net_options),
        init: virtio_net,
    },
    PciEmulation {
        name: "virtio-console",
        description: "virtio console: NAME=/path/to/socket[,NAME2=/path2] (up to 16 named ports)",
        keys: &["port.*.name", "port.*.path"],
        legacy_config: Some(console::legacy_config),
        init: virtio_console,
    },
    PciEmulation {
        name: "virtio-rnd",
        description: "virtio entropy device (host getrandom)",
        keys: &[],
        legacy_config: None,
        init: virtio_rnd,
    },
];

pub fn find_emulation(name: &str) -> Option<&'static PciEmulation> {
    PCI_EMULATIONS.iter().find(|e| e.name == name)
}

/// The text `-s help` prints.
pub fn help_text() -> String {
    let mut s = String::from("PCI emulations (-s [bus:]slot[:func],emulation[,options]):\n");
    for e in PCI_EMULATIONS {
        s.push_str(&format!("  {:<16} {}\n", e.name, e.description));
    }
    s
}

fn blk_options(cfg: &mut Config, prefix: &str, opts: &str) -> Result<(), String> {
    parse_backend_options(cfg, prefix, opts, "path")
}

fn net_options(cfg: &mut Config, prefix: &str, opts: &str) -> Result<(), String> {
    parse_backend_options(cfg, prefix, opts, "backend")
}

/// `-s [bus:]slot[:func],emulation[,conf]`.
pub fn parse_slot_option(cfg: &mut Config, arg: &str) -> Result<(), String> {
    let (slot, rest) = arg
        .split_once(',')
        .ok_or("expected [bus:]slot[:function],emulation[,options]")?;
    let addr = parse_addr(slot)?;
    let (emul, opts) = rest.split_once(',').unwrap_or((rest, ""));
    let e = find_emulation(emul)
        .ok_or_else(|| format!("unknown PCI emulation '{emul}' (rhyve -s help lists them)"))?;
    let prefix = addr.config_prefix();
    if let Some(old) = cfg.get_raw(&format!("{prefix}.device")) {
        return Err(format!("PCI slot {addr} is already used by {old}"));
    }
    cfg.set(&format!("{prefix}.device"), emul)
        .map_err(|e| e.to_string())?;
    match e.legacy_config {
        Some(parse) => parse(cfg, &prefix, opts),
        None => parse_generic_options(cfg, &prefix, opts),
    }
}

/// Checks one `pci.*` key: a valid address, a known emulation, and a key that emulation takes.
pub fn validate_key(cfg: &Config, key: &str) -> Result<(), ConfigError> {
    let parts: Vec<&str> = key.splitn(5, '.').collect();
    let [_, b, s, f, leaf] = parts.as_slice() else {
        return Err(ConfigError::UnknownKey(key.into()));
    };
    let invalid = |msg: String| ConfigError::Invalid {
        key: key.into(),
        msg,
    };
    parse_addr(&format!("{b}:{s}:{f}")).map_err(invalid)?;
    let dev_key = format!("pci.{b}.{s}.{f}.device");
    let dev = cfg
        .get(&dev_key)?
        .ok_or_else(|| invalid("this PCI slot has no 'device' key".into()))?;
    let e = find_emulation(&dev).ok_or_else(|| ConfigError::Invalid {
        key: dev_key.clone(),
        msg: format!("unknown PCI emulation '{dev}' (rhyve -s help lists them)"),
    })?;
    // A key pattern may have `*` components (virtio-console's `port.*.path`).
    let matches = |pat: &str| {
        let (p, l): (Vec<&str>, Vec<&str>) = (pat.split('.').collect(), leaf.split('.').collect());
        p.len() == l.len() && p.iter().zip(&l).all(|(a, b)| *a == "*" || a == b)
    };
    if *leaf == "device" || e.keys.iter().any(|k| matches(k)) {
        Ok(())
    } else {
        Err(invalid(format!(
            "{dev} has no option '{leaf}' (it takes: {})",
            if e.keys.is_empty() {
                "none".to_string()
            } else {
                e.keys.join(", ")
            }
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rhyve_pci::configured_devices;

    #[test]
    fn generic_options_and_unknown_keys() {
        let mut c = Config::new();
        parse_slot_option(&mut c, "0,hostbridge,vendor=0x1275,devid=0x1275").unwrap();
        assert_eq!(
            c.get("pci.0.0.0.vendor").unwrap().as_deref(),
            Some("0x1275")
        );
        validate_key(&c, "pci.0.0.0.vendor").unwrap();
        c.set("pci.0.0.0.color", "blue").unwrap();
        let e = validate_key(&c, "pci.0.0.0.color").unwrap_err().to_string();
        assert!(e.contains("hostbridge has no option 'color'"), "{e}");
        c.set("pci.0.5.0.path", "x").unwrap();
        let e = validate_key(&c, "pci.0.5.0.path").unwrap_err().to_string();
        assert!(e.contains("no 'device'"), "{e}");
        let devs = configured_devices(&c);
        assert!(devs.is_err(), "a slot without a device is an error");
    }
}
