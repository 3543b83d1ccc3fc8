/* Finds the MP floating pointer in 0xF0000-0xFFFFF, checks both checksums, counts processors. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        movl    $0xf0000, %esi
1:      cmpl    $0x5f504d5f, (%esi)             /* "_MP_" */
        je      2f
        addl    $16, %esi
        cmpl    $0x100000, %esi
        jb      1b
        PRINT   "no MP table\r\n"
        ret
2:      movl    %esi, %eax
        SHOW    "MP floating pointer at "
        movl    $16, %ecx
        call    sum
        SHOW    "pointer checksum "
        movl    4(%esi), %esi                   /* configuration table */
        movzwl  4(%esi), %ecx
        call    sum
        SHOW    "table checksum "
        movzwl  34(%esi), %ecx                  /* entry count */
        leal    44(%esi), %edi
        xorl    %ebx, %ebx
3:      cmpb    $0, (%edi)
        jne     4f
        incl    %ebx
        addl    $20, %edi
        jmp     5f
4:      addl    $8, %edi
5:      loop    3b
        movl    %ebx, %eax
        SHOW    "processors "
        ret

/* sum: %eax = byte sum of %ecx bytes at %esi (0 when the checksum is right). */
sum:
        pushl   %esi
        pushl   %ecx
        xorl    %eax, %eax
1:      addb    (%esi), %al
        incl    %esi
        loop    1b
        movzbl  %al, %eax
        popl    %ecx
        popl    %esi
        ret
