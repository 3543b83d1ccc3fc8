//! PCI host bridge at 0:0.0 (bhyve `pci_hostbridge.c`): identity only, no BARs. `vendor` and
//! `devid` override the IDs; `amd_hostbridge` uses AMD's; `model=i440fx` presents QEMU's pc
//! machine's bridge (Intel 82441FX, 8086:1237), which firmware built for QEMU (qboot,
//! SeaBIOS) looks for before it sets the machine up. `IdentityFunction` also serves the
//! LPC bridge's PCI function.

use super::config::ConfigSpace;
use super::device::PciDevice;
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_config::{parse_u64, Config};

/// A function that is only its configuration header: bridges without BARs.
pub struct IdentityFunction {
    name: &'static str,
    cfg: ConfigSpace,
    paused: Paused,
}

impl IdentityFunction {
    pub fn boxed(name: &'static str, cfg: ConfigSpace) -> Box<dyn PciDevice> {
        Box::new(IdentityFunction {
            name,
            cfg,
            paused: Paused::default(),
        })
    }
}

/// The version of a header-only function's saved state (its config space).
const STATE_VERSION: u32 = 1;

impl Lifecycle for IdentityFunction {
    fn pause(&mut self) {
        self.paused.set(true);
    }
    fn resume(&mut self) {
        self.paused.set(false);
    }
    fn save(&mut self) -> Result<DeviceState, StateError> {
        self.paused.check(self.name)?;
        DeviceState::new(self.name, STATE_VERSION, &self.cfg.save_state())
    }
    fn restore(&mut self, s: &DeviceState) -> Result<(), StateError> {
        self.paused.check(self.name)?;
        let cfg = s.parse(self.name, STATE_VERSION)?;
        self.cfg
            .restore_state(&cfg)
            .map_err(|why| StateError::Malformed {
                kind: self.name.into(),
                why,
            })
    }
}

impl PciDevice for IdentityFunction {
    fn name(&self) -> &'static str {
        self.name
    }
    fn config(&self) -> &ConfigSpace {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.cfg
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

fn id(cfg: &Config, key: &str, default: u16) -> Result<u16, String> {
    match cfg.get(key).map_err(|e| e.to_string())? {
        None => Ok(default),
        Some(v) => parse_u64(&v)
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| format!("{key}: '{v}' is not a 16-bit ID")),
    }
}

fn with_ids(
    cfg: &Config,
    prefix: &str,
    vendor: u16,
    device: u16,
) -> Result<Box<dyn PciDevice>, String> {
    let vendor = id(cfg, &format!("{prefix}.vendor"), vendor)?;
    let device = id(cfg, &format!("{prefix}.devid"), device)?;
    // Class 06/00: host bridge.
    Ok(IdentityFunction::boxed(
        "hostbridge",
        ConfigSpace::new(vendor, device, 0x06, 0x00, 0x00),
    ))
}

/// The named models `model=` takes, with their vendor and device IDs.
pub const MODELS: &[(&str, u16, u16)] = &[("bhyve", 0x1275, 0x1275), ("i440fx", 0x8086, 0x1237)];

/// bhyve's IDs (0x1275:0x1275), or a named model's.
pub fn init(
    _ctx: &super::PciInitCtx,
    cfg: &Config,
    prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    let key = format!("{prefix}.model");
    let model = cfg.get(&key).map_err(|e| e.to_string())?;
    let (vendor, device) = match model.as_deref() {
        None => (0x1275, 0x1275),
        Some(m) => MODELS
            .iter()
            .find(|(n, _, _)| *n == m)
            .map(|&(_, v, d)| (v, d))
            .ok_or_else(|| {
                let names: Vec<&str> = MODELS.iter().map(|(n, _, _)| *n).collect();
                format!(
                    "{key}: '{m}' is not a host bridge model ({})",
                    names.join(", ")
                )
            })?,
    };
    with_ids(cfg, prefix, vendor, device)
}

/// AMD's host bridge IDs, as bhyve's `amd_hostbridge`.
pub fn init_amd(
    _ctx: &super::PciInitCtx,
    cfg: &Config,
    prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    with_ids(cfg, prefix, 0x1022, 0x7432)
}
