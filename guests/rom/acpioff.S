/*
 * ACPI power management from the guest: enables ACPI through SMI_CMD, checks SCI_EN and that
 * the PM timer runs, then powers off with SLP_TYP=5 (S5) and SLP_EN in PM1a_CNT. Expect
 * status 1.
 */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        movb    $0xa0, %al                      /* ACPI_ENABLE */
        outb    %al, $0xb2
        movw    $0x404, %dx
        inw     %dx, %ax
        movzwl  %ax, %eax
        SHOW    "pm1a control "
        movw    $0x408, %dx
        inl     %dx, %eax
        movl    %eax, %ebx
        movl    $20000, %ecx
1:      pause
        loop    1b
        inl     %dx, %eax
        subl    %ebx, %eax
        jz      2f
        PRINT   "pm timer runs\r\n"
        jmp     3f
2:      PRINT   "pm timer stopped\r\n"
3:      PRINT   "powering off through PM1a_CNT\r\n"
        movw    $0x404, %dx
        movw    $(5 << 10 | 1 << 13 | 1), %ax   /* SLP_TYP S5, SLP_EN, keep SCI_EN */
        outw    %ax, %dx
        PRINT   "still running after S5\r\n"
        jmp     halt_forever
