/* Halts with interrupts disabled (cli; hlt): nothing can wake it. Expect status 2. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "halting with interrupts disabled\r\n"
        jmp     halt_forever
