/*
 * Writes memory as fast as it can and checks it: each round stores the round's number into
 * every 4 KiB page from 16 MiB to 80 MiB, after checking that the page still holds the
 * previous round's (zero before the first), then prints "tick N". A page that lost a write
 * (a live migration that missed a dirty page) prints "BAD page ADDR" and stops the ROM. For
 * live migration's tests and benchmarks: the guest writing memory fast during it.
 */
#include "rom.h"
#define DIRTY_START     0x1000000
#define DIRTY_END       0x5000000
        .text
        .code32
        .globl main
main:
        xorl    %ebx, %ebx
1:      incl    %ebx
        leal    -1(%ebx), %edx
        movl    $DIRTY_START, %edi
2:      cmpl    %edx, (%edi)
        jne     3f
        movl    %ebx, (%edi)
        addl    $4096, %edi
        cmpl    $DIRTY_END, %edi
        jb      2b
        movl    %ebx, %eax
        SHOW    "tick "
        jmp     1b
3:      movl    %edi, %eax
        SHOW    "BAD page "
4:      cli
        hlt
        jmp     4b
