//! The register set handlers see, and the vector registers a hit saved.

use dynprobe_arch::native::detour::VectorWidth;

/// The general registers, flags and instruction pointer of the probed thread at the probe
/// point. A pre-handler may change any of them; changing `ip` diverts execution there and
/// skips the probed instruction, as a kprobe pre-handler may.
///
/// ```
/// # extern crate dynprobe_probe as dynprobe;
/// # use dynprobe::Regs;
/// let mut regs = Regs::default();
/// regs.set_arg(0, 7);
/// assert_eq!(regs.arg(0), 7);
/// assert_eq!(regs.rdi, 7);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
#[allow(missing_docs)] // the fields are the architectural registers of the same name
pub struct Regs {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rbx: u64,
    pub rax: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ip: u64,
}

/// Each `Regs` field with its `ucontext` greg index: one table serves both directions.
/// Selects one field of a [`Regs`].
type Field = fn(&mut Regs) -> &mut u64;

const GREGS: [(Field, libc::c_int); 18] = [
    (|r| &mut r.r15, libc::REG_R15),
    (|r| &mut r.r14, libc::REG_R14),
    (|r| &mut r.r13, libc::REG_R13),
    (|r| &mut r.r12, libc::REG_R12),
    (|r| &mut r.r11, libc::REG_R11),
    (|r| &mut r.r10, libc::REG_R10),
    (|r| &mut r.r9, libc::REG_R9),
    (|r| &mut r.r8, libc::REG_R8),
    (|r| &mut r.rbp, libc::REG_RBP),
    (|r| &mut r.rbx, libc::REG_RBX),
    (|r| &mut r.rax, libc::REG_RAX),
    (|r| &mut r.rcx, libc::REG_RCX),
    (|r| &mut r.rdx, libc::REG_RDX),
    (|r| &mut r.rsi, libc::REG_RSI),
    (|r| &mut r.rdi, libc::REG_RDI),
    (|r| &mut r.rflags, libc::REG_EFL),
    (|r| &mut r.rsp, libc::REG_RSP),
    (|r| &mut r.ip, libc::REG_RIP),
];

impl Regs {
    /// The SysV ABI integer argument `n` (0-based: rdi, rsi, rdx, rcx, r8, r9), valid at a
    /// function's entry; arguments past the sixth are read from the stack by the caller.
    pub fn arg(&self, n: usize) -> u64 {
        match n {
            0 => self.rdi,
            1 => self.rsi,
            2 => self.rdx,
            3 => self.rcx,
            4 => self.r8,
            5 => self.r9,
            _ => panic!("argument {n} is not passed in a register; read it from the stack"),
        }
    }

    /// Sets the SysV ABI integer argument `n` (see [`Regs::arg`]).
    pub fn set_arg(&mut self, n: usize, value: u64) {
        let reg = match n {
            0 => &mut self.rdi,
            1 => &mut self.rsi,
            2 => &mut self.rdx,
            3 => &mut self.rcx,
            4 => &mut self.r8,
            5 => &mut self.r9,
            _ => panic!("argument {n} is not passed in a register; write it on the stack"),
        };
        *reg = value;
    }

    /// The integer return value register (`rax`), meaningful at a function's return.
    pub fn retval(&self) -> u64 {
        self.rax
    }

    /// Reads the registers out of a signal context.
    pub(crate) fn from_ucontext(uc: &libc::ucontext_t) -> Regs {
        let mut regs = Regs::default();
        for (field, greg) in GREGS {
            *field(&mut regs) = uc.uc_mcontext.gregs[greg as usize] as u64;
        }
        regs
    }

    /// Writes the registers into a signal context, to take effect at `sigreturn`.
    pub(crate) fn to_ucontext(mut self, uc: &mut libc::ucontext_t) {
        for (field, greg) in GREGS {
            uc.uc_mcontext.gregs[greg as usize] = *field(&mut self) as i64;
        }
    }
}

/// Where a hit's path left the probed thread's vector registers, for [`hit_xmm`]: the
/// address of xmm0's low bytes and the distance between two registers, packed in one word
/// (the address is 16-byte aligned; the low bits say the distance). 0: not available.
///
/// - a breakpoint hit: the `fpstate` of the signal frame, `_xmm[16]` of the FXSAVE layout
///   (16 bytes apart; `struct _libc_fpstate` in glibc's `sys/ucontext.h`, the kernel's
///   `struct fxregs_state` in `arch/x86/include/asm/fpu/types.h`);
/// - a detour's or the return trampoline's full save: the save area `vector_moves` lays out
///   in `dynprobe_arch` (registers 16, 32 or 64 bytes apart by [`VectorWidth`]).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct VectorSave(usize);

impl VectorSave {
    /// Nothing saved (a light path).
    pub(crate) const NONE: VectorSave = VectorSave(0);

    /// The registers at `xmm0`, `stride` bytes apart (16, 32 or 64).
    fn new(xmm0: usize, stride: usize) -> VectorSave {
        debug_assert_eq!(xmm0 % 16, 0);
        let code = match stride {
            16 => 1,
            32 => 2,
            _ => 3,
        };
        VectorSave(xmm0 | code)
    }

    /// The registers a signal frame's FPU state holds; `NONE` without one.
    pub(crate) fn of_ucontext(uc: &libc::ucontext_t) -> VectorSave {
        let fpstate = uc.uc_mcontext.fpregs;
        if fpstate.is_null() {
            return VectorSave::NONE;
        }
        // SAFETY: only the field's address is taken: the kernel's fpstate of this frame.
        VectorSave::new(unsafe { std::ptr::addr_of!((*fpstate)._xmm) } as usize, 16)
    }

    /// The save area of `width` whose first register is at `area`.
    pub(crate) fn of_area(area: usize, width: VectorWidth) -> VectorSave {
        match width {
            VectorWidth::None => VectorSave::NONE,
            VectorWidth::Sse => VectorSave::new(area, 16),
            VectorWidth::Avx => VectorSave::new(area, 32),
            VectorWidth::Avx512 { .. } => VectorSave::new(area, 64),
        }
    }

    /// The packed word, for a thread slot.
    pub(crate) fn word(self) -> usize {
        self.0
    }
}

/// The low 64 bits of xmm0–15 of the probed thread at the hit whose handler calls this (a
/// `double` in a register is its low 64 bits, a `float` its low 32), as they were when the
/// thread reached the probe (at a return probe's return: as the function returned, xmm0
/// holding a floating-point return value). `None` outside a handler, and in a handler of a
/// probe not built with [`Probe::reads_vectors`](crate::Probe::reads_vectors) (its detour
/// may not have saved them). Allocates nothing and takes no lock.
pub fn hit_xmm() -> Option<[u64; 16]> {
    use std::sync::atomic::Ordering::Relaxed;
    let slot = crate::thread_slot::ThreadSlot::existing()?;
    let word = slot.vectors.load(Relaxed);
    if slot.active.load(Relaxed) == 0 {
        return None;
    }
    let stride = match word & 0xf {
        1 => 16,
        2 => 32,
        3 => 64,
        _ => return None,
    };
    let base = word & !0xf;
    let mut out = [0u64; 16];
    for (i, value) in out.iter_mut().enumerate() {
        // SAFETY: the path that runs this thread's handlers stored the word pointing at the
        // vector state it saved on this thread's stack (or in its signal frame), live until
        // it clears the word after the handlers return: 16 registers `stride` bytes apart.
        *value = unsafe { ((base + i * stride) as *const u64).read() };
    }
    Some(out)
}
