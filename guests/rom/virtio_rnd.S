/*
 * A minimal virtio 1.x PCI driver for virtio-rnd at 0:4.0: negotiates VERSION_1, sets up
 * queue 0 (8 entries) in low RAM, posts 16-byte write-only buffers, kicks the notify area and
 * polls the used ring. Also posts a buffer outside guest memory and a looping descriptor
 * chain: the device must complete them without harm and keep working.
 */
#include "rom.h"
#define DEV             0xe0020000
#define DESC            0x10000
#define AVAIL           0x11000
#define USED            0x12000
#define BUF             0x20000
#define COMMON          0x6200          /* saved addresses */
#define NOTIFY          0x6204
#define NOTIFY_MULT     0x6208
#define ISR             0x620c
#define NEXT_AVAIL      0x6210

        .macro SHOW text
        PRINT "\text"
        movl    $8, %ecx
        call    puthex
        PRINT "\r\n"
        .endm

        .text
        .code32
        .globl main
main:
        movl    DEV, %eax
        SHOW    "ids "
        movl    DEV + 8, %eax
        SHOW    "class/rev "
        /* Find the vendor capabilities (ID 9) by type. */
        movzbl  DEV + 0x34, %esi
1:      testl   %esi, %esi
        jz      caps_done
        cmpb    $0x09, DEV(%esi)
        jne     2f
        movzbl  DEV + 4(%esi), %eax             /* BAR */
        movl    DEV + 0x10(,%eax,4), %edx
        andl    $0xfffffff0, %edx
        addl    DEV + 8(%esi), %edx             /* + offset */
        movb    DEV + 3(%esi), %al              /* cfg_type */
        cmpb    $1, %al
        jne     3f
        movl    %edx, COMMON
3:      cmpb    $2, %al
        jne     3f
        movl    %edx, NOTIFY
        movl    DEV + 16(%esi), %eax
        movl    %eax, NOTIFY_MULT
3:      cmpb    $3, %al
        jne     2f
        movl    %edx, ISR
2:      movzbl  DEV + 1(%esi), %esi
        jmp     1b
caps_done:
        movl    COMMON, %edi
        movb    $0, 0x14(%edi)                  /* reset */
        movb    $1, 0x14(%edi)                  /* ACKNOWLEDGE */
        movb    $3, 0x14(%edi)                  /* DRIVER */
        movl    $1, 0x00(%edi)
        movl    0x04(%edi), %eax
        SHOW    "device features 63:32 "
        movl    $1, 0x08(%edi)
        movl    $1, 0x0c(%edi)                  /* VERSION_1 */
        movl    $0, 0x08(%edi)
        movl    $0, 0x0c(%edi)
        movb    $0x0b, 0x14(%edi)               /* FEATURES_OK */
        movzbl  0x14(%edi), %eax
        SHOW    "status "
        movw    $0, 0x16(%edi)                  /* queue 0 */
        movzwl  0x18(%edi), %eax
        SHOW    "queue max "
        movw    $8, 0x18(%edi)
        movl    $DESC, 0x20(%edi)
        movl    $0, 0x24(%edi)
        movl    $AVAIL, 0x28(%edi)
        movl    $0, 0x2c(%edi)
        movl    $USED, 0x30(%edi)
        movl    $0, 0x34(%edi)
        movw    $1, 0x1c(%edi)                  /* queue_enable */
        movzwl  0x1e(%edi), %eax                /* queue_notify_off */
        imull   NOTIFY_MULT, %eax
        addl    %eax, NOTIFY
        movb    $0x0f, 0x14(%edi)               /* DRIVER_OK */
        movzbl  0x14(%edi), %eax
        SHOW    "status "
        movw    $0, AVAIL
        movw    $0, AVAIL + 2
        movl    $0, NEXT_AVAIL

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
        call    post
        SHOW    "looping chain completed, len "

        movl    $BUF, %eax
        call    request
        SHOW    "after bad requests len "
        movb    $0, 0x14(%edi)                  /* reset the device */
        movzbl  0x14(%edi), %eax
        SHOW    "status after reset "
        ret

/* request: one 16-byte write-only buffer at %eax in descriptor 0; returns used len in %eax. */
request:
        movl    %eax, DESC
        movl    $0, DESC + 4
        movl    $16, DESC + 8
        movw    $2, DESC + 12                   /* WRITE */
        movw    $0, DESC + 14
        movl    $0, BUF
        movl    $0, BUF + 4
        movl    $0, BUF + 8
        movl    $0, BUF + 12
        xorl    %ebx, %ebx
        /* fall through */
/* post: make descriptor %ebx available, kick, wait for it in the used ring; %eax = len. */
post:
        movl    NEXT_AVAIL, %ecx
        movl    %ecx, %edx
        andl    $7, %edx
        movw    %bx, AVAIL + 4(,%edx,2)
        incl    %ecx
        movl    %ecx, NEXT_AVAIL
        movw    %cx, AVAIL + 2
        movl    NOTIFY, %edx
        movw    $0, (%edx)                      /* kick queue 0 */
        movl    $2000000, %edx
1:      cmpw    %cx, USED + 2
        je      2f
        pause
        decl    %edx
        jnz     1b
        PRINT   "timeout waiting for the used ring\r\n"
        jmp     halt_forever
2:      decl    %ecx
        andl    $7, %ecx
        movl    USED + 8(,%ecx,8), %eax         /* used elem len */
        ret

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
