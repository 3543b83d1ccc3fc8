/* IA32_APIC_BASE as the guest sees it: at reset, then after switching the LAPIC to x2APIC mode
   (EXTD, bit 10) and reading it back through the x2APIC ID register (MSR 0x802). */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        movl    $0x1b, %ecx
        rdmsr
        SHOW    "apic base at reset: "
        orl     $0x400, %eax
        movl    $0x1b, %ecx
        wrmsr
        movl    $0x1b, %ecx
        rdmsr
        SHOW    "apic base in x2apic mode: "
        movl    $0x802, %ecx
        rdmsr
        SHOW    "x2apic id: "
        ret
