//! Differential test of the relocator: every sequence runs once where it was assembled and
//! once as a [`build_slot`] copy 1.5–1.75 GiB away, each in a forked child so that a crash
//! fails one case and not the test. Both runs must leave the same general registers,
//! arithmetic flags, data page and stack.
//!
//! ```text
//! region A (CODE_A)                                region B (SLOT_HIGH or SLOT_LOW)
//!   +0x000 prologue: rsp, flags, 15 registers
//!          jmp SEQ  (original run)  ----------.
//!          jmp B    (relocated run) ----------|------>  build_slot(sequence)
//!   +0x200 STUB: mov (%rsp),%r11; add; ret     |           ...
//!   +0x280 ALT:  lea 0x77(%r14),%r14; jmp EPI  |         jmp EPI (resume) --.
//!   +0x400 SEQ:  the sequence  <--------------'                            |
//!          EPI:  epilogue: store registers and flags, exit_group(0) <------'
//! ```
//!
//! Calls in the sequence reach `STUB`, which records its return address in r11: the
//! relocated call must push the *original* return address, so the callee comes back into
//! region A and both runs end in the same epilogue. The data page sits 1 MiB after region A,
//! in reach of RIP-relative operands from both A and B.

use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, OnceLock};

use dynprobe_arch::x86_64::{build_slot, decode_function};

const CODE_A: u64 = 0x3000_0000_0000;
const CODE_SIZE: usize = 0x1_0000;
const STUB: u64 = CODE_A + 0x200;
const ALT: u64 = CODE_A + 0x280;
const SEQ: u64 = CODE_A + 0x400;
const SLOT_HIGH: u64 = CODE_A + 0x7000_0000;
const SLOT_LOW: u64 = CODE_A - 0x6000_0000;
const DATA: u64 = CODE_A + 0x10_0000;
const DATA_SIZE: usize = 0x1000;
const STACK: u64 = 0x3100_0000_0000;
const STACK_SIZE: usize = 0x1_0000;
const STACK_TOP: u64 = STACK + 0x8000;
/// Registers and flags as the epilogue stores them: rax..r15 by number, then rflags.
const RESULT: u64 = 0x3200_0000_0000;
const RESULT_SIZE: usize = 0x1000;

/// CF, PF, AF, ZF, SF, DF, OF.
const FLAGS_MASK: u64 = 0xcd5;

const RAX: u8 = 0;
const RCX: u8 = 1;
const RDX: u8 = 2;
const RBX: u8 = 3;
const RSP: u8 = 4;
const RSI: u8 = 6;
const RDI: u8 = 7;
const R10: u8 = 10;
const R12: u8 = 12;
/// Registers sequences may compute with. rcx counts (loops, rep), rsi/rdi/r12 point into
/// the data page, rsp into the stack: clobbering those would make both runs crash alike and
/// test nothing.
const SCRATCH: [u8; 11] = [0, 2, 3, 5, 8, 9, 10, 11, 13, 14, 15];

// ---------------------------------------------------------------------------------------
// A tiny assembler: just the encodings the sequences use.

struct Asm {
    ip: u64,
    code: Vec<u8>,
}

fn rex(w: bool, reg: u8, base: u8) -> u8 {
    0x40 | (u8::from(w) << 3) | ((reg >> 3) << 2) | (base >> 3)
}

impl Asm {
    fn at(ip: u64) -> Self {
        Self { ip, code: Vec::new() }
    }

    fn pc(&self) -> u64 {
        self.ip + self.code.len() as u64
    }

    fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.code.extend_from_slice(bytes);
        self
    }

    /// `op r/m64, r64` (and the reverse-direction opcodes with `op r64, r/m64`).
    fn rr(&mut self, opcode: &[u8], reg: u8, rm: u8) -> &mut Self {
        self.raw(&[rex(true, reg, rm)]).raw(opcode).raw(&[0xc0 | (reg & 7) << 3 | (rm & 7)])
    }

    /// `op $imm32, r64` through `81 /ext`.
    fn ri(&mut self, ext: u8, rm: u8, imm: i32) -> &mut Self {
        self.raw(&[rex(true, 0, rm), 0x81, 0xc0 | ext << 3 | (rm & 7)]).raw(&imm.to_le_bytes())
    }

    fn movabs(&mut self, reg: u8, imm: u64) -> &mut Self {
        self.raw(&[rex(true, 0, reg), 0xb8 + (reg & 7)]).raw(&imm.to_le_bytes())
    }

    fn mov_ecx(&mut self, imm: u32) -> &mut Self {
        self.raw(&[0xb9]).raw(&imm.to_le_bytes())
    }

    /// An instruction with a RIP-relative operand at `target`: `head` ends in a ModRM with
    /// mod=00 rm=101, `imm` follows the displacement.
    fn rip(&mut self, head: &[u8], target: u64, imm: &[u8]) -> &mut Self {
        let end = self.pc() + (head.len() + 4 + imm.len()) as u64;
        let disp = i32::try_from(target.wrapping_sub(end) as i64).expect("rip-relative target in reach");
        self.raw(head).raw(&disp.to_le_bytes()).raw(imm)
    }

    /// `op r64, disp(%rip)` or `op disp(%rip), r64` for a two-operand `opcode`.
    fn rip_reg(&mut self, opcode: u8, reg: u8, target: u64) -> &mut Self {
        self.rip(&[rex(true, reg, 0), opcode, 0x05 | (reg & 7) << 3], target, &[])
    }

    fn push(&mut self, reg: u8) -> &mut Self {
        if reg >= 8 {
            self.raw(&[0x41]);
        }
        self.raw(&[0x50 + (reg & 7)])
    }

    fn pop(&mut self, reg: u8) -> &mut Self {
        if reg >= 8 {
            self.raw(&[0x41]);
        }
        self.raw(&[0x58 + (reg & 7)])
    }

    fn rel32(&mut self, opcode: &[u8], target: u64) -> &mut Self {
        self.rip(opcode, target, &[])
    }

    /// A short branch (`opcode rel8`) over the code `body` emits.
    fn over(&mut self, opcode: u8, body: impl FnOnce(&mut Asm)) -> &mut Self {
        self.raw(&[opcode, 0]);
        let at = self.code.len();
        body(self);
        self.code[at - 1] = u8::try_from(self.code.len() - at).expect("short branch");
        self
    }

    /// `body` then a short branch (`opcode rel8`) back to its start.
    fn back(&mut self, opcode: u8, body: impl FnOnce(&mut Asm)) -> &mut Self {
        let top = self.code.len();
        body(self);
        let rel = i8::try_from(top as i64 - (self.code.len() as i64 + 2)).expect("short branch");
        self.raw(&[opcode, rel as u8])
    }
}

// ---------------------------------------------------------------------------------------
// The harness.

#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    regs: [u64; 16],
    flags: u64,
    data: Vec<u8>,
    stack: Vec<u8>,
}

struct Case {
    name: String,
    seq: Vec<u8>,
    regs: [u64; 16],
    flags: u64,
    slot: u64,
}

struct Harness;

/// The one harness of this process: its regions sit at fixed addresses, and runs must not
/// overlap because they share them.
fn harness() -> MutexGuard<'static, Harness> {
    static HARNESS: OnceLock<Mutex<Harness>> = OnceLock::new();
    HARNESS.get_or_init(|| Mutex::new(Harness::new())).lock().unwrap_or_else(|e| e.into_inner())
}

/// Maps `len` bytes at exactly `addr`, shared with forked children so that the parent reads
/// what a child's run left behind.
fn map(addr: u64, len: usize, prot: i32) -> &'static mut [u8] {
    // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping, so no memory of this
    // process is invalidated; the fixed addresses are far from anything Rust allocates.
    let ptr = unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            len,
            prot,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    assert_eq!(ptr as u64, addr, "mmap at {addr:#x}: {}", std::io::Error::last_os_error());
    // SAFETY: the mapping is `len` bytes, readable and writable, and lives until the process
    // exits; only this harness touches it.
    unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) }
}

fn region(addr: u64, len: usize) -> &'static mut [u8] {
    // SAFETY: every region was mapped by `Harness::new` with this address and length and
    // is never unmapped; the harness runs one case at a time, so no two slices are live and
    // written at once, and children only write to it while the parent waits.
    unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) }
}

