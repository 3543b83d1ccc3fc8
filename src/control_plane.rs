//! The main thread while rhyve runs: the VM (given on the command line or over the API), the
//! control signals, and the API's calls, in one event loop (`vmm::main_loop`).
//!
//! A VM given on the command line keeps bhyve's contract: when it stops, rhyve exits with
//! bhyve's status for why (0 reset, 1 powered off, 2 halted, 3 triple fault, 4 error). A VM
//! created over the API (`rhyve --api-socket PATH` with no vmname) is cloud-hypervisor's: a
//! guest reset reboots it in place, any other stop leaves it Shutdown (it can be booted again
//! or deleted), and rhyve exits on `vmm.shutdown` or a signal.

use rhyve_api::{Api, Call, Endpoint, Reply};
use serde_json::{json, Map, Value};

use crate::api_config::{self, DeviceIds};
use std::path::{Path, PathBuf};

use crate::config::{parse_memsize, Config};
use crate::timeline;
use crate::vmm::control::SuspendReason;
use crate::vmm::main_loop::{self, Ended, Event, Flow, Signals};
use crate::vmm::migration::{self, SendOptions, Url};
use crate::vmm::snapshot;
use crate::vmm::Vm;

/// Status of a rhyve that served the API and had no command-line VM, on `vmm.shutdown` or
/// SIGTERM.
const EXIT_OK: u8 = 0;
/// Status for errors (bhyve's 4).
const EXIT_ERROR: u8 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    NotCreated,
    Created,
    Booted,
    Shutdown,
}

pub struct Controller {
    api: Option<Api>,
    /// The VM came from the command line: when it stops, rhyve exits with its status.
    from_cli: bool,
    cfg: Option<Config>,
    /// The VmConfig as given to vm.create (`vm.info` shows it); a command-line VM's is
    /// derived from its tree.
    vm_config: Option<Value>,
    ids: DeviceIds,
    vm: Option<Vm>,
    state: State,
    exit: Option<u8>,
    /// SIGTERM has pressed the power button once.
    pressed: bool,
}

impl Controller {
    /// A controller with the API at `api` (if any) and, from the command line, `cfg` (if any).
    pub fn new(api: Option<Api>, cfg: Option<Config>) -> Controller {
        let from_cli = cfg.is_some();
        Controller {
            api,
            from_cli,
            state: if from_cli {
                State::Created
            } else {
                State::NotCreated
            },
            cfg,
            vm_config: None,
            ids: DeviceIds::default(),
            vm: None,
            exit: None,
            pressed: false,
        }
    }

    /// Builds and starts the command-line VM.
    pub fn boot(&mut self) -> Result<(), String> {
        let Some(cfg) = &self.cfg else {
            return Err("no VM is created (vm.create first)".into());
        };
        if let Some(dir) = cfg.get_raw("restore.file").map(PathBuf::from) {
            // bhyve -r: the snapshot's VM, with this command line's devices where it names
            // them (a new disk path or tap, say).
            let m = snapshot::read_manifest(&dir)?;
            let mut merged = snapshot::config_of(&m)?;
            for (k, v) in cfg.pairs() {
                if k.starts_with("pci.") || k.starts_with("lpc.") || k == "name" {
                    merged.set(&k, &v).map_err(|e| e.to_string())?;
                }
            }
            self.cfg = Some(merged);
            return self.restore(&dir, &m, true);
        }
        let mut vm = Vm::create(cfg).map_err(|e| e.to_string())?;
        timeline::mark("vm created");
        if let Err(e) = vm.start() {
            vm.wait();
            return Err(e.to_string());
        }
        self.vm = Some(vm);
        self.state = State::Booted;
        self.pressed = false;
        Ok(())
    }

