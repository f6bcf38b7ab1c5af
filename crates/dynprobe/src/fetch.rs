//! Evaluating fetch arguments at a hit: registers, arguments, the stack, memory, strings.
//!
//! A hit runs inside a probe handler — a `SIGTRAP` handler or a detour of whatever thread
//! reached the probe, possibly in the middle of `malloc` — so nothing here allocates, locks
//! or faults. Each [`Fetch`] tree is compiled once, when the probe is placed, into a
//! [`FetchProgram`]: a base value and a fixed array of memory reads (a fetch nests in a
//! line, `+8(+0($arg1))`, so a tree of them is a list). Memory is read through a
//! [`TargetMemory`], which reports an unreadable byte instead of faulting: [`SelfMemory`]
//! for the process the code runs in, another implementation for a process traced from
//! outside (ptrace).
//!
//! ```
//! use dynprobe::fetch::{FetchProgram, HitContext, TargetMemory, Value};
//! use dynprobe::spec::ProbeSpec;
//! use dynprobe::Regs;
//!
//! /// Memory holding 0x1000 → [7, 0, 0, 0], nothing else.
//! struct Fake;
//! impl TargetMemory for Fake {
//!     fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
//!         let mem = [7u8, 0, 0, 0];
//!         let Some(at) = addr.checked_sub(0x1000) else { return false };
//!         let Some(src) = mem.get(at as usize..at as usize + buf.len()) else { return false };
//!         buf.copy_from_slice(src);
//!         true
//!     }
//!     fn thread_name(&self, _tid: u64, _buf: &mut [u8; 16]) -> usize { 0 }
//! }
//!
//! let spec = ProbeSpec::parse("p:f n=+0($arg1):u32 bad=+8($arg1)").unwrap();
//! let regs = Regs { rdi: 0x1000, ..Regs::default() };
//! let ctx = HitContext::entry(&regs, &Fake, 42);
//! let mut buf = [0u8; dynprobe::spec::STRING_MAX];
//! let program = |i: usize| FetchProgram::new(&spec.args[i].fetch, spec.args[i].ty, spec.kind, &mut Default::default());
//! assert_eq!(program(0).unwrap().eval(&ctx, &mut buf), Value::Int(7));
//! assert_eq!(program(1).unwrap().eval(&ctx, &mut buf), Value::Fault);
//! ```

use crate::line::PathText;
use crate::spec::{Address, Fetch, FetchType, ProbeKind, Reg, MAX_ARG, MAX_DEREF, STRING_MAX};
use crate::{Regs, DATA_WORDS};

/// The memory and thread names of the process a probe fired in.
pub trait TargetMemory {
    /// Reads `buf.len()` bytes at `addr`; false if any byte is unreadable (never faults).
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool;
    /// The thread's name (`comm`), up to 16 bytes, into `buf`; returns the length (0 when
    /// it cannot be read).
    fn thread_name(&self, tid: u64, buf: &mut [u8; 16]) -> usize;
}

/// The process this code runs in: memory through `process_vm_readv` on itself, which
/// reports an unmapped or unreadable page as an error instead of raising `SIGSEGV`; thread
/// names with `prctl(PR_GET_NAME)` for the calling thread, `/proc/self/task/TID/comm` for
/// another. Every call is async-signal-safe and leaves `errno` as it found it.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelfMemory;

