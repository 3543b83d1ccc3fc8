/*
 * virtio-console at 0:4.0 with named ports: negotiates MULTIPORT, does the control-queue
 * handshake (DEVICE_READY; PORT_READY for each DEVICE_ADD; prints PORT_NAME and PORT_OPEN),
 * then waits for bytes from the host on port 0 and answers "pong: <bytes>" on the same port.
 */
#include "rom.h"
#define DEV             0xe0020000
#include "virtio_lib.inc"
#define CTRLBUF         0x40000         /* 4 control receive buffers of 256 bytes */
#define CTRLMSG         0x41000         /* outgoing control message */
#define P0RX            0x42000
#define P0TX            0x43000
#define OPENS           0x6700
#define CDONE           0x6704
#define NPORTS          0x6708
#define CTRL_RX         2
#define CTRL_TX         3

        .text
        .code32
        .globl main
main:
        movl    DEV, %eax
        SHOW    "ids "
        movl    $(1 << 1), %ebx                 /* MULTIPORT */
        call    virtio_begin
        movl    DEVCFG, %esi
        movl    4(%esi), %eax
        movl    %eax, NPORTS
        SHOW    "max ports "
        xorl    %eax, %eax
1:      call    virtio_queue
        incl    %eax
        movl    NPORTS, %ecx
        leal    2(%ecx,%ecx), %ecx
        cmpl    %ecx, %eax
        jb      1b
        call    virtio_driver_ok
        movl    $0, OPENS
        movl    $0, CDONE
        xorl    %ebx, %ebx
1:      call    post_ctrl
        incl    %ebx
        cmpl    $4, %ebx
        jb      1b
        xorl    %eax, %eax                      /* DEVICE_READY */
        xorl    %edx, %edx
        movl    $1, %ecx
        call    ctrl_send

next_ctrl:
        movl    CDONE, %ecx
        incl    %ecx
        movl    %ecx, CDONE
        movl    $CTRL_RX, %esi
        call    virtio_wait_q
        movl    CDONE, %ecx                     /* buffer: the used entry's id */
        decl    %ecx
        andl    $7, %ecx
        movl    USED + CTRL_RX * QSTRIDE + 4(,%ecx,8), %ebx
        andl    $3, %ebx
        movl    %ebx, %ebp
        shll    $8, %ebx
        addl    $CTRLBUF, %ebx
        movb    $0, (%ebx,%eax)                 /* NUL after the message (for names) */
        PRINT   "ctrl port "
        movl    (%ebx), %eax
        call    putdec
        PRINT   " event "
        movzwl  4(%ebx), %eax
        call    putdec
        PRINT   " value "
        movzwl  6(%ebx), %eax
        call    putdec
        cmpw    $7, 4(%ebx)                     /* PORT_NAME */
        jne     2f
        PRINT   " name "
        leal    8(%ebx), %esi
        call    puts
2:      PRINT   "\r\n"
        cmpw    $1, 4(%ebx)                     /* DEVICE_ADD -> PORT_READY */
        jne     3f
        movl    (%ebx), %eax
        movl    $3, %edx
        movl    $1, %ecx
        call    ctrl_send
3:      cmpw    $6, 4(%ebx)                     /* PORT_OPEN */
        jne     4f
        incl    OPENS
4:      movl    %ebp, %ebx
        call    post_ctrl
        movl    OPENS, %eax
        cmpl    NPORTS, %eax
        jb      next_ctrl

        /* Port 0: one receive buffer, wait for the host's bytes, answer them. */
        movl    $P0RX, %eax
        movl    $200, %ecx
        movl    $2, %edx
        xorl    %esi, %esi
        xorl    %ebx, %ebx
        call    virtio_desc_q
        call    virtio_avail_q
        PRINT   "port 0 waiting\r\n"
        call    virtio_wait_q
        movb    $0, P0RX(%eax)
        movl    %eax, %ecx
        PRINT   "port 0 got: "
        movl    $P0RX, %esi
        call    puts
        PRINT   "\r\n"
        movl    $0x676e6f70, P0TX               /* "pong" */
        movw    $0x203a, P0TX + 4               /* ": " */
        movl    $P0RX, %esi
        movl    $P0TX + 6, %edi
        pushl   %ecx
        cld
        rep movsb
        popl    %ecx
        addl    $6, %ecx
        movl    $P0TX, %eax
        xorl    %edx, %edx
        movl    $1, %esi                        /* port 0 transmit queue */
        xorl    %ebx, %ebx
        call    virtio_desc_q
        call    virtio_avail_q
        call    virtio_wait_q
        PRINT   "reply sent\r\n"
        ret

/* post_ctrl: control receive buffer %ebx (0-3) into descriptor %ebx of the control rx queue. */
post_ctrl:
        pushal
        movl    %ebx, %eax
        shll    $8, %eax
        addl    $CTRLBUF, %eax
        movl    $256, %ecx
        movl    $2, %edx
        movl    $CTRL_RX, %esi
        call    virtio_desc_q
        call    virtio_avail_q
        popal
        ret

/* ctrl_send: control message (port %eax, event %edx, value %ecx); waits until consumed. */
ctrl_send:
        pushal
        movl    %eax, CTRLMSG
        movw    %dx, CTRLMSG + 4
        movw    %cx, CTRLMSG + 6
        movl    $CTRLMSG, %eax
        movl    $8, %ecx
        xorl    %edx, %edx
        movl    $CTRL_TX, %esi
        xorl    %ebx, %ebx
        call    virtio_desc_q
        call    virtio_avail_q
        call    virtio_wait_q
        popal
        ret
