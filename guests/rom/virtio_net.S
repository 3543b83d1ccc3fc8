/*
 * virtio-net at 0:4.0 as a tiny ARP responder for 10.77.0.2: posts rx buffers, answers the
 * host's ARP request through the tx queue, then waits for the ICMP echo request the host can
 * only send after learning our MAC from that reply: both directions through the tap.
 */
#include "rom.h"
#define DEV             0xe0020000
#include "virtio_lib.inc"
#define RXBUF           0x30000         /* 4 rx buffers of 2 KiB */
#define TXBUF           0x34000
#define MAC             0x6500
#define RXDONE          0x6508
#define FRAMES          0x650c
#define MYIP            0x02004d0a      /* 10.77.0.2, as a little-endian dword */
#define HDR             12

        .text
        .code32
        .globl main
main:
        movl    DEV, %eax
        SHOW    "ids "
        movl    $(1 << 5 | 1 << 16), %ebx       /* MAC, STATUS: no offloads, no mergeable rx */
        call    virtio_begin
        call    virtio_use_msix
        xorl    %eax, %eax
        call    virtio_queue                    /* rx */
        movl    $1, %eax
        call    virtio_queue                    /* tx */
        call    virtio_driver_ok
        movl    DEVCFG, %esi
        movl    (%esi), %eax
        movl    %eax, MAC
        movw    4(%esi), %ax
        movw    %ax, MAC + 4
        PRINT   "mac "
        movl    $MAC, %esi
        call    print_mac
        PRINT   "\r\n"
        movl    $0, RXDONE
        movl    $0, FRAMES
        xorl    %ebx, %ebx
1:      call    post_rx
        incl    %ebx
        cmpl    $4, %ebx
        jb      1b
        PRINT   "rx ready\r\n"

next_frame:
        incl    FRAMES
        cmpl    $64, FRAMES
        ja      give_up
        movl    RXDONE, %ecx
        incl    %ecx
        movl    %ecx, RXDONE
        xorl    %esi, %esi
        call    virtio_wait_q
        movl    RXDONE, %ecx                    /* which buffer: the used entry's id */
        decl    %ecx
        andl    $7, %ecx
        movl    USED + 4(,%ecx,8), %ebx
        andl    $3, %ebx
        movl    %ebx, %ebp                      /* buffer index, reposted at the end */
        shll    $11, %ebx
        addl    $RXBUF + HDR, %ebx              /* the Ethernet frame */
        cmpw    $0x0608, 12(%ebx)               /* ARP */
        je      arp
        cmpw    $0x0008, 12(%ebx)               /* IPv4 */
        jne     other
        cmpb    $1, 23(%ebx)                    /* ICMP */
        jne     other
        PRINT   "icmp echo request received, dst mac "
        movl    %ebx, %esi
        call    print_mac
        PRINT   "\r\n"
        movl    IRQS, %eax
        SHOW    "msix interrupts "
        ret

arp:
        cmpw    $0x0100, 20(%ebx)               /* request */
        jne     repost
        cmpl    $MYIP, 38(%ebx)                 /* for us */
        jne     repost
        /* The reply: virtio-net header, then Ethernet + ARP. */
        movl    $TXBUF, %edi
        xorl    %eax, %eax
        movl    $HDR, %ecx
        cld
        rep stosb
        leal    6(%ebx), %esi                   /* to: the requester */
        movl    $6, %ecx
        rep movsb
        movl    $MAC, %esi                      /* from: us */
        movl    $6, %ecx
        rep movsb
        movw    $0x0608, (%edi)                 /* ARP */
        movl    $0x00080100, 2(%edi)            /* htype 1, ptype 0x0800 */
        movl    $0x02000406, 6(%edi)            /* hlen 6, plen 4, oper 2 (reply) */
        addl    $10, %edi
        movl    $MAC, %esi                      /* sender: us */
        movl    $6, %ecx
        rep movsb
        movl    $MYIP, (%edi)
        addl    $4, %edi
        leal    22(%ebx), %esi                  /* target: requester's MAC and IP */
        movl    $10, %ecx
        rep movsb
        movl    $TXBUF, %eax
        movl    $(HDR + 42), %ecx
        xorl    %edx, %edx
        pushl   %ebx
        movl    $1, %esi
        xorl    %ebx, %ebx
        call    virtio_desc_q
        call    virtio_avail_q
        call    virtio_wait_q
        popl    %ebx
        PRINT   "arp reply sent\r\n"
        jmp     repost

other:
        PRINT   "ignored frame, ethertype "
        movzwl  12(%ebx), %eax
        xchgb   %al, %ah
        movl    $4, %ecx
        call    puthex
        PRINT   "\r\n"
repost:
        movl    %ebp, %ebx
        call    post_rx
        jmp     next_frame

give_up:
        PRINT   "no ICMP echo request arrived\r\n"
        ret

/* post_rx: rx buffer %ebx (0-3) into descriptor %ebx of queue 0, made available. */
post_rx:
        pushal
        movl    %ebx, %eax
        shll    $11, %eax
        addl    $RXBUF, %eax
        movl    $0x800, %ecx
        movl    $2, %edx                        /* WRITE */
        xorl    %esi, %esi
        call    virtio_desc_q
        call    virtio_avail_q
        popal
        ret

/* print_mac: the 6 bytes at %esi as xx:xx:xx:xx:xx:xx. */
print_mac:
        pushal
        movl    $6, %edi
1:      movzbl  (%esi), %eax
        movl    $2, %ecx
        call    puthex
        incl    %esi
        decl    %edi
        jz      2f
        movb    $':', %al
        call    putc
        jmp     1b
2:      popal
        ret
