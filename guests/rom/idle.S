/* Halts with interrupts enabled (sti; hlt): an interrupt could wake it, so it is not halted for good. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "idle with interrupts enabled\r\n"
        sti
1:      hlt
        jmp     1b
