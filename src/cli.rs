//! bhyve(8) command-line options, turned into keys of the config tree (bhyverun.c `main`).
//!
//! Options are applied in the order given, so a later `-o` or `-k` overrides an earlier one,
//! exactly as in bhyve. Letters and meanings follow bhyve(8); `-v` (more log output) is ours.

use crate::config::{is_uuid, parse_memsize, schema, Config, ConfigError};
use crate::emulations::{self as pci, lpc};

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Build and run the VM described by the tree.
    Run(Config),
    /// `-h`, `--help`: print usage and exit 0.
    Help,
    /// `--version`: print the version and exit 0.
    Version,
    /// `--api-socket PATH` without a VM: serve the API and wait to be given a VM over it.
    Serve(Config),
    /// `-s help`: list PCI emulations.
    ListPci,
    /// `-l help`: list LPC devices.
    ListLpc,
}

/// The result of parsing: what to do, and how verbose to be.
#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub action: Action,
    pub verbosity: u8,
}

pub const USAGE: &str = "\
Usage: rhyve [-aCDeHhPSuvwxWY] [--api-socket PATH | --api]
       [-c [[cpus=]numcpus][,sockets=n][,cores=n][,threads=n]]
       [-G [w][addr:]port] [-k config_file] [-l lpc] [-m mem] [-o var=value]
       [-p vcpu:hostcpu] [-r file] [-s pci] [-U uuid] vmname
       -a: local APIC is in xAPIC mode
       -C: include guest memory in core file
       -c: number of CPUs and/or topology specification
       -D: destroy on power-off
       -e: exit on unhandled I/O access
       -G: start a debug server
       -H: vmexit from the guest on HLT
       -h: help
       -k: key=value flat config file
       -l: LPC device configuration (-l help lists them)
       -m: memory size (K, M, G or T suffix; none means MiB; default 256M)
       -o: set config 'var' to 'value'
       -P: vmexit from the guest on pause
       -p: pin 'vcpu' to 'hostcpu'
       -r: path to checkpoint file
       -S: guest memory cannot be swapped
       -s: <slot,driver,configinfo> PCI slot config (-s help lists emulations)
       -U: UUID
       -u: RTC keeps UTC time
       -v: more log output (repeat for more)
       -W: force virtio to use single-vector MSI
       -w: ignore unimplemented MSRs
       -x: local APIC is in x2APIC mode
       -Y: disable MPtable generation
  Linux guests: -o boot.kernel=PATH -o boot.initrd=PATH -o boot.cmdline=STRING
  Control API (cloud-hypervisor's REST API on a unix socket; README.md, rhyvectl):
       --api-socket PATH: serve it at PATH (config key api.socket); with no vmname,
                          wait for a VM to be created over the API
       --api: serve it at /run/rhyve/VMNAME.sock (rhyvectl --vm=VMNAME finds it)
       --help, --version
";

/// Where `--api` puts the API socket of VM `name` (`rhyvectl --vm=NAME` looks there).
pub fn default_api_socket(name: &str) -> String {
    format!("/run/rhyve/{name}.sock")
}

/// Option letters that take an argument (bhyve's getopt string, plus none of ours).
const WITH_ARG: &str = "cGkKlmopfrsU";
/// Option letters that are flags.
const FLAGS: &str = "aACDeHhIPSuvWwxY";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    #[error("unknown option -{0} (rhyve -h lists the options)")]
    UnknownOption(char),
    #[error("unknown option --{0} (rhyve --help lists the options)")]
    UnknownLongOption(String),
    #[error("option -{0} needs an argument (rhyve -h)")]
    MissingArgument(char),
    #[error("-{opt} {arg}: {msg}")]
    BadArgument { opt: char, arg: String, msg: String },
    #[error("-r restores the snapshot's vCPUs and memory: leave out -c and -m")]
    RestoreShape,
    #[error("option --{0} needs an argument (rhyve --help)")]
    MissingLongArgument(String),
    #[error("a VM name is required as the last argument (rhyve -h)")]
    NoName,
    #[error("only one VM name may be given, found '{0}' after it")]
    ExtraArgument(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
}

fn bad(opt: char, arg: &str, msg: impl Into<String>) -> CliError {
    CliError::BadArgument {
        opt,
        arg: arg.to_string(),
        msg: msg.into(),
    }
}

/// Parses bhyve's argument vector (without the program name).
pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Parsed, CliError> {
    let mut cfg = Config::new();
    let mut verbosity = 0u8;
    let mut positional: Vec<String> = Vec::new();
    let mut api_by_name = false;
    let mut shaped = false;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_ref();
        i += 1;
        if !positional.is_empty() || arg == "-" || !arg.starts_with('-') {
            // getopt stops at the first operand: everything after is positional.
            positional.push(arg.to_string());
            continue;
        }
        if arg == "--" {
            positional.extend(args[i..].iter().map(|a| a.as_ref().to_string()));
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            match name {
                "help" => {
                    return Ok(Parsed {
                        action: Action::Help,
                        verbosity,
                    })
                }
                "version" => {
                    return Ok(Parsed {
                        action: Action::Version,
                        verbosity,
                    })
                }
                "api" => api_by_name = true,
                "api-socket" => {
                    let path = match inline {
                        Some(v) => v,
                        None if i < args.len() => {
                            i += 1;
                            args[i - 1].as_ref().to_string()
                        }
                        None => return Err(CliError::MissingLongArgument(name.into())),
                    };
                    if path.is_empty() {
                        return Err(CliError::MissingLongArgument(name.into()));
                    }
                    cfg.set("api.socket", &path)?;
                }
                _ => return Err(CliError::UnknownLongOption(name.into())),
            }
            continue;
        }
        let mut letters = arg[1..].char_indices();
        for (pos, opt) in letters.by_ref() {
            if FLAGS.contains(opt) {
                match apply_flag(&mut cfg, opt)? {
                    FlagEffect::Help => {
                        return Ok(Parsed {
                            action: Action::Help,
                            verbosity,
                        })
                    }
                    FlagEffect::Verbose => verbosity = verbosity.saturating_add(1),
                    FlagEffect::None => {}
                }
                continue;
            }
            if !WITH_ARG.contains(opt) {
                return Err(CliError::UnknownOption(opt));
            }
            // The argument is the rest of this word, or the next word.
            let rest = &arg[1 + pos + opt.len_utf8()..];
            let value = if !rest.is_empty() {
                rest.to_string()
            } else if i < args.len() {
                i += 1;
                args[i - 1].as_ref().to_string()
            } else {
                return Err(CliError::MissingArgument(opt));
            };
            shaped |= matches!(opt, 'c' | 'm');
            match apply_option(&mut cfg, opt, &value)? {
                Some(action) => return Ok(Parsed { action, verbosity }),
                None => break,
            }
        }
    }
    match positional.len() {
        0 if cfg.get_raw("name").is_none() && cfg.get_raw("api.socket").is_some() => {
            // Only the API: anything about a VM needs the VM's name.
            if api_by_name || cfg.pairs().iter().any(|(k, _)| k != "api.socket") {
                return Err(CliError::NoName);
            }
            return Ok(Parsed {
                action: Action::Serve(cfg),
                verbosity,
            });
        }
        0 if cfg.get_raw("name").is_none() => return Err(CliError::NoName),
        0 => {}
        1 => cfg.set("name", &positional[0])?,
        _ => return Err(CliError::ExtraArgument(positional[1].clone())),
    }
    if shaped && cfg.get_raw("restore.file").is_some() {
        return Err(CliError::RestoreShape);
    }
    if api_by_name {
        let name = cfg.get("name")?.unwrap_or_default();
        cfg.set("api.socket", &default_api_socket(&name))?;
    }
    lpc::add_implied_bridges(&mut cfg)?;
    schema::finish(
        &mut cfg,
        &[("pci.", pci::validate_key), ("lpc.", lpc::validate_key)],
    )?;
    Ok(Parsed {
        action: Action::Run(cfg),
        verbosity,
    })
}

