//! PCI host bridge at 0:0.0 (bhyve `pci_hostbridge.c`): identity only, no BARs. `vendor` and
//! `devid` override the IDs; `amd_hostbridge` uses AMD's. `IdentityFunction` also serves the
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

/// bhyve's IDs: 0x1275:0x1275.
pub fn init(
    _ctx: &super::PciInitCtx,
    cfg: &Config,
    prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    with_ids(cfg, prefix, 0x1275, 0x1275)
}

/// AMD's host bridge IDs, as bhyve's `amd_hostbridge`.
pub fn init_amd(
    _ctx: &super::PciInitCtx,
    cfg: &Config,
    prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    with_ids(cfg, prefix, 0x1022, 0x7432)
}
