//! The kernel ELF inside a bzImage, unpacked by rhyve (`boot.unpack_bzimage`, on by default on
//! PVM hosts). A bzImage is a small setup program plus a compressed payload (boot protocol
//! 2.08+: `payload_offset` at 0x248, `payload_length` at 0x24C, relative to the protected-mode
//! code) that the image's own decompressor unpacks in the guest. On PVM hosts that decompressor
//! runs in KVM's instruction emulator for over a minute; unpacked here it takes milliseconds,
//! and the ELF is entered through its PVH note. LZ4 (Debian's choice) and gzip are handled;
//! other compressors leave the bzImage to boot the ordinary way.

use std::io::Read;

/// The largest kernel ELF rhyve unpacks: a bound against a payload that inflates without end.
const MAX_UNPACKED: usize = 512 << 20;
/// LZ4's legacy frame (what the kernel's `lz4 -l` build produces): this magic, then blocks of
/// a little-endian compressed length and data, each inflating to at most 8 MiB.
const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at.saturating_add(4))
        .and_then(|s| <[u8; 4]>::try_from(s).ok())
        .map(u32::from_le_bytes)
}

/// The compressed payload of a bzImage (`image` is the whole file).
pub fn payload(image: &[u8]) -> Result<&[u8], String> {
    if image.get(0x202..0x206) != Some(b"HdrS") {
        return Err("not a bzImage (no HdrS signature)".into());
    }
    let version = image
        .get(0x206..0x208)
        .and_then(|v| <[u8; 2]>::try_from(v).ok())
        .map(u16::from_le_bytes)
        .unwrap_or(0);
    if version < 0x208 {
        return Err(format!(
            "boot protocol {}.{:02} has no payload fields (2.08 needed)",
            version >> 8,
            version & 0xff
        ));
    }
    // The signature at 0x202 was found, so the file is longer than 0x1f1.
    let setup_sects = match image.get(0x1f1).copied().unwrap_or(0) {
        0 => 4,
        n => usize::from(n),
    };
    // At most 256 sectors of 512 bytes.
    let code = setup_sects.saturating_add(1).saturating_mul(512);
    let (off, len) = match (le32(image, 0x248), le32(image, 0x24c)) {
        (Some(o), Some(l)) => (o as usize, l as usize),
        _ => return Err("truncated setup header".into()),
    };
    code.checked_add(off)
        .and_then(|start| Some((start, start.checked_add(len)?)))
        .and_then(|(start, end)| image.get(start..end))
        .ok_or_else(|| format!("payload ({len} bytes at {off:#x}) runs past the end of the file"))
}

/// Inflates an LZ4 legacy frame (several frames may follow each other). The kernel's build
/// appends the inflated size after the last block: 4 bytes that end the data.
fn lz4_legacy(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while let Some(word) = le32(data, 0) {
        data = data.get(4..).unwrap_or_default();
        if word == LZ4_LEGACY_MAGIC {
            continue;
        }
        if data.is_empty() {
            break; // the appended size
        }
        let len = word as usize;
        let chunk = data
            .get(..len)
            .ok_or_else(|| format!("LZ4 block of {len} bytes is cut short"))?;
        let n = lz4_flex::block::decompress_into(chunk, &mut block)
            .map_err(|e| format!("LZ4 data is corrupt: {e}"))?;
        if out.len().saturating_add(n) > MAX_UNPACKED {
            return Err(format!("unpacks to more than {MAX_UNPACKED} bytes"));
        }
        out.extend_from_slice(block.get(..n).unwrap_or_default());
        data = data.get(len..).unwrap_or_default();
    }
    Ok(out)
}

fn gunzip(data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take((MAX_UNPACKED as u64).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| format!("gzip data is corrupt: {e}"))?;
    if out.len() > MAX_UNPACKED {
        return Err(format!("unpacks to more than {MAX_UNPACKED} bytes"));
    }
    Ok(out)
}

