/* The demo guest: greets on COM1, reports how it started and what the platform told it, resets. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        PRINT "Hello from the rhyve test guest!\r\n"
        PRINT "reset vector: CS="
        movzwl  RESET_CS, %eax
        movl    $4, %ecx
        call    puthex
        PRINT " IP="
        movzwl  RESET_IP, %eax
        call    puthex
        PRINT "\r\nmemory: "
        /* CMOS 0x34/0x35: 64 KiB units above 16 MiB; 0x5b-0x5d: 64 KiB units above 4 GiB. */
        movb    $0x35, %al
        call    cmos_read
        movb    %al, %ah
        movb    $0x34, %al
        call    cmos_read
        movzwl  %ax, %eax
        shrl    $4, %eax
        addl    $16, %eax
        movl    %eax, %ebx
        movb    $0x5d, %al
        call    cmos_read
        movzbl  %al, %edx
        shll    $16, %edx
        movb    $0x5c, %al
        call    cmos_read
        movb    %al, %dh
        movb    $0x5b, %al
        call    cmos_read
        movb    %al, %dl
        shrl    $4, %edx
        leal    (%ebx,%edx), %eax
        call    putdec
        PRINT " MiB\r\ntime: 20"
        movb    $0x09, %al
        call    rtc_field
        PRINT "-"
        movb    $0x08, %al
        call    rtc_field
        PRINT "-"
        movb    $0x07, %al
        call    rtc_field
        PRINT " "
        movb    $0x04, %al
        call    rtc_field
        PRINT ":"
        movb    $0x02, %al
        call    rtc_field
        PRINT ":"
        movb    $0x00, %al
        call    rtc_field
        PRINT " (RTC)\r\nresetting through port 0xcf9\r\n"
        ret

/* Print the BCD RTC register %al as two digits. */
rtc_field:
        call    cmos_read
        movzbl  %al, %eax
        movl    $2, %ecx
        call    puthex
        ret
