//! The `SIGTRAP` handler a ptrace tracer leaves in its target as a fallback: the code that
//! puts the original bytes back when a breakpoint trap finds no tracer (the tracer was
//! killed), so that the program runs on instead of dying of `SIGTRAP`.
//!
//! While the tracer lives it intercepts every `SIGTRAP` at its signal-delivery-stop
//! (ptrace(2), "Signal-delivery-stop"), so this handler never runs for the tracer's own
//! traps. When the tracer dies, the kernel detaches the threads (`exit_ptrace` in
//! `kernel/ptrace.c`) and a thread stopped at a trap resumes with the trap still to deliver;
//! so does every later hit. The handler then:
//!
//! ```text
//!   handler(sig, info, uc):
//!     resume = 0
//!     if info.si_code == SI_KERNEL:                      raised by an int3
//!       if rip-1 in trampoline..+16: resume = ret of the return entry whose slot == uc.rsp - 8
//!       elif rip-1 in a site's run:  resume = the site's slot (its run, relocated)
//!     fd = open("/proc/self/mem", O_RDWR|O_CLOEXEC)
//!     for each return entry (slot, ret), fd >= 0:        trampoline -> original return address
//!       pread [slot]; pwrite ret if it holds the trampoline
//!     if resume == 0 or RESTORE_DELAY_NS passed since the first trap here:
//!       for each site (addr, slot, len, prot, orig[len]): int3s -> original bytes, last first
//!         fd >= 0: pread each byte, pwrite orig if it is 0xcc
//!         else:    mprotect(pages, rwx); store each; mprotect(pages, prot)
//!     close(fd)
//!     if resume: uc.rip = resume; return                 sigreturn runs the original code
//!     rt_sigaction(SIGTRAP, saved program action)        not ours: the program's own trap
//!     if si_code == SI_KERNEL and [rip-1] == 0xcc: uc.rip = rip-1   its int3 again, under its action
//!     else tgkill(getpid(), gettid(), SIGTRAP)           delivered at sigreturn, under its action
//!     return
//! ```
//!
//! A site's run covers at least two bytes (all `int3`), and a trampoline is followed by
//! `int3`s: when a tracer dies, a thread it held at one of its traps loses the trap (the
//! kernel drops the signal of a signal-delivery-stop whose tracer exits) and resumes just
//! after the `int3` — on another `int3` of ours, which brings it here.
//!
//! It allocates nothing, takes no lock and calls no library: raw system calls only, on a
//! few bytes of the signal stack. Every table is read-only to it and its work is idempotent,
//! so threads trapping at once may all run it. The tables (see [`Tables`]) are kept by the
//! tracer in a writable page of the target; addresses are embedded as immediates, so the
//! code is built for the address it will run at.

use iced_x86::code_asm::*;

use super::relocate::RelocError;

/// Offset of `uc_mcontext.gregs[REG_RSP]` in the kernel's x86-64 `ucontext`
/// (`arch/x86/include/uapi/asm/sigcontext.h`: 40 bytes of `uc_flags`, `uc_link`,
/// `uc_stack`, then the registers r8..r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip).
pub const UC_RSP: i32 = 40 + 15 * 8;
/// Offset of `uc_mcontext.gregs[REG_RIP]`.
pub const UC_RIP: i32 = 40 + 16 * 8;
/// Offset of `si_code` in `siginfo_t`.
const SI_CODE: i32 = 8;
/// `si_code` of a trap raised by `int3` (`SI_KERNEL`).
const SI_KERNEL: i32 = 0x80;

/// Bytes of one site entry: `addr: u64`, `slot: u64` (the out-of-line copy of the run),
/// the run's length and its page's protection (`PROT_*`, for the `mprotect` path) as two
/// bytes, and the run's original bytes from offset [`SITE_ORIG`].
pub const SITE_ENTRY: u64 = 40;
/// Offset of the slot address in a site entry.
pub const SITE_SLOT: i32 = 8;
/// Offset of the run's length in a site entry.
pub const SITE_LEN: i32 = 16;
/// Offset of the page protection in a site entry.
pub const SITE_PROT: i32 = 17;
/// Offset of the original bytes in a site entry.
pub const SITE_ORIG: i32 = 24;
/// How long after its first trap (of a dead tracer's) the handler leaves the `int3`s in
/// place, sending every hit to its slot, before it restores the original bytes.
pub const RESTORE_DELAY_NS: u64 = 500_000_000;
/// The longest run a site entry holds.
pub const SITE_MAX_RUN: usize = 16;
/// How many bytes after the trampoline are `int3`s that count as the trampoline.
pub const TRAMPOLINE_RUN: i32 = 16;
/// Bytes of one return entry: `slot: u64` (0 when free), `ret: u64`.
pub const RETURN_ENTRY: u64 = 16;

