//! rhyvectl's command line: where rhyve's API socket is, and the actions to do there in order.
//!
//! Options are long ones in bhyvectl(8)'s style (`--vm=NAME`, `--get-stats`, ...); an option that
//! takes a value accepts it as `--opt=VALUE` or as the next argument, except `--watch-exits`,
//! whose value is optional and so must be attached (`--watch-exits=2`). Options that modify an
//! action (`--count`, `--downtime-ms`, `--config`, ...) apply to every such action given.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::time::Duration;

/// `rhyvectl --help`.
pub const HELP: &str = "\
usage: rhyvectl (--vm=NAME | --api-socket=PATH) ACTION... [--count=N]
                [--downtime-ms=MS] [--max-rounds=N] [--config=KEY=VALUE]...

Controls a running rhyve through its API, as bhyvectl(8) controls bhyve.
Actions are done in the order given; the first that fails ends rhyvectl.

Where (exactly one):
  --vm=NAME             the VM that `rhyve --api ... NAME` runs (/run/rhyve/NAME.sock)
  --api-socket=PATH     the socket given to `rhyve --api-socket PATH`

Actions:
  --get-stats           print device counters, then each vCPU's exits by kind:
                        count, mean, p50 and p99 handling time
  --pause               pause the VM's vCPUs
  --resume              resume a paused VM
  --force-reset         reset the VM at once (vm.reboot)
  --force-poweroff      power the VM off at once (vm.shutdown)
  --snapshot=DIR        pause the VM and snapshot it into DIR (vm.snapshot; it stays
                        paused: --resume goes on, rhyve -r DIR restores it elsewhere)
  --send-migration=URL  live-migrate the running VM to a rhyve waiting in
                        --receive-migration at URL (unix:/PATH or tcp:HOST:PORT)
                        and wait until it runs there; it is then gone here (a rhyve
                        given its VM on the command line exits)
  --downtime-ms=MS      with --send-migration: the pause the guest may see at the
                        end, 1 to 60000 ms (default 300)
  --max-rounds=N        with --send-migration: at most N pre-copy rounds after the
                        first pass over memory, 0 to 1000 (default 30)
  --receive-migration=URL
                        listen at URL (unix:/PATH or tcp:HOST:PORT), wait up to 120 s
                        for a --send-migration and run the VM it sends here; this
                        rhyve must have no VM yet
  --config=KEY=VALUE    with --receive-migration: a device key of the VM's config
                        tree whose value differs here (pci.* or lpc.*, e.g.
                        lpc.com1.path=/tmp/b.txt); may be repeated
  --power-button        press the ACPI power button (the guest shuts itself down)
  --info                print the VM's configuration and state (JSON)
  --ping                print rhyve's version, pid and features (JSON)
  --watch-exits[=SECS]  every SECS seconds (default 1) show exits summed over the
                        vCPUs: total, exits/s over the last interval, p50, p99;
                        ends at Ctrl-C or when the VM ends
  --count=N             with --watch-exits: stop after N samples

  -h, --help            print this help and exit
  --version             print rhyvectl's version and exit

A percentile is shown as the histogram bucket it falls in: \"<8.19us\" is the bucket
below 8.19 us, \">=1.07s\" the last one. Times are from KVM_RUN returning to the vCPU
entering it again, since the VM booted.
A migration's answer comes when it is over, so rhyvectl waits up to 61 minutes for
it (a minute more than rhyve allows one; 30 s for the other actions).
Exit status: 0 done, 1 rhyve unreachable or an action failed, 2 bad arguments.
";

/// The longest `--watch-exits` interval accepted (a day), so that it fits a `Duration`.
const MAX_INTERVAL_SECS: f64 = 86_400.0;
/// The `--downtime-ms` rhyve accepts (vm.send-migration's `downtime_ms`).
const DOWNTIME_MS: std::ops::RangeInclusive<u64> = 1..=60_000;
/// The `--max-rounds` rhyve accepts (vm.send-migration's `max_rounds`).
const MAX_ROUNDS: std::ops::RangeInclusive<u64> = 0..=1000;

