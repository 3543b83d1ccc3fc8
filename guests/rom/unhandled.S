/*
 * Ends in a VM exit rhyve has no handler for. On a PVM host KVM cannot emulate a 32-bit iret
 * and reports KVM_EXIT_INTERNAL_ERROR (emulation failure); rhyve must name the exit, the vCPU
 * and the RIP, and stop with status 4.
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
        jmp     halt_forever
