/* Resets through the keyboard controller: command 0xFE to port 0x64. Expect status 0. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "reset through the i8042\r\n"
        movb    $0xfe, %al
        outb    %al, $0x64
        PRINT "still running after 0xfe to port 0x64\r\n"
        jmp     halt_forever
