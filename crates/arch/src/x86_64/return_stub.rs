//! The return stub of a remote call: where a function that a ptrace tracer makes a stopped
//! thread of another process call (`dlopen`, the agent's entry) returns to, so that the
//! thread carries on exactly where it was stopped even if the tracer is killed during the
//! call.
//!
//! A tracer that makes the call return to address 0 learns of the return from the
//! `SIGSEGV` — and if it died meanwhile, the kernel detaches the thread (`exit_ptrace` in
//! kernel/ptrace.c), which then returns to 0 untraced and the program dies. The stub
//! instead puts back, by itself, the registers the thread had before the call, which the
//! tracer left in a *frame* on the thread's own stack, between its red zone and the call's
//! arguments (the called function never touches memory above its own stack):
//!
//! ```text
//!   entry:    mov  %rax,%rdi            the function's result, for the tracer
//!             mov  $39,%eax             getpid(): harmless, and allowed by any seccomp
//!             syscall                    filter that lets the program dlopen
//!   notified: mov  $-1,%eax             ── no tracer (any more) from here on ──
//!             mov  $-1,%edx             every XSAVE component (edx:eax)
//!             movabs $frame,%rcx
//!             xrstor64 XSAVE_OFFSET(%rcx)   x87, SSE, AVX… as before the call
//!             push EFLAGS(%rcx)         onto the call's return-address slot
//!             popfq
//!             mov  R15(%rcx),%r15       … every general register but rcx and rsp …
//!             mov  RSP(%rcx),%rsp       (nothing after popfq changes a flag)
//!             movabs $rcx,%rcx
//!             jmp  *rip(%rip)           where the thread was stopped
//!   rip:      .quad  the thread's rip
//!
//!   frame + 0:            the thread's registers, `struct user_regs_struct` as
//!                         PTRACE_GETREGS gives it (arch/x86/include/asm/user_64.h)
//!   frame + XSAVE_OFFSET: its XSAVE image (PTRACE_GETREGSET NT_X86_XSTATE: the standard,
//!                         non-compacted format `xrstor` reads), 64-byte aligned
//! ```
//!
//! A live tracer resumes the call with `PTRACE_SYSCALL` and recognises the `getpid` entry
//! stop at `notified` (ptrace(2), "Syscall-stops"): it takes the result from `rdi` and puts
//! the registers back itself. A tracer that is gone never sees it, and the stub jumps back
//! on its own. A thread stopped inside a blocking system call must be resumed as the kernel
//! would have (restarted: `rip - 2`, `rax` the call's number, or `restart_syscall`); the
//! tracer writes those values into the frame, since the stub runs outside any system call
//! and no kernel restart applies to it.
//!
//! The stub writes nothing but the return-address slot (the `push`), and uses no other
//! stack: a signal arriving while it runs lands below, on the thread's stack, as during the
//! call. The code holds the frame's address, `rcx` and `rip` as immediates: it is built for
//! one call, at the address it will run at.

use iced_x86::code_asm::*;

use super::relocate::RelocError;

/// Where the XSAVE image starts in the frame (64-byte aligned): after the registers.
pub const XSAVE_OFFSET: u64 = 256;
/// The frame's alignment, that of the XSAVE image `xrstor` requires.
pub const FRAME_ALIGN: u64 = 64;
/// The system call the stub makes first: `getpid`, which changes nothing.
pub const NOTIFY_SYSCALL: u64 = 39;
/// Words in the register block (`struct user_regs_struct`).
pub const REGS_WORDS: usize = 27;
/// The longest the stub's code is.
pub const STUB_MAX: usize = 256;
/// The stub's first bytes, the same in every stub (up to `notified`): `mov %rax,%rdi;
/// mov $39,%eax; syscall`. Where they are, a stub is (or was) in use: a tracer killed
/// during its call leaves its thread to come back through it at any later time.
pub const STUB_START: [u8; 10] = [0x48, 0x89, 0xc7, 0xb8, NOTIFY_SYSCALL as u8, 0, 0, 0, 0x0f, 0x05];

/// Offsets (in words) of the registers in `struct user_regs_struct`.
mod slot {
    pub const R15: usize = 0;
    pub const R14: usize = 1;
    pub const R13: usize = 2;
    pub const R12: usize = 3;
    pub const RBP: usize = 4;
    pub const RBX: usize = 5;
    pub const R11: usize = 6;
    pub const R10: usize = 7;
    pub const R9: usize = 8;
    pub const R8: usize = 9;
    pub const RAX: usize = 10;
    pub const RDX: usize = 12;
    pub const RSI: usize = 13;
    pub const RDI: usize = 14;
    pub const EFLAGS: usize = 18;
    pub const RSP: usize = 19;
}

/// The stub's code and where its pieces are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReturnStub {
    /// The code, to be written at the address it was built for.
    pub code: Vec<u8>,
    /// Offset of the instruction after the stub's `syscall`: `rip` at its syscall-stop.
    pub notified: u64,
}

/// What the stub puts back that is not in the frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The frame's address (a multiple of [`FRAME_ALIGN`]).
    pub frame: u64,
    /// The thread's `rcx`.
    pub rcx: u64,
    /// Where the thread goes on.
    pub rip: u64,
}

