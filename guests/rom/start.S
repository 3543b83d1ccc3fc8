/*
 * Runtime shared by rhyve's test-guest ROMs: reset vector -> 16-bit start -> flat 32-bit
 * protected mode -> main(). Serial output on COM1, exception reporting, and the helpers the
 * tests use. Each ROM supplies `main` (32-bit, returns to reset the machine via port 0xCF9).
 *
 * RAM used: 0x500 reset CS, 0x502 reset IP, 0x800 GDT, 0xff0 IDT descriptor, 0x1000 IDT, 0x7000 stack top.
 */
#include "rom.h"

        .section .reset, "ax"
        .code16
        .globl reset_vector
reset_vector:
        outb    %al, $0x80              /* first guest instruction: the boot-timer mark */
        movw    %cs, %ax
        call    1f
1:      popw    %bx                     /* IP of label 1: proves where the CPU started */
        jmp     start16
        .fill   16 - (. - reset_vector), 1, 0xf4

        .section .text.start, "ax"
        .code16
rom_start:
start16:
        cli
        xorw    %cx, %cx
        movw    %cx, %ds
        movw    %ax, RESET_CS
        subw    $(1b - reset_vector), %bx
        movw    %bx, RESET_IP
        /* The GDT is copied to RAM: descriptor loads then never read the ROM slot. */
        movw    $(gdt_end - gdt), %cx
        movw    $(gdt - rom_start), %si
        movw    $GDT_RAM, %di
        cld
        rep movsb %cs:(%si), %es:(%di)
        lgdtl   %cs:(gdt_desc - rom_start)
        movl    %cr0, %eax
        orl     $1, %eax
        movl    %eax, %cr0
        ljmpl   $0x08, $start32

        .code32
start32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movw    %ax, %fs
        movw    %ax, %gs
        movl    $STACK_TOP, %esp
        call    setup_idt
        call    main
        .globl  reset_cf9
reset_cf9:
        movb    $0x06, %al
        movw    $0xcf9, %dx
        outb    %al, %dx
        .globl  halt_forever
halt_forever:
        cli
        hlt
        jmp     halt_forever

        .p2align 3
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff      /* 0x08: flat 32-bit code */
        .quad   0x00cf92000000ffff      /* 0x10: flat 32-bit data */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   GDT_RAM

/* putc: print %al on COM1, waiting for the transmitter to be empty. */
        .globl  putc
putc:
        pushl   %edx
        pushl   %eax
        movw    $COM1 + 5, %dx
1:      inb     %dx, %al
        testb   $0x20, %al
        jz      1b
        popl    %eax
        movw    $COM1, %dx
        outb    %al, %dx
        popl    %edx
        ret

/* puts: print the NUL-terminated string at %esi. */
        .globl  puts
puts:
        pushl   %eax
        pushl   %esi
1:      lodsb
        testb   %al, %al
        jz      2f
        call    putc
        jmp     1b
2:      popl    %esi
        popl    %eax
        ret

/* puthex: print %eax as %ecx hex digits. */
        .globl  puthex
puthex:
        pushal
        movl    %eax, %edx
        shll    $2, %ecx
1:      subl    $4, %ecx
        movl    %edx, %eax
        shrl    %cl, %eax
        andl    $0xf, %eax
        movb    hexdigits(%eax), %al
        call    putc
        testl   %ecx, %ecx
        jnz     1b
        popal
        ret

/* putdec: print %eax in decimal. */
        .globl  putdec
putdec:
        pushal
        movl    $10, %ebx
        xorl    %ecx, %ecx
1:      xorl    %edx, %edx
        divl    %ebx
        pushl   %edx
        incl    %ecx
        testl   %eax, %eax
        jnz     1b
2:      popl    %eax
        addb    $'0', %al
        call    putc
        loop    2b
        popal
        ret

/* cmos_read: %al = CMOS register %al. */
        .globl  cmos_read
cmos_read:
        outb    %al, $0x70
        inb     $0x71, %al
        ret