impl TargetMemory for SelfMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        if buf.is_empty() {
            return true;
        }
        // A raw process_vm_readv: the kernel checks the range and fails with EFAULT instead
        // of touching an unmapped page, and the program's probes on libc never see it.
        dynprobe_probe::raw::read(addr, buf)
    }

    fn thread_name(&self, tid: u64, buf: &mut [u8; 16]) -> usize {
        // Raw system calls, not the C library's wrappers: those may carry the program's
        // probes, and they write `errno`, which the interrupted code may be about to read.
        use dynprobe_probe::raw::syscall4;
        if tid == gettid() {
            // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into `buf`.
            if unsafe { syscall4(libc::SYS_prctl, libc::PR_GET_NAME as u64, buf.as_mut_ptr() as u64, 0, 0) } != 0 {
                return 0;
            }
            return buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        }
        let mut path = PathText::new();
        path.bytes(b"/proc/self/task/").dec(tid).bytes(b"/comm");
        let Some(path) = path.c_str() else { return 0 };
        let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u64;
        // SAFETY: `path` is a NUL-terminated string on our stack.
        let fd = unsafe { syscall4(libc::SYS_openat, libc::AT_FDCWD as u64, path.as_ptr() as u64, flags, 0) };
        if fd < 0 {
            return 0;
        }
        // SAFETY: `buf` is writable for its 16 bytes; `fd` is the descriptor just opened.
        let n = unsafe { syscall4(libc::SYS_read, fd as u64, buf.as_mut_ptr() as u64, buf.len() as u64, 0) };
        // SAFETY: closes the descriptor opened above, ours alone.
        unsafe { syscall4(libc::SYS_close, fd as u64, 0, 0, 0) };
        let n = usize::try_from(n).unwrap_or(0);
        // The file ends with a newline.
        buf[..n].iter().position(|&b| b == b'\n' || b == 0).unwrap_or(n)
    }
}

/// The calling thread's id (the `gettid` system call is async-signal-safe).
pub fn gettid() -> u64 {
    dynprobe_probe::raw::gettid() as u64
}

/// Everything a fetch may read at one hit.
pub struct HitContext<'a> {
    /// The registers at the hit (at a return: those [`crate::ReturnProbe::on_return`]
    /// sees).
    pub regs: &'a Regs,
    /// The process's memory.
    pub target: &'a dyn TargetMemory,
    /// The thread that hit the probe.
    pub tid: u64,
    /// `Some` at a return probe's return: the value returned.
    pub retval: Option<u64>,
    /// The values a return spec fetched at the entry ([`EventFormat::save_entry`](crate::line::EventFormat::save_entry)).
    pub entry: &'a [u64],
    /// `Some` at a return probe's return: nanoseconds since the call's entry.
    pub duration_ns: Option<u64>,
    /// The low 64 bits of xmm0–15 at the hit ([`crate::hit_xmm`] in a handler of a probe
    /// that [reads them](crate::Probe::reads_vectors)); `None`: `%xmmN` reads as a fault.
    pub xmm: Option<&'a [u64; 16]>,
}

impl<'a> HitContext<'a> {
    /// The context of an entry (`p`) hit, or of a return probe's entry.
    pub fn entry(regs: &'a Regs, target: &'a dyn TargetMemory, tid: u64) -> HitContext<'a> {
        HitContext { regs, target, tid, retval: None, entry: &[], duration_ns: None, xmm: None }
    }
}

/// How many values a return spec can keep from the entry to the return: a return probe's
/// data area less the word that holds the entry time.
pub const ENTRY_VALUES: usize = DATA_WORDS - 1;
// Every `$argN` can be kept.
const _: () = assert!(MAX_ARG as usize <= ENTRY_VALUES);

/// The `$argN`s a return spec fetches at the entry, in the order they are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EntryValues {
    args: [u8; MAX_ARG as usize],
    len: u8,
}

impl EntryValues {
    /// The index `$argN` is kept at, added if new.
    fn slot(&mut self, n: u8) -> u8 {
        let len = usize::from(self.len);
        match self.args[..len].iter().position(|&a| a == n) {
            Some(i) => i as u8,
            None => {
                self.args[len] = n;
                self.len += 1;
                len as u8
            }
        }
    }

    /// How many values are kept.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Fills `out[..len()]` from the entry's registers (as far as `out` reaches).
    pub fn save(&self, regs: &Regs, out: &mut [u64]) {
        for (slot, &n) in out.iter_mut().zip(&self.args[..self.len()]) {
            *slot = regs.arg(usize::from(n) - 1);
        }
    }
}

/// One fetched value, as printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'b> {
    /// An integer, not yet truncated to its type (see [`crate::spec::IntType::apply`]).
    Int(u64),
    /// A string's bytes, without the NUL; cut at [`STRING_MAX`] bytes.
    Str(&'b [u8]),
    /// A memory read failed (the kernel's `(fault)`).
    Fault,
}

