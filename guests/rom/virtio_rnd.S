/*
 * A minimal virtio 1.x PCI driver for virtio-rnd at 0:4.0: negotiates VERSION_1, sets up
 * queue 0 (8 entries) in low RAM, posts 16-byte write-only buffers, kicks the notify area and
 * polls the used ring. Also posts a buffer outside guest memory and a looping descriptor
 * chain: the device must complete them without harm and keep working.
 * Built a second time with -DSTAY (virtio_rnd_stay.rom): it then idles when done instead of
 * returning to the reset, for tests that read the device's counters while the guest is up.
 */
#include "rom.h"
#define DEV             0xe0020000
#define BUF             0x20000
#include "virtio_lib.inc"

        .text
        .code32
        .globl main
main:
        movl    DEV, %eax
        SHOW    "ids "
        movl    DEV + 8, %eax
        SHOW    "class/rev "
        xorl    %ebx, %ebx
        call    virtio_begin
        call    virtio_use_msix
        xorl    %eax, %eax
        call    virtio_queue
        call    virtio_driver_ok
        movl    COMMON, %edi

        /* Two good requests: 16 random bytes each. */
        movl    $BUF, %eax
        call    request
        SHOW    "request 1 len "
        call    show_buf
        movl    $BUF, %eax
        call    request
        SHOW    "request 2 len "
        call    show_buf

        /* A buffer far outside guest memory. */
        movl    $0xf0000000, %eax
        call    request
        SHOW    "outside memory len "

        /* A descriptor chain that loops on itself. */
        movl    $BUF, DESC + 16
        movl    $0, DESC + 20
        movl    $16, DESC + 24
        movw    $3, DESC + 28                   /* NEXT | WRITE */
        movw    $1, DESC + 30                   /* next = itself */
        movl    $1, %ebx
        call    virtio_post
        SHOW    "looping chain completed, len "

        movl    $BUF, %eax
        call    request
        SHOW    "after bad requests len "
        movl    IRQS, %eax
        SHOW    "msix interrupts "
        movb    $0, 0x14(%edi)                  /* reset the device */
        movzbl  0x14(%edi), %eax
        SHOW    "status after reset "
#ifdef STAY
1:      sti
        hlt
        jmp     1b
#endif
        ret

/* request: one 16-byte write-only buffer at %eax in descriptor 0; returns used len in %eax. */
request:
        movl    $0, BUF
        movl    $0, BUF + 4
        movl    $0, BUF + 8
        movl    $0, BUF + 12
        xorl    %ebx, %ebx
        movl    $16, %ecx
        movl    $2, %edx                        /* WRITE */
        call    virtio_desc
        /* fall through */
post:
        jmp     virtio_post

show_buf:
        PRINT   "bytes "
        movl    BUF, %eax
        movl    $8, %ecx
        call    puthex
        movl    BUF + 4, %eax
        call    puthex
        movl    BUF + 8, %eax
        call    puthex
        movl    BUF + 12, %eax
        call    puthex
        PRINT   "\r\n"
        ret

