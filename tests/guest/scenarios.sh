# The Debian test guest's scenarios: sourced by its /init (scripts/build-debian-guest.sh puts
# this file in the initramfs), which runs scenario_NAME for rhyve.scenario=NAME, then ends
# as rhyve.end= says. Each prints "rhyve-guest: ..." lines that tests/real_guest.rs asserts on.
# Busybox sh; the host's util-linux blkdiscard is at /usr/sbin.

# The platform as Linux found it: hypervisor, clock, CPUs and topology, ACPI complaints.
scenario_platform() {
    say "hypervisor: $(dmesg | grep -o 'Hypervisor detected: .*' | head -n 1)"
    say "clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)"
    say "cpus online: $(cat /sys/devices/system/cpu/online)"
    # One line per CPU: the package, core and sibling counts Linux derived from CPUID.
    awk -F': ' '/^processor/{p=$2} /^physical id/{pk=$2} /^siblings/{s=$2} /^core id/{c=$2}
        /^cpu cores/{n=$2} /^$/{printf "rhyve-guest: cpu %s package %s core %s siblings %s cores %s\n", p, pk, c, s, n}' /proc/cpuinfo
    for c in /sys/devices/system/cpu/cpu[0-9]*; do
        say "topology $(basename "$c"): package $(cat "$c/topology/physical_package_id") core $(cat "$c/topology/core_id") threads $(cat "$c/topology/thread_siblings_list")"
    done
    say "acpi problems: $(dmesg | grep -i -E 'acpi.*(error|warning)|acpi bios (error|warning)' | wc -l)"
    dmesg | grep -i -E 'acpi.*(error|warning)|acpi bios (error|warning)' | sed 's/^/rhyve-guest: acpi problem: /'
    say "i8042: $(dmesg | grep -i 'i8042' | tr '\n' '|')"
    for d in /sys/bus/pci/devices/*; do
        say "pci $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class") irq $(cat "$d/irq")"
    done
    say "interrupts: $(grep -c -E 'PCI-MSIX|PCI-MSI' /proc/interrupts) msi lines"
    grep -E 'virtio|PCI-MSI|IO-APIC' /proc/interrupts | sed 's/  */ /g; s/^/rhyve-guest: irq /'
    say "rtc: $(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null || echo none) date $(date +%s)"
}

# Thousands of small O_DIRECT reads of virtio-blk (a triple fault under such I/O was seen).
# First one process reading them all, then one dd process per read (how the fault was seen:
# each read then also forks, execs and exits). Progress every 250 reads, so a slow run (the
# nested harness emulates all of it) is told from a stopped one.
scenario_small_reads() {
    n=$(arg reads)
    n=${n:-2000}
    dd if=/dev/vda of=/dev/null bs=4096 count="$n" iflag=direct 2>/dev/null || { say "one-process reads failed"; return; }
    say "small reads: $n in one process done"
    i=0
    while [ "$i" -lt "$n" ]; do
        dd if=/dev/vda of=/dev/null bs=4096 count=1 skip=$((i % 1024)) iflag=direct 2>/dev/null || { say "read $i failed"; return; }
        i=$((i + 1))
        [ $((i % 250)) -ne 0 ] || say "small reads: $i"
    done
    say "small reads: $i done"
}