/// Where a fetch starts, before its memory reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Base {
    Reg(Reg),
    /// `$argN` read from the registers (1-based).
    Arg(u8),
    /// `$argN` kept from a return probe's entry: its index in [`HitContext::entry`].
    Entry(u8),
    Retval,
    StackPointer,
    Const(u64),
    Comm,
    Duration,
}

/// A fetch argument compiled for evaluation at a hit: built once, read-only afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchProgram {
    base: Base,
    /// The offsets of the memory reads, innermost first.
    reads: [i64; MAX_DEREF],
    nreads: u8,
    ty: FetchType,
}

impl FetchProgram {
    /// Compiles `fetch` of a probe of `kind`. In a return probe `$argN` becomes a value kept
    /// from the entry, given a slot in `entry`. Refuses what the probe cannot provide
    /// (`$retval` at an entry, registers a return does not know) and an `@SYMBOL` not yet
    /// resolved.
    pub fn new(fetch: &Fetch, ty: FetchType, kind: ProbeKind, entry: &mut EntryValues) -> Result<FetchProgram, String> {
        let mut reads = [0i64; MAX_DEREF];
        let mut nreads = 0;
        let mut push = |offset: i64| -> Result<(), String> {
            *reads.get_mut(nreads).ok_or_else(|| format!("memory fetches nest at most {MAX_DEREF} deep"))? = offset;
            nreads += 1;
            Ok(())
        };
        let mut at = fetch;
        let base = loop {
            match at {
                Fetch::Deref { offset, base } => {
                    push(*offset)?;
                    at = base;
                }
                Fetch::Stack(n) => {
                    push(i64::from(*n) * 8)?;
                    break Base::StackPointer;
                }
                Fetch::Memory(Address::Absolute(addr)) => {
                    push(0)?;
                    break Base::Const(*addr);
                }
                Fetch::Memory(Address::Symbol { symbol, .. }) => {
                    return Err(format!("`@{symbol}` is not resolved (ProbeSpec::resolve_symbols was not called)"))
                }
                Fetch::Reg(reg) if kind == ProbeKind::Return && !reg.known_at_return() => {
                    return Err(format!("register {reg:?} is not known at a return"))
                }
                Fetch::Reg(reg) => break Base::Reg(*reg),
                Fetch::Arg(n) if !(1..=MAX_ARG).contains(n) => return Err(format!("`$arg{n}` is not an argument")),
                Fetch::Arg(n) => match kind {
                    ProbeKind::Entry => break Base::Arg(*n),
                    ProbeKind::Return => break Base::Entry(entry.slot(*n)),
                    // A marker's arguments are where its site's record says, not in fixed
                    // registers: `marker::spec_for_site` puts that place in `$argN`'s stead.
                    ProbeKind::Marker => {
                        return Err(format!("`$arg{n}` of a marker is not resolved (marker::spec_for_site)"))
                    }
                },
                Fetch::Retval | Fetch::Duration if kind != ProbeKind::Return => {
                    return Err("`$retval` and `$duration` are only available in return probes".to_string())
                }
                Fetch::Retval => break Base::Retval,
                Fetch::Duration => break Base::Duration,
                Fetch::Var(var) => {
                    return Err(format!("the variable `{var}` is not resolved (the CLI lowers it with the DWARF)"))
                }
                Fetch::StackPointer => break Base::StackPointer,
                Fetch::Comm => break Base::Comm,
            }
        };
        if matches!(base, Base::Comm | Base::Duration) && nreads > 0 {
            return Err("`$comm` and `$duration` cannot be dereferenced".to_string());
        }
        reads[..nreads].reverse();
        Ok(FetchProgram { base, reads, nreads: nreads as u8, ty })
    }

    /// The type the value is printed as.
    pub fn ty(&self) -> FetchType {
        self.ty
    }

