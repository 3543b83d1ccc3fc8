/* Counts forever at COUNTER (0x6000) on the BSP: for pause/resume, pinning and SIGTERM tests. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "spinning\r\n"
1:      incl    COUNTER
        jmp     1b
