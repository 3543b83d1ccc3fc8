/*
 * MSI from the guest's side, on the dummy device at 0:4.0: programs the MSI capability to send
 * vector 0x42 to the BSP's LAPIC, enables it, has the device raise it, and counts arrivals,
 * also while the vector is masked (pending bit set, delivery at unmask).
 */
#include "rom.h"
#define DEV             0xe0020000      /* ECAM: bus 0, slot 4, function 0 */
#define VEC             0x42
#define COUNT           0x6100
#define IOBASE          0x6104
#define LAPIC_EOI       0xfee000b0

        .macro SHOWCOUNT text
        PRINT "\text"
        movl    COUNT, %eax
        call    putdec
        PRINT "\r\n"
        .endm

        .text
        .code32
        .globl main
main:
        movl    $0, COUNT
        movl    $msi_handler, %eax
        movl    $VEC, %ecx
        call    set_gate

        /* Walk the capability list for MSI (ID 0x05). */
        movzbl  DEV + 0x34, %esi
1:      testl   %esi, %esi
        jz      no_msix
        cmpb    $0x05, DEV(%esi)
        je      2f
        movzbl  DEV + 1(%esi), %esi
        jmp     1b
2:      movl    DEV + 0x10, %eax
        andl    $0xfffffffc, %eax
        movl    %eax, IOBASE
        movzwl  DEV + 2(%esi), %eax
        SHOW    "MSI control "
        movl    $0xfee00000, DEV + 4(%esi)      /* address: LAPIC 0 */
        movl    $0, DEV + 8(%esi)
        movw    $VEC, DEV + 12(%esi)            /* data: vector */
        movl    $0, DEV + 16(%esi)              /* unmasked */
        orw     $1, DEV + 2(%esi)               /* enable */
        sti

        call    fire
        call    delay
        SHOWCOUNT "delivered: count "

        movl    $1, DEV + 16(%esi)              /* mask */
        call    fire
        call    delay
        SHOWCOUNT "masked: count "
        movl    DEV + 20(%esi), %eax
        SHOW    "pending "
        movl    $0, DEV + 16(%esi)              /* unmask: the pending message goes out */
        call    delay
        SHOWCOUNT "unmasked: count "
        andw    $~1, DEV + 2(%esi)              /* disable */
        call    fire
        call    delay
        SHOWCOUNT "disabled: count "
        cli
        ret

no_msix:
        PRINT   "no MSI capability\r\n"
        ret

/* Ask the device to raise its MSI vector. */
fire:
        pushl   %eax
        pushl   %edx
        movl    IOBASE, %edx
        addl    $0x18, %edx
        movl    $1, %eax
        outl    %eax, %dx
        popl    %edx
        popl    %eax
        ret

delay:
        pushl   %ecx
        movl    $20000, %ecx
1:      pause
        loop    1b
        popl    %ecx
        ret

msi_handler:
        incl    COUNT
        movl    $0, LAPIC_EOI
        /* Same-privilege return without iret (PVM cannot emulate it; see start.S). */
        pushl   8(%esp)
        popfl
        ret     $8