enum FlagEffect {
    None,
    Help,
    Verbose,
}

fn apply_flag(cfg: &mut Config, opt: char) -> Result<FlagEffect, CliError> {
    let kv = match opt {
        'h' => return Ok(FlagEffect::Help),
        'v' => return Ok(FlagEffect::Verbose),
        // -A (ACPI tables) and -I (I/O APIC) are always on in bhyve today; kept for old scripts.
        'A' => ("acpi_tables", "true"),
        'I' => return Ok(FlagEffect::None),
        'a' => ("x86.x2apic", "false"),
        'x' => ("x86.x2apic", "true"),
        'C' => ("memory.guest_in_core", "true"),
        'D' => ("destroy_on_poweroff", "true"),
        'e' => ("x86.strictio", "true"),
        'H' => ("x86.vmexit_on_hlt", "true"),
        'P' => ("x86.vmexit_on_pause", "true"),
        'S' => ("memory.wired", "true"),
        'u' => ("rtc.use_localtime", "false"),
        'W' => ("virtio_msix", "false"),
        'w' => ("x86.strictmsr", "false"),
        'Y' => ("x86.mptable", "false"),
        _ => return Err(CliError::UnknownOption(opt)),
    };
    cfg.set(kv.0, kv.1)?;
    Ok(FlagEffect::None)
}

