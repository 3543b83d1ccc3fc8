/*
 * ACPI from the guest's side: finds the RSDP by the legacy scan of 0xE0000-0xFFFFF, walks the
 * XSDT printing each table's signature and checksum verdict, finds the DSDT through the FADT,
 * counts the MADT's local APICs, then enables ACPI and powers off through the FADT's PM1a_CNT
 * (status 1).
 */
#include "rom.h"
#define PM1A_CNT        0x6800
#define SMI             0x6804
#define ENABLEV         0x6808

        .text
        .code32
        .globl main
main:
        movl    $0xe0000, %esi
1:      cmpl    $0x20525450, 4(%esi)            /* "PTR " of "RSD PTR " */
        jne     2f
        cmpl    $0x20445352, (%esi)             /* "RSD " */
        jne     2f
        movl    $20, %ecx
        call    checksum
        testb   %al, %al
        jz      found
2:      addl    $16, %esi
        cmpl    $0x100000, %esi
        jb      1b
        PRINT   "no RSDP\r\n"
        ret
found:
        movl    %esi, %eax
        SHOW    "RSDP at "
        movzbl  15(%esi), %eax
        SHOW    "RSDP revision "
        movl    24(%esi), %ebx                  /* XSDT (below 4 GiB here) */
        movl    %ebx, %esi
        call    show_table
        movl    4(%ebx), %ecx                   /* entries: (length - 36) / 8 */
        subl    $36, %ecx
        shrl    $3, %ecx
        leal    36(%ebx), %edi
3:      pushl   %ecx
        movl    (%edi), %esi
        call    show_table
        cmpl    $0x50434146, (%esi)             /* "FACP" */
        jne     4f
        movl    64(%esi), %eax
        movl    %eax, PM1A_CNT
        movl    48(%esi), %eax
        movl    %eax, SMI
        movzbl  52(%esi), %eax
        movl    %eax, ENABLEV
        pushl   %esi
        movl    40(%esi), %esi                  /* DSDT */
        call    show_table
        popl    %esi
4:      cmpl    $0x43495041, (%esi)             /* "APIC" */
        jne     5f
        call    count_lapics
5:      addl    $8, %edi
        popl    %ecx
        loop    3b

        movl    SMI, %edx                       /* ACPI enable through SMI_CMD */
        movl    ENABLEV, %eax
        outb    %al, %dx
        PRINT   "powering off through the FADT's PM1a_CNT\r\n"
        movl    PM1A_CNT, %edx
        movw    $(5 << 10 | 1 << 13 | 1), %ax
        outw    %ax, %dx
        PRINT   "still running\r\n"
        jmp     halt_forever

/* checksum: %al = sum of %ecx bytes at %esi. */
checksum:
        pushl   %esi
        pushl   %ecx
        xorl    %eax, %eax
1:      addb    (%esi), %al
        incl    %esi
        loop    1b
        popl    %ecx
        popl    %esi
        ret

/* show_table: prints "table SIG len N ok|BAD" for the SDT at %esi. */
show_table:
        pushal
        PRINT   "table "
        movl    $4, %ecx
        movl    %esi, %edi
1:      movb    (%edi), %al
        call    putc
        incl    %edi
        loop    1b
        PRINT   " len "
        movl    4(%esi), %eax
        call    putdec
        movl    4(%esi), %ecx
        call    checksum
        testb   %al, %al
        jnz     2f
        PRINT   " ok\r\n"
        popal
        ret
2:      PRINT   " BAD\r\n"
        popal
        ret

/* count_lapics: prints the number of type-0 entries of the MADT at %esi. */
count_lapics:
        pushal
        xorl    %ebx, %ebx
        movl    4(%esi), %edx
        addl    %esi, %edx                      /* end */
        addl    $44, %esi
1:      cmpl    %edx, %esi
        jae     2f
        cmpb    $0, (%esi)
        jne     3f
        incl    %ebx
3:      movzbl  1(%esi), %eax
        addl    %eax, %esi
        jmp     1b
2:      PRINT   "MADT local APICs "
        movl    %ebx, %eax
        call    putdec
        PRINT   "\r\n"
        popal
        ret
