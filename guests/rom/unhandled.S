/*
 * Ends in a VM exit rhyve has no handler for. On a PVM host KVM cannot emulate a 32-bit iret
 * and reports KVM_EXIT_INTERNAL_ERROR (emulation failure); with hardware virtualization the
 * iret runs, and the guest then jumps into an unbacked MMIO address, whose instruction fetch
 * KVM cannot emulate either (KVM_EXIT_INTERNAL_ERROR again). rhyve must name the exit, the
 * vCPU and the RIP, and stop with status 4.
 */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "executing iret\r\n"
        pushfl
        pushl   %cs
        pushl   $after
        .globl  unhandled_rip
unhandled_rip:
        iret
after:
        PRINT "iret ran without an exit\r\n"
        movl    $unhandled_mmio_rip, %eax
        jmp     *%eax
        /* In the PCI hole above the BARs rhyve places: no memory, no device. */
        .globl  unhandled_mmio_rip
        .set    unhandled_mmio_rip, 0xd8000000
