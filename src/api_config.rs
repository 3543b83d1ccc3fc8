//! cloud-hypervisor's VmConfig (the `vm.create` body, the `config` of `vm.info`) to and from
//! rhyve's config tree. A VmConfig becomes the bhyve command line it stands for (`-c`, `-m`,
//! `-o key=value`), so the tree is checked by exactly the rules of a command-line VM.
//!
//! What rhyve has, it acts on; a field it does not have is accepted only at
//! cloud-hypervisor's default (asking for nothing rhyve lacks), and is otherwise refused with
//! a message naming it, never ignored.

use serde_json::{json, Map, Value};

use crate::cli::{self, Action};
use crate::config::{parse_memsize, Config};

/// A refused VmConfig: the message names the field.
pub type Refusal = String;

/// One JSON object being read: every field must be taken or be at its default.
struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    taken: Vec<&'static str>,
}

impl<'a> Obj<'a> {
    fn new(path: impl Into<String>, v: &'a Value) -> Result<Self, Refusal> {
        let path = path.into();
        let map = v
            .as_object()
            .ok_or_else(|| format!("{path}: must be an object"))?;
        Ok(Obj {
            path,
            map,
            taken: Vec::new(),
        })
    }

    fn field(&self, k: &str) -> String {
        format!("{}.{k}", self.path)
    }

    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.taken.push(k);
        self.map.get(k).filter(|v| !v.is_null())
    }

    fn str(&mut self, k: &'static str) -> Result<Option<&'a str>, Refusal> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(format!("{}: must be a string", self.field(k))),
        }
    }

    fn bool(&mut self, k: &'static str) -> Result<Option<bool>, Refusal> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(format!("{}: must be true or false", self.field(k))),
        }
    }

    fn u64(&mut self, k: &'static str) -> Result<Option<u64>, Refusal> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| format!("{}: must be a non-negative integer", self.field(k))),
        }
    }

    /// Fields rhyve does not have: absent, null, or at cloud-hypervisor's default.
    fn defaults(&mut self, fields: &[(&'static str, Value)]) -> Result<(), Refusal> {
        for (k, default) in fields {
            if let Some(v) = self.get(k) {
                let empty = matches!(v, Value::Array(a) if a.is_empty());
                if v != default && !empty {
                    return Err(format!(
                        "{}: not supported by rhyve (only {default} is accepted)",
                        self.field(k)
                    ));
                }
            }
        }
        Ok(())
    }

    /// Any field not taken is unknown.
    fn finish(self) -> Result<(), Refusal> {
        match self.map.keys().find(|k| !self.taken.contains(&k.as_str())) {
            Some(k) => Err(format!(
                "{}: unknown field (not in cloud-hypervisor's VmConfig, or not supported by rhyve)",
                self.field(k)
            )),
            None => Ok(()),
        }
    }
}

fn array<'a>(o: &mut Obj<'a>, k: &'static str) -> Result<&'a [Value], Refusal> {
    match o.get(k) {
        None => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(format!("{}: must be an array", o.field(k))),
    }
}

/// Fields of VmConfig that name devices or features rhyve does not have: accepted only empty,
/// absent or false.
const ABSENT_TOP: &[&str] = &[
    "rate_limit_groups",
    "balloon",
    "fs",
    "generic_vhost_user",
    "pmem",
    "debug_console",
    "devices",
    "user_devices",
    "vdpa",
    "vsock",
    "numa",
    "iommu",
    "watchdog",
    "rtc",
    "pvpanic",
    "pci_segments",
    "platform",
    "tpm",
    "landlock_enable",
    "landlock_rules",
];

/// The devices of a VmConfig, with the ids their counters go by.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DeviceIds {
    /// (PCI slot, id), e.g. (2, "_disk0").
    pub slots: Vec<(u8, String)>,
}

