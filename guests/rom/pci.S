/*
 * PCI from the guest's side: enumerates bus 0 through CONF1 (0xCF8/0xCFC) and through ECAM
 * (0xE0000000), then finds the dummy device (10dd:0001) and sizes, moves and disables its
 * BARs, printing what it sees. The test compares that with what rhyve must do.
 */
#include "rom.h"
#define ECAM            0xe0000000
#define NEW_BAR1        0xd0000000

        .text
        .code32
        .globl main
main:
        xorl    %ebp, %ebp                      /* ECAM address of the dummy, once found */
        /* CONF1 scan: slot in %ebx (0-31), function in %edi (0-7). */
        xorl    %ebx, %ebx
1:      xorl    %edi, %edi
2:      movl    %ebx, %eax
        shll    $11, %eax
        movl    %edi, %edx
        shll    $8, %edx
        orl     %edx, %eax
        orl     $0x80000000, %eax
        movw    $0xcf8, %dx
        outl    %eax, %dx
        movw    $0xcfc, %dx
        inl     %dx, %eax
        cmpl    $0xffffffff, %eax
        je      3f
        PRINT   "CONF1 00:"
        call    show_slot_fn
        PRINT   " "
        movl    $8, %ecx
        call    puthex
        PRINT   "\r\n"
3:      incl    %edi
        cmpl    $8, %edi
        jb      2b
        incl    %ebx
        cmpl    $32, %ebx
        jb      1b

        /* ECAM scan, the same order. */
        xorl    %ebx, %ebx
1:      xorl    %edi, %edi
2:      movl    %ebx, %esi
        shll    $15, %esi
        movl    %edi, %edx
        shll    $12, %edx
        orl     %edx, %esi
        addl    $ECAM, %esi
        movl    (%esi), %eax
        cmpl    $0xffffffff, %eax
        je      3f
        cmpl    $0x000110dd, %eax
        jne     4f
        movl    %esi, %ebp
4:      PRINT   "ECAM 00:"
        call    show_slot_fn
        PRINT   " "
        movl    $8, %ecx
        call    puthex
        PRINT   "\r\n"
3:      incl    %edi
        cmpl    $8, %edi
        jb      2b
        incl    %ebx
        cmpl    $32, %ebx
        jb      1b

        /* CONF1 with the enable bit clear reads all ones. */
        movw    $0xcf8, %dx
        xorl    %eax, %eax
        outl    %eax, %dx
        movw    $0xcfc, %dx
        inl     %dx, %eax
        SHOW    "CONF1 disabled "

        testl   %ebp, %ebp
        jnz     1f
        PRINT   "no dummy device\r\n"
        ret
1:
        movl    0x100(%ebp), %eax
        SHOW    "ECAM extended "
        movl    0x3c(%ebp), %eax
        SHOW    "INTx "
        movl    0x10(%ebp), %eax
        SHOW    "BAR0 "
        movl    0x14(%ebp), %eax
        SHOW    "BAR1 "
        movl    %eax, %edi                      /* old BAR1 address */
        movl    0x18(%ebp), %eax
        SHOW    "BAR2 low "
        movl    0x1c(%ebp), %eax
        SHOW    "BAR2 high "

        /* Size BAR1, then put it back. */
        movl    $0xffffffff, 0x14(%ebp)
        movl    0x14(%ebp), %eax
        SHOW    "BAR1 size mask "
        movl    %edi, 0x14(%ebp)

        /* Its storage, at the old and the new address. */
        movl    $0x12345678, 0x10(%edi)
        movl    0x10(%edi), %eax
        SHOW    "BAR1 data "
        movl    $NEW_BAR1, 0x14(%ebp)
        movl    0x14(%ebp), %eax
        SHOW    "BAR1 moved to "
        movl    NEW_BAR1 + 0x10, %eax
        SHOW    "new address data "
        movl    0x10(%edi), %eax
        SHOW    "old address data "

        /* Memory decode off and on again. */
        movw    0x04(%ebp), %ax
        andw    $~0x2, %ax
        movw    %ax, 0x04(%ebp)
        movl    NEW_BAR1 + 0x10, %eax
        SHOW    "decode off "
        movw    0x04(%ebp), %ax
        orw     $0x2, %ax
        movw    %ax, 0x04(%ebp)
        movl    NEW_BAR1 + 0x10, %eax
        SHOW    "decode on "

        /* The I/O BAR's storage. */
        movl    0x10(%ebp), %edx
        andl    $0xfffffffc, %edx
        addl    $4, %edx
        movl    $0xcafebabe, %eax
        outl    %eax, %dx
        xorl    %eax, %eax
        inl     %dx, %eax
        SHOW    "io data "
        ret

/* Print slot %ebx as two hex digits, '.', function %edi. */
show_slot_fn:
        pushl   %eax
        pushl   %ecx
        movl    %ebx, %eax
        movl    $2, %ecx
        call    puthex
        movb    $'.', %al
        call    putc
        movl    %edi, %eax
        movl    $1, %ecx
        call    puthex
        popl    %ecx
        popl    %eax
        ret
