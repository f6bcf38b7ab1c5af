//! Calls already in flight when tracing starts in a running process (`dynprobe record -p`):
//! found by unwinding every thread's stack, tracked from then on, and recorded as entered
//! before the attach (`Kind::EntryBeforeAttach`).
//!
//! ```text
//!   patch every site, recording held back      calls entered now are not diverted
//!   stop every other thread (text::stop)       each parked in the stop handler, its
//!                                              interrupted registers in its ucontext
//!   per thread: unwind from those registers    .eh_frame_hdr / .eh_frame of the loaded
//!     with the modules' call-frame information  modules, gimli, a context made beforehand
//!   frames of traced functions -> instances    at the bottom of the thread's instance
//!     (dynprobe_probe::graph_adopt)            stack, return addresses to the light sled
//!   their records, the recording published     every call entered after this is recorded
//!   the threads run again
//! ```
//!
//! Why in-process, from the controlling thread, while the others are stopped: the patched
//! sites are live and no thread can move (so its stack holds still while it is read and its
//! return addresses are replaced), the thread's registers are those of the code it was
//! stopped in (saved by the kernel in the stop handler's `ucontext`), and the instance
//! stacks are this process's memory. The unwinding itself runs on the controller, not in
//! each thread's signal handler: it may read large tables, and the controller can prepare
//! everything it needs first. While the threads are stopped it allocates nothing and takes
//! no lock a stopped thread could hold (the gimli context and every buffer are made
//! before the stop, and the module list too: `dl_iterate_phdr` takes the loader's lock).
//! Reads of a stack go through `process_vm_readv` (`dynprobe_text::raw::read`), which never
//! faults, and only inside the stack's mapping found at the stop (`/proc/self/maps`, read
//! with raw system calls into a buffer made beforehand); the call-frame tables are read
//! where the loader mapped them, checked to be still mapped once the threads are stopped.
//!
//! The unwinding follows the CFA and register rules of the System V x86-64 ABI (`.eh_frame`
//! as in the Linux Standard Base Core specification, "Exception Frames"); a frame whose rule
//! is a DWARF expression (the C library's signal trampoline) or whose code has no FDE (a
//! JIT) ends the walk: the frames found until then are adopted, those beyond are not (their
//! returns go unrecorded, as before the attach).
//!
//! A thread is often stopped inside dynprobe's own hook code: a plain-entry site's detour
//! buffer, which has no call-frame information, or the dispatcher and handlers it calls
//! (the agent's own code, whose frames gimli unwinds back into the detour). The walk steps
//! through the detour by its known layout: `dynprobe_arch`'s `hook_frame` finds, from the
//! detour's code, where the `rsp` the thread entered it with is at the instruction it is at
//! (or returns to), and the frame continues as the probed function's first instruction with
//! that `rsp`; a thread in the relocated copy of the covered instructions continues as the
//! probed instruction the copy stands for. Stopped before the dispatcher was called, the
//! thread has not entered the function yet (it does, recorded, once it runs again); inside
//! or after it, the function is in flight and adopted. A compiler site's stub and the
//! caller it jumps to (`dynprobe_arch`'s `ftrace` module) are stepped through the same way:
//! `caller_position` finds, from their code, where the `rsp` the site's `call` was made with
//! is (and the program's `rbp`, which the caller saves while it uses its own), and the frame
//! continues as the site's instruction with that `rsp`. The return trampoline's resume stub
//! (an exception resumed from a return diverted on its way) is stepped through by its known
//! frame (`dynprobe_arch`'s `resume_stub_frame`) to the function the exception is going to.
//! Still not stepped through: the return trampoline's sled (a return in progress, which
//! only a call diverted by an earlier session can be making at an attach); such a walk ends
//! there.

use crate::graph;
use dynprobe_arch::native::ftrace::{caller_position, SiteRsp, CALLER_ENTRY_DEPTH, STUB_ENTRY_DEPTH, STUB_SIZE};
use dynprobe_arch::native::hook_frame::EntryRsp;
use dynprobe_events::record::{Kind, Record};
use dynprobe_probe::{DetourSpan, InFlightCall};
use gimli::{
    BaseAddresses, CfaRule, EhFrame, EhFrameHdr, EndianSlice, LittleEndian, ParsedEhFrameHdr, Register, RegisterRule,
    UnwindContext, UnwindSection, X86_64,
};
use std::time::Duration;

