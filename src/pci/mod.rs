//! PCI emulations (bhyve `pci_emul.c`): the registry of emulation names and the parsing of
//! `-s [bus:]slot[:func],emul[,conf]` into `pci.B.S.F` config nodes.
//!
//! Lifecycle, as in bhyve: `-s` names an emulation and fills its config node; at VM creation
//! every configured function's `init` builds its device from that node; then the root allocates
//! BARs largest first, routes INTx, and registers BARs on the buses (`root.rs`); from then on
//! guest config writes move BARs and switch their decoding.

pub mod config;
pub mod device;
pub mod dummy;
pub mod hostbridge;
pub mod lpc_bridge;
pub mod msi;
pub mod msix;
pub mod root;

use std::sync::Arc;

use crate::hypervisor::irq::IrqRouter;
use crate::virtio::blk::Blk;
use crate::virtio::console::{self, Console};
use crate::virtio::net::Net;
use crate::virtio::pci::VirtioPci;
use crate::virtio::rng::Rng;
use vm_memory::GuestMemoryMmap;

use crate::config::{Config, ConfigError};
use device::PciDevice;

/// Converts an emulation's legacy option string (the `conf` of `-s`) into keys below `prefix`.
type LegacyConfig = fn(&mut Config, &str, &str) -> Result<(), String>;
/// Builds the device from its config node `prefix` (bhyve `pe_init`).
type Init = fn(&PciInitCtx, &Config, &str) -> Result<Box<dyn PciDevice>, String>;

/// What an emulation's `init` may use from the VM.
pub struct PciInitCtx {
    /// MSI/MSI-X routes and irqfds.
    pub router: Arc<IrqRouter>,
    /// Guest RAM, for devices that read and write it (virtio queues).
    pub mem: GuestMemoryMmap,
}

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

/// One registered emulation, like bhyve's `struct pci_devemu`.
pub struct PciEmulation {
    pub name: &'static str,
    pub description: &'static str,
    /// Keys this emulation accepts below its `pci.B.S.F` node, besides `device`.
    pub keys: &'static [&'static str],
    /// Parser for the legacy option string; `None` means the generic `name=value` list.
    pub legacy_config: Option<LegacyConfig>,
    pub init: Init,
}

/// Every emulation `-s` accepts. `-s help` prints this list.
pub static PCI_EMULATIONS: &[PciEmulation] = &[
    PciEmulation {
        name: "hostbridge",
        description: "host bridge (0:0.0)",
        keys: &["vendor", "devid"],
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

/// A PCI address: bus 0-255, slot 0-31, function 0-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct PciAddr {
    pub bus: u8,
    pub slot: u8,
    pub func: u8,
}

impl PciAddr {
    pub fn config_prefix(&self) -> String {
        format!("pci.{}.{}.{}", self.bus, self.slot, self.func)
    }
}

impl std::fmt::Display for PciAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}.{}", self.bus, self.slot, self.func)
    }
}

/// Parses bhyve's slot forms: `slot`, `slot:func`, `bus:slot:func`.
pub fn parse_addr(s: &str) -> Result<PciAddr, String> {
    let nums: Vec<&str> = s.split(':').collect();
    let num = |t: &str, what: &str, max: u32| -> Result<u8, String> {
        match t.parse::<u32>() {
            Ok(n) if n <= max => Ok(n as u8),
            _ => Err(format!("{what} '{t}' is not a number from 0 to {max}")),
        }
    };
    let (bus, slot, func) = match nums.as_slice() {
        [s] => (0, num(s, "slot", 31)?, 0),
        [s, f] => (0, num(s, "slot", 31)?, num(f, "function", 7)?),
        [b, s, f] => (
            num(b, "bus", 255)?,
            num(s, "slot", 31)?,
            num(f, "function", 7)?,
        ),
        _ => return Err(format!("'{s}' is not [bus:]slot[:function]")),
    };
    Ok(PciAddr { bus, slot, func })
}

/// The generic legacy option list: `a=b,c` sets `a=b` and `c=true` (bhyve `pci_parse_legacy_config`).
pub fn parse_generic_options(cfg: &mut Config, prefix: &str, opts: &str) -> Result<(), String> {
    for item in opts.split(',').filter(|s| !s.is_empty()) {
        let (k, v) = item.split_once('=').unwrap_or((item, "true"));
        cfg.set(&format!("{prefix}.{k}"), v)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// bhyve's legacy form for devices with a backend: the first item, if it is not `name=value`,
/// is the backend (`path` for disks, `backend` for network), the rest the generic list.
pub fn parse_backend_options(
    cfg: &mut Config,
    prefix: &str,
    opts: &str,
    key: &str,
) -> Result<(), String> {
    let (first, rest) = opts.split_once(',').unwrap_or((opts, ""));
    if first.is_empty() || first.contains('=') {
        return parse_generic_options(cfg, prefix, opts);
    }
    cfg.set(&format!("{prefix}.{key}"), first)
        .map_err(|e| e.to_string())?;
    parse_generic_options(cfg, prefix, rest)
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

/// Every configured `pci.B.S.F` node with its emulation name, in address order.
pub fn configured_devices(cfg: &Config) -> Result<Vec<(PciAddr, String)>, ConfigError> {
    let mut out = Vec::new();
    for (b, _) in cfg.children("pci") {
        for (s, _) in cfg.children(&format!("pci.{b}")) {
            for (f, _) in cfg.children(&format!("pci.{b}.{s}")) {
                let key = format!("pci.{b}.{s}.{f}");
                let addr =
                    parse_addr(&format!("{b}:{s}:{f}")).map_err(|msg| ConfigError::Invalid {
                        key: key.clone(),
                        msg,
                    })?;
                let dev =
                    cfg.get(&format!("{key}.device"))?
                        .ok_or_else(|| ConfigError::Invalid {
                            key: key.clone(),
                            msg: "has no 'device' key naming its emulation".into(),
                        })?;
                out.push((addr, dev));
            }
        }
    }
    Ok(out)
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

    #[test]
    fn slot_forms() {
        assert_eq!(
            parse_addr("3").unwrap(),
            PciAddr {
                bus: 0,
                slot: 3,
                func: 0
            }
        );
        assert_eq!(
            parse_addr("3:1").unwrap(),
            PciAddr {
                bus: 0,
                slot: 3,
                func: 1
            }
        );
        assert_eq!(
            parse_addr("2:3:1").unwrap(),
            PciAddr {
                bus: 2,
                slot: 3,
                func: 1
            }
        );
        for bad in ["", "32", "1:8", "256:0:0", "a", "1:2:3:4", "-1"] {
            assert!(parse_addr(bad).is_err(), "{bad:?}");
        }
    }

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
