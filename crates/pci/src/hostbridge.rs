//! PCI host bridge at 0:0.0 (bhyve `pci_hostbridge.c`): identity only, no BARs. `vendor` and
//! `devid` override the IDs; `amd_hostbridge` uses AMD's; `model=i440fx` presents QEMU's pc
//! machine's bridge (Intel 82441FX, 8086:1237), which firmware built for QEMU (qboot,
//! SeaBIOS) looks for before it sets the machine up, with its PAM registers (0x59-0x5f) routing
//! 0xC0000-0xFFFFF between the boot ROM and RAM (`rhyve_hypervisor::shadow`) when a boot ROM
//! is mapped. `IdentityFunction` also serves the LPC bridge's PCI function.

use std::sync::Arc;

use super::config::ConfigSpace;
use super::device::PciDevice;
use rhyve_base::lifecycle::{DeviceState, Lifecycle, Paused, StateError};
use rhyve_config::{parse_u64, Config};
use rhyve_hypervisor::shadow::{PamMode, Shadow, SEGMENTS};

/// The i440fx's PAM0-PAM6 registers.
pub const PAM_FIRST: usize = 0x59;
pub const PAM_COUNT: usize = 7;

/// A function that is only its configuration header (bridges without BARs), and an
/// i440fx's PAM registers when it has them.
pub struct IdentityFunction {
    name: &'static str,
    cfg: ConfigSpace,
    paused: Paused,
    /// The shadow area the PAM registers route, when a boot ROM is mapped.
    pam: Option<Arc<Shadow>>,
}

impl IdentityFunction {
    pub fn boxed(name: &'static str, cfg: ConfigSpace) -> Box<dyn PciDevice> {
        Box::new(IdentityFunction {
            name,
            cfg,
            paused: Paused::default(),
            pam: None,
        })
    }

    /// Each segment's mode as the PAM registers say: PAM0's high nibble is 0xF0000-0xFFFFF,
    /// then PAM1-PAM6, low nibble first, are the 16 KiB pieces from 0xC0000 up.
    fn pam_modes(&self) -> [PamMode; SEGMENTS] {
        let mut m = [PamMode::Off; SEGMENTS];
        let regs = self.cfg.u32(0x58).to_le_bytes().into_iter();
        let regs = regs.chain(self.cfg.u32(0x5c).to_le_bytes()).skip(1);
        // PAM0's high nibble, then each later register's low and high nibbles.
        let nibbles = regs
            .enumerate()
            .flat_map(|(k, v)| (k > 0).then_some(v).into_iter().chain([v >> 4]))
            .map(PamMode::from_bits);
        for (slot, mode) in m.iter_mut().zip(nibbles) {
            *slot = mode;
        }
        m
    }