/// Where rhyve's API socket is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `--vm=NAME`: the socket `rhyve --api` makes for VM NAME.
    Vm(String),
    /// `--api-socket=PATH`.
    Socket(PathBuf),
}

impl Target {
    /// The socket's path.
    pub fn socket(&self) -> PathBuf {
        match self {
            Target::Vm(name) => PathBuf::from(format!("/run/rhyve/{name}.sock")),
            Target::Socket(path) => path.clone(),
        }
    }
}

/// One thing to do over the API.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    GetStats,
    Pause,
    Resume,
    ForceReset,
    ForcePoweroff,
    PowerButton,
    Info,
    Ping,
    /// Pause the VM (if it runs) and snapshot it into this directory (vm.snapshot).
    Snapshot(PathBuf),
    /// Sample vm.exit-stats every `interval`, `count` times (None: until the VM ends).
    WatchExits {
        interval: Duration,
        count: Option<u64>,
    },
    /// Live-migrate the VM to the rhyve listening at `url` (vm.send-migration); None leaves
    /// rhyve's default.
    SendMigration {
        url: String,
        downtime_ms: Option<u64>,
        max_rounds: Option<u64>,
    },
    /// Receive a VM at `url` and run it here (vm.receive-migration), with these config keys
    /// set to other values than on the source, in the order given.
    ReceiveMigration {
        url: String,
        config: Vec<(String, String)>,
    },
}

/// A command line that asks for work.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub target: Target,
    pub actions: Vec<Action>,
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Help,
    Version,
    Run(Invocation),
}

