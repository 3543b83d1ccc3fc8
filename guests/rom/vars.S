/*
 * With a 64 KiB ROM and `-l bootrom,ROM,VARS`, the variable store ends just below the ROM, at
 * 0xFFFF0000. Prints the last dword of the store, increments it in place, and resets: run
 * twice, the second run must see the first run's write (it reached the file).
 */
#include "rom.h"
#define VARS_LAST 0xfffefffc
        .text
        .code32
        .globl main
main:
        PRINT "vars counter="
        movl    VARS_LAST, %eax
        movl    $8, %ecx
        call    puthex
        PRINT "\r\n"
        incl    VARS_LAST
        ret