hexdigits:
        .ascii  "0123456789abcdef"

/* Exceptions: one stub per vector pushes (error code,) vector, then the common handler. */
        .macro  exc_stub vec
exc_\vec:
        .if (\vec == 8) || (\vec >= 10 && \vec <= 14) || (\vec == 17)
        .else
        pushl   $0
        .endif
        pushl   $\vec
        jmp     exc_common
        .endm

        .altmacro
        .set    vec, 0
        .rept   32
        exc_stub %vec
        .set    vec, vec + 1
        .endr

        .macro  exc_addr vec
        .long   exc_\vec
        .endm
exc_table:
        .set    vec, 0
        .rept   32
        exc_addr %vec
        .set    vec, vec + 1
        .endr

/*
 * A #GP on rdmsr/wrmsr is what the MSR test expects: say so and skip the instruction.
 * Anything else is reported with its vector and EIP, and the CPU stops.
 */
exc_common:
        pushl   %eax                    /* 0: eax, 4: vector, 8: error code, 12: EIP */
        cmpl    $13, 4(%esp)
        jne     1f
        movl    12(%esp), %eax
        movw    (%eax), %ax
        cmpw    $0x320f, %ax            /* rdmsr */
        je      2f
        cmpw    $0x300f, %ax            /* wrmsr */
        jne     1f
2:      pushl   %esi
        movl    $msg_gp, %esi
        call    puts
        popl    %esi
        addl    $2, 12(%esp)
        popl    %eax
        addl    $8, %esp
        /*
         * Same-privilege return without iret, which PVM's instruction emulator cannot run
         * (KVM_EXIT_INTERNAL_ERROR): restore EFLAGS, then pop EIP and drop CS and EFLAGS.
         */
        pushl   8(%esp)
        popfl
        ret     $8
1:      movl    $msg_exc, %esi
        call    puts
        movl    4(%esp), %eax
        movl    $2, %ecx
        call    puthex
        movl    $msg_eip, %esi
        call    puts
        movl    12(%esp), %eax
        movl    $8, %ecx
        call    puthex
        movl    $msg_crlf, %esi
        call    puts
        jmp     halt_forever

/*
 * set_gate: interrupt gate for vector %ecx to handler %eax, and an IDT limit that covers it.
 * Also turns the LAPIC on (spurious vector 0xff) with TPR 0, so the vector can arrive.
 */
        .globl  set_gate
set_gate:
        pushal
        leal    IDT_BASE(,%ecx,8), %edi
        movw    %ax, (%edi)
        movw    $0x08, 2(%edi)
        movw    $0x8e00, 4(%edi)
        shrl    $16, %eax
        movw    %ax, 6(%edi)
        leal    7(,%ecx,8), %eax
        cmpw    IDTR, %ax
        jbe     1f
        movw    %ax, IDTR
        lidt    IDTR
1:      movl    $0x1ff, 0xfee000f0
        movl    $0, 0xfee00080
        popal
        ret

/* setup_idt: 32 interrupt gates at IDT_BASE pointing to the stubs. */
setup_idt:
        pushal
        movl    $IDT_BASE, %edi
        xorl    %ecx, %ecx
1:      movl    exc_table(,%ecx,4), %eax
        movw    %ax, (%edi)
        movw    $0x08, 2(%edi)
        movw    $0x8e00, 4(%edi)
        shrl    $16, %eax
        movw    %ax, 6(%edi)
        addl    $8, %edi
        incl    %ecx
        cmpl    $32, %ecx
        jne     1b
        /* The IDT descriptor lives in RAM so set_gate can extend its limit. */
        movw    $(32 * 8 - 1), IDTR
        movl    $IDT_BASE, IDTR + 2
        lidt    IDTR
        popal
        ret

msg_gp:   .asciz "#GP\r\n"
msg_exc:  .asciz "EXC "
msg_eip:  .asciz " EIP "
        .globl  msg_crlf
msg_crlf: .asciz "\r\n"
