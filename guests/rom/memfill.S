/*
 * Writes a word into every 4 KiB page of guest RAM from 1 MiB to FILL_END (240 MiB), so
 * every page of it is touched and not zero (what a snapshot must write: the benchmarks' touched
 * guest; one store per page, since this ROM's code is emulated on PVM hosts), then says so
 * and ticks like the ticker ROM.
 */
#include "rom.h"
#define FILL_START      0x100000
#define FILL_END        0xf000000
        .text
        .code32
        .globl main
main:
        movl    $FILL_START, %edi
1:      movl    %edi, (%edi)
        addl    $4096, %edi
        cmpl    $FILL_END, %edi
        jb      1b
        PRINT   "filled\r\n"
        xorl    %ebx, %ebx
2:      incl    %ebx
        movl    %ebx, %eax
        SHOW    "tick "
        movl    $200000, %edx
3:      decl    %edx
        jnz     3b
        jmp     2b