type Slice = EndianSlice<'static, LittleEndian>;

/// The most bytes of a detour's code before its copy (see `dynprobe_arch`'s `detour`
/// module: about 1 KiB with the AVX-512 save).
const DETOUR_MAX: usize = 4096;
/// The DWARF register number (System V x86-64 ABI, figure 3.36) of each general register by
/// its number in the instruction encoding (rax rcx rdx rbx rsp rbp rsi rdi r8 … r15).
const DWARF_OF_GPR: [usize; 16] = [0, 2, 1, 3, 7, 6, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15];
/// Bytes of a compiler site's `call` of its stub.
const CALL_LEN: u64 = 5;
/// The most frames one thread's walk follows (deeper stacks end the walk).
const MAX_FRAMES: usize = 4096;
/// How long the stop of the other threads may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Room for `/proc/self/maps` read during the stop.
const MAPS_BUFFER: usize = 4 << 20;

/// What [`crate::Tracer::adopt_in_flight`] found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Threads looked at.
    pub threads: usize,
    /// Calls found in flight and tracked (recorded as entered before the attach).
    pub calls: usize,
    /// Threads whose stack could not be read from where they were stopped (code without
    /// call-frame information, a stack outside every mapping): their calls in flight are
    /// not shown.
    pub unreadable: usize,
    /// Threads left running because they block the stop signal: their calls in flight are
    /// not shown.
    pub left: usize,
    /// Threads stopped inside dynprobe's own hook code (a detour buffer, a compiler site's
    /// stub or caller, or the handlers they call).
    pub in_hooks: usize,
    /// Of those, the threads whose walk stepped through it into the program's frames.
    pub stepped: usize,
    /// Of `in_hooks`, the threads inside a plain-entry site's detour (or its handlers).
    pub in_detours: usize,
    /// Of `in_hooks`, the threads inside a compiler site's stub or caller (or its dispatcher).
    pub in_callers: usize,
}

impl InFlight {
    /// What the attach found, for the user: the calls adopted, and the threads found inside
    /// dynprobe's hook code, by kind, and how many of those the walk stepped through (the
    /// others are among the threads whose calls in flight are shown from where the walk
    /// stopped).
    pub fn describe(&self) -> String {
        let mut line = format!("calls in flight at the attach: {} adopted on {} thread(s)", self.calls, self.threads);
        match self.in_hooks {
            0 => line.push_str("; none was inside dynprobe's hook code"),
            n => line.push_str(&format!(
                "; {n} thread(s) inside dynprobe's hook code ({} in entry detours, {} in compiler-site callers), \
                 {} stepped through into the program's frames",
                self.in_detours, self.in_callers, self.stepped
            )),
        }
        line
    }
}

/// The hook code one thread's walk met, and whether it got through.
#[derive(Debug, Clone, Copy, Default)]
struct Hooks {
    detour: bool,
    caller: bool,
    /// Hook code the walk could not step through.
    stuck: bool,
}

/// A loaded module's call-frame information.
struct Module {
    /// Its executable segments.
    code: Vec<(u64, u64)>,
    eh_frame: EhFrame<Slice>,
    hdr: ParsedEhFrameHdr<Slice>,
    bases: BaseAddresses,
    /// The first and last byte of its tables, checked to be mapped still at the stop.
    bounds: [u64; 2],
}

/// Everything the walk needs, made before the stop.
pub(crate) struct Walker {
    modules: Vec<Module>,
    /// Traced functions' (address, id), sorted by address.
    functions: Vec<(u64, u32)>,
    context: Box<UnwindContext<usize>>,
    maps: Vec<u8>,
    /// One thread's calls, innermost first, then reversed.
    calls: Vec<InFlightCall>,
    /// The optimized probes' detour buffers (the plain-entry sites' hook code), by address.
    detours: Vec<DetourSpan>,
    /// The compiler sites' stubs and callers (`crate::batch`), by address.
    callers: Vec<crate::batch::CallerBlock>,
    /// Room for one detour's or caller's code, read during the stop.
    code: Vec<u8>,
}