# virtio-blk: ext4 on vda (write, fsync, remount, re-read), discard and write-zeroes on vdb,
# a read-only vdc, serial numbers and sector sizes.
scenario_blk() {
    for d in /sys/block/vd*; do
        say "disk $(basename "$d") serial $(cat "$d/serial" 2>/dev/null) ro $(cat "$d/ro") lbs $(cat "$d/queue/logical_block_size") pbs $(cat "$d/queue/physical_block_size") discard $(cat "$d/queue/discard_max_bytes") zeroes $(cat "$d/queue/write_zeroes_max_bytes")"
    done
    mount -t ext4 /dev/vda /mnt || { say "blk: mount /dev/vda failed"; return; }
    say "blk read: $(cat /mnt/hello.txt)"
    dd if=/dev/urandom of=/mnt/data.bin bs=64k count=64 conv=fsync 2>/dev/null
    sum=$(sha256sum /mnt/data.bin | cut -d' ' -f1)
    say "blk wrote data.bin $sum"
    sync
    umount /mnt
    mount -t ext4 /dev/vda /mnt || { say "blk: remount failed"; return; }
    echo 3 >/proc/sys/vm/drop_caches
    say "blk reread data.bin $(sha256sum /mnt/data.bin | cut -d' ' -f1)"
    rm /mnt/data.bin
    echo "kept by the guest at boot $(cat /proc/sys/kernel/random/boot_id)" >/mnt/kept.txt
    sync
    say "blk $(cat /mnt/kept.txt)"
    say "blk fstrim: $(fstrim -v /mnt 2>&1)"
    umount /mnt && say "blk unmounted"
    # vdb: a raw disk the host filled with 0xff; discard its first MiB, zero its second.
    blkdiscard -o 0 -l 1048576 /dev/vdb && say "blk discard vdb ok"
    /usr/sbin/blkdiscard -z -o 1048576 -l 1048576 /dev/vdb && say "blk write-zeroes vdb ok"
    say "blk vdb third MiB: $(dd if=/dev/vdb bs=1048576 skip=2 count=1 iflag=direct 2>/dev/null | od -An -tx1 | sort -u | head -n 2 | tr -d '\n')"
    if dd if=/dev/zero of=/dev/vdc bs=4096 count=1 oflag=direct 2>/dev/null; then
        say "blk vdc write accepted"
    else
        say "blk vdc write refused"
    fi
    say "blk vdc reads: $(dd if=/dev/vdc bs=4096 count=1 iflag=direct 2>/dev/null | head -c 12)"
    sync
}

# virtio-net: the address and MTU the host gave, a ping, then TCP both ways (rhyve.peer:5001
# sends, the guest listens on 5002 for the host's bytes); sha256 of each stream printed.
scenario_net() {
    ip link set lo up
    ip addr add "$(arg ip)" dev eth0 && ip link set eth0 up
    say "net: eth0 $(cat /sys/class/net/eth0/address) mtu $(cat /sys/class/net/eth0/mtu)"
    peer=$(arg peer)
    if ping -c 3 -W 10 "$peer" >/dev/null; then say "net: ping $peer ok"; else say "net: ping $peer failed"; fi
    mib=$(arg mib)
    dd if=/dev/urandom of=/tmp/out.bin bs=1048576 count="${mib:-64}" 2>/dev/null
    say "net: sending $(sha256sum /tmp/out.bin | cut -d' ' -f1)"
    nc "$peer" 5001 </tmp/out.bin && say "net: sent"
    rm /tmp/out.bin
    nc -l -p 5002 >/tmp/in.bin
    say "net: received $(wc -c </tmp/in.bin) bytes $(sha256sum /tmp/in.bin | cut -d' ' -f1)"
    rm /tmp/in.bin
}

# virtio-rnd: bytes from /dev/hwrng.
scenario_rng() {
    say "rng: current $(cat /sys/class/misc/hw_random/rng_current)"
    kib=$(arg kib)
    n=$(dd if=/dev/hwrng bs=1024 count="${kib:-1024}" iflag=fullblock 2>/dev/null | wc -c)
    say "rng: read $n bytes"
}

# virtio-console: the named ports, a line out through the first, a line in from the host.
scenario_console() {
    for p in /sys/class/virtio-ports/*; do
        [ -e "$p/name" ] && say "console port $(basename "$p") name $(cat "$p/name")"
    done
    dev=/dev/$(basename "$(dirname "$(grep -l "$(arg port)" /sys/class/virtio-ports/*/name | head -n 1)")")
    # Held open throughout: Linux drops bytes that reach a port nobody has open.
    exec 3<>"$dev"
    echo "hello from the guest" >&3 && say "console wrote to $dev"
    read -r line <&3
    say "console read: $line"
    exec 3>&-
}

# The serial ports: a line on COM2 (ttyS1), which the host sends to a file.
scenario_serial() {
    say "serial: $(dmesg | grep -o 'ttyS[0-9] at I/O 0x[0-9a-f]* (irq = [0-9]*' | tr '\n' '|')"
    echo "hello on COM2" >/dev/ttyS1 && say "serial: wrote ttyS1"
}

