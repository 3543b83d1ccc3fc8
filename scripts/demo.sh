#!/usr/bin/env bash
# The main job: boot the project's own small guest with its serial console (COM1) on this
# terminal. The guest greets, reports how it started and what the platform told it, and resets
# (exit status 0, as bhyve(8) reports a reset).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release --quiet
guests/build.sh target/guests
echo "+ target/release/rhyve -c 2 -m 512M -l com1,stdio -l bootrom,target/guests/hello.rom demo" >&2
exec target/release/rhyve -c 2 -m 512M -l com1,stdio -l bootrom,target/guests/hello.rom demo
