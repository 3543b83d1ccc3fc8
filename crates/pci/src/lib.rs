//! PCI (bhyve `pci_emul.c`): what an emulation is (`PciEmulation`, its `init` and `PciInitCtx`),
//! PCI addresses and the `pci.B.S.F` config nodes. The registry of emulations, which names
//! devices from `virtio` too, sits above this module, in `emulations`.
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

use rhyve_hypervisor::irq::IrqRouter;
use rhyve_hypervisor::memory::GuestMem;

use device::PciDevice;
use rhyve_config::{Config, ConfigError};

/// Converts an emulation's legacy option string (the `conf` of `-s`) into keys below `prefix`.
pub type LegacyConfig = fn(&mut Config, &str, &str) -> Result<(), String>;
/// Builds the device from its config node `prefix` (bhyve `pe_init`).
pub type Init = fn(&PciInitCtx, &Config, &str) -> Result<Box<dyn PciDevice>, String>;

/// What an emulation's `init` may use from the VM.
pub struct PciInitCtx {
    /// MSI/MSI-X routes and irqfds.
    pub router: Arc<IrqRouter>,
    /// Guest RAM, for devices that read and write it (virtio queues).
    pub mem: GuestMem,
    /// The BIOS area's PAM routing, for a host bridge model that has it (mapped only with a
    /// boot ROM).
    pub shadow: Option<std::sync::Arc<rhyve_hypervisor::shadow::Shadow>>,
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

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
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
}
