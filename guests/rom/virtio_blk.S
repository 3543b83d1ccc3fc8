/*
 * A virtio-blk driver test at 0:4.0: reads the config (capacity, block size), gets the serial,
 * writes a pattern to sector 1, flushes, reads it back and compares, reads past the end,
 * and zeroes sector 2 with WRITE_ZEROES. The test then checks the backing file on the host.
 */
#include "rom.h"
#define DEV             0xe0020000
#include "virtio_lib.inc"
#define HDR             0x20000
#define PATTERN         0x21000
#define READBACK        0x22000
#define STATUS          0x23000
#define IDBUF           0x24000
#define WZSEG           0x25000
#define USED_LEN        0x6300
#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4
#define T_GET_ID        8
#define T_WRITE_ZEROES  13
#define F_WRITE         2
#define F_NEXT          1

        .text
        .code32
        .globl main
main:
        movl    DEV, %eax
        SHOW    "ids "
        /* Accept SEG_MAX(2), RO(5), BLK_SIZE(6), FLUSH(9), WRITE_ZEROES(14) if offered. */
        movl    $(1 << 2 | 1 << 5 | 1 << 6 | 1 << 9 | 1 << 14), %ebx
        call    virtio_begin
        call    virtio_use_msix
        xorl    %eax, %eax
        call    virtio_queue
        call    virtio_driver_ok
        movl    DEVCFG, %esi
        movl    (%esi), %eax
        SHOW    "capacity "
        movl    20(%esi), %eax
        SHOW    "blk_size "

        movl    $T_GET_ID, %eax
        xorl    %edx, %edx
        movl    $IDBUF, %esi
        movl    $20, %ecx
        movl    $F_WRITE, %ebp
        call    blk_request
        SHOW    "get-id status "
        PRINT   "serial "
        movl    $IDBUF, %esi
        call    puts
        PRINT   "\r\n"

        /* Sector 1 := bytes (i * 7 + 3). */
        xorl    %ecx, %ecx
1:      movl    %ecx, %eax
        imull   $7, %eax
        addl    $3, %eax
        movb    %al, PATTERN(%ecx)
        incl    %ecx
        cmpl    $512, %ecx
        jb      1b
        movl    $T_OUT, %eax
        movl    $1, %edx
        movl    $PATTERN, %esi
        movl    $512, %ecx
        xorl    %ebp, %ebp
        call    blk_request
        SHOW    "write status "

        call    blk_flush
        SHOW    "flush status "

        movl    $T_IN, %eax
        movl    $1, %edx
        movl    $READBACK, %esi
        movl    $512, %ecx
        movl    $F_WRITE, %ebp
        call    blk_request
        SHOW    "read status "
        movl    USED_LEN, %eax
        SHOW    "read used len "
        movl    $PATTERN, %esi
        movl    $READBACK, %edi
        movl    $512, %ecx
        cld
        repe cmpsb
        jne     2f
        PRINT   "compare ok\r\n"
        jmp     3f
2:      PRINT   "compare mismatch\r\n"
3:
        /* One sector past the end. */
        movl    DEVCFG, %esi
        movl    (%esi), %edx
        movl    $T_IN, %eax
        movl    $READBACK, %esi
        movl    $512, %ecx
        movl    $F_WRITE, %ebp
        call    blk_request
        SHOW    "past the end status "

        /* WRITE_ZEROES sector 2, then read it back. */
        movl    $2, WZSEG
        movl    $0, WZSEG + 4
        movl    $1, WZSEG + 8
        movl    $0, WZSEG + 12
        movl    $T_WRITE_ZEROES, %eax
        xorl    %edx, %edx
        movl    $WZSEG, %esi
        movl    $16, %ecx
        xorl    %ebp, %ebp
        call    blk_request
        SHOW    "write zeroes status "
        movl    $0xffffffff, READBACK
        movl    $T_IN, %eax
        movl    $2, %edx
        movl    $READBACK, %esi
        movl    $512, %ecx
        movl    $F_WRITE, %ebp
        call    blk_request
        movl    READBACK, %eax
        SHOW    "sector 2 first dword "
        movl    IRQS, %eax
        SHOW    "msix interrupts "
        ret

/*
 * blk_request: type %eax, sector %edx, data at %esi of %ecx bytes with descriptor flags
 * %ebp (F_WRITE when the device writes it). Returns the status byte in %eax.
 */
blk_request:
        movl    %eax, HDR
        movl    $0, HDR + 4
        movl    %edx, HDR + 8
        movl    $0, HDR + 12
        movb    $0xff, STATUS
        pushl   %ecx
        movl    $HDR, %eax
        movl    $16, %ecx
        movl    $F_NEXT, %edx
        xorl    %ebx, %ebx
        call    virtio_desc
        popl    %ecx
        movl    %esi, %eax
        movl    %ebp, %edx
        orl     $F_NEXT, %edx
        movl    $1, %ebx
        call    virtio_desc
        movl    $STATUS, %eax
        movl    $1, %ecx
        movl    $F_WRITE, %edx
        movl    $2, %ebx
        call    virtio_desc
        xorl    %ebx, %ebx
        call    virtio_post
        movl    %eax, USED_LEN
        movzbl  STATUS, %eax
        ret

/* blk_flush: header and status only. */
blk_flush:
        movl    $T_FLUSH, HDR
        movl    $0, HDR + 4
        movl    $0, HDR + 8
        movl    $0, HDR + 12
        movb    $0xff, STATUS
        movl    $HDR, %eax
        movl    $16, %ecx
        movl    $F_NEXT, %edx
        xorl    %ebx, %ebx
        call    virtio_desc
        movl    $STATUS, %eax
        movl    $1, %ecx
        movl    $F_WRITE, %edx
        movl    $1, %ebx
        call    virtio_desc
        xorl    %ebx, %ebx
        call    virtio_post
        movzbl  STATUS, %eax
        ret