/// Where a walk is: the registers of a frame, and how its `pc` is to be read.
struct Frame {
    regs: [Option<u64>; 17],
    pc: u64,
    /// `pc` is where the thread is (the first frame, or a frame dynprobe's hook code stood
    /// for), not a return address (which is looked up one byte back, in its call).
    exact: bool,
    /// The thread has been through the entry site of the function `pc` is in (its hook
    /// code called the dispatcher, or was calling it): it is inside that call.
    entered: bool,
}

impl Frame {
    /// Where its code is looked up: `pc`, or for a return address the byte before it, in its
    /// call (whose call-frame row it has: the call may be the function's last instruction).
    fn lookup(&self) -> u64 {
        if self.exact {
            self.pc
        } else {
            self.pc.wrapping_sub(1)
        }
    }
}

/// Reads `len` bytes of dynprobe's hook code at `ip` into `buf`, made beforehand (at most its
/// capacity: nothing is allocated during the stop); false if unreadable.
fn read_code(buf: &mut Vec<u8>, ip: u64, len: usize) -> bool {
    buf.clear();
    buf.resize(len.min(buf.capacity()), 0);
    dynprobe_text::raw::read(ip, buf)
}

/// The word at `addr` of a stack that spans `sp .. stack_end`, read without faulting; `None`
/// outside it or unreadable.
fn stack_word(addr: u64, sp: u64, stack_end: u64) -> Option<u64> {
    let mut word = [0u8; 8];
    (addr >= sp && addr + 8 <= stack_end && dynprobe_text::raw::read(addr, &mut word)).then(|| u64::from_le_bytes(word))
}

impl Walker {
    pub(crate) fn new(functions: impl Iterator<Item = (u64, u32)>) -> Walker {
        let mut functions: Vec<(u64, u32)> = functions.collect();
        functions.sort_unstable();
        Walker {
            modules: loaded_modules(),
            functions,
            context: Box::new(UnwindContext::new()),
            maps: Vec::with_capacity(MAPS_BUFFER),
            calls: Vec::with_capacity(MAX_FRAMES),
            detours: dynprobe_probe::detours(),
            callers: crate::batch::caller_blocks(),
            code: Vec::with_capacity(DETOUR_MAX),
        }
    }

    /// Stops every other thread, tracks the traced calls in flight on each, pushes their
    /// records, and publishes the held output before the threads run again.
    pub(crate) fn adopt_and_publish(&mut self) -> Result<InFlight, String> {
        let Some(out) = graph::held_output() else { return Ok(InFlight::default()) };
        // A thread that blocks the stop signal (a program's signal-handling thread) cannot be
        // held: it is left running, its calls in flight not shown (`InFlight::left`).
        let world = dynprobe_text::stop::stop_threads_that_answer(STOP_TIMEOUT).map_err(|e| e.to_string())?;
        // Nothing below allocates: the vectors were given their capacity beforehand.
        let time = out.clock.now();
        read_maps(&mut self.maps);
        self.modules.retain(|m| m.bounds.iter().all(|&at| dynprobe_text::raw::read(at, &mut [0u8])));
        let mut found = InFlight { left: world.left_running(), ..InFlight::default() };
        for thread in world.threads() {
            found.threads += 1;
            let Some(regs) = registers(thread.frame) else {
                found.unreadable += 1;
                continue;
            };
            let sp = regs[X86_64::RSP.0 as usize].unwrap_or(0);
            let Some(stack_end) = mapping_end(&self.maps, sp) else {
                found.unreadable += 1;
                continue;
            };
            self.calls.clear();
            let (whole, hooks) = self.walk(regs, sp, stack_end);
            found.unreadable += usize::from(!whole);
            if hooks.detour || hooks.caller || hooks.stuck {
                found.in_hooks += 1;
                found.stepped += usize::from(!hooks.stuck);
                found.in_detours += usize::from(hooks.detour);
                found.in_callers += usize::from(hooks.caller);
            }
            self.calls.reverse();
            for call in self.calls.iter_mut() {
                call.func |= out.tag;
            }
            // SAFETY: the thread is held stopped by `world` for the whole call, and the calls
            // were read from its stack, inside its mapping, in this stop.
            let adopted = unsafe { dynprobe_probe::graph_adopt(thread.tp, thread.tid, sp, &self.calls, out.max_depth) };
            let Some(adopted) = adopted else { continue };
            for (k, call) in self.calls.iter().take(adopted.count).enumerate() {
                let depth = (adopted.first_depth + k) as u16;
                let func = u64::from(call.func & graph::ID_MASK);
                out.ring.push(adopted.slot, thread.tid as u32, Record::new(Kind::EntryBeforeAttach, time, depth, func));
            }
            found.calls += adopted.count;
        }
        graph::publish_held();
        drop(world);
        Ok(found)
    }

