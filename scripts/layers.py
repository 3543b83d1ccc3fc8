#!/usr/bin/env python3
"""Checks that rhyve's top-level modules form the layers ARCHITECTURE.md draws: each module may
use only the modules listed for it (its layer and below), so no import cycle can form and the
tree can be split into crates along these lines. Test code (after `#[cfg(test)]`) is not
counted. Prints each forbidden use with its file and line; exits 1 if there is one."""
import os
import re
import sys

# module -> the modules it may use. Bottom first.
ALLOWED = {
    "logging": set(),
    "term": set(),
    "thread": set(),
    "config": set(),
    "hypervisor": {"logging"},
    "bus": set(),
    "devices": {"bus", "config", "hypervisor", "logging", "term", "thread"},
    "pci": {"bus", "config", "hypervisor", "logging"},
    "virtio": {"config", "hypervisor", "logging", "pci", "thread"},
    "acpi": {"devices", "hypervisor", "pci"},
    "mptable": {"acpi", "hypervisor", "pci"},
    "boot": {"hypervisor", "pci"},
    "emulations": {"config", "devices", "pci", "virtio"},
    "vmm": {"acpi", "boot", "bus", "config", "devices", "emulations", "hypervisor",
            "logging", "mptable", "pci", "term", "thread", "virtio"},
    "cli": {"config", "emulations"},
}

def module_of(path):
    rel = os.path.relpath(path, "src")[:-3].split(os.sep)
    return rel[0]

def cycle_in_table():
    """A cycle in ALLOWED itself, as a list of modules, or None."""
    state = {}
    def visit(m, path):
        state[m] = 1
        for u in sorted(ALLOWED.get(m, ())):
            if state.get(u) == 1:
                return path + [m, u]
            if u not in state:
                c = visit(u, path + [m])
                if c:
                    return c
        state[m] = 2
        return None
    for m in sorted(ALLOWED):
        if m not in state:
            c = visit(m, [])
            if c:
                return c
    return None

def main():
    c = cycle_in_table()
    if c:
        print("layers: the table in scripts/layers.py has a cycle: " + " -> ".join(c))
        return 1
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    os.chdir(root)
    bad = 0
    for d, _, files in os.walk("src"):
        for f in sorted(files):
            if not f.endswith(".rs"):
                continue
            path = os.path.join(d, f)
            mod = module_of(path)
            if mod in ("lib", "main"):
                continue
            if mod not in ALLOWED:
                print(f"{path}: module '{mod}' has no layer in scripts/layers.py")
                bad += 1
                continue
            text = open(path).read()
            cut = text.find("#[cfg(test)]")
            if cut >= 0:
                text = text[:cut]
            for n, line in enumerate(text.splitlines(), 1):
                # crate::x and crate::{x, y::z}
                used_mods = re.findall(r"crate::([a-z_]+)", line)
                for group in re.findall(r"crate::\{([^}]*)", line):
                    used_mods += re.findall(r"(?:^|,)\s*([a-z_]+)", group)
                for used in used_mods:
                    if used != mod and used not in ALLOWED[mod]:
                        print(f"{path}:{n}: '{mod}' may not use '{used}': {line.strip()}")
                        bad += 1
    if bad:
        print(f"layers: {bad} forbidden use(s)")
        return 1
    print("layers: every module uses only the layers below it")
    return 0

if __name__ == "__main__":
    sys.exit(main())
