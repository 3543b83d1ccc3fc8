//! The configuration tree of bhyve_config(5): dotted keys, string values, `%(var)` expansion.
//!
//! Every option on the command line (`-c`, `-m`, `-s`, `-l`, `-o`, `-k`, ...) is turned into keys of
//! this tree first, and the VM is built from the tree alone, as bhyve does since FreeBSD 13.

pub mod schema;

use std::collections::BTreeMap;
use std::fmt;

/// A typed error for everything the configuration layer rejects; each says what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error(
        "invalid config key '{0}': keys are dot-separated names of letters, digits, '_' and '-'"
    )]
    BadKey(String),
    #[error("config key '{key}' is a group of keys ({key}.*), it cannot also hold a value")]
    NodeIsNotValue { key: String },
    #[error("config key '{key}' holds a value, so '{child}' cannot be set below it")]
    ValueIsNotNode { key: String, child: String },
    #[error("'{0}' is not of the form key=value")]
    NotKeyValue(String),
    #[error(
        "config key '{key}': '{value}' is not a boolean (use true/false, on/off, yes/no, 1/0)"
    )]
    BadBool { key: String, value: String },
    #[error("config key '{key}': '{value}' is not a number")]
    BadNumber { key: String, value: String },
    #[error("config key '{key}': %({var}) refers to a key that is not set")]
    UnsetVariable { key: String, var: String },
    #[error("config key '{key}': unterminated %( in '{value}'")]
    BadExpansion { key: String, value: String },
    #[error(
        "config key '{key}': %(...) expansion nests too deeply (a variable refers to itself?)"
    )]
    ExpansionLoop { key: String },
    #[error("{file}:{line}: {msg}")]
    File {
        file: String,
        line: usize,
        msg: String,
    },
    #[error("cannot read config file {file}: {err}")]
    FileRead { file: String, err: String },
    #[error("unknown config key '{0}' (rhyve -h lists options; bhyve_config(5) the keys)")]
    UnknownKey(String),
    #[error("config key '{key}': {msg}")]
    Invalid { key: String, msg: String },
}

/// One node of the tree: a value or a group of named children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Value(String),
    Table(BTreeMap<String, Node>),
}

/// The configuration tree. Keys are kept sorted so `config.dump` output is stable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    root: BTreeMap<String, Node>,
}

/// Nesting limit for `%(var)` expansion; a deeper chain is a loop in practice.
const MAX_EXPANSION_DEPTH: usize = 16;

