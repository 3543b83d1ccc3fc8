# Sourced by scripts/build-debian-guest.sh: the boot disks the firmware tests boot from, built
# without mounting anything (mtools writes the FAT file systems inside the images).
#   bios.img  MBR (syslinux-common's mbr.bin), one bootable FAT partition with SYSLINUX
#             (Debian's syslinux, which installs into FAT through mtools; extlinux would need
#             the file system mounted), the kernel, the initramfs and a syslinux.cfg
#   efi.img   GPT with an EFI system partition: systemd-boot (systemd-boot-efi) as
#             \EFI\BOOT\BOOTX64.EFI (the removable-media path firmware tries without any boot
#             entry), one loader entry for the kernel and initramfs
# Both boot the test guest's firmware scenario on ttyS0 and power off.
# firmware_disks KERNEL INITRD OUTDIR
firmware_disks() {
    local kernel=$1 initrd=$2 out=$3 mb img off=$((1 << 20))
    local options="console=ttyS0 rhyve.scenario=firmware rhyve.end=poweroff"
    local mbr=/usr/lib/syslinux/mbr/mbr.bin efi=/usr/lib/systemd/boot/efi/systemd-bootx64.efi
    for f in "$mbr" "$efi"; do
        [ -e "$f" ] || { echo "$(basename "$0"): $f is missing: run scripts/setup.sh" >&2; exit 1; }
    done
    # The payload plus 16 MiB for the loaders and the file system, in whole MiB.
    mb=$(( ($(stat -c %s "$kernel") + $(stat -c %s "$initrd")) / (1 << 20) + 17 ))

    img=$out/bios.img
    rm -f "$img" && truncate -s "${mb}M" "$img"
    printf 'label: dos\nstart=2048, type=c, bootable\n' | sfdisk -q "$img" >/dev/null
    mformat -i "$img@@$off" -T $(( (mb - 1) * 2048 )) -h 64 -s 32 -v RHYVEBIOS ::
    cat >"$out/syslinux.cfg" <<CFG
SERIAL 0 115200
DEFAULT linux
PROMPT 0
TIMEOUT 1
LABEL linux
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $options
CFG
    mcopy -i "$img@@$off" "$kernel" ::/vmlinuz
    mcopy -i "$img@@$off" "$initrd" ::/initrd.img
    mcopy -i "$img@@$off" "$out/syslinux.cfg" ::/syslinux.cfg
    rm -f "$out/syslinux.cfg"
    syslinux --offset "$off" --install "$img"
    dd if="$mbr" of="$img" bs=440 count=1 conv=notrunc status=none

    img=$out/efi.img
    rm -f "$img" && truncate -s "${mb}M" "$img"
    # The last 33 sectors hold the backup GPT.
    printf 'label: gpt\nstart=2048, size=%d, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=ESP\n' \
        $(( (mb - 2) * 2048 )) | sfdisk -q "$img" >/dev/null
    mformat -i "$img@@$off" -T $(( (mb - 2) * 2048 )) -h 64 -s 32 -v RHYVEEFI ::
    mmd -i "$img@@$off" ::/EFI ::/EFI/BOOT ::/loader ::/loader/entries
    mcopy -i "$img@@$off" "$efi" ::/EFI/BOOT/BOOTX64.EFI
    printf 'default rhyve.conf\ntimeout 0\n' >"$out/loader.conf"
    printf 'title rhyve test guest\nlinux /vmlinuz\ninitrd /initrd.img\noptions %s\n' "$options" >"$out/rhyve.conf"
    mcopy -i "$img@@$off" "$out/loader.conf" ::/loader/loader.conf
    mcopy -i "$img@@$off" "$out/rhyve.conf" ::/loader/entries/rhyve.conf
    rm -f "$out/loader.conf" "$out/rhyve.conf"
    mcopy -i "$img@@$off" "$kernel" ::/vmlinuz
    mcopy -i "$img@@$off" "$initrd" ::/initrd.img
}
