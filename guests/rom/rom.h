/* Constants shared by the test-guest ROMs. */
#define COM1            0x3f8
#define RESET_CS        0x500
#define RESET_IP        0x502
#define IDT_BASE        0x1000
#define IDTR            0x0ff0          /* the IDT descriptor (limit, base) */
#define GDT_RAM         0x0800
#define STACK_TOP       0x7000
#define COUNTER         0x6000

/* PRINT "text": print a string literal on COM1. */
        .macro PRINT text
        .pushsection .rodata
9999:   .asciz "\text"
        .popsection
        pushl   %esi
        movl    $9999b, %esi
        call    puts
        popl    %esi
        .endm

/* SHOW "label": print a label, %eax as 8 hex digits, and a line end (clobbers %ecx). */
        .macro SHOW text
        PRINT "\text"
        movl    $8, %ecx
        call    puthex
        PRINT "\r\n"
        .endm
