/*
 * MSI-X from the guest's side, on the dummy device at 0:4.0: programs table entry 1 to send
 * vector 0x41 to the BSP's LAPIC, enables MSI-X, has the device raise vector 1, and counts the
 * interrupts that arrive, also while the vector and then the whole function are masked (the
 * pending bit must be set, and delivery must happen at unmask).
 */
#include "rom.h"
#define VEC             0x41
#define FIRE_OFFSET     0x1c
#include "dummyirq.inc"

        .text
        .code32
        .globl main
main:
        movl    $0, COUNT
        movl    $irq_handler, %eax
        movl    $VEC, %ecx
        call    set_gate

        /* Walk the capability list for MSI-X (ID 0x11). */
        movzbl  DEV + 0x34, %esi
1:      testl   %esi, %esi
        jz      no_msix
        cmpb    $0x11, DEV(%esi)
        je      2f
        movzbl  DEV + 1(%esi), %esi
        jmp     1b
2:      /* Table and PBA addresses: BAR (BIR) + offset. */
        movl    DEV + 4(%esi), %eax
        call    bir_to_addr
        movl    %eax, %edi
        movl    DEV + 8(%esi), %eax
        call    bir_to_addr
        movl    %eax, %ebx
        movl    DEV + 0x10, %eax
        andl    $0xfffffffc, %eax
        movl    %eax, IOBASE
        PRINT   "MSI-X vectors: "
        movzwl  DEV + 2(%esi), %eax
        andl    $0x7ff, %eax
        incl    %eax
        call    putdec
        PRINT   "\r\n"

        /* Entry 1: LAPIC 0, vector VEC, unmasked. Then enable MSI-X. */
        movl    $0xfee00000, 16(%edi)
        movl    $0, 20(%edi)
        movl    $VEC, 24(%edi)
        movl    $0, 28(%edi)
        orw     $0x8000, DEV + 2(%esi)
        sti

        call    fire
        call    delay
        SHOWCOUNT "delivered: count "

        movl    $1, 28(%edi)                    /* mask vector 1 */
        call    fire
        call    delay
        SHOWCOUNT "vector masked: count "
        PRINT   "PBA "
        movl    (%ebx), %eax
        movl    $8, %ecx
        call    puthex
        PRINT   "\r\n"
        movl    $0, 28(%edi)                    /* unmask: the pending message goes out */
        call    delay
        SHOWCOUNT "vector unmasked: count "

        orw     $0x4000, DEV + 2(%esi)          /* function mask */
        call    fire
        call    delay
        SHOWCOUNT "function masked: count "
        andw    $~0x4000, DEV + 2(%esi)
        call    delay
        SHOWCOUNT "function unmasked: count "
        cli
        ret

no_msix:
        PRINT   "no MSI-X capability\r\n"
        ret

/* %eax = table/PBA register; returns the address it names. */
bir_to_addr:
        pushl   %ecx
        movl    %eax, %ecx
        andl    $7, %ecx
        andl    $0xfffffff8, %eax
        movl    DEV + 0x10(,%ecx,4), %ecx
        andl    $0xfffffff0, %ecx
        addl    %ecx, %eax
        popl    %ecx
        ret