/// Builds the stub at `ip` for `resume`.
pub fn build_return_stub(ip: u64, resume: &Resume) -> Result<ReturnStub, RelocError> {
    let mut a = CodeAssembler::new(64)?;
    let mut notified = a.create_label();
    let mut rip_slot = a.create_label();
    let at = |slot: usize| rcx + (8 * slot) as i32;

    a.mov(rdi, rax)?;
    a.mov(eax, NOTIFY_SYSCALL as i32)?;
    a.syscall()?;
    a.set_label(&mut notified)?;
    a.mov(eax, -1)?;
    a.mov(edx, -1)?;
    a.mov(rcx, resume.frame)?;
    a.xrstor64(ptr(rcx + XSAVE_OFFSET as i32))?;
    a.push(qword_ptr(at(slot::EFLAGS)))?;
    a.popfq()?;
    let gprs = [
        (r15, slot::R15),
        (r14, slot::R14),
        (r13, slot::R13),
        (r12, slot::R12),
        (rbp, slot::RBP),
        (rbx, slot::RBX),
        (r11, slot::R11),
        (r10, slot::R10),
        (r9, slot::R9),
        (r8, slot::R8),
        (rax, slot::RAX),
        (rdx, slot::RDX),
        (rsi, slot::RSI),
        (rdi, slot::RDI),
        (rsp, slot::RSP),
    ];
    for (reg, slot) in gprs {
        a.mov(reg, qword_ptr(at(slot)))?;
    }
    a.mov(rcx, resume.rcx)?;
    a.jmp(qword_ptr(rip_slot))?;
    a.set_label(&mut rip_slot)?;
    a.dq(&[resume.rip])?;
    let result = a.assemble_options(ip, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let notified = result.label_ip(&notified)? - ip;
    let code = result.inner.code_buffer;
    debug_assert!(code.len() <= STUB_MAX, "{} bytes", code.len());
    Ok(ReturnStub { code, notified })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;
    use iced_x86::{Mnemonic, Register};

    const IP: u64 = 0x7f12_3456_7a10;
    const RESUME: Resume = Resume { frame: 0x7ffd_0000_1f40, rcx: 0x1111_2222_3333_4444, rip: 0x7f00_dead_beef };

    #[test]
    fn the_stub_notifies_first_then_restores_everything_and_jumps_back() {
        let stub = build_return_stub(IP, &RESUME).unwrap();
        assert!(stub.code.len() <= STUB_MAX, "{} bytes", stub.code.len());
        // mov %rax,%rdi; mov $39,%eax; syscall — and `notified` right after.
        assert_eq!(&stub.code[..10], &[0x48, 0x89, 0xc7, 0xb8, 39, 0, 0, 0, 0x0f, 0x05]);
        assert_eq!(stub.code[..STUB_START.len()], STUB_START);
        assert_eq!(stub.notified, 10);
        // The code ends with the rip slot, which the final jump goes through.
        let (code, rip) = stub.code.split_at(stub.code.len() - 8);
        assert_eq!(rip, RESUME.rip.to_le_bytes());
        let instrs = decode_instructions(code, IP).unwrap();
        let mnemonics: Vec<Mnemonic> = instrs.iter().map(|i| i.mnemonic()).collect();
        let at = |m| mnemonics.iter().position(|&x| x == m).unwrap();
        assert!(at(Mnemonic::Syscall) < at(Mnemonic::Xrstor64) && at(Mnemonic::Xrstor64) < at(Mnemonic::Popfq));
        assert_eq!(mnemonics.iter().filter(|&&m| m == Mnemonic::Syscall).count(), 1);
        assert!(!mnemonics.contains(&Mnemonic::Call) && !mnemonics.contains(&Mnemonic::Ret));
        let jmp = instrs.last().unwrap();
        assert_eq!((jmp.mnemonic(), jmp.ip_rel_memory_address()), (Mnemonic::Jmp, IP + code.len() as u64));
        // xrstor reads the image at the frame's XSAVE_OFFSET, through rcx = the frame.
        let frame = &instrs[at(Mnemonic::Xrstor64) - 1];
        assert_eq!((frame.op0_register(), frame.immediate64()), (Register::RCX, RESUME.frame));
        let xrstor = &instrs[at(Mnemonic::Xrstor64)];
        assert_eq!((xrstor.memory_base(), xrstor.memory_displacement64()), (Register::RCX, XSAVE_OFFSET));
        // The flags from their slot, through the call's return-address slot.
        let push = &instrs[at(Mnemonic::Popfq) - 1];
        assert_eq!((push.mnemonic(), push.memory_displacement64()), (Mnemonic::Push, 8 * slot::EFLAGS as u64));
        // After popfq: only moves (every register once, rsp from the frame, then rcx), and
        // the jump.
        let after = &instrs[at(Mnemonic::Popfq) + 1..instrs.len() - 1];
        assert!(after.iter().all(|i| i.mnemonic() == Mnemonic::Mov), "{after:?}");
        let mut loaded: Vec<Register> = after.iter().map(|i| i.op0_register()).collect();
        assert_eq!(&loaded[loaded.len() - 2..], &[Register::RSP, Register::RCX]);
        assert_eq!(after.last().unwrap().immediate64(), RESUME.rcx);
        let load_rsp = &after[after.len() - 2];
        assert_eq!((load_rsp.memory_base(), load_rsp.memory_displacement64()), (Register::RCX, 8 * slot::RSP as u64));
        loaded.sort();
        loaded.dedup();
        assert_eq!(loaded.len(), 16, "every general register: {loaded:?}");
        assert!(after[..after.len() - 2].iter().all(|i| i.memory_base() == Register::RCX));
    }
}