    /// Builds the VM of `self.cfg` (the snapshot's config), restores the snapshot in `dir`
    /// into it and, with `resume`, lets it run.
    fn restore(&mut self, dir: &Path, m: &snapshot::Manifest, resume: bool) -> Result<(), String> {
        let Some(cfg) = &self.cfg else {
            return Err("no VM config".into());
        };
        snapshot::check_disks(m, cfg).map_err(|e| format!("restoring {}: {e}", dir.display()))?;
        let mut vm = Vm::create(cfg).map_err(|e| e.to_string())?;
        let t = std::time::Instant::now();
        snapshot::restore(&mut vm, dir, m)
            .map_err(|e| format!("restoring {}: {e}", dir.display()))?;
        log::info!(
            "restored {} in {:.1} ms",
            dir.display(),
            t.elapsed().as_secs_f64() * 1e3
        );
        if resume {
            vm.resume();
        }
        self.vm = Some(vm);
        self.state = State::Booted;
        self.pressed = false;
        Ok(())
    }

    /// Runs until rhyve should exit; returns the exit status.
    pub fn run(&mut self, signals: &Signals) -> u8 {
        loop {
            if let Some(code) = self.exit {
                if let Some(api) = self.api.as_mut() {
                    api.shutdown();
                }
                return code;
            }
            let ctl = self.vm.as_ref().map(|vm| vm.control());
            let api_fd = self.api.as_ref().map(|a| a.fd());
            let ended = main_loop::run(ctl.as_deref(), Some(signals), api_fd, &mut |ev| {
                self.on_event(ev)
            });
            if ended == Ended::VmStopped {
                let reason = self.stop_vm(None);
                self.after_stop(reason);
            }
        }
    }

    /// Stops the VM (with `reason`, or as it stopped by itself), joins its vCPUs and drops it.
    fn stop_vm(&mut self, reason: Option<SuspendReason>) -> SuspendReason {
        let Some(mut vm) = self.vm.take() else {
            return SuspendReason::PowerOff;
        };
        if let Some(r) = reason {
            vm.control().suspend(r);
        }
        let why = vm.finish();
        timeline::mark(&format!("vm stopped: {why:?}"));
        crate::term::restore();
        log::info!("vm stopped: {why:?}");
        self.state = State::Shutdown;
        why
    }

    /// What a stopped VM means: a command-line VM ends rhyve; an API VM reboots on a guest
    /// reset and otherwise waits, Shutdown.
    fn after_stop(&mut self, reason: SuspendReason) {
        if self.from_cli {
            self.exit = Some(reason.exit_status() as u8);
        } else if reason == SuspendReason::Reset {
            if let Err(e) = self.boot() {
                log::error!("rebooting the VM after a guest reset: {e}");
            }
        }
    }

    fn on_event(&mut self, ev: Event) -> Flow {
        match ev {
            Event::Signal(sig) => self.on_signal(sig),
            Event::Api => {
                let calls = self.api.as_ref().map(|a| a.take()).unwrap_or_default();
                let mut flow = Flow::Continue;
                for call in calls {
                    if self.on_call(call) == Flow::Return {
                        flow = Flow::Return;
                    }
                }
                flow
            }
        }
    }