# The ACPI power button: busybox acpid powers the guest off when the host presses it.
scenario_acpid() {
    mkdir -p /etc/acpi/PWRF
    printf '#!/bin/sh\necho "rhyve-guest: power button pressed"\npoweroff -f\n' >/etc/acpi/PWRF/00000080
    chmod 755 /etc/acpi/PWRF/00000080
    acpid -c /etc/acpi -l /dev/console || say "acpid failed"
    say "acpid: waiting for the power button ($(ls /dev/input/ | tr '\n' ' '))"
    while :; do sleep 1; done
}

# The Debian test guest's original checks: read the host's file, write one, rng, net.
scenario_default() {
    if [ -b /dev/vda ]; then
        if mount -t ext4 /dev/vda /mnt; then
            say "blk read: $(cat /mnt/hello.txt)"
            echo "written by the guest at boot $(cat /proc/sys/kernel/random/boot_id)" >/mnt/from-guest.txt
            sync
            say "blk wrote: $(cat /mnt/from-guest.txt)"
            umount /mnt && say "blk unmounted"
        else
            say "blk: mount /dev/vda failed"
        fi
    else
        say "blk: no /dev/vda"
    fi
    if [ -c /dev/hwrng ]; then
        say "rng: $(cat /sys/class/misc/hw_random/rng_current) gave $(dd if=/dev/hwrng bs=16 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
    else
        say "rng: no /dev/hwrng"
    fi
    ip=$(arg ip)
    peer=$(arg peer)
    if [ -n "$ip" ] && [ -d /sys/class/net/eth0 ]; then
        ip link set lo up
        ip addr add "$ip" dev eth0 && ip link set eth0 up
        say "net: eth0 $(cat /sys/class/net/eth0/address) $ip"
        if [ -n "$peer" ]; then
            if ping -c 1 -W 10 "$peer" >/dev/null; then say "net: ping $peer ok"; else say "net: ping $peer failed"; fi
        fi
    fi
}

# Numbered records, each written to its own 512-byte sector of vda (record N in sector N)
# with O_DIRECT and fsync, and pings to the host every 0.2 s, until the host stops the guest:
# snapshot/restore and live migration must keep both going (tests/real_guest.rs reads the
# disk and the ping replies afterwards).
scenario_records() {
    ip link set lo up
    ip addr add "$(arg ip)" dev eth0 && ip link set eth0 up
    ping -i 0.2 "$(arg peer)" &
    i=1
    while :; do
        printf 'record %08d\n' "$i" | dd of=/dev/vda bs=512 seek="$i" conv=sync,notrunc,fsync oflag=direct 2>/dev/null || say "records: writing $i failed"
        say "record $i"
        i=$((i + 1))
        sleep 0.1
    done
}

# How the guest was booted, for the firmware boots: BIOS or UEFI, the memory map's first
# entries and where the ACPI tables were found, and a UEFI variable carried from the last
# boot to this one (read first, then replaced with this boot's id).
scenario_firmware() {
    if [ -d /sys/firmware/efi ]; then say "firmware: efi"; else say "firmware: bios"; fi
    say "rsdp: $(dmesg | grep -o 'ACPI: RSDP 0x[0-9A-Fa-f]*' | head -n 1)"
    dmesg | grep -o 'BIOS-e820: .*' | head -n 3 | sed 's/^/rhyve-guest: e820: /'
    say "acpi problems: $(dmesg | grep -i -E 'acpi.*(error|warning)|acpi bios (error|warning)' | wc -l)"
    dmesg | grep -i -E 'acpi.*(error|warning)|acpi bios (error|warning)' | sed 's/^/rhyve-guest: acpi problem: /'
    say "cmdline: $(cat /proc/cmdline)"
    [ -d /sys/firmware/efi ] || return 0
    v=/sys/firmware/efi/efivars
    mount -t efivarfs efivarfs "$v" || { say "efivarfs: mount failed"; return; }
    var=$v/RhyveBoot-3b0c1a2e-6f1d-4c55-9a8e-5e0f4d7a1b22
    if [ -f "$var" ]; then
        say "efivar before: $(tail -c +5 "$var")"
        chattr -i "$var" 2>/dev/null
        rm -f "$var"
    else
        say "efivar before: none"
    fi
    id=$(cat /proc/sys/kernel/random/boot_id)
    # Attributes (non-volatile, boot and runtime access), then the data.
    printf '\007\000\000\000%s' "$id" >"$var" || { say "efivar: write failed"; return; }
    say "efivar written: $id"
    umount "$v"
}