impl Harness {
    fn new() -> Self {
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        map(CODE_A, CODE_SIZE, rwx);
        map(SLOT_HIGH, CODE_SIZE, rwx);
        map(SLOT_LOW, CODE_SIZE, rwx);
        map(DATA, DATA_SIZE, rw);
        map(STACK, STACK_SIZE, rw);
        map(RESULT, RESULT_SIZE, rw);
        Harness
    }

    /// Runs `case` in place and relocated; `Err` describes the difference.
    fn check(&self, case: &Case) -> Result<(), String> {
        let original = self.run(case, None).map_err(|e| format!("original run: {e}"))?;
        let slot = build_slot(&case.seq, SEQ, case.slot, SEQ + case.seq.len() as u64)
            .map_err(|e| format!("build_slot: {e}"))?;
        self.compare(case, &original, &slot)
    }

    /// Runs `slot` (placed at `case.slot`) and compares it with the `original` run.
    fn compare(&self, case: &Case, original: &Snapshot, slot: &[u8]) -> Result<(), String> {
        let relocated = self.run(case, Some(slot)).map_err(|e| format!("relocated run: {e}"))?;
        if *original == relocated {
            return Ok(());
        }
        let mut msg = String::new();
        for (r, (a, b)) in original.regs.iter().zip(&relocated.regs).enumerate() {
            if a != b {
                let _ = writeln!(msg, "  register {r}: {a:#x} original, {b:#x} relocated");
            }
        }
        if original.flags != relocated.flags {
            let _ = writeln!(msg, "  flags: {:#x} original, {:#x} relocated", original.flags, relocated.flags);
        }
        for (what, a, b) in [("data", &original.data, &relocated.data), ("stack", &original.stack, &relocated.stack)] {
            if let Some(at) = a.iter().zip(b.iter()).position(|(x, y)| x != y) {
                let _ = writeln!(msg, "  {what} differs first at offset {at:#x}");
            }
        }
        let _ = writeln!(msg, "  slot:\n{}", listing(slot, case.slot));
        Err(msg)
    }

    fn run(&self, case: &Case, slot: Option<&[u8]>) -> Result<Snapshot, String> {
        let code = region(CODE_A, CODE_SIZE);
        code.fill(0xcc);
        let entry = slot.map_or(SEQ, |_| case.slot);
        let epilogue_ip = SEQ + case.seq.len() as u64;
        for (ip, bytes) in [
            (CODE_A, prologue(case, entry)),
            (STUB, stub()),
            (ALT, alt(epilogue_ip)),
            (SEQ, case.seq.clone()),
            (epilogue_ip, epilogue()),
        ] {
            let at = (ip - CODE_A) as usize;
            code[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        for base in [SLOT_HIGH, SLOT_LOW] {
            region(base, CODE_SIZE).fill(0xcc);
        }
        if let Some(slot) = slot {
            region(case.slot, slot.len()).copy_from_slice(slot);
        }
        let data = region(DATA, DATA_SIZE);
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = (i * 7 + 3) as u8;
        }
        // Slots the sequences call through: STUB's address every 64 bytes.
        for slot in data.chunks_exact_mut(64) {
            slot[..8].copy_from_slice(&STUB.to_le_bytes());
        }
        for (i, byte) in region(STACK, STACK_SIZE).iter_mut().enumerate() {
            *byte = (i * 13 + 5) as u8;
        }
        region(RESULT, RESULT_SIZE).fill(0);

        // SAFETY: the child only arms an alarm and jumps into the prepared code, which ends
        // in exit_group; it calls nothing that could deadlock on a lock another thread of the
        // test process held at fork time.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: CODE_A holds the prologue, which switches to its own stack and never
            // returns: every path ends in the epilogue's exit_group or in a fatal signal.
            unsafe {
                libc::alarm(5);
                let entry: extern "C" fn() -> ! = std::mem::transmute(CODE_A as usize);
                entry()
            }
        }
        let mut status = 0;
        // SAFETY: `pid` is our child and `status` a valid out-pointer.
        let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
        assert_eq!(waited, pid, "waitpid: {}", std::io::Error::last_os_error());
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            return Err(if libc::WIFSIGNALED(status) {
                format!("killed by signal {}", libc::WTERMSIG(status))
            } else {
                format!("wait status {status:#x}")
            });
        }
        let result = region(RESULT, RESULT_SIZE);
        let word = |i: usize| u64::from_le_bytes(result[i * 8..i * 8 + 8].try_into().unwrap());
        Ok(Snapshot {
            regs: std::array::from_fn(word),
            flags: word(16) & FLAGS_MASK,
            data: region(DATA, DATA_SIZE).to_vec(),
            stack: region(STACK, STACK_SIZE).to_vec(),
        })
    }
}

