#!/usr/bin/env bash
# Says which KVM this host offers rhyve, as one word on stdout:
#   hw    a KVM with hardware-virtualization semantics (VT-x/AMD-V, or nested SVM in L1)
#   pvm   PVM (module kvm_pvm), a software hypervisor: firmware-level guests and a stock
#         kernel's boot run, Linux user space does not (README.md)
#   none  no usable /dev/kvm (missing, or not readable and writable by this user)
# and, for pvm and none, why on stderr. The tests run where KVM can run them: see test.sh.
set -euo pipefail
if ! [ -c /dev/kvm ]; then
    echo "no /dev/kvm on this host$( [ -d /sys/module/kvm_pvm ] && echo " (kvm_pvm is loaded but did not bind: see dmesg)")" >&2
    echo none
elif ! { exec 3<>/dev/kvm; } 2>/dev/null; then
    echo "/dev/kvm is not readable and writable by $(id -un): add yourself to the kvm group" >&2
    echo none
elif [ -d /sys/module/kvm_pvm ]; then
    echo "this host's KVM is PVM: Linux user space cannot run on it" >&2
    echo pvm
else
    echo hw
fi