/// A usage error: one line saying what is wrong (exit status 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (rhyvectl --help lists the options)", self.0)
    }
}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Parses the arguments (without the program name). `-h`/`--help` and `--version` win over
/// everything else, as long as they come before an argument that is wrong.
pub fn parse(args: &[OsString]) -> Result<Command, UsageError> {
    let mut target: Option<Target> = None;
    let mut actions = Vec::new();
    let mut count: Option<u64> = None;
    let mut downtime_ms: Option<u64> = None;
    let mut max_rounds: Option<u64> = None;
    let mut config: Vec<(String, String)> = Vec::new();
    let mut want: Option<Command> = None;

    let mut i = 0;
    while let Some(arg) = args.get(i) {
        i += 1;
        let bytes = arg.as_bytes();
        // Only the option's name must be UTF-8; a socket path may be any bytes.
        let (name_bytes, value) = match bytes.iter().position(|&b| b == b'=') {
            Some(eq) => (&bytes[..eq], Some(OsStr::from_bytes(&bytes[eq + 1..]))),
            None => (bytes, None),
        };
        let Ok(name) = std::str::from_utf8(name_bytes) else {
            return Err(usage(format!(
                "unexpected argument '{}'",
                arg.to_string_lossy()
            )));
        };
        // The value of an option that needs one: attached, or the next argument.
        let mut take_value = |opt: &str| -> Result<OsString, UsageError> {
            if let Some(v) = value {
                return Ok(v.to_os_string());
            }
            match args.get(i) {
                Some(next) if !next.as_bytes().starts_with(b"-") => {
                    i += 1;
                    Ok(next.clone())
                }
                _ => Err(usage(format!("{opt} needs a value ({opt}=...)"))),
            }
        };
        let no_value = || -> Result<(), UsageError> {
            match value {
                Some(_) => Err(usage(format!("{name} takes no value"))),
                None => Ok(()),
            }
        };
        let flag = |a: Action| no_value().map(|()| a);
        match name {
            "-h" | "--help" => {
                no_value()?;
                want.get_or_insert(Command::Help);
            }
            "--version" => {
                no_value()?;
                want.get_or_insert(Command::Version);
            }
            "--vm" => {
                let v = take_value(name)?;
                let vm = vm_name(&v)?;
                set_target(&mut target, Target::Vm(vm))?;
            }
            "--api-socket" => {
                let v = take_value(name)?;
                if v.is_empty() {
                    return Err(usage("--api-socket needs a PATH"));
                }
                set_target(&mut target, Target::Socket(PathBuf::from(v)))?;
            }
            "--count" => {
                let v = take_value(name)?;
                if count.is_some() {
                    return Err(usage("--count is given twice"));
                }
                count = Some(parse_count(&v)?);
            }
            "--downtime-ms" => {
                let v = take_value(name)?;
                if downtime_ms.is_some() {
                    return Err(usage("--downtime-ms is given twice"));
                }
                downtime_ms = Some(parse_in(name, &v, DOWNTIME_MS, "milliseconds")?);
            }
            "--max-rounds" => {
                let v = take_value(name)?;
                if max_rounds.is_some() {
                    return Err(usage("--max-rounds is given twice"));
                }
                max_rounds = Some(parse_in(name, &v, MAX_ROUNDS, "rounds")?);
            }
            "--config" => {
                let (key, val) = parse_config(&take_value(name)?)?;
                if config.iter().any(|(k, _)| *k == key) {
                    return Err(usage(format!("--config {key} is given twice")));
                }
                config.push((key, val));
            }
            "--send-migration" => {
                let url = migration_url(name, &take_value(name)?)?;
                actions.push(Action::SendMigration {
                    url,
                    downtime_ms: None,
                    max_rounds: None,
                });
            }
            "--receive-migration" => {
                let url = migration_url(name, &take_value(name)?)?;
                actions.push(Action::ReceiveMigration {
                    url,
                    config: Vec::new(),
                });
            }
            "--get-stats" => actions.push(flag(Action::GetStats)?),
            "--pause" => actions.push(flag(Action::Pause)?),
            "--resume" => actions.push(flag(Action::Resume)?),
            "--force-reset" => actions.push(flag(Action::ForceReset)?),
            "--force-poweroff" => actions.push(flag(Action::ForcePoweroff)?),
            "--power-button" => actions.push(flag(Action::PowerButton)?),
            "--info" => actions.push(flag(Action::Info)?),
            "--ping" => actions.push(flag(Action::Ping)?),
            "--snapshot" => {
                let dir = PathBuf::from(take_value(name)?);
                if !dir.is_absolute() {
                    return Err(usage("--snapshot needs an absolute DIR"));
                }
                actions.push(Action::Snapshot(dir));
            }
            "--watch-exits" => {
                let interval = match value {
                    None => Duration::from_secs(1),
                    Some(v) => parse_interval(v)?,
                };
                actions.push(Action::WatchExits {
                    interval,
                    count: None,
                });
            }
            _ if name.starts_with('-') => {
                return Err(usage(format!("unknown option {name}")));
            }
            _ => {
                return Err(usage(format!(
                    "unexpected argument '{}'",
                    arg.to_string_lossy()
                )));
            }
        }
    }

    if let Some(cmd) = want {
        return Ok(cmd);
    }
    let Some(target) = target else {
        return Err(usage("say which VM: --vm=NAME or --api-socket=PATH"));
    };
    if actions.is_empty() {
        return Err(usage(
            "no action given (e.g. --get-stats, --pause, --info, --watch-exits)",
        ));
    }
    if let Some(n) = count {
        let mut watches = actions
            .iter_mut()
            .filter_map(|a| match a {
                Action::WatchExits { count, .. } => Some(count),
                _ => None,
            })
            .peekable();
        if watches.peek().is_none() {
            return Err(usage("--count applies only to --watch-exits"));
        }
        for c in watches {
            *c = Some(n);
        }
    }
    let sends = actions
        .iter()
        .any(|a| matches!(a, Action::SendMigration { .. }));
    for (given, opt) in [
        (downtime_ms.is_some(), "--downtime-ms"),
        (max_rounds.is_some(), "--max-rounds"),
    ] {
        if given && !sends {
            return Err(usage(format!("{opt} applies only to --send-migration")));
        }
    }
    let receives = actions
        .iter()
        .any(|a| matches!(a, Action::ReceiveMigration { .. }));
    if !config.is_empty() && !receives {
        return Err(usage("--config applies only to --receive-migration"));
    }
    for a in &mut actions {
        match a {
            Action::SendMigration {
                downtime_ms: d,
                max_rounds: r,
                ..
            } => {
                *d = downtime_ms;
                *r = max_rounds;
            }
            Action::ReceiveMigration { config: c, .. } => c.clone_from(&config),
            _ => {}
        }
    }
    Ok(Command::Run(Invocation { target, actions }))
}

