/*
 * lspci from the guest: for every function on bus 0 (ECAM), prints its IDs, class and, for
 * each BAR register, the mask read back after writing all ones (decode off while sizing, as
 * an OS does), then restores it. "00:ss.f vvvvdddd cccccccc m0 m1 m2 m3 m4 m5".
 */
#include "rom.h"
#define ECAM            0xe0000000

        .text
        .code32
        .globl main
main:
        xorl    %ebx, %ebx                      /* slot */
1:      xorl    %edi, %edi                      /* function */
2:      movl    %ebx, %esi
        shll    $15, %esi
        movl    %edi, %eax
        shll    $12, %eax
        orl     %eax, %esi
        addl    $ECAM, %esi
        cmpl    $0xffffffff, (%esi)
        je      4f
        PRINT   "00:"
        movl    %ebx, %eax
        movl    $2, %ecx
        call    puthex
        movb    $'.', %al
        call    putc
        movl    %edi, %eax
        movl    $1, %ecx
        call    puthex
        movb    $' ', %al
        call    putc
        movl    (%esi), %eax
        movl    $8, %ecx
        call    puthex
        movb    $' ', %al
        call    putc
        movl    8(%esi), %eax
        call    puthex
        movw    4(%esi), %bp                    /* command, decode off while sizing */
        movw    $0, 4(%esi)
        xorl    %edx, %edx
3:      movb    $' ', %al
        call    putc
        movl    0x10(%esi,%edx,4), %ecx         /* save */
        movl    $0xffffffff, 0x10(%esi,%edx,4)
        movl    0x10(%esi,%edx,4), %eax
        movl    %ecx, 0x10(%esi,%edx,4)         /* restore */
        movl    $8, %ecx
        call    puthex
        incl    %edx
        cmpl    $6, %edx
        jb      3b
        movw    %bp, 4(%esi)
        PRINT   "\r\n"
4:      incl    %edi
        cmpl    $8, %edi
        jb      2b
        incl    %ebx
        cmpl    $32, %ebx
        jb      1b
        ret