    /// Walks one thread's stack from its interrupted registers, collecting the frames of
    /// traced functions into `self.calls`, innermost first. The first value is false when
    /// the walk ended somewhere other than the outermost frame (or the first frame of an
    /// unknown code); the second says which of dynprobe's hook code it went through.
    fn walk(&mut self, regs: [Option<u64>; 17], sp: u64, stack_end: u64) -> (bool, Hooks) {
        let mut hooks = Hooks::default();
        let Some(pc) = regs[X86_64::RA.0 as usize] else { return (false, hooks) };
        let mut at = Frame { regs, pc, exact: true, entered: false };
        for _ in 0..MAX_FRAMES {
            let step = match self.step_through_hook(&at, sp, stack_end) {
                Some(step) => {
                    hooks.detour = true;
                    Some(step)
                }
                None => self.step_through_caller(&at, sp, stack_end).inspect(|_| hooks.caller = true),
            };
            if let Some(step) = step {
                let Some(program) = step else {
                    hooks.stuck = true;
                    return (false, hooks);
                };
                at = program;
            }
            match self.unwind(&mut at, sp, stack_end) {
                Some(true) => {}
                Some(false) => return (true, hooks),
                None => return (false, hooks),
            }
        }
        (false, hooks)
    }

    /// When `at` is in a compiler site's stub or caller (or returns into the caller, from
    /// its dispatcher): the frame of the traced function at its site — the site's
    /// instruction, with the `rsp` and `rbp` the thread had there — or `Some(None)` when it
    /// cannot be told. The stub and the caller change no callee-saved register but `rbp`,
    /// which they save where `dynprobe_arch`'s `caller_position` says.
    fn step_through_caller(&mut self, at: &Frame, sp: u64, stack_end: u64) -> Option<Option<Frame>> {
        let lookup = at.lookup();
        let i = self.callers.partition_point(|b| b.start <= lookup).checked_sub(1)?;
        let block = self.callers[i];
        if lookup >= block.end {
            return None;
        }
        let stubs = block.start + block.caller_len.next_multiple_of(STUB_SIZE);
        let (code_ip, len, depth) = if lookup < block.start + block.caller_len {
            (block.start, block.caller_len, CALLER_ENTRY_DEPTH)
        } else if lookup >= stubs {
            (stubs + (lookup - stubs) / STUB_SIZE * STUB_SIZE, STUB_SIZE, STUB_ENTRY_DEPTH)
        } else {
            return Some(None);
        };
        if !read_code(&mut self.code, code_ip, len as usize) {
            return Some(None);
        }
        let Some(position) = caller_position(&self.code, code_ip, depth, at.pc) else { return Some(None) };
        let word = |addr: u64| stack_word(addr, sp, stack_end);
        let site_rsp = match position.site_rsp {
            SiteRsp::Rsp(d) => at.regs[X86_64::RSP.0 as usize].map(|rsp| rsp + u64::from(d)),
            SiteRsp::Rbp(d) => at.regs[X86_64::RBP.0 as usize].map(|rbp| rbp + u64::from(d)),
        };
        let Some(site_rsp) = site_rsp else { return Some(None) };
        // The site's `call` pushed the address of the instruction after it.
        let Some(after_site) = word(site_rsp.wrapping_sub(8)).filter(|&ret| in_code(&self.modules, ret)) else {
            return Some(None);
        };
        let mut regs = at.regs;
        regs[X86_64::RSP.0 as usize] = Some(site_rsp);
        if let Some(d) = position.rbp_saved {
            regs[X86_64::RBP.0 as usize] = word(site_rsp.wrapping_sub(u64::from(d)));
        }
        // Stopped before the dispatcher was called, the thread enters the function through
        // it once it runs again (recorded then); inside the dispatcher or after it, the call
        // is under way, as in a detour.
        let entered = position.called || !at.exact;
        Some(Some(Frame { regs, pc: after_site - CALL_LEN, exact: true, entered }))
    }

