/*
 * Starts the APs the way an OS does: INIT, then two SIPIs through the local APIC at 0xFEE00000.
 * Each AP runs a real-mode trampoline copied to 0x8000 that prints "AP <apic id> up" under a
 * spinlock and counts itself. The BSP waits until the count has been stable for two RTC
 * seconds, prints "cpus up: N", and resets.
 */
#include "rom.h"
#define LAPIC_SVR       0xfee000f0
#define LAPIC_ICR_LO    0xfee00300
#define TRAMPOLINE      0x8000
#define AP_LOCK         0x7f00
#define AP_COUNT        0x7f02
#define AP_STACK        0x7e00

        .text
        .code32
        .globl main
main:
        movl    $1, %eax
        cpuid
        shrl    $24, %ebx
        PRINT "BSP apic id "
        movl    %ebx, %eax
        movl    $2, %ecx
        call    puthex
        PRINT "\r\n"
        /* Topology as CPUID leaf 0xB reports it: logical CPUs per core and per package. */
        movl    $0xb, %eax
        xorl    %ecx, %ecx
        cpuid
        movzwl  %bx, %eax
        PRINT   "topology: threads per core "
        call    putdec
        movl    $0xb, %eax
        movl    $1, %ecx
        cpuid
        movzwl  %bx, %eax
        PRINT   ", logical CPUs per package "
        call    putdec
        PRINT   "\r\n"
        movl    $ap_start, %esi
        movl    $TRAMPOLINE, %edi
        movl    $(ap_end - ap_start), %ecx
        cld
        rep movsb
        movw    $0, AP_LOCK
        movw    $0, AP_COUNT
        orl     $0x100, LAPIC_SVR               /* software-enable the LAPIC */
        movl    $0x000c4500, LAPIC_ICR_LO       /* INIT to all but self */
        call    delay
        movl    $0x000c4600 | (TRAMPOLINE >> 12), LAPIC_ICR_LO  /* SIPI */
        call    delay
        movl    $0x000c4600 | (TRAMPOLINE >> 12), LAPIC_ICR_LO  /* SIPI again, as the MP spec says */

        /* Wait until AP_COUNT stops changing for two RTC second ticks. */
        xorl    %edi, %edi                      /* ticks without change */
        movzwl  AP_COUNT, %ebp
        movb    $0x00, %al
        call    cmos_read
        movb    %al, %bl
1:      movzwl  AP_COUNT, %eax
        cmpl    %eax, %ebp
        je      2f
        movl    %eax, %ebp
        xorl    %edi, %edi
2:      movb    $0x00, %al
        call    cmos_read
        cmpb    %al, %bl
        je      1b
        movb    %al, %bl
        incl    %edi
        cmpl    $2, %edi
        jb      1b

        /* Take the lock so a late AP cannot print into our line. */
3:      movb    $1, %al
        xchgb   %al, AP_LOCK
        testb   %al, %al
        jnz     3b
        PRINT "cpus up: "
        movzwl  AP_COUNT, %eax
        incl    %eax
        call    putdec
        PRINT "\r\n"
        ret

delay:
        movl    $20000, %ecx
1:      pause
        loop    1b
        ret

/* The AP trampoline: position-independent real-mode code, run at 0x800:0000. */
        .code16
ap_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        movw    %ax, %ss
1:      movb    $1, %al
        xchgb   %al, AP_LOCK
        testb   %al, %al
        jnz     1b
        movw    $AP_STACK, %sp
        movl    $1, %eax
        cpuid
        shrl    $24, %ebx
        movb    $'A', %al
        call    ap_putc
        movb    $'P', %al
        call    ap_putc
        movb    $' ', %al
        call    ap_putc
        movb    %bl, %al
        shrb    $4, %al
        call    ap_puthex
        movb    %bl, %al
        andb    $0xf, %al
        call    ap_puthex
        movb    $' ', %al
        call    ap_putc
        movb    $'u', %al
        call    ap_putc
        movb    $'p', %al
        call    ap_putc
        movb    $'\r', %al
        call    ap_putc
        movb    $'\n', %al
        call    ap_putc
        incw    AP_COUNT
        movb    $0, AP_LOCK
2:      cli
        hlt
        jmp     2b
ap_puthex:
        addb    $'0', %al
        cmpb    $'9', %al
        jbe     ap_putc
        addb    $('a' - '9' - 1), %al
ap_putc:
        pushw   %dx
        pushw   %ax
        movw    $COM1 + 5, %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        popw    %ax
        movw    $COM1, %dx
        outb    %al, %dx
        popw    %dx
        ret
ap_end:
