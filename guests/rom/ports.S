/* Touches an unassigned I/O port and an unimplemented MSR, prints what it saw, resets. */
#include "rom.h"
#define NOPORT 0x1234
        .text
        .code32
        .globl main
main:
        PRINT "probing port 0x1234\r\n"
        movw    $NOPORT, %dx
        inb     %dx, %al
        PRINT "inb="
        movl    $2, %ecx
        call    puthex
        inw     %dx, %ax
        PRINT " inw="
        movl    $4, %ecx
        call    puthex
        inl     %dx, %eax
        PRINT " inl="
        movl    $8, %ecx
        call    puthex
        outb    %al, %dx
        PRINT "\r\nrdmsr 0x1234: "
        movl    $0xdeadbeef, %eax
        movl    $0xdeadbeef, %edx
        movl    $0x1234, %ecx
        rdmsr
        PRINT "value="
        movl    $8, %ecx
        call    puthex
        PRINT "\r\nwrmsr 0x1234: "
        movl    $0x1234, %ecx
        wrmsr
        PRINT "done\r\n"
        ret