/// Where the handler finds what it works on, all in the target's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tables {
    /// The return trampoline's `int3`.
    pub trampoline: u64,
    /// The program's own `SIGTRAP` action, as the kernel's `rt_sigaction` returned it
    /// (`struct sigaction` of the x86-64 syscall ABI: handler, flags, restorer, mask).
    pub saved_action: u64,
    /// `"/proc/self/mem\0"`.
    pub proc_mem_path: u64,
    /// A writable `u64`, 0 at first: `CLOCK_MONOTONIC` (ns) of the first trap the handler
    /// saw.
    pub dead_since: u64,
    /// The site table ([`SITE_ENTRY`] bytes each).
    pub sites: u64,
    /// Entries in the site table.
    pub site_count: u64,
    /// The return table ([`RETURN_ENTRY`] bytes each).
    pub returns: u64,
    /// Entries in the return table.
    pub return_count: u64,
}

/// The handler's code and where its pieces are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrapFallback {
    /// The code, to be placed at the address it was built for.
    pub code: Vec<u8>,
    /// Offset of the `sa_restorer` (`mov $15,%eax; syscall`: `rt_sigreturn`).
    pub restorer: u64,
    /// Offset of the handler (`sa_sigaction`, for `SA_SIGINFO`).
    pub handler: u64,
}

