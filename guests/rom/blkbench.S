/*
 * virtio-blk benchmark guest (0:4.0): a 64 MiB sequential write in 64 KiB requests, a flush,
 * then 4096 random 4 KiB reads. Requests go in batches of 8, each an indirect descriptor
 * (header, data, status), with one kick per batch. "BENCH <phase> start/done" lines let the
 * host time each phase; the random offsets follow the LCG benches/blk.rs replays on the host.
 */
#include "rom.h"
#define DEV             0xe0020000
#include "virtio_lib.inc"
#define HDRS            0x40000         /* 8 headers, 16 bytes each */
#define STATUSES        0x41000         /* 8 status bytes */
#define ITABLES         0x42000         /* 8 indirect tables, 64 bytes each */
#define DATA            0x100000        /* 8 data buffers, 64 KiB apart */
#define SEQ_REQS        1024
#define SEQ_LEN         0x10000
#define RND_REQS        4096
#define RND_LEN         0x1000
#define SECTORS_4K      16384           /* 64 MiB / 4 KiB */
#define LCG             0x6600
#define COUNT           0x6604
#define NEXT_SECTOR     0x6608
#define T_IN            0
#define T_OUT           1
#define T_FLUSH         4

        .text
        .code32
        .globl main
main:
        movl    $(1 << 9 | 1 << 28), %ebx       /* FLUSH, INDIRECT_DESC */
        call    virtio_start
        movl    $1, LCG

        PRINT   "BENCH seqwrite start\r\n"
        movl    $0, NEXT_SECTOR
        movl    $(SEQ_REQS / 8), COUNT
1:      movl    $T_OUT, %eax
        movl    $SEQ_LEN, %ecx
        xorl    %ebp, %ebp
        call    batch
        decl    COUNT
        jnz     1b
        call    flush
        PRINT   "BENCH seqwrite done\r\n"
        movl    STATUSES, %eax
        SHOW    "status bytes 0-3 "
        movzwl  USED + 2, %eax
        SHOW    "used idx "

        PRINT   "BENCH randread start\r\n"
        movl    $(RND_REQS / 8), COUNT
1:      movl    $T_IN, %eax
        movl    $RND_LEN, %ecx
        movl    $1, %ebp
        call    batch
        decl    COUNT
        jnz     1b
        PRINT   "BENCH randread done\r\n"
        movl    COMMON, %edi
        movb    $0, 0x14(%edi)                  /* reset: the device logs its counters */
        ret

/*
 * batch: 8 requests of type %eax and %ecx bytes; %ebp = 0 sequential (NEXT_SECTOR advances),
 * 1 random (LCG). Builds 8 indirect chains, makes them available, kicks once, waits for all.
 */
batch:
        pushal
        movl    %eax, %esi                      /* type */
        movl    %ecx, %ebx                      /* bytes */
        xorl    %edi, %edi                      /* request index 0..7 */
2:      /* header */
        movl    %edi, %edx
        shll    $4, %edx
        movl    %esi, HDRS(%edx)
        movl    $0, HDRS + 4(%edx)
        testl   %ebp, %ebp
        jnz     3f
        movl    NEXT_SECTOR, %eax
        movl    %ebx, %ecx
        shrl    $9, %ecx
        addl    %ecx, NEXT_SECTOR
        jmp     4f
3:      movl    LCG, %eax                       /* x = x * 1103515245 + 12345 */
        imull   $1103515245, %eax
        addl    $12345, %eax
        movl    %eax, LCG
        shrl    $8, %eax
        andl    $(SECTORS_4K - 1), %eax
        shll    $3, %eax                        /* 4 KiB in 512-byte sectors */
4:      movl    %eax, HDRS + 8(%edx)
        movl    $0, HDRS + 12(%edx)
        /* indirect table: header, data, status */
        movl    %edi, %ecx
        shll    $6, %ecx
        leal    ITABLES(%ecx), %ecx
        leal    HDRS(%edx), %eax
        movl    %eax, (%ecx)
        movl    $0, 4(%ecx)
        movl    $16, 8(%ecx)
        movl    $0x00010001, 12(%ecx)           /* NEXT, next = 1 */
        movl    %edi, %eax
        shll    $16, %eax
        addl    $DATA, %eax
        movl    %eax, 16(%ecx)
        movl    $0, 20(%ecx)
        movl    %ebx, 24(%ecx)
        movl    $0x00020001, %eax               /* NEXT, next = 2 */
        cmpl    $T_IN, %esi
        jne     5f
        orl     $2, %eax                        /* WRITE for reads */
5:      movl    %eax, 28(%ecx)
        leal    STATUSES(%edi), %eax
        movl    %eax, 32(%ecx)
        movl    $0, 36(%ecx)
        movl    $1, 40(%ecx)
        movl    $2, 44(%ecx)                    /* WRITE */
        /* main descriptor %edi -> the table */
        movl    %edi, %edx
        shll    $4, %edx
        movl    %ecx, DESC(%edx)
        movl    $0, DESC + 4(%edx)
        movl    $48, DESC + 8(%edx)
        movl    $4, DESC + 12(%edx)             /* INDIRECT */
        /* avail ring entry */
        movl    QNEXT, %eax
        addl    %edi, %eax
        andl    $7, %eax
        movw    %di, AVAIL + 4(,%eax,2)
        incl    %edi
        cmpl    $8, %edi
        jb      2b
        movl    QNEXT, %ecx
        addl    $8, %ecx
        movl    %ecx, QNEXT
        movw    %cx, AVAIL + 2
        movl    QNOTIFY, %edx
        movw    $0, (%edx)                      /* one kick for the batch */
        xorl    %esi, %esi
        call    virtio_wait_q
        popal
        ret

flush:
        pushal
        movl    $T_FLUSH, HDRS
        movl    $0, HDRS + 4
        movl    $0, HDRS + 8
        movl    $0, HDRS + 12
        movl    $HDRS, %eax
        movl    $16, %ecx
        movl    $1, %edx
        xorl    %ebx, %ebx
        call    virtio_desc
        movl    $STATUSES, %eax
        movl    $1, %ecx
        movl    $2, %edx
        movl    $1, %ebx
        call    virtio_desc
        xorl    %ebx, %ebx
        call    virtio_post
        popal
        ret
