//! The LPC side of the platform (bhyve `pci_lpc.c`): the legacy devices' fixed resources. What
//! `-l` accepts and how it lands in the config tree is `emulations::lpc`.

/// The legacy COM ports: name, I/O base, ISA IRQ (bhyve `pci_lpc.c` / `uart_emul.c`).
pub const COM_PORTS: [(&str, u16, u32); 4] = [
    ("com1", 0x3f8, 4),
    ("com2", 0x2f8, 3),
    ("com3", 0x3e8, 4),
    ("com4", 0x2e8, 3),
];