/// The VmConfig `v` as a config tree for a VM named `name`, and its devices' ids.
pub fn to_tree(v: &Value, name: &str) -> Result<(Config, DeviceIds), Refusal> {
    let mut extra: Vec<String> = Vec::new();
    let mut args: Vec<String> = Vec::new();
    let mut o = |k: &str, val: &str| {
        args.push("-o".into());
        args.push(format!("{k}={val}"));
    };
    let mut top = Obj::new("VmConfig", v)?;
    let mut ids = DeviceIds::default();

    // payload
    let payload = top
        .get("payload")
        .ok_or("VmConfig.payload: required (a kernel or a firmware to boot)")?;
    let mut p = Obj::new("payload", payload)?;
    let (kernel, firmware) = (p.str("kernel")?, p.str("firmware")?);
    match (kernel, firmware) {
        (None, None) => return Err("payload: needs kernel or firmware".into()),
        (Some(_), Some(_)) => {
            return Err("payload: give kernel or firmware, not both (rhyve boots one)".into())
        }
        (Some(k), None) => o("boot.kernel", k),
        (None, Some(f)) => o("lpc.bootrom", f),
    }
    if let Some(c) = p.str("cmdline")? {
        if kernel.is_none() {
            return Err("payload.cmdline: only with payload.kernel".into());
        }
        o("boot.cmdline", c);
    }
    if let Some(i) = p.str("initramfs")? {
        if kernel.is_none() {
            return Err("payload.initramfs: only with payload.kernel".into());
        }
        o("boot.initrd", i);
    }
    p.defaults(&[("igvm", json!(null)), ("host_data", json!(null))])?;
    p.finish()?;

    // cpus
    if let Some(c) = top.get("cpus") {
        let mut c = Obj::new("cpus", c)?;
        let boot = c.u64("boot_vcpus")?.ok_or("cpus.boot_vcpus: required")?;
        let max = c.u64("max_vcpus")?.unwrap_or(boot);
        if !(1..=255).contains(&boot) {
            return Err("cpus.boot_vcpus: must be from 1 to 255".into());
        }
        if max != boot {
            return Err("cpus.max_vcpus: must equal boot_vcpus (rhyve has no CPU hotplug)".into());
        }
        let mut spec = format!("cpus={boot}");
        if let Some(t) = c.get("topology") {
            let mut t = Obj::new("cpus.topology", t)?;
            let threads = t.u64("threads_per_core")?.unwrap_or(1);
            let cores = t.u64("cores_per_die")?.unwrap_or(1);
            let dies = t.u64("dies_per_package")?.unwrap_or(1);
            let packages = t.u64("packages")?.unwrap_or(1);
            if dies != 1 {
                return Err("cpus.topology.dies_per_package: only 1 is supported".into());
            }
            spec.push_str(&format!(
                ",sockets={packages},cores={cores},threads={threads}"
            ));
            t.finish()?;
        }
        extra.push("-c".into());
        extra.push(spec);
        c.defaults(&[
            ("kvm_hyperv", json!(false)),
            ("nested", json!(true)),
            ("max_phys_bits", json!(null)),
            ("affinity", json!([])),
            ("features", json!({})),
            ("core_scheduling", json!("Vm")),
        ])?;
        c.finish()?;
    }

    // memory
    if let Some(m) = top.get("memory") {
        let mut m = Obj::new("memory", m)?;
        let size = m.u64("size")?.ok_or("memory.size: required (bytes)")?;
        if !((1 << 20)..=(1 << 46)).contains(&size) || size % 4096 != 0 {
            return Err(
                "memory.size: must be from 1 MiB to 64 TiB and a multiple of 4096 bytes".into(),
            );
        }
        extra.push("-m".into());
        extra.push(format!("{}K", size / 1024));
        m.defaults(&[
            ("hotplug_size", json!(null)),
            ("hotplugged_size", json!(null)),
            ("mergeable", json!(false)),
            ("hotplug_method", json!("Acpi")),
            ("shared", json!(false)),
            ("hugepages", json!(false)),
            ("hugepage_size", json!(null)),
            ("prefault", json!(false)),
            ("reserve", json!(false)),
            ("thp", json!(true)),
            ("zones", json!([])),
        ])?;
        m.finish()?;
    }

    // Devices, in slots from 2 up (0 is the host bridge, 31 the LPC bridge).
    let mut slot = 2u8;
    let mut next_slot = |what: &str| -> Result<u8, Refusal> {
        let s = slot;
        if s > 30 {
            return Err(format!(
                "{what}: no PCI slot left (rhyve uses slots 2 to 30)"
            ));
        }
        slot += 1;
        Ok(s)
    };
    let mut id = |o: &mut Obj<'_>, kind: &str, n: usize, s: u8| -> Result<(), Refusal> {
        let given = o.str("id")?;
        let id = given
            .map(str::to_string)
            .unwrap_or_else(|| format!("_{kind}{n}"));
        if ids.slots.iter().any(|(_, i)| *i == id) {
            return Err(format!("{}: id '{id}' is used twice", o.path));
        }
        ids.slots.push((s, id));
        Ok(())
    };
    for (n, d) in array(&mut top, "disks")?.iter().enumerate() {
        let mut d = Obj::new(format!("disks[{n}]"), d)?;
        let s = next_slot(&d.path)?;
        let pfx = format!("pci.0.{s}.0");
        o(&format!("{pfx}.device"), "virtio-blk");
        let path = d.str("path")?.ok_or(format!("disks[{n}].path: required"))?;
        o(&format!("{pfx}.path"), path);
        if d.bool("readonly")? == Some(true) {
            o(&format!("{pfx}.ro"), "true");
        }
        // cloud-hypervisor's direct is O_DIRECT: bhyve's nocache.
        if d.bool("direct")? == Some(true) {
            o(&format!("{pfx}.nocache"), "true");
        }
        if let Some(ser) = d.str("serial")? {
            o(&format!("{pfx}.ser"), ser);
        }
        id(&mut d, "disk", n, s)?;
        d.defaults(&[
            ("iommu", json!(false)),
            ("num_queues", json!(1)),
            ("queue_size", json!(128)),
            ("vhost_user", json!(false)),
            ("vhost_socket", json!(null)),
            ("rate_limiter_config", json!(null)),
            ("pci_segment", json!(0)),
            ("pci_device_id", json!(null)),
            ("rate_limit_group", json!(null)),
            ("queue_affinity", json!([])),
            ("backing_files", json!(false)),
            ("sparse", json!(true)),
            ("image_type", json!("Raw")),
            ("lock_granularity", json!(null)),
        ])?;
        d.finish()?;
    }
    for (n, d) in array(&mut top, "net")?.iter().enumerate() {
        let mut d = Obj::new(format!("net[{n}]"), d)?;
        let s = next_slot(&d.path)?;
        let pfx = format!("pci.0.{s}.0");
        o(&format!("{pfx}.device"), "virtio-net");
        let tap = d.str("tap")?.ok_or(format!(
            "net[{n}].tap: required (rhyve opens an existing tap; it does not create one)"
        ))?;
        o(&format!("{pfx}.backend"), tap);
        if let Some(mac) = d.str("mac")? {
            o(&format!("{pfx}.mac"), mac);
        }
        if let Some(mtu) = d.u64("mtu")? {
            o(&format!("{pfx}.mtu"), &mtu.to_string());
        }
        id(&mut d, "net", n, s)?;
        d.defaults(&[
            ("ip", json!("192.168.249.1")),
            ("mask", json!("255.255.255.0")),
            ("host_mac", json!(null)),
            ("iommu", json!(false)),
            ("num_queues", json!(2)),
            ("queue_size", json!(256)),
            ("vhost_user", json!(false)),
            ("vhost_socket", json!(null)),
            ("vhost_mode", json!("Client")),
            ("pci_segment", json!(0)),
            ("pci_device_id", json!(null)),
            ("rate_limiter_config", json!(null)),
            ("offload_tso", json!(true)),
            ("offload_ufo", json!(true)),
            ("offload_csum", json!(true)),
        ])?;
        d.finish()?;
    }
    if let Some(r) = top.get("rng") {
        let mut r = Obj::new("rng", r)?;
        let src = r.str("src")?.ok_or("rng.src: required")?;
        if !matches!(src, "/dev/urandom" | "/dev/random") {
            return Err(format!("rng.src: rhyve's virtio-rnd reads the host's getrandom(); only /dev/urandom or /dev/random, not {src}"));
        }
        let s = next_slot("rng")?;
        o(&format!("pci.0.{s}.0.device"), "virtio-rnd");
        id(&mut r, "rng", 0, s)?;
        r.defaults(&[
            ("iommu", json!(false)),
            ("pci_segment", json!(0)),
            ("pci_device_id", json!(null)),
        ])?;
        r.finish()?;
    }
    if let Some(c) = top.get("serial") {
        let mut c = Obj::new("serial", c)?;
        match c.str("mode")?.ok_or("serial.mode: required")? {
            "Off" | "Null" => {}
            "Tty" => o("lpc.com1.path", "stdio"),
            "File" => {
                let f = c
                    .str("file")?
                    .ok_or("serial.file: required with mode File")?;
                o("lpc.com1.path", f);
            }
            m => {
                return Err(format!(
                    "serial.mode: {m} is not supported by rhyve (Off, Null, Tty or File)"
                ))
            }
        }
        c.str("file")?;
        c.defaults(&[("socket", json!(null))])?;
        c.finish()?;
    }
    if let Some(c) = top.get("console") {
        let mut c = Obj::new("console", c)?;
        match c.str("mode")?.ok_or("console.mode: required")? {
            "Off" | "Null" => {}
            "Socket" => {
                let path = c.str("socket")?.ok_or("console.socket: required with mode Socket")?;
                let s = next_slot("console")?;
                let pfx = format!("pci.0.{s}.0");
                o(&format!("{pfx}.device"), "virtio-console");
                o(&format!("{pfx}.port.0.name"), "console");
                o(&format!("{pfx}.port.0.path"), path);
                id(&mut c, "console", 0, s)?;
            }
            m => return Err(format!("console.mode: {m} is not supported by rhyve (Off, Null, or Socket: a virtio-console port on a unix socket)")),
        }
        c.str("socket")?;
        c.str("id")?;
        c.defaults(&[
            ("file", json!(null)),
            ("iommu", json!(false)),
            ("pci_segment", json!(0)),
            ("pci_device_id", json!(null)),
        ])?;
        c.finish()?;
    }
    let absent: Vec<(&'static str, Value)> =
        ABSENT_TOP.iter().map(|k| (*k, json!(false))).collect();
    for (k, _) in &absent {
        if let Some(v) = top.get(k) {
            let empty =
                matches!(v, Value::Bool(false)) || matches!(v, Value::Array(a) if a.is_empty());
            if !empty {
                return Err(format!("VmConfig.{k}: not supported by rhyve"));
            }
        }
    }
    top.finish()?;
    extra.append(&mut args);
    let mut args = extra;
    args.push(name.to_string());
    match cli::parse(&args) {
        Ok(p) => match p.action {
            Action::Run(cfg) => Ok((cfg, ids)),
            _ => Err("VmConfig: not a VM configuration".into()),
        },
        Err(e) => Err(format!("VmConfig: {e}")),
    }
}

