//! Functions of a stripped executable, found by their call-frame information.
//!
//! Debian's executables carry no `.symtab`: without the `-dbgsym` package, `record` would
//! find none of their functions. Every function the compiler emits still has an FDE in
//! `.eh_frame` (the unwinder needs one to throw through it, and `-fasynchronous-unwind-tables`
//! is the x86-64 default): its start address and length. An FDE also starts where a
//! function's split-off part begins (GCC's `.cold` fragments, entered by a jump), so only
//! those whose first row says "just called" are taken: the CFA is `rsp + 8` and the return
//! address is at CFA − 8, which is exactly what a `call` leaves and what the tracers rely
//! on when they find the return address at `[rsp]` on entry. (A fragment entered before
//! its function pushed anything looks the same; its `[rsp]` is then the function's own
//! return address, which keeps a return hook's nesting consistent.) See the System V
//! x86-64 ABI, "DWARF Definition" and "Unwind Library Interface", and the `.eh_frame`
//! format in the Linux Standard Base Core specification.
//!
//! The functions are named `sub_<link-time address in hex>`, as disassemblers name
//! unnamed code.

use std::fs::File;
use std::path::Path;

use gimli::{
    BaseAddresses, CfaRule, CieOrFde, EhFrame, LittleEndian, RegisterRule, UnwindContext, UnwindSection, X86_64,
};
use object::read::ReadCache;
use object::{Object, ObjectSection, SectionKind};

use crate::elf::RawSymbol;

/// [`functions`] of the file at `path` (only its headers and `.eh_frame` are read), less
/// those that start inside a function `known` already names. None if it cannot be read.
pub(crate) fn functions_of(path: &Path, known: &[RawSymbol]) -> Vec<RawSymbol> {
    let Ok(file) = File::open(path) else { return Vec::new() };
    let cache = ReadCache::new(file);
    let mut found = functions(&cache);
    found.retain(|f| !known.iter().any(|k| k.value <= f.value && f.value < k.value + k.size.max(1)));
    found
}

/// The functions the `.eh_frame` of the ELF image `data` describes that start "just
/// called" (see the module documentation) inside a section of code named `.text*`,
/// sorted by address, without duplicates. An image without `.eh_frame` gives none; a
/// corrupt one gives those read before the damage.
pub(crate) fn functions<'d, R: object::ReadRef<'d>>(data: R) -> Vec<RawSymbol> {
    let Ok(file) = object::File::parse(data) else { return Vec::new() };
    let Some(section) = file.section_by_name(".eh_frame") else { return Vec::new() };
    let Ok(bytes) = section.data() else { return Vec::new() };
    let text: Vec<(u64, u64)> = file
        .sections()
        .filter(|s| s.kind() == SectionKind::Text && s.name().is_ok_and(|n| n.starts_with(".text")))
        .map(|s| (s.address(), s.address() + s.size()))
        .collect();
    let mut eh_frame = EhFrame::new(bytes, LittleEndian);
    eh_frame.set_address_size(8);
    let bases = BaseAddresses::default().set_eh_frame(section.address());
    let mut context = Box::new(UnwindContext::new());
    let mut found = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        let CieOrFde::Fde(partial) = entry else { continue };
        let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else { continue };
        let (start, len) = (fde.initial_address(), fde.len());
        if len == 0 || !text.iter().any(|&(lo, hi)| lo <= start && start < hi) {
            continue;
        }
        let Ok(mut rows) = fde.rows(&eh_frame, &bases, &mut context) else { continue };
        let Ok(Some(row)) = rows.next_row() else { continue };
        let just_called = matches!(row.cfa(), CfaRule::RegisterAndOffset { register, offset: 8 } if *register == X86_64::RSP)
            && matches!(row.register(X86_64::RA), Some(RegisterRule::Offset(-8)));
        if just_called {
            found.push(RawSymbol {
                mangled: format!("sub_{start:x}"),
                value: start,
                size: len,
                global: false,
                ifunc: false,
            });
        }
    }
    found.sort_by_key(|s| s.value);
    found.dedup_by_key(|s| s.value);
    found
}