    /// When `at` is in a detour buffer (or returns into one, from the handlers it called):
    /// the frame of the probed function it stands for — its first instruction, with the
    /// `rsp` the thread entered the detour with, or the probed instruction a relocated
    /// copy stands for — or `Some(None)` when it cannot be told. The detour changes no
    /// callee-saved register (checked from its code), and the unwinding of the handlers
    /// put theirs back, so the registers the walk holds are the program's.
    fn step_through_hook(&mut self, at: &Frame, sp: u64, stack_end: u64) -> Option<Option<Frame>> {
        let lookup = at.lookup();
        let i = self.detours.partition_point(|d| d.start <= lookup).checked_sub(1)?;
        let d = &self.detours[i];
        if lookup >= d.end {
            return None;
        }
        let rsp = at.regs[X86_64::RSP.0 as usize];
        let mut program = Frame { regs: at.regs, pc: d.probe_ip, exact: true, entered: true };
        if at.pc >= d.copy {
            // The relocated copy runs on the program's stack with its registers: the probed
            // instruction it stands for has the same call-frame row (a return address into
            // the copy is the instruction after a relocated call, or the jump back).
            let offset = (at.pc - d.start) as u32;
            program.pc = match d.copy_map.iter().find(|&&(_, new)| new == offset) {
                Some(&(old, _)) => d.probe_ip + u64::from(old),
                None if d.copy_map.iter().all(|&(_, new)| new < offset) => d.probe_ip + u64::from(d.covered),
                None => return Some(None),
            };
            program.exact = at.exact || program.pc == d.probe_ip + u64::from(d.covered);
            return Some(Some(program));
        }
        if lookup < d.entry {
            return Some(None);
        }
        if !read_code(&mut self.code, d.entry, (d.copy - d.entry) as usize) {
            return Some(None);
        }
        let Some(position) = dynprobe_arch::native::hook_frame::entry_rsp(&self.code, d.entry, at.pc) else {
            return Some(None);
        };
        let word = |addr: u64| stack_word(addr, sp, stack_end);
        let entry_rsp = match position.rsp {
            EntryRsp::Rsp(k) => rsp.map(|rsp| rsp.wrapping_add_signed(k)),
            EntryRsp::Register { reg, offset } => {
                DWARF_OF_GPR.get(reg as usize).and_then(|&r| at.regs[r]).map(|v| v.wrapping_add_signed(offset))
            }
            EntryRsp::Word { at: slot, offset } => {
                rsp.and_then(|rsp| word(rsp.wrapping_add_signed(slot))).map(|v| v.wrapping_add_signed(offset))
            }
        };
        let Some(entry_rsp) = entry_rsp else { return Some(None) };
        program.regs[X86_64::RSP.0 as usize] = Some(entry_rsp);
        // Stopped before the dispatcher was called, the thread enters the function through
        // it once it runs again (recorded then); inside the dispatcher or after it, the call
        // is under way (a dispatcher that ran while the recording was held entered nothing).
        program.entered = position.called || !at.exact;
        Some(Some(program))
    }