/// Sets rsp, the flags and every other register, then jumps to `entry`.
fn prologue(case: &Case, entry: u64) -> Vec<u8> {
    let mut asm = Asm::at(CODE_A);
    asm.movabs(RSP, STACK_TOP);
    asm.raw(&[0x68]).raw(&(case.flags as u32).to_le_bytes()).raw(&[0x9d]); // push $flags; popfq
    for reg in (0..16).filter(|&r| r != RSP) {
        asm.movabs(reg, case.regs[reg as usize]);
    }
    asm.rel32(&[0xe9], entry);
    asm.code
}

/// The call target: records the return address it was given in r11.
fn stub() -> Vec<u8> {
    vec![
        0x4c, 0x8b, 0x1c, 0x24, // mov (%rsp),%r11
        0x48, 0x83, 0xc3, 0x11, // add $0x11,%rbx
        0xc3, // ret
    ]
}

/// A second way out of a sequence, that leaves a mark in r14 but not in the flags.
fn alt(epilogue_ip: u64) -> Vec<u8> {
    let mut asm = Asm::at(ALT);
    asm.raw(&[0x4d, 0x8d, 0x76, 0x77]); // lea 0x77(%r14),%r14
    asm.rel32(&[0xe9], epilogue_ip);
    asm.code
}

/// Stores rax..r15 and rflags at RESULT and exits the child.
fn epilogue() -> Vec<u8> {
    let mut asm = Asm::at(0);
    asm.raw(&[0x9c]); // pushfq, before anything changes the flags
    asm.raw(&[0x48, 0xa3]).raw(&RESULT.to_le_bytes()); // movabs %rax,RESULT
    asm.movabs(RAX, RESULT);
    for reg in (1..16).filter(|&r| r != RSP) {
        asm.raw(&[rex(true, reg, 0), 0x89, 0x80 | (reg & 7) << 3]).raw(&(u32::from(reg) * 8).to_le_bytes());
    }
    asm.pop(RCX).raw(&[0x48, 0x89, 0x88]).raw(&128u32.to_le_bytes()); // mov %rcx,128(%rax)
    asm.raw(&[0x48, 0x89, 0xa0]).raw(&32u32.to_le_bytes()); // mov %rsp,32(%rax)
    asm.raw(&[0xb8, 0xe7, 0, 0, 0, 0x31, 0xff, 0x0f, 0x05]); // exit_group(0)
    asm.code
}

fn listing(code: &[u8], ip: u64) -> String {
    match decode_function(code, ip) {
        Ok(insns) => insns.iter().map(|i| format!("    {:#x}: {}\n", i.ip, i.text)).collect(),
        Err(e) => format!("    ({e})\n"),
    }
}

// ---------------------------------------------------------------------------------------
// The sequences.

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: deterministic, so a failing case number always names the same case.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    fn scratch(&mut self) -> u8 {
        self.pick(&SCRATCH)
    }

    /// A value that makes comparisons and carries interesting.
    fn value(&mut self) -> u64 {
        match self.below(4) {
            0 => self.below(4),
            1 => self.pick(&[u64::MAX, 1 << 63, (1 << 63) - 1, 0x8000_0000, 0xffff_ffff]),
            _ => self.next(),
        }
    }

    /// An 8-byte aligned address in the data page, away from where rsi/rdi start.
    fn data_slot(&mut self) -> u64 {
        DATA + 0xc00 + self.below(0x40) * 8
    }
}

fn initial_regs(rng: &mut Rng) -> [u64; 16] {
    let mut regs: [u64; 16] = std::array::from_fn(|_| rng.value());
    regs[RCX as usize] = rng.below(6);
    regs[RSP as usize] = STACK_TOP;
    regs[RSI as usize] = DATA + 0x100;
    regs[RDI as usize] = DATA + 0x600;
    regs[R12 as usize] = DATA + 0x400;
    regs
}

/// One random instruction or idiom, appended to `asm`.
type Template = fn(&mut Asm, &mut Rng);