/// Builds the fallback handler at `ip` for `tables`.
pub fn build_trap_fallback(ip: u64, tables: &Tables) -> Result<TrapFallback, RelocError> {
    const SYS_READ_AT: i32 = 17; // pread64
    const SYS_WRITE_AT: i32 = 18; // pwrite64
    const SYS_OPEN: i32 = 2;
    const SYS_CLOSE: i32 = 3;
    const SYS_MPROTECT: i32 = 10;
    const SYS_RT_SIGACTION: i32 = 13;
    const SYS_RT_SIGRETURN: i32 = 15;
    const SYS_GETPID: i32 = 39;
    const SYS_GETTID: i32 = 186;
    const SYS_TGKILL: i32 = 234;
    const SYS_CLOCK_GETTIME: i32 = 228;
    const CLOCK_MONOTONIC: i32 = 1;
    const SIGTRAP: i32 = 5;
    const O_RDWR_CLOEXEC: i32 = 0o2 | 0o2000000;
    const RWX: i32 = 7;

    let mut a = CodeAssembler::new(64)?;
    // pread64/pwrite64(fd = r14, buf = rsp, len, offset = [rbx] (+ r8)): one table entry's
    // address, through /proc/self/mem.
    let at_entry = |a: &mut CodeAssembler, nr: i32, len: i32, plus_r8: bool| -> Result<(), IcedError> {
        a.mov(eax, nr)?;
        a.mov(rdi, r14)?;
        a.mov(rsi, rsp)?;
        a.mov(edx, len)?;
        a.mov(r10, qword_ptr(rbx))?;
        if plus_r8 {
            a.add(r10, r8)?;
        }
        a.syscall()
    };
    // The restorer first, at offset 0.
    a.mov(eax, SYS_RT_SIGRETURN)?;
    a.syscall()?;
    a.int3()?;
    let mut handler = a.create_label();
    a.set_label(&mut handler)?;

    // Registers kept across the body (a system call clobbers only rax, rcx and r11):
    // r12 = uc, r13d = si_code, r15 = the trap address, rbp = where to resume (0: not ours),
    // r14 = the /proc/self/mem descriptor or -errno, rbx and r9 = a table cursor and count.
    a.mov(r12, rdx)?;
    a.mov(r13d, dword_ptr(rsi + SI_CODE))?;
    a.mov(r15, qword_ptr(r12 + UC_RIP))?;
    a.dec(r15)?;
    a.xor(ebp, ebp)?;
    a.sub(rsp, 24)?; // an aligned 8-byte buffer at [rsp]

    let mut looked_up = a.create_label();
    let mut at_site = a.create_label();
    a.cmp(r13d, SI_KERNEL)?;
    a.jne(looked_up)?;
    a.mov(rax, r15)?;
    a.mov(rcx, tables.trampoline)?;
    a.sub(rax, rcx)?;
    a.cmp(rax, TRAMPOLINE_RUN)?;
    a.jae(at_site)?;
    // A return into the trampoline: the entry whose slot the `ret` popped.
    {
        let (mut next, mut top) = (a.create_label(), a.create_label());
        a.mov(rcx, qword_ptr(r12 + UC_RSP))?;
        a.sub(rcx, 8)?;
        a.mov(rbx, tables.returns)?;
        a.mov(r9, tables.return_count)?;
        a.set_label(&mut top)?;
        a.test(r9, r9)?;
        a.jz(looked_up)?;
        a.cmp(qword_ptr(rbx), rcx)?;
        a.jne(next)?;
        a.mov(rbp, qword_ptr(rbx + 8))?;
        a.jmp(looked_up)?;
        a.set_label(&mut next)?;
        a.add(rbx, RETURN_ENTRY as i32)?;
        a.dec(r9)?;
        a.jmp(top)?;
    }
    a.set_label(&mut at_site)?;
    {
        let (mut next, mut top) = (a.create_label(), a.create_label());
        a.mov(rbx, tables.sites)?;
        a.mov(r9, tables.site_count)?;
        a.set_label(&mut top)?;
        a.test(r9, r9)?;
        a.jz(looked_up)?;
        a.mov(rax, r15)?;
        a.sub(rax, qword_ptr(rbx))?;
        a.movzx(ecx, byte_ptr(rbx + SITE_LEN))?;
        a.cmp(rax, rcx)?;
        a.jae(next)?;
        a.mov(rbp, qword_ptr(rbx + SITE_SLOT))?;
        a.jmp(looked_up)?;
        a.set_label(&mut next)?;
        a.add(rbx, SITE_ENTRY as i32)?;
        a.dec(r9)?;
        a.jmp(top)?;
    }
    a.set_label(&mut looked_up)?;

    // fd = open("/proc/self/mem", O_RDWR | O_CLOEXEC)
    a.mov(eax, SYS_OPEN)?;
    a.mov(rdi, tables.proc_mem_path)?;
    a.mov(esi, O_RDWR_CLOEXEC)?;
    a.xor(edx, edx)?;
    a.syscall()?;
    a.mov(r14, rax)?;

    // Every return address still pointing at the trampoline back to the original (through
    // the descriptor: a slot may be on the stack of a thread that exited since).
    {
        let (mut top, mut next, mut done) = (a.create_label(), a.create_label(), a.create_label());
        a.test(r14, r14)?;
        a.js(done)?;
        a.mov(rbx, tables.returns)?;
        a.mov(r9, tables.return_count)?;
        a.set_label(&mut top)?;
        a.test(r9, r9)?;
        a.jz(done)?;
        a.cmp(qword_ptr(rbx), 0)?;
        a.je(next)?;
        at_entry(&mut a, SYS_READ_AT, 8, false)?;
        a.cmp(rax, 8)?;
        a.jne(next)?;
        a.mov(rax, tables.trampoline)?;
        a.cmp(qword_ptr(rsp), rax)?;
        a.jne(next)?;
        a.mov(rax, qword_ptr(rbx + 8))?;
        a.mov(qword_ptr(rsp), rax)?;
        at_entry(&mut a, SYS_WRITE_AT, 8, false)?;
        a.set_label(&mut next)?;
        a.add(rbx, RETURN_ENTRY as i32)?;
        a.dec(r9)?;
        a.jmp(top)?;
        a.set_label(&mut done)?;
    }
    // The bytes wait until the tracer has been dead for RESTORE_DELAY_NS (and a trap comes
    // then): threads it held at its traps resume just past their int3 (see the module
    // documentation), and one that ran only after the original bytes were back would
    // execute the middle of the original run. Until then every trap goes to the site's
    // slot. A trap that is not ours restores at once: the program's action comes back.
    let mut restore_bytes = a.create_label();
    let mut bytes_done = a.create_label();
    {
        let mut seen = a.create_label();
        a.test(rbp, rbp)?;
        a.jz(restore_bytes)?;
        a.mov(eax, SYS_CLOCK_GETTIME)?;
        a.mov(edi, CLOCK_MONOTONIC)?;
        a.lea(rsi, ptr(rsp + 8))?;
        a.syscall()?;
        a.imul_3(rax, qword_ptr(rsp + 8), 1_000_000_000)?;
        a.add(rax, qword_ptr(rsp + 16))?;
        a.mov(rcx, tables.dead_since)?;
        a.mov(rdx, qword_ptr(rcx))?;
        a.test(rdx, rdx)?;
        a.jnz(seen)?;
        a.mov(qword_ptr(rcx), rax)?;
        a.jmp(bytes_done)?;
        a.set_label(&mut seen)?;
        a.sub(rax, rdx)?;
        a.mov(rcx, RESTORE_DELAY_NS)?;
        a.cmp(rax, rcx)?;
        a.jb(bytes_done)?;
    }
    a.set_label(&mut restore_bytes)?;
    // Every site's original bytes back, the last first: the first stays an int3 until the
    // rest is whole. r8 counts the run's bytes down.
    {
        let (mut top, mut next, mut by_mprotect) = (a.create_label(), a.create_label(), a.create_label());
        let (mut byte, mut stored, mut reprotect) = (a.create_label(), a.create_label(), a.create_label());
        a.mov(rbx, tables.sites)?;
        a.mov(r9, tables.site_count)?;
        a.set_label(&mut top)?;
        a.test(r9, r9)?;
        a.jz(bytes_done)?;
        a.movzx(r8d, byte_ptr(rbx + SITE_LEN))?;
        a.test(r14, r14)?;
        a.js(by_mprotect)?;
        a.set_label(&mut byte)?;
        a.test(r8, r8)?;
        a.jz(next)?;
        a.dec(r8)?;
        at_entry(&mut a, SYS_READ_AT, 1, true)?;
        a.cmp(rax, 1)?;
        a.jne(byte)?;
        a.cmp(byte_ptr(rsp), 0xcc)?;
        a.jne(byte)?;
        a.mov(al, byte_ptr(rbx + r8 + SITE_ORIG))?;
        a.mov(byte_ptr(rsp), al)?;
        at_entry(&mut a, SYS_WRITE_AT, 1, true)?;
        a.jmp(byte)?;
        // No /proc: make the run's pages writable (and still executable: other threads may
        // run in them), store, and give them their protection back.
        let pages = |a: &mut CodeAssembler| -> Result<(), IcedError> {
            a.mov(rdi, qword_ptr(rbx))?;
            a.and(rdi, -4096)?;
            a.mov(rsi, qword_ptr(rbx))?;
            a.movzx(eax, byte_ptr(rbx + SITE_LEN))?;
            a.lea(rsi, ptr(rsi + rax - 1))?;
            a.and(rsi, -4096)?;
            a.add(rsi, 4096)?;
            a.sub(rsi, rdi)?;
            Ok(())
        };
        a.set_label(&mut by_mprotect)?;
        pages(&mut a)?;
        a.mov(edx, RWX)?;
        a.mov(eax, SYS_MPROTECT)?;
        a.syscall()?;
        a.test(rax, rax)?;
        a.jnz(next)?;
        a.mov(rdi, qword_ptr(rbx))?;
        a.set_label(&mut stored)?;
        a.test(r8, r8)?;
        a.jz(reprotect)?;
        a.dec(r8)?;
        a.cmp(byte_ptr(rdi + r8), 0xcc)?;
        a.jne(stored)?;
        a.mov(al, byte_ptr(rbx + r8 + SITE_ORIG))?;
        a.mov(byte_ptr(rdi + r8), al)?;
        a.jmp(stored)?;
        a.set_label(&mut reprotect)?;
        pages(&mut a)?;
        a.movzx(edx, byte_ptr(rbx + SITE_PROT))?;
        a.mov(eax, SYS_MPROTECT)?;
        a.syscall()?;
        a.set_label(&mut next)?;
        a.add(rbx, SITE_ENTRY as i32)?;
        a.dec(r9)?;
        a.jmp(top)?;
    }

    a.set_label(&mut bytes_done)?;
    {
        let mut no_fd = a.create_label();
        a.test(r14, r14)?;
        a.js(no_fd)?;
        a.mov(eax, SYS_CLOSE)?;
        a.mov(rdi, r14)?;
        a.syscall()?;
        a.set_label(&mut no_fd)?;
    }
    a.add(rsp, 24)?;

    let mut foreign = a.create_label();
    a.test(rbp, rbp)?;
    a.jz(foreign)?;
    a.mov(qword_ptr(r12 + UC_RIP), rbp)?;
    a.ret()?;

    // Not one of ours: the program's own action back, and its trap raised again under it.
    a.set_label(&mut foreign)?;
    let mut reraise = a.create_label();
    a.mov(eax, SYS_RT_SIGACTION)?;
    a.mov(edi, SIGTRAP)?;
    a.mov(rsi, tables.saved_action)?;
    a.xor(edx, edx)?;
    a.mov(r10d, 8)?;
    a.syscall()?;
    a.cmp(r13d, SI_KERNEL)?;
    a.jne(reraise)?;
    a.cmp(byte_ptr(r15), 0xcc)?;
    a.jne(reraise)?;
    a.mov(qword_ptr(r12 + UC_RIP), r15)?;
    a.ret()?;
    a.set_label(&mut reraise)?;
    a.mov(eax, SYS_GETPID)?;
    a.syscall()?;
    a.mov(r8, rax)?;
    a.mov(eax, SYS_GETTID)?;
    a.syscall()?;
    a.mov(rsi, rax)?;
    a.mov(rdi, r8)?;
    a.mov(edx, SIGTRAP)?;
    a.mov(eax, SYS_TGKILL)?;
    a.syscall()?;
    a.ret()?;

    let result = a.assemble_options(ip, iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let handler = result.label_ip(&handler)? - ip;
    Ok(TrapFallback { code: result.inner.code_buffer, restorer: 0, handler })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;
    use iced_x86::Mnemonic;

    fn tables() -> Tables {
        Tables {
            trampoline: 0x7000_0000,
            saved_action: 0x7000_1000,
            proc_mem_path: 0x7000_1040,
            dead_since: 0x7000_1050,
            sites: 0x7000_1080,
            site_count: 2,
            returns: 0x7000_2000,
            return_count: 64,
        }
    }

    #[test]
    fn the_restorer_is_rt_sigreturn_and_the_handler_follows() {
        let built = build_trap_fallback(0x7000_0010, &tables()).unwrap();
        let instrs = decode_instructions(&built.code, 0x7000_0010).unwrap();
        assert_eq!(&built.code[..7], &[0xb8, 15, 0, 0, 0, 0x0f, 0x05], "mov $15,%eax; syscall");
        assert_eq!(built.handler, 8, "after the restorer and an int3");
        assert!(instrs.iter().any(|i| i.ip() == 0x7000_0010 + built.handler));
        assert!(built.code.len() < 1024, "{} bytes", built.code.len());
    }

    #[test]
    fn the_handler_calls_nothing_and_only_returns() {
        let built = build_trap_fallback(0x7000_0010, &tables()).unwrap();
        let instrs = decode_instructions(&built.code, 0x7000_0010).unwrap();
        let count = |m| instrs.iter().filter(|i| i.mnemonic() == m).count();
        assert_eq!(count(Mnemonic::Call), 0);
        assert_eq!(count(Mnemonic::Ret), 3, "resume, rewind, re-raise");
        // Every jump stays inside the code.
        let end = 0x7000_0010 + built.code.len() as u64;
        for i in instrs.iter().filter(|i| i.is_jcc_short_or_near() || i.is_jmp_short_or_near()) {
            assert!((0x7000_0010..end).contains(&i.near_branch_target()), "{i}");
        }
        // The table addresses are embedded as they were given.
        let immediates: Vec<u64> = instrs.iter().filter(|i| i.op_count() == 2).map(|i| i.immediate64()).collect();
        for addr in [tables().trampoline, tables().sites, tables().returns, tables().saved_action] {
            assert!(immediates.contains(&addr), "{addr:#x} not in the code");
        }
    }
}
