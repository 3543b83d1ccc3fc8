/* Triple faults: an exception with an empty IDT. Expect status 3. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "triple fault next\r\n"
        lidt    empty_idt
        ud2
        PRINT "survived\r\n"
        jmp     halt_forever
empty_idt:
        .word   0
        .long   0