/// The VmConfig a config tree stands for (a command-line VM's `vm.info`).
pub fn from_tree(cfg: &Config, ids: &DeviceIds) -> Value {
    let get = |k: &str| cfg.get_raw(k).map(str::to_string);
    let yes = |k: &str| cfg.get_bool(k, false).unwrap_or(false);
    let mut payload = Map::new();
    for (key, field) in [
        ("boot.kernel", "kernel"),
        ("boot.cmdline", "cmdline"),
        ("boot.initrd", "initramfs"),
        ("lpc.bootrom", "firmware"),
    ] {
        if let Some(v) = get(key) {
            payload.insert(field.into(), json!(v));
        }
    }
    let cpus = cfg.get_u64("cpus").ok().flatten().unwrap_or(1);
    let mut cpus_v = json!({"boot_vcpus": cpus, "max_vcpus": cpus});
    if let (Ok(Some(s)), Ok(Some(c)), Ok(Some(t))) = (
        cfg.get_u64("sockets"),
        cfg.get_u64("cores"),
        cfg.get_u64("threads"),
    ) {
        cpus_v["topology"] = json!({"packages": s, "cores_per_die": c, "threads_per_core": t, "dies_per_package": 1});
    }
    let mem = get("memory.size")
        .and_then(|s| parse_memsize(&s))
        .unwrap_or(256 << 20);
    let (mut disks, mut net) = (Vec::new(), Vec::new());
    let (mut rng, mut console) = (None, json!({"mode": "Off"}));
    let slot_ids = ids_of(cfg, ids);
    let id_of = |slot: u8| {
        slot_ids
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, i)| i.clone())
            .unwrap_or_default()
    };
    for slot in 0..32u8 {
        let pfx = format!("pci.0.{slot}.0");
        let key = |k: &str| format!("{pfx}.{k}");
        match get(&key("device")).as_deref() {
            Some("virtio-blk") => {
                let mut d = json!({
                    "path": get(&key("path")).unwrap_or_default(),
                    "readonly": yes(&key("ro")),
                    "direct": yes(&key("nocache")),
                    "id": id_of(slot),
                });
                if let Some(s) = get(&key("ser")) {
                    d["serial"] = json!(s);
                }
                disks.push(d);
            }
            Some("virtio-net") => {
                let mut d = json!({
                    "tap": get(&key("backend")).unwrap_or_default(),
                    "id": id_of(slot),
                });
                if let Some(m) = get(&key("mac")) {
                    d["mac"] = json!(m);
                }
                net.push(d);
            }
            Some("virtio-rnd") => {
                rng = Some(json!({"src": "/dev/urandom", "id": id_of(slot)}));
            }
            Some("virtio-console") => {
                if let Some(p) = get(&key("port.0.path")) {
                    console = json!({"mode": "Socket", "socket": p, "id": id_of(slot)});
                }
            }
            _ => {}
        }
    }
    let serial = match get("lpc.com1.path").as_deref() {
        None => json!({"mode": "Off"}),
        Some("stdio") => json!({"mode": "Tty"}),
        Some(f) => json!({"mode": "File", "file": f}),
    };
    let mut v = json!({
        "payload": payload,
        "cpus": cpus_v,
        "memory": {"size": mem},
        "disks": disks,
        "net": net,
        "serial": serial,
        "console": console,
    });
    if let Some(r) = rng {
        v["rng"] = r;
    }
    v
}