    /// Unwinds one frame: `Some(true)` when `at` is now its caller's frame, `Some(false)`
    /// when the walk ended well (the outermost frame, or a call tracked already), `None`
    /// when it cannot go on.
    fn unwind(&mut self, at: &mut Frame, sp: u64, stack_end: u64) -> Option<bool> {
        let Walker { modules, functions, context, calls, .. } = self;
        let (regs, pc) = (at.regs, at.pc);
        let lookup = at.lookup();
        if let Some(offset) = dynprobe_probe::resume_stub_offset(lookup) {
            return step_out_of_resume_stub(at, offset, sp, stack_end).map(|()| true);
        }
        let module = modules.iter().find(|m| m.code.iter().any(|&(lo, hi)| lo <= lookup && lookup < hi))?;
        let table = module.hdr.table()?;
        let fde = table.fde_for_address(&module.eh_frame, &module.bases, lookup, EhFrame::cie_from_offset).ok()?;
        let row = fde.unwind_info_for_address(&module.eh_frame, &module.bases, context, lookup).ok()?;
        let cfa = match *row.cfa() {
            CfaRule::RegisterAndOffset { register, offset } => match regs.get(register.0 as usize).copied().flatten() {
                Some(value) => value.wrapping_add_signed(offset),
                None => return None,
            },
            CfaRule::Expression(_) => return None,
        };
        if cfa <= sp || cfa > stack_end {
            return None;
        }
        let read = |rule: RegisterRule<usize>| -> Option<Option<u64>> {
            match rule {
                RegisterRule::Offset(n) => stack_word(cfa.wrapping_add_signed(n), sp, stack_end).map(Some),
                RegisterRule::ValOffset(n) => Some(Some(cfa.wrapping_add_signed(n))),
                _ => None,
            }
        };
        let (ret_at, ret) = match row.register(X86_64::RA) {
            Some(RegisterRule::Undefined) => (0, None),
            Some(rule @ RegisterRule::Offset(n)) => match read(rule) {
                Some(ret) => (cfa.wrapping_add_signed(n), ret),
                None => return None,
            },
            _ => return None,
        };
        let start = fde.initial_address();
        // A thread stopped on the first bytes of a traced function has not been through
        // its site yet: it enters it, recorded, when it runs again.
        let entered = !at.exact || at.entered || pc >= start + 5;
        let traced = functions.binary_search_by_key(&start, |&(addr, _)| addr).ok();
        match (traced, ret) {
            // Adopted only when it returns into known code: a return address already
            // replaced (by an earlier session, still in flight) ends the walk below.
            (Some(i), Some(ret)) if entered && in_code(modules, ret) && calls.len() < calls.capacity() => {
                calls.push(InFlightCall { slot_addr: ret_at, ret, func: functions[i].1 })
            }
            _ => {}
        }
        let Some(ret) = ret else { return Some(false) };
        if dynprobe_probe::is_return_trampoline(ret) {
            // A call tracked already (by an earlier session, still in flight): the calls
            // below it are not taken up (see `graph_adopt`), and the walk ends well.
            return Some(false);
        }
        // The caller's callee-saved registers; the others are unknown there.
        let mut caller = [None; 17];
        for reg in [X86_64::RBX, X86_64::RBP, X86_64::R12, X86_64::R13, X86_64::R14, X86_64::R15] {
            let r = reg.0 as usize;
            caller[r] = match row.register(reg) {
                None | Some(RegisterRule::SameValue) => regs[r],
                Some(rule) => read(rule).flatten(),
            };
        }
        caller[X86_64::RSP.0 as usize] = Some(cfa);
        if ret == 0 {
            return Some(false);
        }
        *at = Frame { regs: caller, pc: ret, exact: false, entered: false };
        Some(true)
    }
}

/// Unwinds a frame in a return trampoline's resume stub (which has no module): it stands for
/// the function whose diverted return an exception unwinds through, just before its `ret`
/// with the original return address back in its slot (see `dynprobe_probe`'s
/// `resume_stub_offset`); its caller, the function the exception is going to, is the next
/// frame. `None` when its return address cannot be read.
fn step_out_of_resume_stub(at: &mut Frame, offset: u32, sp: u64, stack_end: u64) -> Option<()> {
    let (cfa_above_rsp, in_rdx) = dynprobe_arch::native::trampoline::resume_stub_frame(offset);
    let cfa = at.regs[X86_64::RSP.0 as usize]?.wrapping_add(cfa_above_rsp);
    if cfa < sp || cfa > stack_end {
        return None;
    }
    let ret = match in_rdx {
        true => at.regs[X86_64::RDX.0 as usize]?,
        false => stack_word(cfa.wrapping_sub(8), sp, stack_end)?,
    };
    // The stub changes no callee-saved register.
    let mut caller = [None; 17];
    for reg in [X86_64::RBX, X86_64::RBP, X86_64::R12, X86_64::R13, X86_64::R14, X86_64::R15] {
        caller[reg.0 as usize] = at.regs[reg.0 as usize];
    }
    caller[X86_64::RSP.0 as usize] = Some(cfa);
    *at = Frame { regs: caller, pc: ret, exact: false, entered: false };
    Some(())
}