const ALU_RR: [u8; 8] = [0x01, 0x29, 0x21, 0x09, 0x31, 0x11, 0x19, 0x39]; // add sub and or xor adc sbb cmp

#[rustfmt::skip]
const TEMPLATES: &[Template] = &[
    // op %r,%r
    |a, r| { let op = r.pick(&ALU_RR); a.rr(&[op], r.scratch(), r.scratch()); },
    // op $imm32,%r
    |a, r| { let (ext, reg, imm) = (r.below(8) as u8, r.scratch(), r.next() as i32); a.ri(ext, reg, imm); },
    // mov disp(%rip),%r
    |a, r| { let (reg, slot) = (r.scratch(), r.data_slot()); a.rip_reg(0x8b, reg, slot); },
    // mov %r,disp(%rip)
    |a, r| { let (reg, slot) = (r.scratch(), r.data_slot()); a.rip_reg(0x89, reg, slot); },
    // add %r,disp(%rip)
    |a, r| { let (reg, slot) = (r.scratch(), r.data_slot()); a.rip_reg(0x01, reg, slot); },
    // lea disp(%rip),%r — of data, and of code inside the sequence
    |a, r| { let (reg, slot) = (r.scratch(), r.data_slot()); a.rip_reg(0x8d, reg, slot); },
    |a, r| { let (reg, pc) = (r.scratch(), a.pc()); a.rip_reg(0x8d, reg, pc); },
    // cmpq $imm32,disp(%rip)
    |a, r| { let (slot, imm) = (r.data_slot(), r.value() as i32); a.rip(&[0x48, 0x81, 0x3d], slot, &imm.to_le_bytes()); },
    // mov %r,disp8(%r12); mov disp8(%r12),%r
    |a, r| { let (reg, d) = (r.scratch(), r.below(16) as u8 * 8); a.raw(&[rex(true, reg, R12), 0x89, 0x44 | (reg & 7) << 3, 0x24, d]); },
    |a, r| { let (reg, d) = (r.scratch(), r.below(16) as u8 * 8); a.raw(&[rex(true, reg, R12), 0x8b, 0x44 | (reg & 7) << 3, 0x24, d]); },
    // inc, dec, not, neg
    |a, r| { let (ext, reg) = (r.below(2) as u8, r.scratch()); a.raw(&[rex(true, 0, reg), 0xff, 0xc0 | ext << 3 | (reg & 7)]); },
    |a, r| { let (ext, reg) = (2 + r.below(2) as u8, r.scratch()); a.raw(&[rex(true, 0, reg), 0xf7, 0xc0 | ext << 3 | (reg & 7)]); },
    // shl/shr/sar/rol $imm8
    |a, r| {
        let (ext, reg, n) = (r.pick(&[4u8, 5, 7, 0]), r.scratch(), 1 + r.below(63) as u8);
        a.raw(&[rex(true, 0, reg), 0xc1, 0xc0 | ext << 3 | (reg & 7), n]);
    },
    // imul %r,%r
    |a, r| { let (x, y) = (r.scratch(), r.scratch()); a.rr(&[0x0f, 0xaf], x, y); },
    // setcc %al/%dl/%bl; cmovcc %r,%r
    |a, r| { let (cc, reg) = (r.below(16) as u8, r.pick(&[RAX, RDX, RBX])); a.raw(&[0x0f, 0x90 + cc, 0xc0 | reg]); },
    |a, r| { let (cc, x, y) = (r.below(16) as u8, r.scratch(), r.scratch()); a.rr(&[0x0f, 0x40 + cc], x, y); },
    // push/pop, pushfq/pop
    |a, r| { let (x, y) = (r.scratch(), r.scratch()); a.push(x).pop(y); },
    |a, r| { let x = r.scratch(); a.raw(&[0x9c]).pop(x); },
    // jcc rel8 over an add, jcc rel32 to ALT
    |a, r| { let (cc, reg, imm) = (r.below(16) as u8, r.scratch(), r.next() as i32); a.over(0x70 + cc, |a| { a.ri(0, reg, imm); }); },
    |a, r| { let cc = r.below(16) as u8; a.rel32(&[0x0f, 0x80 + cc], ALT); },
    // jmp rel8 over an add
    |a, r| { let reg = r.scratch(); a.over(0xeb, |a| { a.ri(0, reg, 0x1000); }); },
    // loop / loope / loopne over a short body
    |a, r| {
        let (op, n, reg) = (r.pick(&[0xe2u8, 0xe1, 0xe0]), 1 + r.below(5) as u32, r.scratch());
        a.mov_ecx(n).back(op, |a| { a.ri(0, reg, 3); a.ri(7, reg, 9); });
    },
    // jrcxz over an add, and to ALT
    |a, r| { let (n, reg) = (r.below(2) as u32, r.scratch()); a.mov_ecx(n).over(0xe3, |a| { a.ri(0, reg, 5); }); },
    |a, r| { let n = r.below(2) as u32; a.mov_ecx(n); a.raw(&[0xe3, 0x02, 0xeb, 0x05]).rel32(&[0xe9], ALT); },
    // call STUB
    |a, _| { a.rel32(&[0xe8], STUB); },
    // lea STUB(%rip),%rax; call *%rax
    |a, _| { a.rip_reg(0x8d, RAX, STUB).raw(&[0xff, 0xd0]); },
    // lea STUB(%rip),%r10; push %r10; call *(%rsp); pop %r10
    |a, _| { a.rip_reg(0x8d, R10, STUB).push(R10).raw(&[0xff, 0x14, 0x24]).pop(R10); },
    // lea STUB(%rip),%r10; push %r10; push %rbx; call *0x8(%rsp); pop %rbx; pop %r10
    |a, _| { a.rip_reg(0x8d, R10, STUB).push(R10).push(RBX).raw(&[0xff, 0x54, 0x24, 0x08]).pop(RBX).pop(R10); },
    // call *slot(%rip): the data page holds STUB's address every 64 bytes
    |a, r| { let slot = DATA + r.below(32) * 64; a.rel32(&[0xff, 0x15], slot); },
    // call 1f; 1: pop %r — the return address is the original one
    |a, r| { let reg = r.scratch(); a.raw(&[0xe8, 0, 0, 0, 0]).pop(reg); },
    // call L; jmp 1f; L: add $5,%rbx; ret; 1:
    |a, _| { a.raw(&[0xe8, 2, 0, 0, 0, 0xeb, 5, 0x48, 0x83, 0xc3, 0x05, 0xc3]); },
    // mov $n,%ecx; rep movsb / rep stosb / repne scasb / rep movsq
    |a, r| {
        let (n, op) = (r.below(17) as u32, r.pick(&[&[0xf3, 0xa4][..], &[0xf3, 0xaa], &[0xf2, 0xae], &[0xf3, 0x48, 0xa5]]));
        a.mov_ecx(n).raw(op);
    },
    // lodsb; stosq
    |a, _| { a.raw(&[0xac, 0x48, 0xab]); },
    // endbr64; nopl 0x0(%rax,%rax,1); xchg %rax,%rdx; bswap %rbx
    |a, _| { a.raw(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x44, 0, 0, 0x48, 0x92, 0x48, 0x0f, 0xcb]); },
];

