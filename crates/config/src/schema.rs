//! The keys rhyve knows (bhyve_config(5) plus the `boot.*` keys for Linux), their value types,
//! the defaults, and the checks that run once the whole command line is in the tree.
//!
//! bhyve silently ignores keys it does not know; rhyve refuses them, because a misspelt key
//! (`memory.sise`) that silently does nothing is the worse failure. A key that some `%(name)`
//! refers to is a variable and is allowed.

use super::{is_uuid, parse_bool, parse_cpulist, parse_memsize, parse_u64, Config, ConfigError};

/// Checks the keys of a subtree whose owner (a device registry above this module) knows them:
/// given the whole tree and one key below the owner's prefix.
pub type SubtreeCheck = fn(&Config, &str) -> Result<(), ConfigError>;

/// What a value must look like.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Bool,
    Count,
    Size,
    Str,
    Uuid,
    CpuList,
    Port,
    /// `sandbox.seccomp`: a boolean or `log`.
    Seccomp,
}

/// Exact keys and their kinds. `vcpu.N.*`, `pci.B.S.F.*` and `lpc.*` are checked by their owners.
const KEYS: &[(&str, Kind)] = &[
    ("name", Kind::Str),
    ("cpus", Kind::Count),
    ("sockets", Kind::Count),
    ("cores", Kind::Count),
    ("threads", Kind::Count),
    ("memory.size", Kind::Size),
    ("memory.wired", Kind::Bool),
    ("memory.guest_in_core", Kind::Bool),
    ("x86.strictio", Kind::Bool),
    ("x86.strictmsr", Kind::Bool),
    ("x86.vmexit_on_hlt", Kind::Bool),
    ("x86.vmexit_on_pause", Kind::Bool),
    ("x86.mptable", Kind::Bool),
    ("x86.x2apic", Kind::Bool),
    ("destroy_on_poweroff", Kind::Bool),
    ("acpi_tables", Kind::Bool),
    ("rtc.use_localtime", Kind::Bool),
    ("uuid", Kind::Uuid),
    ("virtio_msix", Kind::Bool),
    ("keyboard.layout", Kind::Str),
    ("gdb.port", Kind::Port),
    ("gdb.address", Kind::Str),
    ("gdb.wait", Kind::Bool),
    ("restore.file", Kind::Str),
    ("config.dump", Kind::Bool),
    ("api.socket", Kind::Str),
    ("boot.kernel", Kind::Str),
    ("boot.initrd", Kind::Str),
    ("boot.cmdline", Kind::Str),
    ("boot.pvm_cmdline", Kind::Bool),
    ("boot.unpack_bzimage", Kind::Bool),
    ("debug.boot_timer", Kind::Bool),
    ("debug.exit_stats", Kind::Bool),
    ("debug.timeline", Kind::Str),
    ("debug.rip_samples", Kind::Str),
    ("debug.rip_sample_hz", Kind::Count),
    ("sandbox.seccomp", Kind::Seccomp),
];

/// bhyve's defaults (bhyverun.c `set_defaults`), written into the tree so `config.dump` shows them.
const DEFAULTS: &[(&str, &str)] = &[
    ("memory.size", "256M"),
    ("x86.strictmsr", "true"),
    ("x86.strictio", "false"),
    ("acpi_tables", "true"),
    ("x86.mptable", "true"),
    ("rtc.use_localtime", "true"),
    ("destroy_on_poweroff", "false"),
];

fn check_kind(key: &str, kind: Kind, value: &str) -> Result<(), ConfigError> {
    let invalid = |msg: &str| ConfigError::Invalid {
        key: key.into(),
        msg: format!("'{value}' {msg}"),
    };
    match kind {
        Kind::Bool => parse_bool(key, value).map(|_| ()),
        Kind::Count => match parse_u64(value) {
            Some(n) if n > 0 && n <= u32::MAX as u64 => Ok(()),
            _ => Err(invalid("is not a positive number")),
        },
        Kind::Size => match parse_memsize(value) {
            Some(n) if n > 0 => Ok(()),
            _ => Err(invalid(
                "is not a memory size (a number with K, M, G or T; none means MiB)",
            )),
        },
        Kind::Str => Ok(()),
        Kind::Uuid if is_uuid(value) => Ok(()),
        Kind::Uuid => Err(invalid("is not a UUID")),
        Kind::CpuList if parse_cpulist(value).is_some() => Ok(()),
        Kind::CpuList => Err(invalid("is not a host CPU list such as 1 or 0,2-3")),
        Kind::Port if value.parse::<u16>().is_ok() => Ok(()),
        Kind::Port => Err(invalid("is not a TCP port")),
        Kind::Seccomp if value == "log" || parse_bool(key, value).is_ok() => Ok(()),
        Kind::Seccomp => Err(invalid("is not true, false or log")),
    }
}