fn split_key(key: &str) -> Result<Vec<&str>, ConfigError> {
    let parts: Vec<&str> = key.split('.').collect();
    let valid = |p: &&str| {
        !p.is_empty()
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if parts.iter().all(valid) {
        Ok(parts)
    } else {
        Err(ConfigError::BadKey(key.to_string()))
    }
}

/// Parses a boolean the way bhyve_config(5) spells them.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, ConfigError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(ConfigError::BadBool {
            key: key.to_string(),
            value: value.to_string(),
        }),
    }
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `key` to `value`, replacing an earlier value (the last `-o` wins, as in bhyve).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let parts = split_key(key)?;
        let (last, dirs) = parts.split_last().ok_or(ConfigError::BadKey(key.into()))?;
        let mut table = &mut self.root;
        for (i, part) in dirs.iter().enumerate() {
            let node = table
                .entry((*part).to_string())
                .or_insert_with(|| Node::Table(BTreeMap::new()));
            table = match node {
                Node::Table(t) => t,
                Node::Value(_) => {
                    return Err(ConfigError::ValueIsNotNode {
                        key: parts[..=i].join("."),
                        child: key.to_string(),
                    })
                }
            };
        }
        if let Some(Node::Table(_)) = table.get(*last) {
            return Err(ConfigError::NodeIsNotValue {
                key: key.to_string(),
            });
        }
        table.insert((*last).to_string(), Node::Value(value.to_string()));
        Ok(())
    }

    /// Sets `key` only if nothing has set it yet.
    pub fn set_default(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        if self.node(key).is_none() {
            self.set(key, value)?;
        }
        Ok(())
    }

    /// Parses `key=value` and sets it (the form of `-o` and of `-k` file lines).
    pub fn set_pair(&mut self, pair: &str) -> Result<(), ConfigError> {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ConfigError::NotKeyValue(pair.to_string()))?;
        self.set(k.trim(), v)
    }

    /// Reads a `-k` file: `key=value` lines; blank lines and lines starting with `#` are skipped.
    pub fn load_file(&mut self, path: &str) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::FileRead {
            file: path.to_string(),
            err: e.to_string(),
        })?;
        self.load_str(&text, path)
    }

    /// Applies a `-k` file's text, read from `path` (named in errors).
    pub fn load_str(&mut self, text: &str, path: &str) -> Result<(), ConfigError> {
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            self.set_pair(line).map_err(|e| ConfigError::File {
                file: path.to_string(),
                line: n + 1,
                msg: e.to_string(),
            })?;
        }
        Ok(())
    }

    /// The node at `key`, if any.
    pub fn node(&self, key: &str) -> Option<&Node> {
        let parts = split_key(key).ok()?;
        let mut table = &self.root;
        let (last, dirs) = parts.split_last()?;
        for part in dirs {
            match table.get(*part)? {
                Node::Table(t) => table = t,
                Node::Value(_) => return None,
            }
        }
        table.get(*last)
    }

    /// The raw (unexpanded) value at `key`.
    pub fn get_raw(&self, key: &str) -> Option<&str> {
        match self.node(key)? {
            Node::Value(v) => Some(v),
            Node::Table(_) => None,
        }
    }

    /// The value at `key` with `%(var)` references expanded (`%%` is a literal `%`).
    pub fn get(&self, key: &str) -> Result<Option<String>, ConfigError> {
        match self.get_raw(key) {
            None => Ok(None),
            Some(raw) => self.expand(key, raw, 0).map(Some),
        }
    }

    fn expand(&self, key: &str, raw: &str, depth: usize) -> Result<String, ConfigError> {
        if depth > MAX_EXPANSION_DEPTH {
            return Err(ConfigError::ExpansionLoop { key: key.into() });
        }
        let mut out = String::with_capacity(raw.len());
        let mut rest = raw;
        while let Some(pos) = rest.find('%') {
            out.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if let Some(after) = tail.strip_prefix("%%") {
                out.push('%');
                rest = after;
            } else if let Some(after) = tail.strip_prefix("%(") {
                let end = after.find(')').ok_or_else(|| ConfigError::BadExpansion {
                    key: key.into(),
                    value: raw.into(),
                })?;
                let var = &after[..end];
                let val = self
                    .get_raw(var)
                    .ok_or_else(|| ConfigError::UnsetVariable {
                        key: key.into(),
                        var: var.into(),
                    })?;
                out.push_str(&self.expand(key, val, depth + 1)?);
                rest = &after[end + 1..];
            } else {
                out.push('%');
                rest = &tail[1..];
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Names referenced by `%(name)` anywhere in the tree (they are variables, not unknown keys).
    pub fn referenced_variables(&self) -> Vec<String> {
        let mut vars = Vec::new();
        for (_, value) in self.pairs() {
            let mut rest = value.as_str();
            while let Some(pos) = rest.find("%(") {
                let after = &rest[pos + 2..];
                match after.find(')') {
                    Some(end) => {
                        vars.push(after[..end].to_string());
                        rest = &after[end + 1..];
                    }
                    None => break,
                }
            }
        }
        vars
    }

    pub fn get_bool(&self, key: &str, default: bool) -> Result<bool, ConfigError> {
        match self.get(key)? {
            None => Ok(default),
            Some(v) => parse_bool(key, &v),
        }
    }

    /// A decimal (or 0x-prefixed hexadecimal) unsigned number.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, ConfigError> {
        match self.get(key)? {
            None => Ok(None),
            Some(v) => parse_u64(&v).map(Some).ok_or(ConfigError::BadNumber {
                key: key.into(),
                value: v,
            }),
        }
    }

    /// The children of the group at `key` (empty if there is none).
    pub fn children(&self, key: &str) -> Vec<(&str, &Node)> {
        let table = if key.is_empty() {
            Some(&self.root)
        } else {
            match self.node(key) {
                Some(Node::Table(t)) => Some(t),
                _ => None,
            }
        };
        table
            .map(|t| t.iter().map(|(k, v)| (k.as_str(), v)).collect())
            .unwrap_or_default()
    }

    /// Every `key=value` leaf, in key order, unexpanded.
    pub fn pairs(&self) -> Vec<(String, String)> {
        fn walk(prefix: &str, t: &BTreeMap<String, Node>, out: &mut Vec<(String, String)>) {
            for (k, v) in t {
                let full = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match v {
                    Node::Value(s) => out.push((full, s.clone())),
                    Node::Table(sub) => walk(&full, sub, out),
                }
            }
        }
        let mut out = Vec::new();
        walk("", &self.root, &mut out);
        out
    }
}

impl fmt::Display for Config {
    /// The `config.dump` format: one `key=value` line per leaf, the same form `-k` reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, v) in self.pairs() {
            writeln!(f, "{k}={v}")?;
        }
        Ok(())
    }
}

pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parses a memory size as bhyve(8) `-m` does: a number with an optional K, M, G or T suffix
/// (either case); a bare number is in MiB.
pub fn parse_memsize(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, shift) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 10),
        (i, 'm' | 'M') => (&s[..i], 20),
        (i, 'g' | 'G') => (&s[..i], 30),
        (i, 't' | 'T') => (&s[..i], 40),
        _ => (s, 20),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    n.checked_mul(1u64 << shift)
}

