/* Does nothing and resets: the fixed cost a benchmark subtracts. */
#include "rom.h"
        .text
        .code32
        .globl main
main:
        ret