/// Applies defaults and derived values and validates every key: the ones this module knows,
/// and each key below a prefix of `owners` by that owner's check (`pci.` and `lpc.`, by the
/// device registry). Runs after the whole command line is parsed, before `config.dump`.
pub fn finish(cfg: &mut Config, owners: &[(&str, SubtreeCheck)]) -> Result<(), ConfigError> {
    for (k, v) in DEFAULTS {
        cfg.set_default(k, v)?;
    }
    derive_topology(cfg)?;
    validate(cfg, owners)
}

/// bhyve's rule: with only a topology given, cpus is its product; both given must agree.
fn derive_topology(cfg: &mut Config) -> Result<(), ConfigError> {
    let get = |k: &str| -> Result<Option<u64>, ConfigError> {
        match cfg.get_u64(k)? {
            Some(0) => Err(ConfigError::Invalid {
                key: k.into(),
                msg: "must be a positive number".into(),
            }),
            v => Ok(v),
        }
    };
    let (cpus, sockets, cores, threads) = (
        get("cpus")?,
        get("sockets")?,
        get("cores")?,
        get("threads")?,
    );
    if sockets.is_none() && cores.is_none() && threads.is_none() {
        let n = cpus.unwrap_or(1);
        cfg.set_default("cpus", &n.to_string())?;
        return Ok(());
    }
    let cores = cores.unwrap_or(1);
    let threads = threads.unwrap_or(1);
    let sockets = match (sockets, cpus) {
        (Some(s), _) => s,
        // Like bhyve: cpus with cores/threads but no sockets fills sockets.
        (None, Some(c)) if c % (cores * threads) == 0 => c / (cores * threads),
        (None, _) => 1,
    };
    let product = sockets
        .checked_mul(cores)
        .and_then(|p| p.checked_mul(threads))
        .ok_or_else(|| ConfigError::Invalid {
            key: "cpus".into(),
            msg: "topology is too large".into(),
        })?;
    let cpus = cpus.unwrap_or(product);
    if cpus != product {
        return Err(ConfigError::Invalid {
            key: "cpus".into(),
            msg: format!(
                "{cpus} vCPUs do not match the topology sockets={sockets} x cores={cores} x threads={threads} = {product}"
            ),
        });
    }
    cfg.set("cpus", &cpus.to_string())?;
    cfg.set("sockets", &sockets.to_string())?;
    cfg.set("cores", &cores.to_string())?;
    cfg.set("threads", &threads.to_string())?;
    Ok(())
}

fn validate(cfg: &Config, owners: &[(&str, SubtreeCheck)]) -> Result<(), ConfigError> {
    let vars = cfg.referenced_variables();
    let cpus = cfg.get_u64("cpus")?.unwrap_or(1);
    for (key, _) in cfg.pairs() {
        // Expansion errors (an unset %(var)) surface here, for every key.
        let value = cfg.get(&key)?.unwrap_or_default();
        if let Some((_, kind)) = KEYS.iter().find(|(k, _)| *k == key) {
            check_kind(&key, *kind, &value)?;
        } else if let Some(rest) = key.strip_prefix("vcpu.") {
            let (n, leaf) = rest.split_once('.').unwrap_or((rest, ""));
            match (n.parse::<u64>(), leaf) {
                (Ok(n), "cpuset") if n < cpus => check_kind(&key, Kind::CpuList, &value)?,
                (Ok(_), "cpuset") => {
                    return Err(ConfigError::Invalid {
                        key,
                        msg: format!("this VM has {cpus} vCPUs (0 to {})", cpus - 1),
                    })
                }
                _ => return Err(ConfigError::UnknownKey(key)),
            }
        } else if let Some((_, check)) = owners.iter().find(|(p, _)| key.starts_with(p)) {
            check(cfg, &key)?;
        } else if key.starts_with("fwcfg.user.") {
            // Checked where fw_cfg is set up.
        } else if !vars.contains(&key) {
            return Err(ConfigError::UnknownKey(key));
        }
    }
    Ok(())
}
