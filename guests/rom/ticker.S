/*
 * Prints "tick N" on COM1 about every few milliseconds, N counting up from 1 without a gap:
 * for the control API's pause and resume (a paused guest prints nothing; resumed, it goes on
 * from the next number).
 */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        xorl    %ebx, %ebx
1:      incl    %ebx
        movl    %ebx, %eax
        SHOW    "tick "
        movl    $200000, %edx
2:      decl    %edx
        jnz     2b
        jmp     1b