/// A UUID in its 8-4-4-4-12 hex form (the value of `uuid`).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parses a host CPU list such as `1,3,5-7` (the value of `vcpu.N.cpuset`).
pub fn parse_cpulist(s: &str) -> Option<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in s.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (parse_u64(a)? as usize, parse_u64(b)? as usize);
                if a > b || b >= libc::CPU_SETSIZE as usize {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => {
                let c = parse_u64(part)? as usize;
                if c >= libc::CPU_SETSIZE as usize {
                    return None;
                }
                cpus.push(c);
            }
        }
    }
    Some(cpus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_get_and_overwrite() {
        let mut c = Config::new();
        c.set("memory.size", "256M").unwrap();
        c.set("memory.size", "1G").unwrap();
        assert_eq!(c.get("memory.size").unwrap().as_deref(), Some("1G"));
        assert_eq!(c.get("memory.nope").unwrap(), None);
        assert_eq!(c.get("memory").unwrap(), None, "a group is not a value");
    }

    #[test]
    fn node_value_conflicts_are_errors() {
        let mut c = Config::new();
        c.set("pci.0.2.0.device", "dummy").unwrap();
        assert!(matches!(
            c.set("pci.0.2", "x"),
            Err(ConfigError::NodeIsNotValue { .. })
        ));
        c.set("name", "vm").unwrap();
        assert!(matches!(
            c.set("name.sub", "x"),
            Err(ConfigError::ValueIsNotNode { .. })
        ));
    }

    #[test]
    fn bad_keys_are_rejected() {
        let mut c = Config::new();
        for k in ["", ".a", "a.", "a..b", "a b", "a=b", "ü"] {
            assert!(c.set(k, "1").is_err(), "key {k:?} accepted");
        }
    }

    #[test]
    fn booleans_in_every_spelling() {
        let mut c = Config::new();
        for (v, want) in [
            ("true", true),
            ("ON", true),
            ("yes", true),
            ("1", true),
            ("false", false),
            ("off", false),
            ("No", false),
            ("0", false),
        ] {
            c.set("x86.strictio", v).unwrap();
            assert_eq!(c.get_bool("x86.strictio", !want).unwrap(), want, "{v}");
        }
        c.set("x86.strictio", "maybe").unwrap();
        assert!(matches!(
            c.get_bool("x86.strictio", false),
            Err(ConfigError::BadBool { .. })
        ));
        assert!(c.get_bool("unset.key", true).unwrap());
    }

    #[test]
    fn expansion_of_variables() {
        let mut c = Config::new();
        c.set("dir", "/vm").unwrap();
        c.set("name", "web").unwrap();
        c.set("disk", "%(dir)/%(name).img").unwrap();
        c.set("pct", "100%% sure, 50% off").unwrap();
        assert_eq!(c.get("disk").unwrap().as_deref(), Some("/vm/web.img"));
        assert_eq!(c.get("pct").unwrap().as_deref(), Some("100% sure, 50% off"));
        c.set("loop", "%(loop)").unwrap();
        assert!(matches!(
            c.get("loop"),
            Err(ConfigError::ExpansionLoop { .. })
        ));
        c.set("bad", "%(dir").unwrap();
        assert!(matches!(
            c.get("bad"),
            Err(ConfigError::BadExpansion { .. })
        ));
        c.set("unset", "%(nothing)").unwrap();
        assert!(matches!(
            c.get("unset"),
            Err(ConfigError::UnsetVariable { .. })
        ));
        let mut vars = c.referenced_variables();
        vars.sort();
        assert_eq!(vars, ["dir", "loop", "name", "nothing"]);
    }

    #[test]
    fn dump_round_trips_through_a_file() {
        let mut c = Config::new();
        c.set("name", "vm0").unwrap();
        c.set("pci.0.31.0.device", "lpc").unwrap();
        c.set("lpc.com1.path", "stdio").unwrap();
        let dump = c.to_string();
        assert_eq!(
            dump,
            "lpc.com1.path=stdio\nname=vm0\npci.0.31.0.device=lpc\n"
        );
        let dir = std::env::temp_dir().join(format!("rhyve-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("vm.conf");
        std::fs::write(&f, format!("# a comment\n\n{dump}")).unwrap();
        let mut back = Config::new();
        back.load_file(f.to_str().unwrap()).unwrap();
        assert_eq!(back, c);
        std::fs::write(&f, "name=ok\nthis line is wrong\n").unwrap();
        let err = back.load_file(f.to_str().unwrap()).unwrap_err();
        assert!(err.to_string().contains(":2:"), "{err}");
        assert!(matches!(
            back.load_file("/nonexistent/rhyve.conf"),
            Err(ConfigError::FileRead { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn memsize_suffixes() {
        assert_eq!(parse_memsize("256"), Some(256 << 20));
        assert_eq!(parse_memsize("256M"), Some(256 << 20));
        assert_eq!(parse_memsize("512k"), Some(512 << 10));
        assert_eq!(parse_memsize("4G"), Some(4 << 30));
        assert_eq!(parse_memsize("1t"), Some(1 << 40));
        for bad in [
            "",
            "M",
            "12X",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            " G1",
        ] {
            assert_eq!(parse_memsize(bad), None, "{bad:?}");
        }
    }
}
