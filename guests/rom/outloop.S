/* LOOPS writes to port 0x80 and a reset: the port-I/O exit benchmark's guest. */
#include "rom.h"
#ifndef LOOPS
#define LOOPS 100000
#endif
        .text
        .code32
        .globl main
main:
        movl    $LOOPS, %ecx
1:      outb    %al, $0x80
        loop    1b
        ret