    /// The value at this hit; a string is read into `buf`.
    pub fn eval<'b>(&self, ctx: &HitContext, buf: &'b mut [u8; STRING_MAX]) -> Value<'b> {
        let mut value = match self.base {
            Base::Reg(reg) => match reg.xmm() {
                None => register(reg, ctx.regs),
                Some(n) => match ctx.xmm {
                    Some(xmm) => xmm[n],
                    None => return Value::Fault,
                },
            },
            Base::Arg(n) => ctx.regs.arg(usize::from(n) - 1),
            Base::Entry(i) => match ctx.entry.get(usize::from(i)) {
                Some(&v) => v,
                None => return Value::Fault,
            },
            Base::Retval => match ctx.retval {
                Some(v) => v,
                None => return Value::Fault,
            },
            Base::Duration => match ctx.duration_ns {
                Some(v) => v,
                None => return Value::Fault,
            },
            Base::StackPointer => ctx.regs.rsp,
            Base::Const(v) => v,
            Base::Comm => {
                let mut name = [0u8; 16];
                let n = ctx.target.thread_name(ctx.tid, &mut name).min(name.len());
                buf[..n].copy_from_slice(&name[..n]);
                return Value::Str(&buf[..n]);
            }
        };
        let reads = &self.reads[..usize::from(self.nreads)];
        for (i, &offset) in reads.iter().enumerate() {
            let addr = value.wrapping_add_signed(offset);
            let last = i + 1 == reads.len();
            value = match self.ty {
                // A string fetch reads the string where its last read would have read.
                FetchType::String | FetchType::UString if last => return read_string(ctx.target, addr, buf),
                FetchType::Int(int) if last => match read_int(ctx.target, addr, int.bytes()) {
                    Some(v) => v,
                    None => return Value::Fault,
                },
                FetchType::Float(bits) if last => match read_int(ctx.target, addr, usize::from(bits / 8)) {
                    Some(v) => v,
                    None => return Value::Fault,
                },
                _ => match read_int(ctx.target, addr, 8) {
                    Some(v) => v,
                    None => return Value::Fault,
                },
            };
        }
        match self.ty {
            FetchType::Int(_) | FetchType::Float(_) => Value::Int(value),
            // No memory read: the value is the string's address.
            FetchType::String | FetchType::UString => read_string(ctx.target, value, buf),
        }
    }
}

/// A little-endian integer of `bytes` (at most 8) bytes at `addr`.
fn read_int(target: &dyn TargetMemory, addr: u64, bytes: usize) -> Option<u64> {
    let mut raw = [0u8; 8];
    target.read(addr, &mut raw[..bytes]).then(|| u64::from_le_bytes(raw))
}

/// Reads never cross this boundary: a string may end just before an unmapped page, which a
/// read spanning both would report as a fault. The smallest page size of any x86-64 or
/// arm64 Linux; larger pages only make fewer real boundaries.
const READ_CHUNK: u64 = 4096;

/// The NUL-terminated string at `addr`, into `buf`: cut at [`STRING_MAX`] bytes, a fault if
/// a byte before its end cannot be read.
fn read_string<'b>(target: &dyn TargetMemory, addr: u64, buf: &'b mut [u8; STRING_MAX]) -> Value<'b> {
    let mut len = 0;
    while len < buf.len() {
        let Some(at) = addr.checked_add(len as u64) else { return Value::Fault };
        let to_boundary = (READ_CHUNK - at % READ_CHUNK) as usize;
        let chunk = to_boundary.min(buf.len() - len);
        if !target.read(at, &mut buf[len..len + chunk]) {
            return Value::Fault;
        }
        if let Some(nul) = buf[len..len + chunk].iter().position(|&b| b == 0) {
            return Value::Str(&buf[..len + nul]);
        }
        len += chunk;
    }
    Value::Str(&buf[..])
}

