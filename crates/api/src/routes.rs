//! The endpoints: cloud-hypervisor's paths and methods for what rhyve has, plus rhyve's own
//! (`vm.exit-stats`). docs/api/openapi.yaml describes exactly this table.

use serde_json::Value;

use crate::Reply;

/// One API operation, as the main thread receives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    /// The VmConfig body, parsed as JSON but not yet checked.
    VmCreate(Value),
    VmBoot,
    VmDelete,
    VmInfo,
    VmCounters,
    VmPause,
    VmResume,
    VmShutdown,
    VmReboot,
    VmPowerButton,
    VmExitStats,
    /// The VmSnapshotConfig body.
    VmSnapshot(Value),
    /// The RestoreConfig body.
    VmRestore(Value),
    /// The SendMigrationData body.
    VmSendMigration(Value),
    /// The ReceiveMigrationData body.
    VmReceiveMigration(Value),
}

impl Endpoint {
    /// How long the main thread may take to answer, where it is not the server's usual
    /// limit: a migration answers when it is over.
    pub fn answer_within(&self) -> Option<std::time::Duration> {
        match self {
            Endpoint::VmSendMigration(_) | Endpoint::VmReceiveMigration(_) => {
                Some(std::time::Duration::from_secs(3600))
            }
            _ => None,
        }
    }
}

/// Where the API lives.
pub const PREFIX: &str = "/api/v1/";

/// Every path under [`PREFIX`], its method, and whether it takes a JSON body.
const TABLE: &[(&str, &str, bool)] = &[
    ("vmm.ping", "GET", false),
    ("vmm.shutdown", "PUT", false),
    ("vm.create", "PUT", true),
    ("vm.boot", "PUT", false),
    ("vm.delete", "PUT", false),
    ("vm.info", "GET", false),
    ("vm.counters", "GET", false),
    ("vm.pause", "PUT", false),
    ("vm.resume", "PUT", false),
    ("vm.shutdown", "PUT", false),
    ("vm.reboot", "PUT", false),
    ("vm.power-button", "PUT", false),
    ("vm.exit-stats", "GET", false),
    ("vm.snapshot", "PUT", true),
    ("vm.restore", "PUT", true),
    ("vm.send-migration", "PUT", true),
    ("vm.receive-migration", "PUT", true),
];

/// The endpoint a request names, or the answer that refuses it.
pub fn route(method: &str, path: &str, body: &[u8]) -> Result<Endpoint, Reply> {
    let name = path.strip_prefix(PREFIX).unwrap_or("");
    let Some(&(name, want, takes_body)) = TABLE.iter().find(|(n, _, _)| *n == name) else {
        return Err(Reply::error(
            404,
            format!("no such endpoint {path} (the API is under {PREFIX}: docs/api/openapi.yaml)"),
        ));
    };
    if method != want {
        let mut r = Reply::error(405, format!("{path} takes {want}, not {method}"));
        r.allow = Some(want);
        return Err(r);
    }
    if takes_body {
        let v: Value = serde_json::from_slice(body)
            .map_err(|e| Reply::error(400, format!("{path}: the body is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(Reply::error(
                400,
                format!("{path}: the body must be a JSON object"),
            ));
        }
        return Ok(match name {
            "vm.snapshot" => Endpoint::VmSnapshot(v),
            "vm.restore" => Endpoint::VmRestore(v),
            "vm.send-migration" => Endpoint::VmSendMigration(v),
            "vm.receive-migration" => Endpoint::VmReceiveMigration(v),
            _ => Endpoint::VmCreate(v),
        });
    }
    // Clients that always send a body may send an empty object; anything more asks for
    // something this endpoint does not do.
    let trimmed = body.trim_ascii();
    if !(trimmed.is_empty() || trimmed == b"{}" || trimmed == b"null") {
        return Err(Reply::error(400, format!("{path} takes no request body")));
    }
    Ok(match name {
        "vmm.ping" => Endpoint::VmmPing,
        "vmm.shutdown" => Endpoint::VmmShutdown,
        "vm.boot" => Endpoint::VmBoot,
        "vm.delete" => Endpoint::VmDelete,
        "vm.info" => Endpoint::VmInfo,
        "vm.counters" => Endpoint::VmCounters,
        "vm.pause" => Endpoint::VmPause,
        "vm.resume" => Endpoint::VmResume,
        "vm.shutdown" => Endpoint::VmShutdown,
        "vm.reboot" => Endpoint::VmReboot,
        "vm.power-button" => Endpoint::VmPowerButton,
        _ => Endpoint::VmExitStats,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_table_entry_routes_and_wrong_methods_paths_and_bodies_are_refused() {
        for (name, method, body) in TABLE {
            let path = format!("{PREFIX}{name}");
            let b: &[u8] = if *body { b"{\"payload\":{}}" } else { b"" };
            assert!(route(method, &path, b).is_ok(), "{path}");
            let other = if *method == "GET" { "PUT" } else { "GET" };
            let e = route(other, &path, b).unwrap_err();
            assert_eq!((e.status, e.allow), (405, Some(*method)), "{path}");
        }
        assert_eq!(
            route("GET", "/api/v1/vm.nope", b"").unwrap_err().status,
            404
        );
        assert_eq!(route("GET", "/vmm.ping", b"").unwrap_err().status, 404);
        assert_eq!(
            route("PUT", "/api/v1/vm.create", b"{").unwrap_err().status,
            400
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.create", b"[1]")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.pause", b"{\"a\":1}")
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            route("PUT", "/api/v1/vm.pause", b" {} "),
            Ok(Endpoint::VmPause)
        );
    }
}