    fn apply_pam(&self) {
        if let Some(s) = &self.pam {
            if let Err(e) = s.set(self.pam_modes()) {
                log::error!("hostbridge: PAM routing of 0xc0000-0xfffff failed: {e}");
            }
        }
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
            })?;
        self.apply_pam();
        Ok(())
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
    fn config_written(&mut self, off: usize, len: usize) {
        let pam = PAM_FIRST..PAM_FIRST + PAM_COUNT;
        if off < pam.end && off.saturating_add(len) > pam.start {
            self.apply_pam();
        }
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

/// `pam`: the model has PAM registers (they read back what was written); `shadow`: the area
/// they route, when a boot ROM is mapped.
fn with_ids(
    cfg: &Config,
    prefix: &str,
    vendor: u16,
    device: u16,
    pam: bool,
    shadow: Option<Arc<Shadow>>,
) -> Result<Box<dyn PciDevice>, String> {
    let vendor = id(cfg, &format!("{prefix}.vendor"), vendor)?;
    let device = id(cfg, &format!("{prefix}.devid"), device)?;
    Ok(Box::new(host_bridge(vendor, device, pam, shadow)))
}

fn host_bridge(
    vendor: u16,
    device: u16,
    pam: bool,
    shadow: Option<Arc<Shadow>>,
) -> IdentityFunction {
    // Class 06/00: host bridge.
    let mut f = IdentityFunction {
        name: "hostbridge",
        cfg: ConfigSpace::new(vendor, device, 0x06, 0x00, 0x00),
        paused: Paused::default(),
        pam: shadow,
    };
    if pam {
        // PAM0's low nibble is reserved.
        f.cfg
            .set_wmask(PAM_FIRST, &[0xf0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    }
    f
}

/// The named models `model=` takes, with their vendor and device IDs.
pub const MODELS: &[(&str, u16, u16)] = &[("bhyve", 0x1275, 0x1275), ("i440fx", 0x8086, 0x1237)];

/// The models whose bridge has PAM registers.
pub const PAM_MODELS: &[&str] = &["i440fx"];

/// Whether the host bridge `cfg` describes (at `prefix`) routes the BIOS area with PAM.
pub fn has_pam(cfg: &Config, prefix: &str) -> bool {
    cfg.get(&format!("{prefix}.model"))
        .ok()
        .flatten()
        .is_some_and(|m| PAM_MODELS.contains(&m.as_str()))
}

/// bhyve's IDs (0x1275:0x1275), or a named model's.
pub fn init(
    ctx: &super::PciInitCtx,
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
    let pam = has_pam(cfg, prefix);
    let shadow = if pam { ctx.shadow.clone() } else { None };
    with_ids(cfg, prefix, vendor, device, pam, shadow)
}

/// AMD's host bridge IDs, as bhyve's `amd_hostbridge`.
pub fn init_amd(
    _ctx: &super::PciInitCtx,
    cfg: &Config,
    prefix: &str,
) -> Result<Box<dyn PciDevice>, String> {
    with_ids(cfg, prefix, 0x1022, 0x7432, false, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pam_registers_give_each_segment_its_mode() {
        let mut f = host_bridge(0x8086, 0x1237, true, None);
        // SeaBIOS's unlock, as it writes it: two dwords at 0x58 and 0x5c, PAM0 0x30 and the
        // rest 0x33 (0x58 itself is not a PAM register and stays 0).
        f.cfg.guest_write(0x58, &[0xff, 0x30, 0x33, 0x33]);
        f.config_written(0x58, 4);
        f.cfg.guest_write(0x5c, &[0x33, 0x33, 0x33, 0x33]);
        f.config_written(0x5c, 4);
        assert_eq!(f.cfg.u8(0x58), 0, "0x58 is read-only");
        assert!(f.pam_modes().iter().all(|&m| m == PamMode::ReadWrite));
        // Its lock: 0xC0000-0xC7FFF read-only, 0xEC000 write-only, F read-only; PAM0's low
        // nibble is reserved.
        f.cfg.guest_write(PAM_FIRST, &[0x1f]);
        f.cfg.guest_write(PAM_FIRST + 1, &[0x11]);
        f.cfg.guest_write(PAM_FIRST + 6, &[0x23]);
        assert_eq!(f.cfg.u8(PAM_FIRST), 0x10);
        let m = f.pam_modes();
        assert_eq!(m[0], PamMode::ReadOnly, "0xF0000 from PAM0's high nibble");
        assert_eq!((m[1], m[2]), (PamMode::ReadOnly, PamMode::ReadOnly));
        assert_eq!(m[3], PamMode::ReadWrite);
        assert_eq!((m[11], m[12]), (PamMode::ReadWrite, PamMode::WriteOnly));
        // A bridge without PAM keeps the registers at 0.
        let mut plain = host_bridge(0x1275, 0x1275, false, None);
        plain.cfg.guest_write(PAM_FIRST, &[0x30]);
        assert_eq!(plain.cfg.u8(PAM_FIRST), 0);
    }
}
