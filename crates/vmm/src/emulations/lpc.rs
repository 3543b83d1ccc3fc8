//! The LPC side of the platform (bhyve `pci_lpc.c`): the `-l` devices and their config keys.
//!
//! bhyve hangs the COM ports and the boot ROM off an LPC bridge at 0:31.0. rhyve accepts a bhyve
//! line that names the bridge, and implies the bridge (and a host bridge at 0:0.0) when a `-l`
//! device is given without one, so `rhyve -l com1,stdio -l bootrom,ROM vm` works as it reads.

use rhyve_config::{Config, ConfigError};
use rhyve_devices::legacy::lpc::COM_PORTS;
use rhyve_pci::{self as pci, PciAddr};

const LPC_DEVICES: &[(&str, &str)] = &[
    (
        "com1",
        "16550 UART at 0x3f8, IRQ 4: stdio, a file or device path, or tcp=ip:port",
    ),
    ("com2", "16550 UART at 0x2f8, IRQ 3"),
    ("com3", "16550 UART at 0x3e8, IRQ 4"),
    ("com4", "16550 UART at 0x2e8, IRQ 3"),
    (
        "bootrom",
        "bootrom,romfile[,varfile]: firmware mapped to end at 4 GiB",
    ),
    (
        "fwcfg",
        "fwcfg,qemu: QEMU's fw_cfg at 0x510 for QEMU-built firmware (OVMF, SeaBIOS, qboot)",
    ),
];

/// The text `-l help` prints.
pub fn help_text() -> String {
    let mut s = String::from("LPC devices (-l device[,options]):\n");
    for (name, what) in LPC_DEVICES {
        s.push_str(&format!("  {name:<10} {what}\n"));
    }
    s
}

/// `-l lpcdev[,conf]`.
pub fn parse_option(cfg: &mut Config, arg: &str) -> Result<(), String> {
    let (dev, conf) = arg.split_once(',').unwrap_or((arg, ""));
    let set = |cfg: &mut Config, k: &str, v: &str| cfg.set(k, v).map_err(|e| e.to_string());
    match dev {
        "bootrom" => {
            let (rom, vars) = conf.split_once(',').unwrap_or((conf, ""));
            if rom.is_empty() {
                return Err("bootrom needs a ROM file: -l bootrom,romfile[,varfile]".into());
            }
            set(cfg, "lpc.bootrom", rom)?;
            if !vars.is_empty() {
                set(cfg, "lpc.bootvars", vars)?;
            }
            Ok(())
        }
        "fwcfg" => match conf {
            "qemu" => set(cfg, "lpc.fwcfg", conf),
            "bhyve" => Err("fwcfg,bhyve (bhyve's own fw_cfg) is not built; use fwcfg,qemu".into()),
            _ => Err(format!("fwcfg takes qemu, not '{conf}': -l fwcfg,qemu")),
        },
        d if COM_PORTS.iter().any(|(n, _, _)| *n == d) => {
            if conf.is_empty() {
                return Err(format!(
                    "{d} needs a backend: stdio, a file or device path, or tcp=ip:port"
                ));
            }
            set(cfg, &format!("lpc.{d}.path"), conf)
        }
        _ => Err(format!(
            "unknown LPC device '{dev}' (rhyve -l help lists them)"
        )),
    }
}

/// Checks one `lpc.*` key.
pub fn validate_key(cfg: &Config, key: &str) -> Result<(), ConfigError> {
    if key == "lpc.fwcfg" {
        return match cfg.get_raw(key) {
            Some("qemu") => Ok(()),
            other => Err(ConfigError::Invalid {
                key: key.into(),
                msg: format!(
                    "'{}' is not a fw_cfg rhyve has: use qemu",
                    other.unwrap_or_default()
                ),
            }),
        };
    }
    let known = matches!(key, "lpc.bootrom" | "lpc.bootvars")
        || COM_PORTS
            .iter()
            .any(|(n, _, _)| key == format!("lpc.{n}.path"));
    if known {
        Ok(())
    } else {
        Err(ConfigError::UnknownKey(key.into()))
    }
}

/// Adds `hostbridge` at 0:0.0 and `lpc` at 0:31.0 when `-l` devices are configured without them.
pub fn add_implied_bridges(cfg: &mut Config) -> Result<(), ConfigError> {
    if cfg.children("lpc").is_empty() {
        return Ok(());
    }
    let devices = pci::configured_devices(cfg)?;
    let has = |name: &str| devices.iter().any(|(_, d)| d == name);
    let free = |addr: PciAddr| !devices.iter().any(|(a, _)| *a == addr);
    let host = PciAddr {
        bus: 0,
        slot: 0,
        func: 0,
    };
    if !has("hostbridge") && !has("amd_hostbridge") && free(host) {
        cfg.set(&format!("{}.device", host.config_prefix()), "hostbridge")?;
    }
    let lpc = PciAddr {
        bus: 0,
        slot: 31,
        func: 0,
    };
    if !has("lpc") {
        if !free(lpc) {
            return Err(ConfigError::Invalid {
                key: lpc.config_prefix(),
                msg: "-l devices need an LPC bridge; add one with -s SLOT,lpc".into(),
            });
        }
        cfg.set(&format!("{}.device", lpc.config_prefix()), "lpc")?;
    }
    Ok(())
}
