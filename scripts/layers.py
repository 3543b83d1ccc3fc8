#!/usr/bin/env python3
"""Checks that rhyve's crates form the layers ARCHITECTURE.md draws: each crate depends only on
the rhyve crates listed for it here (Cargo itself refuses a dependency cycle; this keeps a new
dependency from quietly crossing a layer, e.g. a device crate reaching up into the VMM).
Prints each dependency outside the table; exits 1 if there is one."""
import glob
import os
import re
import sys

# crate -> the rhyve crates it may depend on. Bottom first.
ALLOWED = {
    "base": set(),
    "api": {"base"},
    "config": set(),
    "bus": set(),
    "hypervisor": {"base"},
    "block": {"base", "config"},
    "devices": {"base", "bus", "config", "hypervisor"},
    "pci": {"base", "bus", "config", "hypervisor"},
    "virtio": {"base", "block", "config", "hypervisor", "pci"},
    "platform": {"devices", "hypervisor", "pci"},
    "vmm": {"base", "bus", "config", "devices", "hypervisor", "pci", "platform", "virtio"},
    "rhyvectl": set(),
}


def deps(manifest, section):
    """The rhyve-* names in one [section] of a Cargo.toml."""
    out, inside = set(), False
    for line in open(manifest):
        line = line.strip()
        if line.startswith("["):
            inside = line == f"[{section}]"
            continue
        m = re.match(r"rhyve-([a-z]+)\s*=", line)
        if inside and m:
            out.add(m.group(1))
    return out


def main():
    os.chdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    bad = 0
    found = set()
    for manifest in sorted(glob.glob("crates/*/Cargo.toml")):
        crate = os.path.basename(os.path.dirname(manifest))
        found.add(crate)
        if crate not in ALLOWED:
            print(f"{manifest}: crate '{crate}' has no layer in scripts/layers.py")
            bad += 1
            continue
        for section in ("dependencies", "dev-dependencies"):
            for d in sorted(deps(manifest, section) - ALLOWED[crate]):
                print(f"{manifest}: [{section}] '{crate}' may not depend on '{d}'")
                bad += 1
    for crate in sorted(set(ALLOWED) - found):
        print(f"scripts/layers.py: crate '{crate}' is in the table but not in crates/")
        bad += 1
    if bad:
        print(f"layers: {bad} problem(s)")
        return 1
    print(f"layers: {len(found)} crates, each depending only on the layers below it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