/// The counter id of each PCI slot with a device: the VmConfig's, or cloud-hypervisor's
/// default (`_disk0`, `_net0`, ...) counted by kind in slot order.
pub fn ids_of(cfg: &Config, given: &DeviceIds) -> Vec<(u8, String)> {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    let mut out = Vec::new();
    for slot in 0..32u8 {
        let kind = match cfg.get_raw(&format!("pci.0.{slot}.0.device")) {
            Some("virtio-blk") => "disk",
            Some("virtio-net") => "net",
            Some("virtio-rnd") => "rng",
            Some("virtio-console") => "console",
            _ => continue,
        };
        let n = match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => {
                *n += 1;
                *n - 1
            }
            None => {
                counts.push((kind, 1));
                0
            }
        };
        let id = given
            .slots
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, i)| i.clone())
            .unwrap_or_else(|| format!("_{kind}{n}"));
        out.push((slot, id));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(v: Value) -> Result<Config, String> {
        to_tree(&v, "apivm").map(|(c, _)| c)
    }

    #[test]
    fn a_vmconfig_becomes_the_tree_of_its_command_line_and_back() {
        let v = json!({
            "payload": {"kernel": "/k", "cmdline": "console=ttyS0", "initramfs": "/i"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "topology": {"packages": 1, "cores_per_die": 2, "threads_per_core": 1, "dies_per_package": 1}},
            "memory": {"size": 536870912, "thp": true},
            "disks": [{"path": "/d,with,commas.img", "readonly": true, "direct": true, "id": "root"}, {"path": "/e.img"}],
            "net": [{"tap": "tap7", "mac": "52:54:00:00:00:07", "num_queues": 2}],
            "rng": {"src": "/dev/urandom"},
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
            "iommu": false,
            "fs": []
        });
        let (c, ids) = to_tree(&v, "apivm").expect("accepted");
        assert_eq!(c.get_raw("boot.kernel"), Some("/k"));
        assert_eq!(c.get_raw("boot.cmdline"), Some("console=ttyS0"));
        assert_eq!(c.get_raw("cpus"), Some("2"));
        assert_eq!(c.get_raw("cores"), Some("2"));
        assert_eq!(c.get_raw("pci.0.2.0.path"), Some("/d,with,commas.img"));
        assert_eq!(c.get_raw("pci.0.2.0.ro"), Some("true"));
        assert_eq!(c.get_raw("pci.0.2.0.nocache"), Some("true"));
        assert_eq!(c.get_raw("pci.0.4.0.backend"), Some("tap7"));
        assert_eq!(c.get_raw("pci.0.5.0.device"), Some("virtio-rnd"));
        assert_eq!(c.get_raw("lpc.com1.path"), Some("stdio"));
        assert_eq!(
            parse_memsize(c.get_raw("memory.size").unwrap()),
            Some(512 << 20)
        );
        let slots = ids_of(&c, &ids);
        assert_eq!(
            slots,
            vec![
                (2, "root".into()),
                (3, "_disk1".into()),
                (4, "_net0".into()),
                (5, "_rng0".into())
            ]
        );
        let back = from_tree(&c, &ids);
        assert_eq!(back["memory"]["size"], 536870912u64);
        assert_eq!(back["disks"][0]["id"], "root");
        assert_eq!(back["disks"][1]["path"], "/e.img");
        assert_eq!(back["net"][0]["mac"], "52:54:00:00:00:07");
        assert_eq!(back["cpus"]["topology"]["cores_per_die"], 2);
        // What comes back is itself accepted.
        assert!(to_tree(&back, "apivm").is_ok(), "{back}");
    }

    #[test]
    fn what_rhyve_does_not_have_is_refused_by_name() {
        let base = || json!({"payload": {"firmware": "/rom"}});
        let refused = |patch: Value| {
            let mut v = base();
            for (k, x) in patch.as_object().unwrap() {
                v[k] = x.clone();
            }
            tree(v).unwrap_err()
        };
        assert!(tree(base()).is_ok());
        assert!(tree(json!({})).unwrap_err().contains("payload"));
        assert!(tree(json!({"payload": {}}))
            .unwrap_err()
            .contains("kernel or firmware"));
        assert!(
            refused(json!({"cpus": {"boot_vcpus": 1, "max_vcpus": 2}})).contains("cpus.max_vcpus")
        );
        assert!(
            refused(json!({"cpus": {"boot_vcpus": 1, "kvm_hyperv": true}}))
                .contains("cpus.kvm_hyperv")
        );
        assert!(refused(json!({"cpus": {"boot_vcpus": 0}})).contains("cpus.boot_vcpus"));
        assert!(refused(json!({"memory": {"size": 1000}})).contains("memory.size"));
        assert!(refused(json!({"memory": {"size": 1u64 << 63}})).contains("memory.size"));
        assert!(
            refused(json!({"memory": {"size": 1073741824u64, "hugepages": true}}))
                .contains("memory.hugepages")
        );
        assert!(
            refused(json!({"disks": [{"path": "/x", "vhost_user": true}]}))
                .contains("disks[0].vhost_user")
        );
        assert!(refused(json!({"disks": [{"readonly": true}]})).contains("disks[0].path"));
        assert!(refused(json!({"net": [{"tap": "t", "ip": "10.0.0.1"}]})).contains("net[0].ip"));
        assert!(refused(json!({"rng": {"src": "/dev/hwrng"}})).contains("rng.src"));
        assert!(refused(json!({"serial": {"mode": "Pty"}})).contains("serial.mode"));
        assert!(refused(json!({"vsock": {"cid": 3, "socket": "/s"}})).contains("vsock"));
        assert!(refused(json!({"watchdog": true})).contains("watchdog"));
        assert!(refused(json!({"frobnicate": 1})).contains("VmConfig.frobnicate"));
        assert!(refused(json!({"disks": [{"path": "/x", "colour": "red"}]}))
            .contains("disks[0].colour"));
        assert!(
            refused(json!({"disks": [{"path": "/x", "id": "a"}, {"path": "/y", "id": "a"}]}))
                .contains("used twice")
        );
        assert!(refused(json!({"memory": {"size": "big"}})).contains("memory.size"));
        assert!(refused(json!({"disks": {"path": "/x"}})).contains("disks"));
        let many: Vec<Value> = (0..30).map(|i| json!({"path": format!("/d{i}")})).collect();
        assert!(refused(json!({"disks": many})).contains("no PCI slot left"));
    }
}