fn apply_option(cfg: &mut Config, opt: char, arg: &str) -> Result<Option<Action>, CliError> {
    match opt {
        'c' => parse_topology(cfg, arg)?,
        'm' => {
            if parse_memsize(arg).is_none() {
                return Err(bad(
                    opt,
                    arg,
                    "not a memory size (a number with K, M, G or T; none means MiB)",
                ));
            }
            cfg.set("memory.size", arg)?;
        }
        's' if arg == "help" => return Ok(Some(Action::ListPci)),
        's' => pci::parse_slot_option(cfg, arg).map_err(|m| bad(opt, arg, m))?,
        'l' if arg == "help" => return Ok(Some(Action::ListLpc)),
        'l' => lpc::parse_option(cfg, arg).map_err(|m| bad(opt, arg, m))?,
        'o' => cfg.set_pair(arg)?,
        'k' => cfg.load_file(arg)?,
        'p' => parse_pin(cfg, arg)?,
        'U' => {
            if !is_uuid(arg) {
                return Err(bad(
                    opt,
                    arg,
                    "not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)",
                ));
            }
            cfg.set("uuid", arg)?;
        }
        'G' => parse_gdb(cfg, arg)?,
        'r' => cfg.set("restore.file", arg)?,
        'K' => cfg.set("keyboard.layout", arg)?,
        'f' => {
            let (name, rest) = arg
                .split_once(',')
                .ok_or_else(|| bad(opt, arg, "expected name,string=... or name,file=..."))?;
            cfg.set(&format!("fwcfg.user.{name}"), rest)?;
        }
        _ => return Err(CliError::UnknownOption(opt)),
    }
    Ok(None)
}

/// `-c [[cpus=]n][,sockets=n][,cores=n][,threads=n]`.
fn parse_topology(cfg: &mut Config, arg: &str) -> Result<(), CliError> {
    for (idx, item) in arg.split(',').enumerate() {
        let (key, val) = match item.split_once('=') {
            Some((k, v)) => (k, v),
            None if idx == 0 => ("cpus", item),
            None => return Err(bad('c', arg, format!("'{item}' is not name=value"))),
        };
        if !matches!(key, "cpus" | "sockets" | "cores" | "threads") {
            return Err(bad(
                'c',
                arg,
                format!("unknown topology item '{key}' (cpus, sockets, cores, threads)"),
            ));
        }
        match val.parse::<u32>() {
            Ok(n) if n > 0 => cfg.set(key, val)?,
            _ => return Err(bad('c', arg, format!("{key} must be a positive number"))),
        }
    }
    Ok(())
}

/// `-p vcpu:hostcpu`: appended to `vcpu.N.cpuset`, as bhyve does for repeated `-p`.
fn parse_pin(cfg: &mut Config, arg: &str) -> Result<(), CliError> {
    let (v, h) = arg
        .split_once(':')
        .ok_or_else(|| bad('p', arg, "expected vcpu:hostcpu"))?;
    let vcpu: u32 = v
        .parse()
        .map_err(|_| bad('p', arg, "vcpu is not a number"))?;
    let host: u32 = h
        .parse()
        .map_err(|_| bad('p', arg, "hostcpu is not a number"))?;
    let key = format!("vcpu.{vcpu}.cpuset");
    let value = match cfg.get_raw(&key) {
        Some(old) => format!("{old},{host}"),
        None => host.to_string(),
    };
    cfg.set(&key, &value)?;
    Ok(())
}

