//! The register set handlers see.

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
