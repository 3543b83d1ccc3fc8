/*
 * RTC interrupts from the guest's side: routes I/O APIC pin 8 to vector 0x48, counts periodic
 * interrupts at 1024 Hz over one second, then alarm interrupts ("don't care" alarm: every
 * second) over three (seconds timed by the PM timer). The handler reads register C to acknowledge, as an OS must.
 */
#include "rom.h"
#define VEC             0x48
#define COUNT           0x6900
#define IOREGSEL        0xfec00000
#define IOWIN           0xfec00010

        .text
        .code32
        .globl main
main:
        movl    $rtc_handler, %eax
        movl    $VEC, %ecx
        call    set_gate
        /*
         * Mask both 8259s, as an OS using the I/O APIC does: KVM starts the BSP's LINT0 in
         * virtual-wire (ExtINT) mode, so an uninitialised PIC would deliver IRQ 8 as vector 0.
         */
        movb    $0xff, %al
        outb    %al, $0x21
        outb    %al, $0xa1
        movl    $0x20, IOREGSEL                 /* pin 8, low: vector, edge, unmasked */
        movl    $VEC, IOWIN
        movl    $0x21, IOREGSEL                 /* pin 8, high: APIC 0 */
        movl    $0, IOWIN
        movb    $0x0c, %al                      /* clear register C */
        call    cmos_read

        movb    $0x0b, %al                      /* PIE on, 24-hour */
        outb    %al, $0x70
        movb    $0x42, %al
        outb    %al, $0x71
        movl    $0, COUNT
        call    next_second
        movl    $0, COUNT
        sti
        call    next_second
        cli
        movl    COUNT, %eax
        PRINT   "periodic interrupts in one second: "
        call    putdec
        PRINT   "\r\n"

        movb    $0x01, %al                      /* alarm: any hour, minute, second */
        outb    %al, $0x70
        movb    $0xff, %al
        outb    %al, $0x71
        movb    $0x03, %al
        outb    %al, $0x70
        movb    $0xff, %al
        outb    %al, $0x71
        movb    $0x05, %al
        outb    %al, $0x70
        movb    $0xff, %al
        outb    %al, $0x71
        movb    $0x0b, %al                      /* AIE only */
        outb    %al, $0x70
        movb    $0x22, %al
        outb    %al, $0x71
        call    next_second
        movl    $0, COUNT
        sti
        call    next_second
        call    next_second
        call    next_second
        cli
        movl    COUNT, %eax
        PRINT   "alarm interrupts in three seconds: "
        call    putdec
        PRINT   "\r\n"
        movb    $0x0b, %al                      /* all off */
        outb    %al, $0x70
        movb    $0x02, %al
        outb    %al, $0x71
        ret

/*
 * next_second: waits one second by the ACPI PM timer (3.579545 MHz at port 0x408). Its reads
 * are VM exits taken with interrupts enabled, where pending interrupts get injected; CMOS
 * reads would need interrupts off, since the handler uses the CMOS index port too.
 */
next_second:
        pushl   %ebx
        pushl   %edx
        movw    $0x408, %dx
        inl     %dx, %eax
        movl    %eax, %ebx
1:      inl     %dx, %eax
        subl    %ebx, %eax
        cmpl    $3579545, %eax
        jb      1b
        popl    %edx
        popl    %ebx
        ret

rtc_handler:
        pushl   %eax
        incl    COUNT
        movb    $0x0c, %al                      /* read C: acknowledge */
        outb    %al, $0x70
        inb     $0x71, %al
        movl    $0, 0xfee000b0                  /* EOI */
        popl    %eax
        /* Same-privilege return without iret (PVM cannot emulate it; see start.S). */
        pushl   8(%esp)
        popfl
        ret     $8