fn set_target(slot: &mut Option<Target>, t: Target) -> Result<(), UsageError> {
    if slot.is_some() {
        return Err(usage(
            "give only one of --vm=NAME and --api-socket=PATH, once",
        ));
    }
    *slot = Some(t);
    Ok(())
}

fn vm_name(v: &OsStr) -> Result<String, UsageError> {
    let Some(name) = v.to_str() else {
        return Err(usage(format!(
            "--vm '{}': a VM name must be UTF-8",
            v.to_string_lossy()
        )));
    };
    if name.is_empty() {
        return Err(usage("--vm needs a NAME"));
    }
    if name.contains('/') || name == "." || name == ".." {
        return Err(usage(format!(
            "--vm '{name}': a VM name cannot be a path (use --api-socket=PATH for a socket elsewhere)"
        )));
    }
    Ok(name.to_string())
}

fn parse_count(v: &OsStr) -> Result<u64, UsageError> {
    let s = v.to_string_lossy();
    match s.parse::<u64>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(usage(format!(
            "--count '{s}': not a whole number of samples, at least 1"
        ))),
    }
}

/// A whole number in `range` (of `unit`), the value of `opt`.
fn parse_in(
    opt: &str,
    v: &OsStr,
    range: std::ops::RangeInclusive<u64>,
    unit: &str,
) -> Result<u64, UsageError> {
    let s = v.to_string_lossy();
    match s.parse::<u64>() {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(usage(format!(
            "{opt} '{s}': not a whole number of {unit} from {} to {}",
            range.start(),
            range.end()
        ))),
    }
}

/// A migration URL as rhyve takes it: `unix:/absolute/path` or `tcp:host:port` (each may
/// have `//` after the colon). It is sent as given.
fn migration_url(opt: &str, v: &OsStr) -> Result<String, UsageError> {
    let s = v.to_string_lossy();
    let bad = |why: &str| usage(format!("{opt} '{s}': {why}"));
    let Some(url) = v.to_str() else {
        return Err(bad("a URL must be UTF-8"));
    };
    if let Some(path) = url.strip_prefix("unix:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if !path.starts_with('/') {
            return Err(bad("not unix:/absolute/path"));
        }
    } else if let Some(addr) = url.strip_prefix("tcp:") {
        let addr = addr.strip_prefix("//").unwrap_or(addr);
        match addr.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
            _ => return Err(bad("not tcp:host:port")),
        }
    } else {
        return Err(bad("not unix:/absolute/path or tcp:host:port"));
    }
    Ok(url.to_string())
}

/// `KEY=VALUE` of `--config`: a device key of rhyve's config tree and its value here.
fn parse_config(v: &OsStr) -> Result<(String, String), UsageError> {
    let s = v.to_string_lossy();
    let Some(kv) = v.to_str() else {
        return Err(usage(format!("--config '{s}': must be UTF-8")));
    };
    let Some((key, val)) = kv.split_once('=') else {
        return Err(usage(format!(
            "--config '{s}': not KEY=VALUE (e.g. lpc.com1.path=/tmp/b.txt)"
        )));
    };
    let device = ["pci.", "lpc."]
        .iter()
        .any(|p| key.strip_prefix(p).is_some_and(|rest| !rest.is_empty()));
    if !device {
        return Err(usage(format!(
            "--config '{s}': only device keys (pci.*, lpc.*) can differ on the destination"
        )));
    }
    Ok((key.to_string(), val.to_string()))
}

