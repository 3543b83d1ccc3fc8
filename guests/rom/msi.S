/*
 * MSI from the guest's side, on the dummy device at 0:4.0: programs the MSI capability to send
 * vector 0x42 to the BSP's LAPIC, enables it, has the device raise it, and counts arrivals,
 * also while the vector is masked (pending bit set, delivery at unmask).
 */
#include "rom.h"
#define VEC             0x42
#define FIRE_OFFSET     0x18
#include "dummyirq.inc"

        .text
        .code32
        .globl main
main:
        movl    $0, COUNT
        movl    $irq_handler, %eax
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