    /// SIGTERM presses the ACPI power button (bhyve): a guest that enabled ACPI shuts itself
    /// down. When nothing can receive the button, or on a second SIGTERM, the VM is powered
    /// off. SIGINT, SIGHUP and SIGQUIT stop it as an error (status 4). Without a
    /// command-line VM, any of them ends rhyve (SIGTERM with status 0).
    fn on_signal(&mut self, sig: i32) -> Flow {
        if !self.from_cli {
            if self.vm.is_some() {
                self.stop_vm(Some(SuspendReason::PowerOff));
            }
            self.exit = Some(if sig == libc::SIGTERM {
                EXIT_OK
            } else {
                eprint!("rhyve: stopped by signal {sig}\r\n");
                EXIT_ERROR
            });
            return Flow::Return;
        }
        let Some(vm) = &self.vm else {
            self.exit = Some(EXIT_ERROR);
            return Flow::Return;
        };
        let ctl = vm.control();
        if sig == libc::SIGTERM {
            if !self.pressed && !ctl.is_paused() && vm.pm.power_button() {
                log::info!("SIGTERM: power button pressed");
                self.pressed = true;
            } else {
                log::info!("SIGTERM: powering off");
                ctl.suspend(SuspendReason::PowerOff);
            }
        } else {
            eprint!("rhyve: stopped by signal {sig}\r\n");
            ctl.suspend(SuspendReason::Error);
        }
        Flow::Continue
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            State::NotCreated | State::Created => "Created",
            State::Shutdown => "Shutdown",
            State::Booted => match &self.vm {
                Some(vm) if vm.control().is_paused() => "Paused",
                _ => "Running",
            },
        }
    }

    fn on_call(&mut self, call: Call) -> Flow {
        let (reply, flow) = self.answer(&call.endpoint);
        call.reply(reply);
        flow
    }

    /// The answer to one call, and whether the main loop must start over (the VM it runs
    /// changed, or rhyve is exiting).
    fn answer(&mut self, e: &Endpoint) -> (Reply, Flow) {
        let done = || (Reply::done(), Flow::Return);
        let not_created = || refuse(404, "no VM is created (PUT /api/v1/vm.create first)");
        let not_booted = |what: &str| {
            refuse(
                405,
                format!("{what}: the VM is not running (PUT /api/v1/vm.boot)"),
            )
        };
        let created = self.state != State::NotCreated;
        match e {
            Endpoint::VmmPing => (
                Reply::ok(json!({
                    "build_version": env!("CARGO_PKG_VERSION"),
                    "version": env!("CARGO_PKG_VERSION"),
                    "pid": std::process::id(),
                    "features": [],
                })),
                Flow::Continue,
            ),
            Endpoint::VmmShutdown => {
                let reason = self
                    .vm
                    .is_some()
                    .then(|| self.stop_vm(Some(SuspendReason::PowerOff)));
                self.exit = Some(match (self.from_cli, reason) {
                    (true, Some(r)) => r.exit_status() as u8,
                    _ => EXIT_OK,
                });
                done()
            }
            Endpoint::VmCreate(v) => {
                if created {
                    return refuse(409, "a VM is already created (vm.delete it first)");
                }
                match api_config::to_tree(v, "vm") {
                    Ok((cfg, ids)) => {
                        self.cfg = Some(cfg);
                        self.ids = ids;
                        self.vm_config = Some(v.clone());
                        self.state = State::Created;
                        (Reply::done(), Flow::Continue)
                    }
                    Err(msg) => refuse(400, msg),
                }
            }
            Endpoint::VmBoot => match self.state {
                State::NotCreated => not_created(),
                State::Booted => refuse(409, "the VM is already booted"),
                State::Created | State::Shutdown => match self.boot() {
                    Ok(()) => done(),
                    Err(msg) => refuse(400, format!("the VM cannot boot: {msg}")),
                },
            },
            Endpoint::VmDelete => {
                if !created {
                    return not_created();
                }
                if self.vm.is_some() {
                    let r = self.stop_vm(Some(SuspendReason::PowerOff));
                    if self.from_cli {
                        self.exit = Some(r.exit_status() as u8);
                    }
                }
                self.cfg = None;
                self.vm_config = None;
                self.ids = DeviceIds::default();
                self.state = State::NotCreated;
                done()
            }
            Endpoint::VmInfo => {
                let Some(cfg) = &self.cfg else {
                    return not_created();
                };
                let config = self
                    .vm_config
                    .clone()
                    .unwrap_or_else(|| api_config::from_tree(cfg, &self.ids));
                let mem = cfg
                    .get_raw("memory.size")
                    .and_then(parse_memsize)
                    .unwrap_or(256 << 20);
                (
                    Reply::ok(json!({
                        "config": config,
                        "state": self.state_name(),
                        "memory_actual_size": mem,
                    })),
                    Flow::Continue,
                )
            }
            Endpoint::VmCounters => {
                let Some(cfg) = &self.cfg else {
                    return not_created();
                };
                let mut out = Map::new();
                if let Some(vm) = &self.vm {
                    let ids = api_config::ids_of(cfg, &self.ids);
                    for (addr, name, counters) in vm.device_counters() {
                        let id = ids
                            .iter()
                            .find(|(s, _)| *s == addr.slot && addr.bus == 0 && addr.func == 0)
                            .map(|(_, i)| i.clone())
                            .unwrap_or_else(|| format!("{name}@{addr}"));
                        let m: Map<String, Value> = counters
                            .into_iter()
                            .map(|(k, v)| (k.to_string(), json!(v)))
                            .collect();
                        out.insert(id, Value::Object(m));
                    }
                }
                (Reply::ok(Value::Object(out)), Flow::Continue)
            }
            Endpoint::VmExitStats => match &self.vm {
                Some(vm) => (Reply::ok(vm.exit_stats().to_json()), Flow::Continue),
                None if created => refuse(404, "the VM is not running: no exit statistics"),
                None => not_created(),
            },
            Endpoint::VmPause | Endpoint::VmResume | Endpoint::VmPowerButton => {
                if !created {
                    return not_created();
                }
                let what = match e {
                    Endpoint::VmPause => "vm.pause",
                    Endpoint::VmResume => "vm.resume",
                    _ => "vm.power-button",
                };
                let Some(vm) = &self.vm else {
                    return not_booted(what);
                };
                let paused = vm.control().is_paused();
                let r = match e {
                    Endpoint::VmPause if paused => {
                        Reply::error(405, "vm.pause: the VM is already paused")
                    }
                    Endpoint::VmPause => match vm.pause() {
                        Ok(()) => Reply::done(),
                        Err(msg) => Reply::error(500, format!("vm.pause: {msg}")),
                    },
                    Endpoint::VmResume if !paused => {
                        Reply::error(405, "vm.resume: the VM is not paused")
                    }
                    Endpoint::VmResume => {
                        vm.resume();
                        Reply::done()
                    }
                    _ if paused => {
                        Reply::error(405, "vm.power-button: the VM is paused (vm.resume first)")
                    }
                    _ => {
                        if vm.pm.power_button() {
                            Reply::done()
                        } else {
                            Reply::error(409, "vm.power-button: the guest has not enabled ACPI or masks the power button; nothing receives it (vm.shutdown powers off)")
                        }
                    }
                };
                (r, Flow::Continue)
            }
            Endpoint::VmSnapshot(body) => {
                let Some(cfg) = &self.cfg else {
                    return not_created();
                };
                let Some(vm) = &self.vm else {
                    return not_booted("vm.snapshot");
                };
                if !vm.control().is_paused() {
                    return refuse(
                        405,
                        "vm.snapshot: the VM must be paused (PUT /api/v1/vm.pause)",
                    );
                }
                let dir = match snapshot_dir(body, "destination_url") {
                    Ok(d) => d,
                    Err(msg) => return refuse(400, msg),
                };
                if let Err(msg) = writable_snapshot_dir(&dir) {
                    return refuse(400, msg);
                }
                let t = std::time::Instant::now();
                match snapshot::save(vm, cfg, &dir) {
                    Ok(s) => {
                        log::info!(
                            "snapshot {}: {} of {} bytes of RAM written in {:.1} ms",
                            dir.display(),
                            s.memory_bytes,
                            s.memory_size,
                            t.elapsed().as_secs_f64() * 1e3
                        );
                        (Reply::done(), Flow::Continue)
                    }
                    Err(msg) => refuse(500, format!("vm.snapshot: {msg}")),
                }
            }
            Endpoint::VmRestore(body) => {
                if created {
                    return refuse(
                        409,
                        "vm.restore: a VM is already created (vm.delete it first)",
                    );
                }
                let dir = match snapshot_dir(body, "source_url") {
                    Ok(d) => d,
                    Err(msg) => return refuse(400, msg),
                };
                let resume = body.get("resume").and_then(Value::as_bool).unwrap_or(false);
                let m = match snapshot::read_manifest(&dir) {
                    Ok(m) => m,
                    Err(msg) => return refuse(400, msg),
                };
                match snapshot::config_of(&m) {
                    Ok(cfg) => self.cfg = Some(cfg),
                    Err(msg) => return refuse(400, msg),
                }
                self.vm_config = None;
                self.ids = DeviceIds::default();
                self.state = State::Created;
                match self.restore(&dir, &m, resume) {
                    Ok(()) => done(),
                    Err(msg) => {
                        self.cfg = None;
                        self.state = State::NotCreated;
                        refuse(400, format!("vm.restore: {msg}"))
                    }
                }
            }
            Endpoint::VmSendMigration(body) => {
                let (Some(cfg), Some(vm)) = (&self.cfg, &self.vm) else {
                    return if created {
                        not_booted("vm.send-migration")
                    } else {
                        not_created()
                    };
                };
                if vm.control().is_paused() {
                    return refuse(
                        405,
                        "vm.send-migration: the VM is paused (vm.resume first; a paused VM is snapshotted)",
                    );
                }
                let (url, opts) = match send_options(body) {
                    Ok(x) => x,
                    Err(msg) => return refuse(400, format!("vm.send-migration: {msg}")),
                };
                match migration::send(vm, cfg, &url, opts) {
                    Ok(s) => {
                        log::info!(
                            "migrated to {url}: {} of {} bytes of RAM sent in {:.1} ms ({} rounds after the first pass, {} bytes paused), downtime {:.1} ms",
                            s.bytes,
                            s.memory_size,
                            s.total.as_secs_f64() * 1e3,
                            s.rounds,
                            s.final_bytes,
                            s.downtime.as_secs_f64() * 1e3
                        );
                        // The VM runs there now: here it ends as if powered off.
                        self.stop_vm(Some(SuspendReason::PowerOff));
                        if self.from_cli {
                            self.exit = Some(SuspendReason::PowerOff.exit_status() as u8);
                        }
                        self.cfg = None;
                        self.vm_config = None;
                        self.ids = DeviceIds::default();
                        self.state = State::NotCreated;
                        done()
                    }
                    Err(msg) => {
                        log::warn!("migration to {url} failed, the VM runs on here: {msg}");
                        refuse(
                            500,
                            format!("vm.send-migration: {msg} (the VM runs on here)"),
                        )
                    }
                }
            }
            Endpoint::VmReceiveMigration(body) => {
                if created {
                    return refuse(
                        409,
                        "vm.receive-migration: a VM is already created (vm.delete it first)",
                    );
                }
                let (url, overrides) = match receive_options(body) {
                    Ok(x) => x,
                    Err(msg) => return refuse(400, format!("vm.receive-migration: {msg}")),
                };
                let listener = match migration::listen(&url) {
                    Ok(l) => l,
                    Err(msg) => return refuse(400, format!("vm.receive-migration: {msg}")),
                };
                let t = std::time::Instant::now();
                match migration::receive(&listener, &overrides) {
                    Ok(r) => {
                        log::info!(
                            "received a VM at {url}: {} bytes of RAM in {:.1} ms",
                            r.bytes,
                            t.elapsed().as_secs_f64() * 1e3
                        );
                        self.cfg = Some(r.cfg);
                        self.vm = Some(r.vm);
                        self.vm_config = None;
                        self.ids = DeviceIds::default();
                        self.state = State::Booted;
                        self.pressed = false;
                        done()
                    }
                    Err(msg) => refuse(500, format!("vm.receive-migration: {msg}")),
                }
            }
            Endpoint::VmShutdown | Endpoint::VmReboot => {
                if !created {
                    return not_created();
                }
                let what = if *e == Endpoint::VmShutdown {
                    "vm.shutdown"
                } else {
                    "vm.reboot"
                };
                if self.vm.is_none() {
                    return not_booted(what);
                }
                if *e == Endpoint::VmShutdown {
                    let r = self.stop_vm(Some(SuspendReason::PowerOff));
                    if self.from_cli {
                        self.exit = Some(r.exit_status() as u8);
                    }
                    return done();
                }
                self.stop_vm(Some(SuspendReason::Reset));
                match self.boot() {
                    Ok(()) => done(),
                    Err(msg) => {
                        eprint!("rhyve: vm.reboot: the VM cannot start again: {msg}\r\n");
                        if self.from_cli {
                            self.exit = Some(EXIT_ERROR);
                        }
                        (
                            Reply::error(
                                500,
                                format!("vm.reboot: the VM stopped but cannot start again: {msg}"),
                            ),
                            Flow::Return,
                        )
                    }
                }
            }
        }
    }
}

