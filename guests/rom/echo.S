/* Echoes COM1 input back in upper case until it reads 'q', then resets: the input path's test. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "echo ready\r\n"
1:      movw    $COM1 + 5, %dx
        inb     %dx, %al
        testb   $0x01, %al              /* LSR data ready */
        jz      1b
        movw    $COM1, %dx
        inb     %dx, %al
        cmpb    $'q', %al
        je      3f
        cmpb    $'a', %al
        jb      2f
        cmpb    $'z', %al
        ja      2f
        subb    $('a' - 'A'), %al
2:      call    putc
        jmp     1b
3:      PRINT "\r\nbye\r\n"
        ret