/// The kernel ELF inside `image`: `Ok(None)` when its compressor is not one rhyve unpacks
/// (the bzImage then boots through its own decompressor), an error when the payload is broken.
pub fn unpack(image: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let p = payload(image)?;
    let elf = match p {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(p)?,
        [0x1f, 0x8b, ..] => gunzip(p)?,
        _ => return Ok(None),
    };
    if !elf.starts_with(b"\x7fELF") {
        return Err("the unpacked payload is not an ELF kernel".into());
    }
    Ok(Some(elf))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::arithmetic_side_effects, clippy::indexing_slicing)]
    use super::*;
    use std::io::Write;

    /// A bzImage-shaped file: 1 setup sector + the boot sector, then `payload`.
    fn image(payload: &[u8], version: u16) -> Vec<u8> {
        let mut img = vec![0u8; 2 * 512];
        img[0x1f1] = 1;
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&0x10u32.to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img.extend_from_slice(&[0u8; 0x10]);
        img.extend_from_slice(payload);
        img
    }

    fn elf_like() -> Vec<u8> {
        let mut e = b"\x7fELF".to_vec();
        e.extend((0..200_000u32).map(|i| (i % 251) as u8));
        e
    }

    fn lz4_frame(data: &[u8], blocks: usize) -> Vec<u8> {
        let mut f = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(data.len().div_ceil(blocks)) {
            let c = lz4_flex::block::compress(chunk);
            f.extend_from_slice(&(c.len() as u32).to_le_bytes());
            f.extend_from_slice(&c);
        }
        f.extend_from_slice(&(data.len() as u32).to_le_bytes());
        f
    }

    #[test]
    fn lz4_and_gzip_payloads_unpack_to_the_elf() {
        let elf = elf_like();
        let unpacked = unpack(&image(&lz4_frame(&elf, 3), 0x20f)).expect("lz4");
        assert_eq!(unpacked.as_deref(), Some(&elf[..]));
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&elf).expect("gzip");
        let mut gz = gz.finish().expect("gzip");
        gz.extend_from_slice(&(elf.len() as u32).to_le_bytes());
        let unpacked = unpack(&image(&gz, 0x20f)).expect("gzip");
        assert_eq!(unpacked.as_deref(), Some(&elf[..]));
    }

    #[test]
    fn other_compressors_are_left_to_the_bzimage() {
        // zstd's magic: boot the ordinary way.
        let img = image(&[0x28, 0xb5, 0x2f, 0xfd, 1, 2, 3], 0x20f);
        assert_eq!(unpack(&img), Ok(None));
    }

    #[test]
    fn broken_payloads_are_errors_that_say_why() {
        let elf = elf_like();
        let frame = lz4_frame(&elf, 2);
        // Cut inside the second block.
        let cut = image(&frame[..frame.len() - 100], 0x20f);
        assert!(unpack(&cut).unwrap_err().contains("cut short"));
        // A payload length past the end of the file.
        let mut long = image(&frame, 0x20f);
        long[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(unpack(&long).unwrap_err().contains("past the end"));
        // Old boot protocol, no signature, an unpacked payload that is not ELF.
        assert!(unpack(&image(&frame, 0x207)).unwrap_err().contains("2.08"));
        assert!(unpack(&[0u8; 100]).unwrap_err().contains("not a bzImage"));
        let not_elf = lz4_frame(&[0x55; 5000], 1);
        assert!(unpack(&image(&not_elf, 0x20f))
            .unwrap_err()
            .contains("not an ELF"));
        // Corrupt LZ4 data: a match offset before the start of the output.
        let mut bad = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        bad.extend_from_slice(&3u32.to_le_bytes());
        bad.extend_from_slice(&[0x0f, 0xff, 0xff]);
        bad.extend_from_slice(&[0, 0, 0, 0]);
        assert!(unpack(&image(&bad, 0x20f)).unwrap_err().contains("corrupt"));
        // A header cut right after the version, and a payload offset that would wrap.
        let img = image(&frame, 0x20f);
        assert!(unpack(&img[..0x208])
            .unwrap_err()
            .contains("truncated setup header"));
        let mut wrap = image(&frame, 0x20f);
        wrap[0x248..0x24c].copy_from_slice(&u32::MAX.to_le_bytes());
        wrap[0x1f1] = 0xff;
        assert!(unpack(&wrap).unwrap_err().contains("past the end"));
    }
}