/// A refusal: the status and message, the main loop carrying on.
fn refuse(status: u16, msg: impl Into<String>) -> (Reply, Flow) {
    (Reply::error(status, msg), Flow::Continue)
}

/// The directory a snapshot URL names: `file:///an/absolute/path` (cloud-hypervisor's form)
/// or an absolute path.
fn snapshot_dir(body: &Value, field: &str) -> Result<PathBuf, String> {
    only_fields(body, &[field, "resume"])?;
    let url = body
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{field}: required (file:///path/to/dir)"))?;
    let path = url.strip_prefix("file://").unwrap_or(url);
    if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
        return Err(format!(
            "{field}: {url} is not file:///absolute/path (without ..)"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Only these fields, or a 400 naming the first other one.
fn only_fields(body: &Value, allowed: &[&str]) -> Result<(), String> {
    let extra = body
        .as_object()
        .and_then(|o| o.keys().find(|k| !allowed.contains(&k.as_str())).cloned());
    match extra {
        Some(k) => Err(format!("{k}: not supported by rhyve")),
        None => Ok(()),
    }
}

fn url_field(body: &Value, field: &str) -> Result<Url, String> {
    let s = body
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("{field}: required (unix:/path or tcp:host:port)"))?;
    Url::parse(s)
}

/// SendMigrationData: `destination_url`, and rhyve's `downtime_ms` (the pause the guest may
/// see, default 300) and `max_rounds` (pre-copy rounds, default 30); `local` must be false.
fn send_options(body: &Value) -> Result<(Url, SendOptions), String> {
    only_fields(
        body,
        &["destination_url", "local", "downtime_ms", "max_rounds"],
    )?;
    if body.get("local").and_then(Value::as_bool) == Some(true) {
        return Err("local: true (memory by file descriptor) is not supported by rhyve".into());
    }
    let mut o = SendOptions::default();
    if let Some(v) = body.get("downtime_ms") {
        let ms = v
            .as_u64()
            .filter(|ms| (1..=60_000).contains(ms))
            .ok_or("downtime_ms: a number of milliseconds from 1 to 60000")?;
        o.downtime = std::time::Duration::from_millis(ms);
    }
    if let Some(v) = body.get("max_rounds") {
        o.max_rounds = v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .filter(|n| *n <= 1000)
            .ok_or("max_rounds: a number from 0 to 1000")?;
    }
    Ok((url_field(body, "destination_url")?, o))
}

/// ReceiveMigrationData: `receiver_url`, and rhyve's `config`: device keys of the config
/// tree (`pci.*`, `lpc.*`) that differ here, as `rhyve -r` takes new `-s`/`-l` options.
fn receive_options(body: &Value) -> Result<(Url, Vec<(String, String)>), String> {
    only_fields(body, &["receiver_url", "config"])?;
    let mut overrides = Vec::new();
    if let Some(c) = body.get("config") {
        let o = c
            .as_object()
            .ok_or("config: an object of config keys and string values")?;
        for (k, v) in o {
            let v = v
                .as_str()
                .ok_or_else(|| format!("config.{k}: a string value"))?;
            if !(k.starts_with("pci.") || k.starts_with("lpc.")) {
                return Err(format!("config.{k}: only device keys (pci.*, lpc.*)"));
            }
            overrides.push((k.clone(), v.to_string()));
        }
    }
    Ok((url_field(body, "receiver_url")?, overrides))
}

/// A snapshot goes only into a new or empty directory, or over an earlier snapshot: never
/// over other files.
fn writable_snapshot_dir(dir: &Path) -> Result<(), String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return match dir.parent() {
            Some(p) if p.is_dir() => Ok(()),
            _ => Err(format!(
                "{}: its parent directory does not exist",
                dir.display()
            )),
        };
    };
    const OURS: &[&str] = &[
        "manifest.json",
        "memory",
        "vcpus.json",
        "devices.json",
        "platform.json",
    ];
    for e in entries.flatten() {
        let name = e.file_name();
        if !OURS.iter().any(|o| name == *o) {
            return Err(format!(
                "{}: holds {} and is not a snapshot; give an empty or new directory",
                dir.display(),
                name.to_string_lossy()
            ));
        }
    }
    Ok(())
}