/// The general register's value (0 for a vector register, which `Regs` does not hold).
pub fn register(reg: Reg, regs: &Regs) -> u64 {
    match reg {
        Reg::Rax => regs.rax,
        Reg::Rbx => regs.rbx,
        Reg::Rcx => regs.rcx,
        Reg::Rdx => regs.rdx,
        Reg::Rsi => regs.rsi,
        Reg::Rdi => regs.rdi,
        Reg::Rbp => regs.rbp,
        Reg::Rsp => regs.rsp,
        Reg::R8 => regs.r8,
        Reg::R9 => regs.r9,
        Reg::R10 => regs.r10,
        Reg::R11 => regs.r11,
        Reg::R12 => regs.r12,
        Reg::R13 => regs.r13,
        Reg::R14 => regs.r14,
        Reg::R15 => regs.r15,
        Reg::Rip => regs.ip,
        Reg::Rflags => regs.rflags,
        // Not in `Regs`: a hit's vector registers are `HitContext::xmm`.
        Reg::Xmm0
        | Reg::Xmm1
        | Reg::Xmm2
        | Reg::Xmm3
        | Reg::Xmm4
        | Reg::Xmm5
        | Reg::Xmm6
        | Reg::Xmm7
        | Reg::Xmm8
        | Reg::Xmm9
        | Reg::Xmm10
        | Reg::Xmm11
        | Reg::Xmm12
        | Reg::Xmm13
        | Reg::Xmm14
        | Reg::Xmm15 => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ProbeSpec;
    use std::cell::RefCell;

    /// Memory made of pages that exist (4 KiB each, zero-filled unless written) and every
    /// read made, to check that reads never span an unreadable page.
    #[derive(Default)]
    struct Fake {
        pages: Vec<(u64, Box<[u8; 4096]>)>,
        reads: RefCell<Vec<(u64, usize)>>,
    }

    impl Fake {
        fn write(&mut self, addr: u64, bytes: &[u8]) {
            for (i, &b) in bytes.iter().enumerate() {
                let at = addr + i as u64;
                let page = at & !0xfff;
                if !self.pages.iter().any(|(p, _)| *p == page) {
                    self.pages.push((page, Box::new([0; 4096])));
                }
                let (_, data) = self.pages.iter_mut().find(|(p, _)| *p == page).unwrap();
                data[(at & 0xfff) as usize] = b;
            }
        }

        fn byte(&self, addr: u64) -> Option<u8> {
            let (_, data) = self.pages.iter().find(|(p, _)| *p == addr & !0xfff)?;
            Some(data[(addr & 0xfff) as usize])
        }
    }

    impl TargetMemory for Fake {
        fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
            self.reads.borrow_mut().push((addr, buf.len()));
            for (i, out) in buf.iter_mut().enumerate() {
                match self.byte(addr + i as u64) {
                    Some(b) => *out = b,
                    None => return false,
                }
            }
            true
        }

        fn thread_name(&self, tid: u64, buf: &mut [u8; 16]) -> usize {
            let name = format!("worker-{tid}");
            buf[..name.len()].copy_from_slice(name.as_bytes());
            name.len()
        }
    }

    /// The value of field `field` of `spec` at a hit with `ctx`, as owned data.
    fn eval(spec: &str, field: usize, ctx: &HitContext) -> Result<Owned, String> {
        let spec = ProbeSpec::parse(spec).unwrap();
        let arg = &spec.args[field];
        let program = FetchProgram::new(&arg.fetch, arg.ty, spec.kind, &mut EntryValues::default())?;
        let mut buf = [0u8; STRING_MAX];
        Ok(match program.eval(ctx, &mut buf) {
            Value::Int(v) => Owned::Int(v),
            Value::Str(s) => Owned::Str(s.to_vec()),
            Value::Fault => Owned::Fault,
        })
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Owned {
        Int(u64),
        Str(Vec<u8>),
        Fault,
    }

    fn s(text: &[u8]) -> Owned {
        Owned::Str(text.to_vec())
    }

    /// A struct at 0x1000 { u64 a = 0x1122334455667788; i32 b = -3; char *name = 0x2000 },
    /// "hello" at 0x2000, a pointer to the struct at 0x3000, a string running up to the
    /// last byte of a page at 0x5ffc ("abc" then the page ends, unterminated), and the
    /// stack at 0x7000.
    fn memory() -> Fake {
        let mut m = Fake::default();
        m.write(0x1000, &0x1122_3344_5566_7788u64.to_le_bytes());
        m.write(0x1008, &(-3i32).to_le_bytes());
        m.write(0x1010, &0x2000u64.to_le_bytes());
        m.write(0x2000, b"hello\0");
        m.write(0x3000, &0x1000u64.to_le_bytes());
        m.write(0x4ffd, b"ok\0");
        m.write(0x5ffc, b"abcd");
        m.write(0x7000, &0x40_1234u64.to_le_bytes());
        m.write(0x7008, &7u64.to_le_bytes());
        m
    }

    fn regs() -> Regs {
        Regs { rdi: 0x1000, rsi: 0x2000, rdx: 0x3000, rax: 42, rsp: 0x7000, ip: 0x40_0000, ..Regs::default() }
    }

    #[test]
    fn registers_arguments_and_the_stack() {
        let (m, regs) = (memory(), regs());
        let ctx = HitContext::entry(&regs, &m, 9);
        let spec = "p f a=$arg1 b=%rax c=$stack0 d=$stack1 e=$stack f=$stack2 g=%rip";
        assert_eq!(eval(spec, 0, &ctx), Ok(Owned::Int(0x1000)));
        assert_eq!(eval(spec, 1, &ctx), Ok(Owned::Int(42)));
        assert_eq!(eval(spec, 2, &ctx), Ok(Owned::Int(0x40_1234)));
        assert_eq!(eval(spec, 3, &ctx), Ok(Owned::Int(7)));
        assert_eq!(eval(spec, 4, &ctx), Ok(Owned::Int(0x7000)));
        // 0x7010 is on the page but was never written: zero, not a fault.
        assert_eq!(eval(spec, 5, &ctx), Ok(Owned::Int(0)));
        assert_eq!(eval(spec, 6, &ctx), Ok(Owned::Int(0x40_0000)));
        for n in 1..=6u8 {
            let regs = Regs { rdi: 1, rsi: 2, rdx: 3, rcx: 4, r8: 5, r9: 6, ..Regs::default() };
            let ctx = HitContext::entry(&regs, &m, 9);
            assert_eq!(eval(&format!("p f a=$arg{n}"), 0, &ctx), Ok(Owned::Int(u64::from(n))));
        }
    }

    #[test]
    fn memory_reads_are_as_wide_as_their_type_and_nest() {
        let (m, regs) = (memory(), regs());
        let ctx = HitContext::entry(&regs, &m, 9);
        let spec =
            "p f a=+0($arg1) b=+8($arg1):s32 c=+0(+0($arg3)) d=+1($arg1):u8 e=+8(+0(%rdx)):u32 f=-0x1001(+0x10($arg1))";
        assert_eq!(eval(spec, 0, &ctx), Ok(Owned::Int(0x1122_3344_5566_7788)));
        // The 4 bytes of the s32 only; the sign is applied when printed.
        assert_eq!(eval(spec, 1, &ctx), Ok(Owned::Int(0xffff_fffd)));
        assert_eq!(eval(spec, 2, &ctx), Ok(Owned::Int(0x1122_3344_5566_7788)));
        assert_eq!(eval(spec, 3, &ctx), Ok(Owned::Int(0x77)));
        assert_eq!(eval(spec, 4, &ctx), Ok(Owned::Int(0xffff_fffd)));
        // 0x2000 - 0x1001 is on page 0, unmapped.
        assert_eq!(eval(spec, 5, &ctx), Ok(Owned::Fault));
        m.reads.borrow_mut().clear();
        eval("p f v=+8($arg1):u16", 0, &ctx).unwrap();
        assert_eq!(*m.reads.borrow(), [(0x1008, 2)]);
    }

    #[test]
    fn faults_are_reported_not_taken() {
        let (m, regs) = (memory(), Regs { rdi: 0xdead_0000, ..regs() });
        let ctx = HitContext::entry(&regs, &m, 9);
        let spec = "p f a=+0($arg1) b=+0(+0($arg1)) c=$arg1:string d=+0($arg1):string e=@0x9999 f=+0(@0x1000)";
        for field in 0..5 {
            assert_eq!(eval(spec, field, &ctx), Ok(Owned::Fault), "field {field}");
        }
        // 0x1122334455667788 is not mapped.
        assert_eq!(eval(spec, 5, &ctx), Ok(Owned::Fault));
        // An address that wraps past the top of memory.
        let regs = Regs { rdi: u64::MAX - 2, ..Regs::default() };
        let ctx = HitContext::entry(&regs, &m, 9);
        assert_eq!(eval("p f s=$arg1:string", 0, &ctx), Ok(Owned::Fault));
    }

    #[test]
    fn strings_at_addresses_and_in_memory() {
        let (m, regs) = (memory(), regs());
        let ctx = HitContext::entry(&regs, &m, 9);
        // `$arg2:string`: the argument is the string's address. `+16($arg1):string` is the
        // string at the address its read would read, the field itself: the pointer's
        // bytes, 00 20 ..., an empty string (as in the kernel).
        let spec = "p f a=$arg2:string b=+0(+16($arg1)):string c=@0x2001:ustring d=+16($arg1):string";
        assert_eq!(eval(spec, 0, &ctx), Ok(s(b"hello")));
        assert_eq!(eval(spec, 1, &ctx), Ok(s(b"hello")));
        assert_eq!(eval(spec, 2, &ctx), Ok(s(b"ello")));
        assert_eq!(eval(spec, 3, &ctx), Ok(s(b"")));
    }

    #[test]
    fn strings_stop_at_a_page_boundary_and_at_their_bound() {
        let mut m = memory();
        // "ok" ends 1 byte before the page end of 0x4fff; the next page is unmapped, and a
        // read spanning it would fail.
        let regs = Regs { rdi: 0x4ffd, rsi: 0x5ffc, rdx: 0x6000, ..Regs::default() };
        let ctx = HitContext::entry(&regs, &m, 9);
        assert_eq!(eval("p f s=$arg1:string", 0, &ctx), Ok(s(b"ok")));
        assert!(m.reads.borrow().iter().all(|&(addr, len)| addr / 4096 == (addr + len as u64 - 1) / 4096));
        // Unterminated before an unmapped page: a fault, not a made-up end.
        assert_eq!(eval("p f s=$arg2:string", 0, &ctx), Ok(Owned::Fault));
        // A long string is cut at STRING_MAX bytes, even across a page boundary.
        m.write(0x8f80, &[b'x'; 600]);
        let regs = Regs { rdi: 0x8f80, ..Regs::default() };
        let ctx = HitContext::entry(&regs, &m, 9);
        assert_eq!(eval("p f s=$arg1:string", 0, &ctx), Ok(s(&[b'x'; STRING_MAX])));
        m.write(0x9010, b"\0");
        let ctx = HitContext::entry(&regs, &m, 9);
        assert_eq!(eval("p f s=$arg1:string", 0, &ctx), Ok(s(&[b'x'; 0x90])));
    }

    #[test]
    fn vector_registers_come_from_the_hits_xmm_or_fault_without_them() {
        let (m, regs) = (memory(), regs());
        let xmm: [u64; 16] = std::array::from_fn(|i| 1.5f64.to_bits() + i as u64);
        let ctx = HitContext { xmm: Some(&xmm), ..HitContext::entry(&regs, &m, 9) };
        assert_eq!(eval("p f d=%xmm0:x64 e=%xmm15:x64", 0, &ctx), Ok(Owned::Int(1.5f64.to_bits())));
        assert_eq!(eval("p f d=%xmm0:x64 e=%xmm15:x64", 1, &ctx), Ok(Owned::Int(1.5f64.to_bits() + 15)));
        // No vector state at this hit: a fault, never a general register's value.
        let ctx = HitContext::entry(&regs, &m, 9);
        assert_eq!(eval("p f d=%xmm0:x64", 0, &ctx), Ok(Owned::Fault));
    }

    #[test]
    fn comm_is_the_thread_name() {
        let (m, regs) = (memory(), regs());
        let ctx = HitContext::entry(&regs, &m, 77);
        assert_eq!(eval("p f c=$comm", 0, &ctx), Ok(s(b"worker-77")));
    }

    #[test]
    fn return_probes_read_the_entry_values_the_return_value_and_the_duration() {
        let m = memory();
        let spec = ProbeSpec::parse("r:f ret=$retval:s32 t=$duration a=$arg3 out=+8(+0($arg3)):s32 b=$arg1").unwrap();
        let mut entry = EntryValues::default();
        let programs: Vec<FetchProgram> =
            spec.args.iter().map(|a| FetchProgram::new(&a.fetch, a.ty, spec.kind, &mut entry).unwrap()).collect();
        // $arg3 and $arg1 are kept, $arg3 once.
        assert_eq!(entry.len(), 2);
        let mut kept = [0u64; ENTRY_VALUES];
        entry.save(&Regs { rdi: 11, rdx: 0x3000, ..Regs::default() }, &mut kept);
        assert_eq!(kept[..2], [0x3000, 11]);
        let at_return = Regs { rax: 0xffff_fffe, rsp: 0x7008, ..Regs::default() };
        let ctx = HitContext {
            regs: &at_return,
            target: &m,
            tid: 1,
            retval: Some(at_return.rax),
            entry: &kept[..2],
            duration_ns: Some(1234),
            xmm: None,
        };
        let ints: Vec<u64> = programs
            .iter()
            .map(|p| match p.eval(&ctx, &mut [0; STRING_MAX]) {
                Value::Int(v) => v,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ints, [0xffff_fffe, 1234, 0x3000, 0xffff_fffd, 11]);
        let mut buf = [0u8; STRING_MAX];
        // Without the entry values (a caller's bug), a fault rather than garbage.
        let ctx = HitContext { entry: &[], ..ctx };
        assert_eq!(programs[2].eval(&ctx, &mut buf), Value::Fault);
    }

    #[test]
    fn what_a_probe_cannot_provide_is_refused_when_compiling() {
        use crate::spec::{Fetch, FetchType};
        let compile = |fetch: Fetch, kind| FetchProgram::new(&fetch, FetchType::DEFAULT, kind, &mut Default::default());
        assert!(compile(Fetch::Retval, ProbeKind::Entry).unwrap_err().contains("only available in return probes"));
        assert!(compile(Fetch::Duration, ProbeKind::Entry).is_err());
        assert!(compile(Fetch::Reg(Reg::Rdi), ProbeKind::Return).unwrap_err().contains("not known at a return"));
        assert!(compile(Fetch::Arg(7), ProbeKind::Entry).is_err());
        let unresolved = Fetch::Memory(Address::Symbol { symbol: "x".into(), offset: 0 });
        assert!(compile(unresolved, ProbeKind::Entry).unwrap_err().contains("`@x` is not resolved"));
        let deep = (0..=MAX_DEREF).fold(Fetch::Arg(1), |f, _| Fetch::Deref { offset: 0, base: Box::new(f) });
        assert!(compile(deep, ProbeKind::Entry).unwrap_err().contains("nest at most"));
        let comm = Fetch::Deref { offset: 0, base: Box::new(Fetch::Comm) };
        assert!(compile(comm, ProbeKind::Entry).is_err());
    }

    #[test]
    fn self_memory_reads_what_is_mapped_and_reports_what_is_not() {
        let value: u64 = 0x0123_4567_89ab_cdef;
        let mut out = [0u8; 8];
        assert!(SelfMemory.read(std::ptr::addr_of!(value) as u64, &mut out));
        assert_eq!(u64::from_le_bytes(out), value);
        // Page 0 is never mapped; errno is left as it was.
        // SAFETY: writes this thread's errno.
        unsafe { *libc::__errno_location() = 1234 };
        assert!(!SelfMemory.read(16, &mut out));
        // SAFETY: reads this thread's errno.
        assert_eq!(unsafe { *libc::__errno_location() }, 1234);
        assert!(SelfMemory.read(16, &mut []));
    }

    #[test]
    fn self_memory_names_this_thread_and_others() {
        let handle = std::thread::Builder::new()
            .name("fetch-test-thr".into())
            .spawn(|| {
                let mut name = [0u8; 16];
                let n = SelfMemory.thread_name(gettid(), &mut name);
                (gettid(), name[..n].to_vec())
            })
            .unwrap();
        let (tid, own) = handle.join().unwrap();
        assert_eq!(own, b"fetch-test-thr");
        // The thread above has exited: its name cannot be read any more (once the kernel has
        // reaped it, which may come a moment after the join).
        let mut name = [0u8; 16];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while SelfMemory.thread_name(tid, &mut name) != 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(SelfMemory.thread_name(tid, &mut name), 0);
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::Builder::new()
            .name("fetch-other".into())
            .spawn(move || {
                tx.send(gettid()).unwrap();
                done_rx.recv().unwrap();
            })
            .unwrap();
        let tid = rx.recv().unwrap();
        let n = SelfMemory.thread_name(tid, &mut name);
        assert_eq!(&name[..n], b"fetch-other");
        done_tx.send(()).unwrap();
        other.join().unwrap();
    }
}
