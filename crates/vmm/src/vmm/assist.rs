//! Instructions PVM's emulator gives up on that a stock Linux kernel uses (`int3`, `fwait`,
//! `clac`/`stac`): decoded with iced-x86 in the vCPU's code size and finished by rhyve, and a
//! readable description of any other instruction KVM could not emulate.

use kvm_ioctls::VcpuFd;

/// What to do for an instruction PVM's emulator gave up on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assist {
    /// Step over it (`fwait`: no x87 exception can be pending here).
    Skip(u8),
    /// `clac`/`stac`: set RFLAGS.AC, then step over it.
    SetAc(bool, u8),
    /// `int3`: step over it and deliver #BP, as the CPU would (a trap: the saved RIP is the
    /// next instruction). Linux's live code patching relies on it.
    Breakpoint(u8),
}

/// The code size (64, 32 or 16) of the segment the vCPU executes in.
pub fn bitness(vcpu: &VcpuFd) -> u32 {
    match vcpu.get_sregs() {
        Ok(s) if s.cs.l != 0 => 64,
        Ok(s) if s.cs.db != 0 => 32,
        Ok(_) => 16,
        Err(_) => 64,
    }
}

/// Decodes the first instruction of `insn` (iced-x86) in a `bitness`-bit code segment; `None`
/// when the bytes do not hold a whole valid instruction.
pub fn decode_insn(insn: &[u8], bitness: u32) -> Option<iced_x86::Instruction> {
    use iced_x86::{Decoder, DecoderOptions};
    let mut d = Decoder::try_new(bitness, insn, DecoderOptions::NONE).ok()?;
    let i = d.decode();
    (!i.is_invalid()).then_some(i)
}

/// The instruction as an assembler would write it (AT&T syntax, as objdump shows Linux code).
pub fn describe_insn(insn: &[u8], bitness: u32) -> String {
    use iced_x86::{Formatter, GasFormatter};
    let bytes: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
    match decode_insn(insn, bitness) {
        Some(i) => {
            let mut text = String::new();
            GasFormatter::new().format(&i, &mut text);
            format!("`{text}` ({})", bytes[..i.len().min(bytes.len())].join(" "))
        }
        None if insn.is_empty() => "no instruction bytes given by KVM".to_string(),
        None => format!("undecodable bytes {}", bytes.join(" ")),
    }
}

/// Decides how to finish an instruction KVM's emulator could not (only the few a stock Linux
/// kernel needs on PVM hosts; prefixes are allowed, as the CPU allows them); anything else is
/// unhandled.
pub fn emulation_assist(insn: &[u8], bitness: u32) -> Option<Assist> {
    use iced_x86::Mnemonic;
    let i = decode_insn(insn, bitness)?;
    let len = u8::try_from(i.len()).ok()?;
    match i.mnemonic() {
        Mnemonic::Int3 => Some(Assist::Breakpoint(len)),
        Mnemonic::Wait => Some(Assist::Skip(len)),
        Mnemonic::Clac => Some(Assist::SetAc(false, len)),
        Mnemonic::Stac => Some(Assist::SetAc(true, len)),
        _ => None,
    }
}

/// Applies an emulation assist to the vCPU's registers (and events, for #BP).
pub fn apply_assist(vcpu: &VcpuFd, a: Assist) -> Result<(), kvm_ioctls::Error> {
    const RFLAGS_AC: u64 = 1 << 18;
    const BP_VECTOR: u8 = 3;
    let mut regs = vcpu.get_regs()?;
    let len = match a {
        Assist::Skip(n) | Assist::Breakpoint(n) => n,
        Assist::SetAc(on, n) => {
            if on {
                regs.rflags |= RFLAGS_AC;
            } else {
                regs.rflags &= !RFLAGS_AC;
            }
            n
        }
    };
    regs.rip = regs.rip.wrapping_add(u64::from(len));
    vcpu.set_regs(&regs)?;
    if let Assist::Breakpoint(_) = a {
        let mut ev = vcpu.get_vcpu_events()?;
        ev.exception.injected = 1;
        ev.exception.nr = BP_VECTOR;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        vcpu.set_vcpu_events(&ev)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_assists_cover_exactly_the_known_instructions() {
        assert_eq!(
            emulation_assist(&[0xcc, 0x90], 64),
            Some(Assist::Breakpoint(1))
        );
        assert_eq!(emulation_assist(&[0x9b], 64), Some(Assist::Skip(1)));
        assert_eq!(emulation_assist(&[0x9b], 16), Some(Assist::Skip(1)));
        assert_eq!(
            emulation_assist(&[0x0f, 0x01, 0xca], 64),
            Some(Assist::SetAc(false, 3))
        );
        assert_eq!(
            emulation_assist(&[0x0f, 0x01, 0xcb, 0xc3], 32),
            Some(Assist::SetAc(true, 3))
        );
        // A prefixed int3 is still int3, and its length counts the prefix.
        assert_eq!(
            emulation_assist(&[0x3e, 0xcc], 64),
            Some(Assist::Breakpoint(2))
        );
        // iret, xrstor, lock cmpxchg16b, int 0x80, a truncated clac, nothing: not ours.
        for insn in [
            &[0xcf][..],
            &[0x48, 0x0f, 0xae, 0x2f],
            &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20],
            &[0xcd, 0x80],
            &[0x0f, 0x01],
            &[],
        ] {
            assert_eq!(emulation_assist(insn, 64), None, "{insn:x?}");
        }
    }

    #[test]
    fn undecodable_or_unemulated_instructions_are_described_for_the_user() {
        assert_eq!(describe_insn(&[0xcf], 32), "`iret` (cf)");
        assert_eq!(describe_insn(&[0x48, 0xcf, 0x90], 64), "`iretq` (48 cf)");
        assert_eq!(describe_insn(&[0x0f, 0x01], 64), "undecodable bytes 0f 01");
        assert_eq!(describe_insn(&[], 64), "no instruction bytes given by KVM");
    }
}
