/*
 * Waits for the ACPI power button: enables ACPI and the button event, polls PWRBTN_STS, then
 * acknowledges it and powers off (S5), as an OS does. SIGTERM to rhyve presses the button.
 */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        movb    $0xa0, %al                      /* ACPI_ENABLE */
        outb    %al, $0xb2
        movw    $0x402, %dx                     /* PM1a_EN */
        movw    $0x100, %ax                     /* PWRBTN_EN */
        outw    %ax, %dx
        PRINT   "waiting for the power button\r\n"
        movw    $0x400, %dx                     /* PM1a_STS */
1:      inw     %dx, %ax
        testw   $0x100, %ax
        jnz     2f
        pause
        jmp     1b
2:      PRINT   "power button pressed\r\n"
        movw    $0x100, %ax
        outw    %ax, %dx                        /* write 1 to clear */
        inw     %dx, %ax
        movzwl  %ax, %eax
        SHOW    "status after clear "
        movw    $0x404, %dx
        movw    $(5 << 10 | 1 << 13 | 1), %ax
        outw    %ax, %dx
        jmp     halt_forever