/// Whether the return address `addr` returns into the code of a module of `modules`.
fn in_code(modules: &[Module], addr: u64) -> bool {
    addr != 0 && modules.iter().any(|m| m.code.iter().any(|&(lo, hi)| lo < addr && addr <= hi))
}

/// The interrupted registers saved in the stop handler's `ucontext` at `frame`, by DWARF
/// register number (the return-address column holds `rip`).
fn registers(frame: u64) -> Option<[Option<u64>; 17]> {
    // `gregset_t`: 23 registers (<sys/ucontext.h>).
    const GREGS: usize = 23;
    let mut bytes = [0u8; GREGS * 8];
    let at = frame + std::mem::offset_of!(libc::ucontext_t, uc_mcontext) as u64;
    if !dynprobe_text::raw::read(at, &mut bytes) {
        return None;
    }
    let greg = |i: libc::c_int| {
        let i = i as usize * 8;
        Some(u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes")))
    };
    let mut regs = [None; 17];
    let map: [(Register, libc::c_int); 17] = [
        (X86_64::RAX, libc::REG_RAX),
        (X86_64::RDX, libc::REG_RDX),
        (X86_64::RCX, libc::REG_RCX),
        (X86_64::RBX, libc::REG_RBX),
        (X86_64::RSI, libc::REG_RSI),
        (X86_64::RDI, libc::REG_RDI),
        (X86_64::RBP, libc::REG_RBP),
        (X86_64::RSP, libc::REG_RSP),
        (X86_64::R8, libc::REG_R8),
        (X86_64::R9, libc::REG_R9),
        (X86_64::R10, libc::REG_R10),
        (X86_64::R11, libc::REG_R11),
        (X86_64::R12, libc::REG_R12),
        (X86_64::R13, libc::REG_R13),
        (X86_64::R14, libc::REG_R14),
        (X86_64::R15, libc::REG_R15),
        (X86_64::RA, libc::REG_RIP),
    ];
    for (reg, index) in map {
        regs[reg.0 as usize] = greg(index);
    }
    Some(regs)
}

/// Reads `/proc/self/maps` into `buf` (within its capacity) with raw system calls.
fn read_maps(buf: &mut Vec<u8>) {
    buf.clear();
    // SAFETY: opens a NUL-terminated literal path; the descriptor is closed below.
    let fd = unsafe { libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return;
    }
    while buf.len() < buf.capacity() {
        let room = buf.capacity() - buf.len();
        // SAFETY: reads into the vector's spare capacity, then sets the length to cover
        // exactly the bytes read.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().add(buf.len()).cast(), room) };
        if n <= 0 {
            break;
        }
        // SAFETY: as above: `n` more bytes were written.
        unsafe { buf.set_len(buf.len() + n as usize) };
    }
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
}

/// The end of the writable mapping of `maps` that holds `addr`.
fn mapping_end(maps: &[u8], addr: u64) -> Option<u64> {
    maps.split(|&b| b == b'\n').find_map(|line| {
        let (range, rest) = split_at_byte(line, b' ')?;
        let (lo, hi) = split_at_byte(range, b'-')?;
        let (lo, hi) = (hex(lo)?, hex(hi)?);
        (lo <= addr && addr < hi && rest.get(1) == Some(&b'w')).then_some(hi)
    })
}

fn split_at_byte(s: &[u8], b: u8) -> Option<(&[u8], &[u8])> {
    let i = s.iter().position(|&c| c == b)?;
    Some((&s[..i], &s[i + 1..]))
}

fn hex(s: &[u8]) -> Option<u64> {
    s.iter().try_fold(0u64, |v, &c| Some(v.checked_mul(16)? + (c as char).to_digit(16)? as u64))
}

/// The loaded modules that have an `.eh_frame_hdr` (`PT_GNU_EH_FRAME`), read from the
/// loader's list (`dl_iterate_phdr(3)`).
fn loaded_modules() -> Vec<Module> {
    let mut modules: Vec<Module> = Vec::new();
    extern "C" fn each(info: *mut libc::dl_phdr_info, _size: libc::size_t, data: *mut libc::c_void) -> libc::c_int {
        // SAFETY: `data` is the `&mut Vec<Module>` passed below, and `info` the loader's
        // entry for one object, valid during this call.
        let (modules, info) = unsafe { (&mut *data.cast::<Vec<Module>>(), &*info) };
        // SAFETY: the loader's program headers of this object: `dlpi_phnum` of them.
        let headers = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        if let Some(module) = module_of(info.dlpi_addr, headers) {
            modules.push(module);
        }
        0
    }
    // SAFETY: the callback only reads the entries it is given and pushes onto `modules`.
    unsafe { libc::dl_iterate_phdr(Some(each), (&mut modules as *mut Vec<Module>).cast()) };
    modules
}

fn module_of(base: u64, headers: &[libc::Elf64_Phdr]) -> Option<Module> {
    let segment = |h: &libc::Elf64_Phdr| (base + h.p_vaddr, base + h.p_vaddr + h.p_memsz);
    let loads: Vec<(u64, u64)> = headers.iter().filter(|h| h.p_type == libc::PT_LOAD).map(segment).collect();
    let code: Vec<(u64, u64)> =
        headers.iter().filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_X != 0).map(segment).collect();
    let eh = headers.iter().find(|h| h.p_type == libc::PT_GNU_EH_FRAME)?;
    let (hdr_lo, hdr_hi) = segment(eh);
    if code.is_empty() || !loads.iter().any(|&(lo, hi)| lo <= hdr_lo && hdr_hi <= hi) || hdr_hi <= hdr_lo {
        return None;
    }
    // SAFETY: the header table lies inside a loaded segment of this object, mapped (and
    // readable: the unwinder of the C library reads it) while the object is loaded.
    let hdr_bytes: &'static [u8] =
        unsafe { std::slice::from_raw_parts(hdr_lo as usize as *const u8, (hdr_hi - hdr_lo) as usize) };
    let bases = BaseAddresses::default().set_eh_frame_hdr(hdr_lo);
    let hdr = EhFrameHdr::new(hdr_bytes, LittleEndian).parse(&bases, 8).ok()?;
    let eh_lo = match hdr.eh_frame_ptr() {
        gimli::Pointer::Direct(addr) => addr,
        gimli::Pointer::Indirect(_) => return None,
    };
    // `.eh_frame` has no length of its own here: it runs at most to its segment's end.
    let &(_, eh_hi) = loads.iter().find(|&&(lo, hi)| lo <= eh_lo && eh_lo < hi)?;
    // SAFETY: as above, within one loaded segment of the object.
    let eh_bytes: &'static [u8] =
        unsafe { std::slice::from_raw_parts(eh_lo as usize as *const u8, (eh_hi - eh_lo) as usize) };
    let mut eh_frame = EhFrame::new(eh_bytes, LittleEndian);
    eh_frame.set_address_size(8);
    let bases = bases.set_eh_frame(eh_lo).set_text(code[0].0);
    Some(Module { code, eh_frame, hdr, bases, bounds: [hdr_lo, eh_hi - 1] })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_description_names_the_threads_in_hook_code_by_kind() {
        let none = InFlight { threads: 6, calls: 3, ..InFlight::default() };
        assert_eq!(
            none.describe(),
            "calls in flight at the attach: 3 adopted on 6 thread(s); none was inside dynprobe's hook code"
        );
        let some = InFlight { threads: 6, calls: 9, in_hooks: 3, stepped: 2, in_detours: 1, in_callers: 2, ..none };
        assert!(some.describe().ends_with(
            "; 3 thread(s) inside dynprobe's hook code (1 in entry detours, 2 in compiler-site callers), 2 stepped \
             through into the program's frames"
        ));
    }

    #[test]
    fn maps_lines_give_the_end_of_the_writable_mapping() {
        let maps = b"00400000-00401000 r-xp 00000000 08:01 1 /bin/x\n7ffc0000-7ffd0000 rw-p 00000000 00:00 0 [stack]\n";
        assert_eq!(mapping_end(maps, 0x7ffc1234), Some(0x7ffd0000));
        assert_eq!(mapping_end(maps, 0x400100), None, "not writable");
        assert_eq!(mapping_end(maps, 0x10), None);
    }
}