/// Ways a sequence may end early: a `ret` to ALT, an indirect jump to ALT.
#[rustfmt::skip]
const ENDINGS: &[Template] = &[
    |a, _| { a.rip_reg(0x8d, R10, ALT).push(R10).raw(&[0xc3]); },
    |a, _| { a.rip_reg(0x8d, R10, ALT).raw(&[0x41, 0xff, 0xe2]); },
    |a, _| { a.rip_reg(0x8d, R10, ALT).push(R10).push(R10).raw(&[0xc2, 0x08, 0x00]); },
];

fn generated_cases(count: usize, seed: u64) -> Vec<Case> {
    let mut rng = Rng(seed);
    (0..count)
        .map(|i| {
            let mut asm = Asm::at(SEQ);
            for _ in 0..1 + rng.below(6) {
                rng.pick(TEMPLATES)(&mut asm, &mut rng);
            }
            if rng.below(8) == 0 {
                rng.pick(ENDINGS)(&mut asm, &mut rng);
            }
            Case {
                name: format!("generated #{i}"),
                seq: asm.code,
                regs: initial_regs(&mut rng),
                flags: 0x2 | (rng.next() & 0x8d5),
                slot: if i % 2 == 0 { SLOT_HIGH } else { SLOT_LOW },
            }
        })
        .collect()
}