/// `-G [w][addr:]port`.
fn parse_gdb(cfg: &mut Config, arg: &str) -> Result<(), CliError> {
    let (wait, rest) = match arg.strip_prefix('w') {
        Some(r) => (true, r),
        None => (false, arg),
    };
    let (addr, port) = match rest.rsplit_once(':') {
        Some((a, p)) => (Some(a), p),
        None => (None, rest),
    };
    if port.parse::<u16>().is_err() {
        return Err(bad('G', arg, "port is not a number from 0 to 65535"));
    }
    cfg.set("gdb.port", port)?;
    if let Some(a) = addr {
        cfg.set("gdb.address", a)?;
    }
    if wait {
        cfg.set("gdb.wait", "true")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_cpulist;

    fn run(args: &[&str]) -> Config {
        match parse(args).unwrap().action {
            Action::Run(c) => c,
            other => panic!("expected Run, got {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        parse(args).unwrap_err().to_string()
    }

    #[test]
    fn a_typical_bhyve_line() {
        let c = run(&[
            "-c",
            "2",
            "-m",
            "512M",
            "-s",
            "0,hostbridge",
            "-s",
            "31,lpc",
            "-l",
            "com1,stdio",
            "-l",
            "bootrom,/fw/rom.bin,/vm/vars.fd",
            "-e",
            "-w",
            "-u",
            "-H",
            "-P",
            "vm0",
        ]);
        let get = |k: &str| c.get(k).unwrap();
        assert_eq!(get("name").as_deref(), Some("vm0"));
        assert_eq!(get("cpus").as_deref(), Some("2"));
        assert_eq!(get("memory.size").as_deref(), Some("512M"));
        assert_eq!(get("pci.0.0.0.device").as_deref(), Some("hostbridge"));
        assert_eq!(get("pci.0.31.0.device").as_deref(), Some("lpc"));
        assert_eq!(get("lpc.com1.path").as_deref(), Some("stdio"));
        assert_eq!(get("lpc.bootrom").as_deref(), Some("/fw/rom.bin"));
        assert_eq!(get("lpc.bootvars").as_deref(), Some("/vm/vars.fd"));
        assert_eq!(get("x86.strictio").as_deref(), Some("true"));
        assert_eq!(get("x86.strictmsr").as_deref(), Some("false"));
        assert_eq!(get("rtc.use_localtime").as_deref(), Some("false"));
    }

    #[test]
    fn bundled_flags_and_attached_arguments() {
        let c = run(&["-ewc4", "-m1G", "vm"]);
        assert_eq!(c.get("x86.strictio").unwrap().as_deref(), Some("true"));
        assert_eq!(c.get("x86.strictmsr").unwrap().as_deref(), Some("false"));
        assert_eq!(c.get("cpus").unwrap().as_deref(), Some("4"));
        assert_eq!(c.get("memory.size").unwrap().as_deref(), Some("1G"));
    }

    #[test]
    fn topology_forms() {
        let c = run(&["-c", "cpus=4,sockets=2,cores=2,threads=1", "vm"]);
        assert_eq!(c.get("sockets").unwrap().as_deref(), Some("2"));
        let c = run(&["-c", "sockets=2,cores=4", "vm"]);
        assert_eq!(
            c.get("cpus").unwrap().as_deref(),
            Some("8"),
            "cpus derived from topology"
        );
        assert!(err(&["-c", "4,sockets=3", "vm"]).contains("topology"));
        assert!(err(&["-c", "0", "vm"]).contains("positive"));
        assert!(err(&["-c", "two", "vm"]).contains("positive"));
        assert!(err(&["-c", "4,dies=2", "vm"]).contains("unknown topology item"));
    }

    #[test]
    fn later_options_win_and_k_files_apply_in_order() {
        let dir = std::env::temp_dir().join(format!("rhyve-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.conf");
        std::fs::write(&f, "memory.size=2G\ncpus=2\n").unwrap();
        let fs = f.to_str().unwrap();
        let c = run(&["-m", "1G", "-k", fs, "vm"]);
        assert_eq!(c.get("memory.size").unwrap().as_deref(), Some("2G"));
        let c = run(&["-k", fs, "-o", "memory.size=3G", "vm"]);
        assert_eq!(c.get("memory.size").unwrap().as_deref(), Some("3G"));
        // A -k file may give the name; then no operand is needed.
        std::fs::write(&f, "name=fromfile\n").unwrap();
        let c = run(&["-k", fs]);
        assert_eq!(c.get("name").unwrap().as_deref(), Some("fromfile"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pinning_appends() {
        let c = run(&["-c", "2", "-p", "0:1", "-p", "0:3", "-p", "1:0", "vm"]);
        assert_eq!(c.get("vcpu.0.cpuset").unwrap().as_deref(), Some("1,3"));
        assert_eq!(c.get("vcpu.1.cpuset").unwrap().as_deref(), Some("0"));
        assert!(err(&["-p", "0", "vm"]).contains("vcpu:hostcpu"));
        assert!(err(&["-p", "x:1", "vm"]).contains("vcpu is not a number"));
        assert!(err(&["-c", "2", "-p", "5:0", "vm"]).contains("vcpu.5"));
        assert_eq!(parse_cpulist("1,3-5"), Some(vec![1, 3, 4, 5]));
        assert_eq!(parse_cpulist("5-3"), None);
        assert_eq!(parse_cpulist("a"), None);
    }

    #[test]
    fn help_and_lists() {
        assert_eq!(parse(&["-h"]).unwrap().action, Action::Help);
        assert_eq!(parse(&["-s", "help"]).unwrap().action, Action::ListPci);
        assert_eq!(parse(&["-l", "help"]).unwrap().action, Action::ListLpc);
        assert_eq!(parse(&["-vv", "-h"]).unwrap().verbosity, 2);
    }

    #[test]
    fn bad_input_is_one_clear_error() {
        assert!(err(&["-q", "vm"]).contains("unknown option -q"));
        assert!(err(&["-m"]).contains("needs an argument"));
        assert!(err(&["-m", "lots", "vm"]).contains("not a memory size"));
        assert!(err(&[]).contains("VM name is required"));
        assert!(err(&["vm", "other"]).contains("only one VM name"));
        assert!(err(&["-o", "novalue", "vm"]).contains("key=value"));
        assert!(err(&["-o", "memory.sise=1G", "vm"]).contains("unknown config key"));
        assert!(err(&["-o", "x86.strictio=perhaps", "vm"]).contains("not a boolean"));
        assert!(err(&["-U", "not-a-uuid", "vm"]).contains("UUID"));
        assert!(err(&["-G", "w:99999", "vm"]).contains("port"));
        assert!(err(&["-s", "2,nosuchdev", "vm"]).contains("unknown PCI emulation"));
        assert!(err(&["-s", "32,hostbridge", "vm"]).contains("slot"));
        assert!(err(&["-s", "1:2:8,hostbridge", "vm"]).contains("function"));
        assert!(err(&["-s", "x,hostbridge", "vm"]).contains("slot"));
        assert!(err(&["-s", "3", "vm"]).contains("emulation"));
        assert!(err(&["-s", "0,hostbridge", "-s", "0:0,lpc", "vm"]).contains("already"));
        assert!(err(&["-l", "com5,stdio", "vm"]).contains("unknown LPC device"));
        assert!(err(&["-l", "com1", "vm"]).contains("backend"));
        assert!(err(&["-l", "bootrom", "vm"]).contains("ROM file"));
        assert!(err(&["-k", "/nonexistent/x.conf", "vm"]).contains("cannot read"));
    }

    #[test]
    fn variables_used_by_expansion_are_not_unknown_keys() {
        let c = run(&["-o", "romdir=/fw", "-l", "bootrom,%(romdir)/rom.bin", "vm"]);
        assert_eq!(
            c.get("lpc.bootrom").unwrap().as_deref(),
            Some("/fw/rom.bin")
        );
        assert!(err(&["-o", "romdir=/fw", "vm"]).contains("unknown config key 'romdir'"));
    }

    #[test]
    fn lpc_implies_hostbridge_and_lpc_bridge() {
        let c = run(&["-l", "com1,stdio", "vm"]);
        assert_eq!(
            c.get("pci.0.0.0.device").unwrap().as_deref(),
            Some("hostbridge")
        );
        assert_eq!(c.get("pci.0.31.0.device").unwrap().as_deref(), Some("lpc"));
        // An explicit LPC bridge elsewhere is kept, and no second one is added.
        let c = run(&[
            "-s",
            "0,hostbridge",
            "-s",
            "1,lpc",
            "-l",
            "com1,stdio",
            "vm",
        ]);
        assert_eq!(c.get("pci.0.1.0.device").unwrap().as_deref(), Some("lpc"));
        assert_eq!(c.get("pci.0.31.0.device").unwrap(), None);
    }
}