fn parse_interval(v: &OsStr) -> Result<Duration, UsageError> {
    let s = v.to_string_lossy();
    let bad = || {
        usage(format!(
            "--watch-exits '{s}': not a number of seconds above 0 and at most {MAX_INTERVAL_SECS}"
        ))
    };
    let secs: f64 = s.trim().parse().map_err(|_| bad())?;
    if !(secs > 0.0 && secs <= MAX_INTERVAL_SECS) {
        return Err(bad());
    }
    let d = Duration::try_from_secs_f64(secs).map_err(|_| bad())?;
    if d.is_zero() {
        return Err(bad());
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Command, UsageError> {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        parse(&v)
    }

    fn run(args: &[&str]) -> Invocation {
        match p(args) {
            Ok(Command::Run(inv)) => inv,
            other => panic!("{args:?}: expected a run, got {other:?}"),
        }
    }

    fn err(args: &[&str]) -> String {
        match p(args) {
            Err(e) => e.0,
            Ok(c) => panic!("{args:?}: expected a usage error, got {c:?}"),
        }
    }

    #[test]
    fn vm_both_spellings_give_the_run_rhyve_socket() {
        for args in [
            &["--vm=guest", "--pause"][..],
            &["--vm", "guest", "--pause"],
        ] {
            let inv = run(args);
            assert_eq!(inv.target, Target::Vm("guest".into()));
            assert_eq!(inv.target.socket(), PathBuf::from("/run/rhyve/guest.sock"));
            assert_eq!(inv.actions, vec![Action::Pause]);
        }
    }

    #[test]
    fn api_socket_both_spellings() {
        for args in [
            &["--api-socket=/tmp/a=b.sock", "--info"][..],
            &["--api-socket", "/tmp/a=b.sock", "--info"],
        ] {
            let inv = run(args);
            assert_eq!(inv.target.socket(), PathBuf::from("/tmp/a=b.sock"));
            assert_eq!(inv.actions, vec![Action::Info]);
        }
    }

    #[test]
    fn a_socket_path_need_not_be_utf8() {
        let mut raw = b"--api-socket=/tmp/\xff.sock".to_vec();
        let arg = OsString::from(OsStr::from_bytes(&raw));
        let got = parse(&[arg, OsString::from("--ping")]);
        raw.drain(..13);
        match got {
            Ok(Command::Run(inv)) => {
                assert_eq!(inv.target.socket().as_os_str().as_bytes(), &raw[..])
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn actions_keep_their_order_and_may_repeat() {
        let inv = run(&[
            "--pause",
            "--get-stats",
            "--vm=x",
            "--resume",
            "--force-reset",
            "--force-poweroff",
            "--power-button",
            "--ping",
            "--info",
            "--pause",
        ]);
        assert_eq!(
            inv.actions,
            vec![
                Action::Pause,
                Action::GetStats,
                Action::Resume,
                Action::ForceReset,
                Action::ForcePoweroff,
                Action::PowerButton,
                Action::Ping,
                Action::Info,
                Action::Pause,
            ]
        );
    }

    #[test]
    fn watch_exits_interval_and_count() {
        let one = Duration::from_secs(1);
        assert_eq!(
            run(&["--vm=x", "--watch-exits"]).actions,
            vec![Action::WatchExits {
                interval: one,
                count: None
            }]
        );
        assert_eq!(
            run(&["--vm=x", "--watch-exits=0.25", "--count=3"]).actions,
            vec![Action::WatchExits {
                interval: Duration::from_millis(250),
                count: Some(3)
            }]
        );
        // --count may come first, and as two arguments.
        assert_eq!(
            run(&["--count", "2", "--vm=x", "--watch-exits=5"]).actions,
            vec![Action::WatchExits {
                interval: Duration::from_secs(5),
                count: Some(2)
            }]
        );
    }

    #[test]
    fn send_migration_and_its_options() {
        assert_eq!(
            run(&["--vm=x", "--send-migration=tcp:10.0.0.2:7000"]).actions,
            vec![Action::SendMigration {
                url: "tcp:10.0.0.2:7000".into(),
                downtime_ms: None,
                max_rounds: None
            }]
        );
        // The options may come before, as two arguments, and apply to every send.
        assert_eq!(
            run(&[
                "--downtime-ms",
                "50",
                "--vm=x",
                "--send-migration",
                "unix:/run/dst.sock",
                "--max-rounds=0",
                "--send-migration=unix:///b",
            ])
            .actions,
            vec![
                Action::SendMigration {
                    url: "unix:/run/dst.sock".into(),
                    downtime_ms: Some(50),
                    max_rounds: Some(0)
                },
                Action::SendMigration {
                    url: "unix:///b".into(),
                    downtime_ms: Some(50),
                    max_rounds: Some(0)
                }
            ]
        );
    }

    #[test]
    fn receive_migration_and_its_config() {
        assert_eq!(
            run(&["--vm=x", "--receive-migration=tcp://[::1]:7000"]).actions,
            vec![Action::ReceiveMigration {
                url: "tcp://[::1]:7000".into(),
                config: vec![]
            }]
        );
        assert_eq!(
            run(&[
                "--vm=x",
                "--config",
                "lpc.com1.path=/tmp/b=c.txt",
                "--receive-migration",
                "unix:/tmp/m.sock",
                "--config=pci.0.3.0.path=",
            ])
            .actions,
            vec![Action::ReceiveMigration {
                url: "unix:/tmp/m.sock".into(),
                config: vec![
                    ("lpc.com1.path".into(), "/tmp/b=c.txt".into()),
                    ("pci.0.3.0.path".into(), "".into()),
                ]
            }]
        );
    }

    #[test]
    fn bad_migration_arguments() {
        for (arg, want) in [
            (
                "--send-migration=/tmp/s",
                "not unix:/absolute/path or tcp:host:port",
            ),
            (
                "--send-migration=http://h:1",
                "not unix:/absolute/path or tcp:host:port",
            ),
            ("--send-migration=unix:rel.sock", "not unix:/absolute/path"),
            ("--receive-migration=tcp:host", "not tcp:host:port"),
            ("--receive-migration=tcp::7000", "not tcp:host:port"),
            ("--receive-migration=tcp:h:70000", "not tcp:host:port"),
        ] {
            let msg = err(&["--vm=a", arg]);
            assert!(msg.ends_with(want), "{arg}: {msg}");
        }
        assert!(err(&["--vm=a", "--send-migration"]).contains("needs a value"));
        for bad in ["0", "60001", "-1", "x", "1.5", ""] {
            let msg = err(&[
                "--vm=a",
                "--send-migration=tcp:h:1",
                &format!("--downtime-ms={bad}"),
            ]);
            assert!(msg.contains("from 1 to 60000"), "{bad}: {msg}");
        }
        assert!(
            err(&["--vm=a", "--send-migration=tcp:h:1", "--max-rounds=1001"])
                .contains("from 0 to 1000")
        );
        assert!(err(&[
            "--vm=a",
            "--send-migration=tcp:h:1",
            "--downtime-ms=1",
            "--downtime-ms=2"
        ])
        .contains("twice"));
        assert_eq!(
            err(&["--vm=a", "--pause", "--downtime-ms=5"]),
            "--downtime-ms applies only to --send-migration"
        );
        assert_eq!(
            err(&["--vm=a", "--receive-migration=tcp:h:1", "--max-rounds=5"]),
            "--max-rounds applies only to --send-migration"
        );
        assert_eq!(
            err(&[
                "--vm=a",
                "--send-migration=tcp:h:1",
                "--config=lpc.com1.path=/x"
            ]),
            "--config applies only to --receive-migration"
        );
        let recv = ["--vm=a", "--receive-migration=tcp:h:1"];
        for (bad, want) in [
            ("lpc.com1.path", "not KEY=VALUE"),
            ("memory.size=1", "only device keys"),
            ("pci.=x", "only device keys"),
            ("=x", "only device keys"),
        ] {
            let msg = err(&[recv[0], recv[1], &format!("--config={bad}")]);
            assert!(msg.contains(want), "{bad}: {msg}");
        }
        assert_eq!(
            err(&[
                recv[0],
                recv[1],
                "--config=lpc.com1.path=/a",
                "--config=lpc.com1.path=/b"
            ]),
            "--config lpc.com1.path is given twice"
        );
    }

    #[test]
    fn help_and_version_win() {
        assert_eq!(p(&["-h"]), Ok(Command::Help));
        assert_eq!(p(&["--help"]), Ok(Command::Help));
        assert_eq!(p(&["--vm=x", "--pause", "--help"]), Ok(Command::Help));
        assert_eq!(p(&["--version"]), Ok(Command::Version));
        assert_eq!(p(&["--version", "--help"]), Ok(Command::Version));
    }

    #[test]
    fn a_target_is_required_and_only_one() {
        assert!(err(&[]).contains("--vm=NAME or --api-socket=PATH"));
        assert!(err(&["--pause"]).contains("--vm=NAME or --api-socket=PATH"));
        assert!(err(&["--vm=a", "--vm=b", "--pause"]).contains("only one"));
        assert!(err(&["--vm=a", "--api-socket=/s", "--pause"]).contains("only one"));
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert!(err(&["--vm"]).contains("--vm needs a value"));
        assert!(err(&["--vm", "--pause"]).contains("--vm needs a value"));
        assert!(err(&["--vm=", "--pause"]).contains("--vm needs a NAME"));
        assert!(err(&["--vm=a/b", "--pause"]).contains("cannot be a path"));
        assert!(err(&["--vm=..", "--pause"]).contains("cannot be a path"));
        assert!(err(&["--api-socket=", "--pause"]).contains("needs a PATH"));
        assert!(err(&["--api-socket"]).contains("needs a value"));
        for bad in ["0", "-1", "x", "", "1e9", "inf", "NaN", "1e-12"] {
            let msg = err(&["--vm=a", &format!("--watch-exits={bad}")]);
            assert!(msg.starts_with("--watch-exits"), "{bad}: {msg}");
        }
        for bad in ["0", "-2", "x", "1.5"] {
            let msg = err(&["--vm=a", "--watch-exits", &format!("--count={bad}")]);
            assert!(msg.contains("at least 1"), "{bad}: {msg}");
        }
        assert!(err(&["--vm=a", "--watch-exits", "--count=1", "--count=2"]).contains("twice"));
    }

    #[test]
    fn unknown_and_stray_arguments() {
        assert_eq!(
            err(&["--vm=a", "--frobnicate"]),
            "unknown option --frobnicate"
        );
        assert_eq!(err(&["--vm=a", "-p"]), "unknown option -p");
        assert_eq!(err(&["--vm=a", "pause"]), "unexpected argument 'pause'");
        // --watch-exits takes its value only attached.
        assert_eq!(
            err(&["--vm=a", "--watch-exits", "2"]),
            "unexpected argument '2'"
        );
        assert_eq!(err(&["--vm=a", "--pause=1"]), "--pause takes no value");
        assert_eq!(err(&["--help=1"]), "--help takes no value");
    }

    #[test]
    fn actions_and_count_rules() {
        assert!(err(&["--vm=a"]).starts_with("no action given"));
        assert_eq!(
            err(&["--vm=a", "--pause", "--count=2"]),
            "--count applies only to --watch-exits"
        );
    }

    #[test]
    fn usage_error_display_is_one_line() {
        let e = usage("unknown option --x");
        let s = e.to_string();
        assert_eq!(s, "unknown option --x (rhyvectl --help lists the options)");
        assert!(!s.contains('\n'));
    }
}