/// Every template alone, every ending, and every condition code taken and not taken.
fn hand_written_cases() -> Vec<Case> {
    let mut rng = Rng(0x5eed);
    let mut case = |name: String, emit: &dyn Fn(&mut Asm, &mut Rng), flags: u64| {
        let mut asm = Asm::at(SEQ);
        emit(&mut asm, &mut rng);
        Case { name, seq: asm.code, regs: initial_regs(&mut rng), flags, slot: SLOT_HIGH }
    };
    let mut cases = Vec::new();
    for (i, template) in TEMPLATES.iter().chain(ENDINGS).enumerate() {
        cases.push(case(format!("template {i}"), &|a, r| template(a, r), 0x2));
    }
    // Flag patterns that make each condition both true and false somewhere: none, CF+ZF,
    // SF alone, OF+PF, and SF+OF.
    for flags in [0x2, 0x43, 0x82, 0x806, 0x882] {
        for cc in 0..16u8 {
            cases.push(case(
                format!("jcc {cc:#x} rel8, flags {flags:#x}"),
                &|a, _| {
                    a.over(0x70 + cc, |a| {
                        a.ri(0, RBX, 0x100);
                    });
                },
                flags,
            ));
            cases.push(case(
                format!("jcc {cc:#x} rel32 to ALT, flags {flags:#x}"),
                &|a, _| {
                    a.rel32(&[0x0f, 0x80 + cc], ALT).ri(0, RBX, 0x100);
                },
                flags,
            ));
        }
    }
    cases.push(case(
        "rip-relative load, store and lea in one run".into(),
        &|a, _| {
            a.rip_reg(0x8b, RAX, DATA + 0xc08).rip_reg(0x89, RAX, DATA + 0xff8).rip_reg(0x8d, RBX, DATA);
            a.rip(&[0xc7, 0x05], DATA + 0xd00, &0x1234_5678u32.to_le_bytes()); // movl $imm32,disp(%rip)
        },
        0x2,
    ));
    cases.push(case(
        "loop whose body calls".into(),
        &|a, _| {
            a.mov_ecx(3).back(0xe2, |a| {
                a.rel32(&[0xe8], STUB);
            });
        },
        0x2,
    ));
    cases
}

#[test]
fn relocated_sequences_behave_like_the_originals() {
    let harness = harness();
    let mut cases = hand_written_cases();
    let hand_written = cases.len();
    cases.extend(generated_cases(300, 0x0123_4567_89ab_cdef));
    let failures: Vec<String> = cases
        .iter()
        .filter_map(|case| {
            harness.check(case).err().map(|e| format!("{}:\n{}  sequence:\n{}", case.name, e, listing(&case.seq, SEQ)))
        })
        .collect();
    eprintln!(
        "differential: {} sequences ran ({hand_written} hand-written, {} generated), {} differ",
        cases.len(),
        cases.len() - hand_written,
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.iter().take(5).cloned().collect::<Vec<_>>().join("\n"));
}

/// The harness must be able to fail: a plain byte copy of a RIP-relative load reads other
/// memory, and a plain copy of a call returns into the copy (here: into int3 filler).
#[test]
fn harness_notices_a_naive_copy() {
    let harness = harness();
    let mut rng = Rng(7);
    for (seq, expected_r11) in [
        (Asm::at(SEQ).rip_reg(0x8b, RAX, DATA + 0xc08).code.clone(), None),
        (Asm::at(SEQ).rel32(&[0xe8], STUB).code.clone(), Some(SEQ + 5)),
    ] {
        let case = Case { name: "naive".into(), seq, regs: initial_regs(&mut rng), flags: 0x2, slot: SLOT_HIGH };
        let original = harness.run(&case, None).unwrap();
        assert_eq!(original.regs[RSP as usize], STACK_TOP, "the epilogue stored the registers");
        if let Some(r11) = expected_r11 {
            assert_eq!(original.regs[11], r11, "STUB saw the original return address");
        }
        let mut naive = case.seq.clone();
        naive.extend(
            dynprobe_arch::x86_64::jmp_rel32(SLOT_HIGH + naive.len() as u64, SEQ + naive.len() as u64).unwrap(),
        );
        assert!(harness.compare(&case, &original, &naive).is_err(), "{}", listing(&naive, SLOT_HIGH));
        assert_eq!(harness.check(&case), Ok(()));
    }
}
