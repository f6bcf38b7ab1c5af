//! The detour buffer of a jump-optimized probe (the kernel's optprobe detour buffer:
//! Documentation/trace/kprobes.rst, "Preparing Detour Buffer"): where the `jmp` written
//! over the probe point leads.
//!
//! ```text
//!  +0   trap:  int3                        slow way out: the handler asked for more than a
//!              int3 ...                    register restore can give (see below)
//!  +16  entry: [cmpb $0xcc,filter(%rip) ; jne full ; cmp $v,%rdi ; je full … ; jmp copy]
//!        full: lea -(128+144)(%rsp),%rsp   step over the red zone, room for the frame
//!              pushfq ; cld                (entry: movq $0x202, the flags are dead)
//!              mov %r15..%rdi,0..112(%rsp) the frame is now a `Regs`: r15 at the lowest address
//!              (store the original rsp and the probe address in the frame)
//!              mov %rsp,%rsi               the frame, dispatch's second argument
//!              mov $context,%rdi
//!       [light path, when built light (see below):
//!              cmpb $0xcc,light(%rip) ; jne vectors
//!              and $-16,%rsp ; sub $16,%rsp ; mov %rsi,8(%rsp) ; mov %rdi,(%rsp)
//!              call light_dispatch(context, frame)
//!              mov %eax,%r11d ; mov (%rsp),%rdi ; mov 8(%rsp),%rsp
//!              cmp $2,%r11d ; jne tail     2: a heavy handler joined, do it again with…
//!              mov %rsp,%rsi]
//!     vectors: and $-align,%rsp ; sub $area,%rsp ; mov %rsi,area-8(%rsp)
//!              <save vector state>         MXCSR and every vector register (see StateSave)
//!              call dispatch(context, frame)
//!              mov %eax,%r11d
//!              <restore vector state>
//!              mov area-8(%rsp),%rsp
//!        tail: test %r11d,%r11d ; jnz trap
//!              cmp <callee-saved> ; jne trap    the dispatcher kept the callee-saved ones
//!             [mid-function: the frame's flags, by sahf when they are arithmetic ones
//!              only, else by popfq (see arithmetic_flags_or_popfq); entry: flags are
//!              dead at a call, skipped]
//!              mov 0..112(%rsp),<caller-saved>  registers as the handlers left them
//!              lea 144(%rsp),%rsp          back to the original rsp, red zone untouched
//!  copy:       <covered instructions, relocated>
//!              jmp <probe point + covered length>
//! ```
//!
//! `dispatch` returns 0 to continue into the copy, or 1 when the thread must go
//! somewhere a restore cannot take it without a spare register: a new `rip` (a diversion, or
//! the post-handler path), a new `rsp`. Then the thread executes the `int3` at `trap` with
//! `rsp` at the frame, and the trap's owner loads the whole frame into the thread's context.
//!
//! **Light detours.** When every handler of the site is proven to leave the vector, x87 and
//! MXCSR state alone (see [`super::vector_use`]), the detour is built with a light path
//! that saves only the general registers and the flags (the 2 KiB of AVX-512 state are
//! most of a full detour's cost). It is taken while the byte at [`LIGHT_FLAG_OFFSET`] is
//! `int3`; the probe layer writes a `nop` there for good when a heavy handler joins the
//! site. A thread that read the flag just before sees the heavy handler in the site's list:
//! the dispatcher then runs no handler and returns [`REDO_FULL`], and the detour does the
//! call again with the vector state saved.
//!
//! The frame layout is the one of the probe layer's `Regs`: 18 quadwords, `r15 r14 r13 r12
//! r11 r10 r9 r8 rbp rbx rax rcx rdx rsi rdi rflags rsp rip`.

use iced_x86::code_asm::*;
use iced_x86::IcedError;

use super::encode::{jmp_any, rel32_reaches};
use super::relocate::{relocate, RelocError};

/// Size of the register frame (18 quadwords).
pub const FRAME_SIZE: i32 = 144;
/// Offset of the saved flags in the frame.
pub const FRAME_FLAGS: i32 = 120;
/// Offset of the saved `rsp` in the frame.
pub const FRAME_RSP: i32 = 128;
/// Offset of the saved `rip` in the frame.
pub const FRAME_IP: i32 = 136;
/// The red zone below `rsp` ([`super::RED_ZONE`]), which a detour must not touch, as an
/// operand offset.
const RED_ZONE: i32 = super::RED_ZONE as i32;
/// The flags a detour at a function entry puts in the frame (only IF and the reserved bit).
const ENTRY_FLAGS: i32 = 0x202;
/// Offset of the detour's entry (what the probe point's `jmp` targets).
pub const ENTRY_OFFSET: usize = 16;
/// Offset of the slow-path `int3`.
pub const TRAP_OFFSET: usize = 0;
/// What a light call of the dispatcher returns when a handler of the site is heavy: it ran
/// no handler, and the detour calls it again with the vector state saved.
pub const REDO_FULL: u32 = 2;
/// Offset of the byte that keeps a light detour's light path on while it is `int3` (as
/// written), and off for good once it is anything else (a byte of the trap area, read as
/// data, never executed).
pub const LIGHT_FLAG_OFFSET: usize = ENTRY_OFFSET - 2;

/// What the detour saves around the handlers besides the general registers.
///
/// Every vector register is saved, at a function entry too: the SysV ABI says only xmm0–7
/// carry arguments there, but GCC's `-fipa-ra` lets a caller keep its own values in any
/// register it knows the callee leaves alone (xmm8–15, the upper halves, zmm16–31), and a
/// handler — Rust code, or libc's AVX-512 `memcpy` under it — may clobber any of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateSave {
    /// Save and restore the flags. Not needed at a function entry: a call clobbers them.
    pub flags: bool,
    /// With `flags`: the direction flag is known clear at the probe point, as the ABI has
    /// it at every call and return, because the function holds no instruction that could
    /// set it ([`may_set_direction_flag`]). The frame's flags are then read by `lahf` and
    /// `seto` — `pushfq` and `cld` are microcoded, and were ~1.1 ns of a mid-function
    /// probe's ~9 on an AMD Zen 4 host — and only the full save's path clears DF (a light
    /// handler is proven not to read it). The frame holds the arithmetic flags, IF and bit
    /// 1 (TF and AC read as clear, as at an entry).
    pub direction_clear: bool,
    /// With `flags`: the arithmetic flags are dead at the probe point
    /// ([`arithmetic_flags_dead`]): the code after the handlers overwrites all six before it
    /// reads one, so they are not put back (a handler's change to one of them could not
    /// matter); a change to another flag, DF say, still reaches the program by `popfq`.
    pub arithmetic_dead: bool,
    /// The vector registers to save (with MXCSR).
    pub width: VectorWidth,
}

impl StateSave {
    /// The flags are saved, by `lahf`/`seto` rather than `pushfq` ([`Self::direction_clear`]).
    fn flags_without_pushfq(&self) -> bool {
        self.flags && self.direction_clear
    }
}

/// The vector registers a handler may clobber, by what the CPU has enabled (XCR0).
///
/// **The upper state.** Intel cores track whether the upper halves of zmm0–15 (bits
/// 128–511) may be non-zero — "dirty" since the last VEX/EVEX write there, clean after
/// `vzeroupper` (the `AVX` and `ZMM_Hi256` bits of XINUSE, `xgetbv` with ecx=1). A legacy
/// SSE instruction that writes an xmm register while they are dirty pays a penalty: on the
/// Intel Xeon (family 6 model 167, AVX-512, a KVM guest) this was measured on, about 120 ns
/// of CPU time, once per dirtying (`dynprobe bench --rows upper-state-penalty` measures it on
/// any host). Compiled code keeps them clean at calls and returns (`vzeroupper`), and
/// handlers are SSE code. So a save ends with
/// `vzeroupper` (the handlers start clean) after noting whether the upper halves held
/// anything; the restore, when they did not, puts the xmm registers back with legacy moves
/// after a `vzeroupper` — the same values, and the program left as clean as it was — and
/// with full-width moves only when they did. zmm16–31 and the opmask registers take no part
/// in the penalty and are always moved whole (measured there too). A return probe paid the
/// penalty two or three times per call (327 ns; 62 since). The test and the `vzeroupper`s
/// are lost in the noise of the 64 full-width moves (~11 ns in all, measured alone); AMD's
/// Zen cores have no such penalty.
///
/// They are saved with plain moves rather than `XSAVE`: on the AMD Zen 4 this was measured
/// on, `XSAVEC` + `XRSTOR` of the same state cost about 150 ns, the moves about 15. Reading
/// XINUSE (`xgetbv` with ecx=1) to skip components in their initial state was tried too:
/// on that machine the read alone cost more than the moves it saved. The x87 stack is not
/// saved: Rust code does not use it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorWidth {
    /// Nothing: the code called is proven to leave the vector, x87 and MXCSR state alone
    /// (see [`super::vector_use`]).
    None,
    /// xmm0–15.
    Sse,
    /// ymm0–15.
    Avx,
    /// zmm0–31 and the opmask registers k0–7.
    Avx512 {
        /// The opmask registers are 64 bits wide (AVX512BW), not 16.
        wide_masks: bool,
    },
}

impl std::fmt::Display for VectorWidth {
    /// What is saved, for a report: `AVX-512 (zmm0-31, k0-7, MXCSR)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VectorWidth::None => f.write_str("none (handlers proven light)"),
            VectorWidth::Sse => f.write_str("SSE (xmm0-15, MXCSR)"),
            VectorWidth::Avx => f.write_str("AVX (ymm0-15, MXCSR)"),
            VectorWidth::Avx512 { .. } => f.write_str("AVX-512 (zmm0-31, k0-7, MXCSR)"),
        }
    }
}

impl VectorWidth {
    /// Bytes of the save area.
    pub fn save_size(self) -> i32 {
        match self {
            VectorWidth::None => 64,
            VectorWidth::Sse => 16 * 16 + 64,
            VectorWidth::Avx => 16 * 32 + 64,
            VectorWidth::Avx512 { .. } => 32 * 64 + 8 * 8 + 64,
        }
    }
}

/// What a detour is built for.
#[derive(Debug, Clone, Copy)]
pub struct DetourSpec<'a> {
    /// Address the detour will sit at (64-byte aligned is best).
    pub detour_ip: u64,
    /// The probe point.
    pub probe_ip: u64,
    /// The original bytes of the covered run (see [`super::optimize::covered_run`]).
    pub covered: &'a [u8],
    /// State to save besides the general registers.
    pub save: StateSave,
    /// `extern "C" fn(context: u64, frame: *mut Regs) -> u32` run with the frame.
    pub dispatch: u64,
    /// The same, called on the light path (when `light`), which may also return
    /// [`REDO_FULL`].
    pub light_dispatch: u64,
    /// First argument of `dispatch`.
    pub context: u64,
    /// At a function entry (`save.flags` false: the compares clobber the flags), the values
    /// of the first argument (`rdi`) the handlers are for: any other goes straight to the
    /// copy, without saving anything, while [`FILTER_FLAG_OFFSET`] holds `int3`. Empty: no
    /// filter.
    pub entry_filter: &'a [i32],
    /// Build the light path too (every handler of the site is proven light).
    pub light: bool,
}

/// Offset of the byte that keeps a detour's entry filter on while it is `int3` (`0xcc`,
/// as written), and off for good once it is anything else: a byte of the trap area that is
/// never executed, read as data.
pub const FILTER_FLAG_OFFSET: usize = ENTRY_OFFSET - 1;

/// A built detour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detour {
    /// The code, to be placed at `detour_ip`.
    pub code: Vec<u8>,
    /// Offset in `code` of the relocated covered run.
    pub copy_offset: u32,
    /// For each covered instruction: (its offset in the run, its offset in `code`). Moves a
    /// thread stopped inside the covered bytes into the copy.
    pub copy_map: Vec<(u32, u32)>,
}

impl Detour {
    /// Where in the detour a thread at `offset` bytes into the covered run continues; `None`
    /// when `offset` is not an instruction boundary of the run.
    pub fn copy_address(&self, detour_ip: u64, offset: u32) -> Option<u64> {
        self.copy_map.iter().find(|&&(old, _)| old == offset).map(|&(_, new)| detour_ip + u64::from(new))
    }
}

/// Builds the detour for `spec`.
pub fn build_detour(spec: &DetourSpec<'_>) -> Result<Detour, RelocError> {
    build_detour_from(None, spec)
}

/// [`build_detour`], taking everything before the copy from `prefix` when it
/// [fits](DetourPrefix::fits) `spec` (the same bytes, without assembling them again).
pub fn build_detour_from(prefix: Option<&DetourPrefix>, spec: &DetourSpec<'_>) -> Result<Detour, RelocError> {
    let mut prefix = match prefix.filter(|p| p.fits(spec)) {
        Some(prefix) => prefix.fill(spec),
        None => save_call_restore(spec)?.assemble(spec.detour_ip)?,
    };
    let copy_ip = spec.detour_ip + prefix.len() as u64;
    let copy = relocate(spec.covered, spec.probe_ip, copy_ip)?;
    let copy_offset = prefix.len() as u32;
    prefix.extend_from_slice(&copy.code);
    let back_ip = spec.detour_ip + prefix.len() as u64;
    prefix.extend(jmp_any(back_ip, spec.probe_ip + spec.covered.len() as u64));
    let copy_map = copy.offsets.iter().map(|&(old, new)| (old, new + copy_offset)).collect();
    Ok(Detour { code: prefix, copy_offset, copy_map })
}

/// Everything before the copy (the prologue, the call and the epilogue), assembled once for
/// one kind of detour and filled in for each site: assembling the ~150 instructions of an
/// AVX-512 save and restore was most of the cost of preparing a detour, and a program
/// traced whole has one per function (80,000 in `node`).
///
/// The bytes depend on the site only through three fields: the probe address and the
/// dispatcher's context (each a `mov` of a 64-bit immediate) and, when the dispatcher is
/// in `rel32` reach, the call's displacement; its branches are internal (relative to the
/// prefix itself). [`DetourPrefix::new`] finds the fields in an assembled prefix and checks,
/// by assembling a second one for other values, that filling them in gives exactly the
/// bytes the assembler would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DetourPrefix {
    save: StateSave,
    entry_filter: Vec<i32>,
    dispatch: u64,
    light_dispatch: u64,
    direct_call: bool,
    code: Vec<u8>,
    probe_ip_at: usize,
    context_at: usize,
    /// Where the calls' `rel32`s are, for direct calls, and whether each is the light
    /// dispatcher's.
    call_at: Vec<(usize, bool)>,
    light: bool,
}

impl DetourPrefix {
    /// The prefix of `spec`'s kind of detour; `None` when its per-site fields cannot be
    /// found unambiguously (then every detour is assembled whole).
    pub fn new(spec: &DetourSpec<'_>) -> Result<Option<DetourPrefix>, RelocError> {
        let code = save_call_restore(spec)?.assemble(spec.detour_ip)?;
        let direct_call = direct_call(spec);
        let unique = |bytes: &[u8]| {
            let mut at = code.windows(bytes.len()).enumerate().filter(|(_, w)| *w == bytes).map(|(i, _)| i);
            at.next().filter(|_| at.next().is_none())
        };
        let (Some(probe_ip_at), Some(context_at)) =
            (unique(&spec.probe_ip.to_le_bytes()), unique(&spec.context.to_le_bytes()))
        else {
            return Ok(None);
        };
        let call_at = if direct_call {
            let rel = |i: usize, to: u64| to.wrapping_sub(spec.detour_ip + i as u64 + 4) as i64;
            let calls = |to: u64| -> Vec<(usize, bool)> {
                (1..code.len().saturating_sub(3))
                    .filter(|&i| code[i - 1] == 0xe8)
                    .filter(|&i| {
                        i64::from(i32::from_le_bytes(code[i..i + 4].try_into().expect("4 bytes"))) == rel(i, to)
                    })
                    .map(|i| (i, to == spec.light_dispatch && spec.light))
                    .collect()
            };
            let mut at = calls(spec.dispatch);
            if spec.light {
                at.extend(calls(spec.light_dispatch));
            }
            // One call of each dispatcher; anything else is not what was assembled.
            if at.len() != 1 + usize::from(spec.light) {
                return Ok(None);
            }
            at
        } else {
            Vec::new()
        };
        let prefix = DetourPrefix {
            save: spec.save,
            entry_filter: spec.entry_filter.to_vec(),
            dispatch: spec.dispatch,
            light_dispatch: spec.light_dispatch,
            direct_call,
            code,
            probe_ip_at,
            context_at,
            call_at,
            light: spec.light,
        };
        // Other values, the same kind of detour: the filled-in bytes must be the assembler's.
        let other = DetourSpec {
            detour_ip: spec.detour_ip + 0x40,
            probe_ip: spec.probe_ip ^ 0x0101_0101_0101,
            context: spec.context ^ 0x0202_0202_0202,
            ..*spec
        };
        if !prefix.fits(&other) || prefix.fill(&other) != save_call_restore(&other)?.assemble(other.detour_ip)? {
            return Ok(None);
        }
        Ok(Some(prefix))
    }

    /// Whether this prefix is the one `spec` would assemble (the same state saved, the same
    /// dispatcher, called the same way).
    pub fn fits(&self, spec: &DetourSpec<'_>) -> bool {
        self.save == spec.save
            && self.entry_filter == spec.entry_filter
            && self.dispatch == spec.dispatch
            && (!spec.light || self.light_dispatch == spec.light_dispatch)
            && self.direct_call == direct_call(spec)
            && self.light == spec.light
    }

    /// The prefix's bytes for `spec`.
    fn fill(&self, spec: &DetourSpec<'_>) -> Vec<u8> {
        // Room for the copy and the jump back too, which the caller appends: one allocation
        // per detour (a relocated run is a few instructions, each at most ~30 bytes).
        let mut code = Vec::with_capacity(self.code.len() + 256);
        code.extend_from_slice(&self.code);
        code[self.probe_ip_at..][..8].copy_from_slice(&spec.probe_ip.to_le_bytes());
        code[self.context_at..][..8].copy_from_slice(&spec.context.to_le_bytes());
        for &(at, light) in &self.call_at {
            let to = if light { spec.light_dispatch } else { spec.dispatch };
            let rel = to.wrapping_sub(spec.detour_ip + at as u64 + 4) as i32;
            code[at..][..4].copy_from_slice(&rel.to_le_bytes());
        }
        code
    }
}

/// Whether the detour calls its dispatcher directly (`call rel32`), as [`save_call_restore`]
/// decides.
fn direct_call(spec: &DetourSpec<'_>) -> bool {
    let reaches = |to: u64| rel32_reaches(spec.detour_ip, to) && rel32_reaches(spec.detour_ip + 4096, to);
    reaches(spec.dispatch) && (!spec.light || reaches(spec.light_dispatch))
}

/// The prologue, the call and the epilogue: everything before the copy.
fn save_call_restore(spec: &DetourSpec<'_>) -> Result<CodeAssembler, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut trap = a.create_label();
    let mut flag = a.create_label();
    let mut light_flag = a.create_label();
    a.set_label(&mut trap)?;
    for i in 0..ENTRY_OFFSET {
        if i == FILTER_FLAG_OFFSET {
            a.set_label(&mut flag)?;
        }
        if i == LIGHT_FLAG_OFFSET {
            a.set_label(&mut light_flag)?;
        }
        a.int3()?;
    }
    // The entry filter: a call whose first argument no handler is for goes on into the copy
    // untouched (the compares clobber only the flags, dead at a function entry).
    let filtered = !spec.entry_filter.is_empty() && !spec.save.flags;
    let mut full = a.create_label();
    let mut pass = a.create_label();
    if filtered {
        a.cmp(byte_ptr(flag), 0xcc)?;
        a.jne(full)?;
        for &value in spec.entry_filter {
            a.cmp(rdi, value)?;
            a.je(full)?;
        }
        a.jmp(pass)?;
        a.set_label(&mut full)?;
    }

    // Frame: [rip][rsp] below the red zone, then flags and the general registers.
    if spec.save.flags_without_pushfq() {
        // The flags go into the frame once its registers are saved (below).
        a.lea(rsp, ptr(rsp - (RED_ZONE + FRAME_SIZE)))?;
    } else if spec.save.flags {
        a.lea(rsp, ptr(rsp - (RED_ZONE + 16)))?;
        a.pushfq()?;
        // Handlers are Rust code: the ABI wants the direction flag clear (a signal handler
        // starts with it clear too). popfq puts the program's back.
        a.cld()?;
        a.lea(rsp, ptr(rsp - 8 * FRAME_GPRS.len() as i32))?;
    } else {
        // Flags are dead at a function entry and pushfq is microcoded: the frame gets the
        // flags a thread starts with (IF set), so that a slow-path restore loads sane ones.
        a.lea(rsp, ptr(rsp - (RED_ZONE + FRAME_SIZE)))?;
        a.mov(qword_ptr(rsp + FRAME_FLAGS), ENTRY_FLAGS)?;
    }
    for (i, reg) in FRAME_GPRS.into_iter().enumerate() {
        a.mov(qword_ptr(rsp + 8 * i as i32), reg)?;
    }
    if spec.save.flags_without_pushfq() {
        arithmetic_flags_to_frame(&mut a)?;
    }
    a.lea(rax, ptr(rsp + (FRAME_SIZE + RED_ZONE)))?;
    a.mov(qword_ptr(rsp + FRAME_RSP), rax)?;
    a.mov(rax, spec.probe_ip)?;
    a.mov(qword_ptr(rsp + FRAME_IP), rax)?;
    a.mov(rsi, rsp)?;
    a.mov(rdi, spec.context)?;
    // A direct call when the dispatcher is in reach of the detour (both near the probed
    // code, as in a probed executable); otherwise through a register.
    // (The call sits somewhere in the detour's first kilobytes.)
    let call = |a: &mut CodeAssembler, to: u64| match direct_call(spec) {
        true => a.call(to),
        false => a.mov(rax, to).and_then(|()| a.call(rax)),
    };
    let mut tail = a.create_label();
    if spec.light {
        // The light path: the general registers and flags are in the frame, and the
        // handlers are proven to leave every other register alone.
        let mut vectors = a.create_label();
        a.cmp(byte_ptr(light_flag), 0xcc)?;
        a.jne(vectors)?;
        a.and(rsp, -16)?;
        a.sub(rsp, 16)?;
        a.mov(qword_ptr(rsp + 8), rsi)?;
        a.mov(qword_ptr(rsp), rdi)?;
        call(&mut a, spec.light_dispatch)?;
        a.mov(r11d, eax)?;
        a.mov(rdi, qword_ptr(rsp))?;
        a.mov(rsp, qword_ptr(rsp + 8))?;
        a.cmp(r11d, REDO_FULL as i32)?;
        a.jne(tail)?;
        // A heavy handler joined the site: no handler ran and the frame is as built.
        a.mov(rsi, rsp)?;
        a.set_label(&mut vectors)?;
    }

    if spec.save.flags_without_pushfq() {
        // DF is clear here unless something broke the ABI (a callee returning with it set,
        // a signal handler's or another probe's change to the program's flags). A light
        // handler is proven not to read it (no string instruction: see `vector_use`); any
        // other, which may copy memory with `rep movsb`, runs with it cleared all the same.
        // (`cld` costs ~0.8 ns on an AMD Zen 4: not on the light path.)
        a.cld()?;
    }
    // The vector save area, aligned, with the frame's address in its last quadword.
    let area = spec.save.width.save_size();
    a.and(rsp, -64)?;
    a.sub(rsp, area)?;
    a.mov(qword_ptr(rsp + (area - 8)), rsi)?;
    vector_moves(&mut a, spec.save.width, Direction::Save)?;
    call(&mut a, spec.dispatch)?;
    // r11 holds the decision through the vector restore, which uses eax and the flags; r11
    // itself is reloaded from the frame afterwards.
    a.mov(r11d, eax)?;
    vector_moves(&mut a, spec.save.width, Direction::Restore)?;
    a.mov(rsp, qword_ptr(rsp + (area - 8)))?;
    a.set_label(&mut tail)?;
    a.test(r11d, r11d)?;
    a.jnz(trap)?;
    // The dispatcher preserved the callee-saved registers, so they still hold the values in
    // the frame unless a handler changed the frame: compare instead of reloading (a load
    // into a register costs more than one into a comparison), and take the slow way out if
    // a handler changed one. The compares come first: they clobber the flags, which are
    // restored after them.
    for (i, reg) in FRAME_GPRS.into_iter().enumerate() {
        if CALLEE_SAVED.contains(&reg) {
            a.cmp(qword_ptr(rsp + 8 * i as i32), reg)?;
            a.jne(trap)?;
        }
    }
    let mut done = a.create_label();
    if spec.save.flags {
        arithmetic_flags_or_popfq(&mut a, &mut done, spec.save.arithmetic_dead)?;
    }
    // Moves and `lea` leave the flags alone.
    caller_saved_reload(&mut a)?;
    // Past the flags word (at a function entry the flags are dead: a call clobbers them).
    a.lea(rsp, ptr(rsp + (8 + 16 + RED_ZONE)))?;
    if spec.save.flags || filtered {
        // Where the popfq path or a filtered-out call joins the copy (a label needs an
        // instruction, and one only: a filter is only built where flags are not saved).
        match spec.save.flags {
            true => a.set_label(&mut done)?,
            false => a.set_label(&mut pass)?,
        }
        a.nop()?;
    }
    Ok(a)
}

/// Stores the flags into the frame at `rsp` without `pushfq`: SF ZF AF PF CF by `lahf`, OF
/// by `seto`, with IF and bit 1 set, as `pushfq` would have them while DF, TF and AC are
/// clear. Clobbers rax, rcx and the flags (both saved already).
fn arithmetic_flags_to_frame(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.lahf()?;
    a.seto(cl)?;
    a.movzx(ecx, cl)?;
    a.shl(ecx, 11)?;
    a.shr(eax, 8)?;
    a.movzx(eax, al)?;
    a.or(eax, ecx)?;
    a.or(eax, ENTRY_FLAGS)?;
    a.mov(qword_ptr(rsp + FRAME_FLAGS), rax)
}

/// Whether the function `bytes` (at `start`) holds an instruction that can set the
/// direction flag (`std`, `popf`, `iret`, `uiret`: any the decoder says writes or sets it),
/// or cannot be decoded whole: only then may DF be
/// set inside it, since the ABI has it clear at every call and return (see
/// [`StateSave::direction_clear`]).
pub fn may_set_direction_flag(bytes: &[u8], start: u64) -> bool {
    use iced_x86::RflagsBits;
    super::decode::decode_instructions(bytes, start).map_or(true, |insns| {
        insns.iter().any(|insn| (insn.rflags_written() | insn.rflags_set()) & RflagsBits::DF != 0)
    })
}

/// Instructions [`arithmetic_flags_dead`] looks at before it calls the flags live.
const LIVENESS_WINDOW: usize = 16;

/// Whether the arithmetic flags (OF SF ZF AF CF PF) are dead at `at` in the function
/// `bytes` (at `start`): the instructions from `at` on, straight through, overwrite all
/// six (an instruction that leaves one undefined overwrites it too) before any of them
/// reads one still holding its value at `at`. Conservative: a branch, call, return or
/// other change of flow before that, bytes that do not decode, or more than
/// 16 instructions (`LIVENESS_WINDOW`), and they are live (a caller could read flags a
/// function returns, hand-written code could pass them to a callee).
pub fn arithmetic_flags_dead(bytes: &[u8], start: u64, at: u64) -> bool {
    use iced_x86::{FlowControl, RflagsBits};
    const ARITHMETIC: u32 =
        RflagsBits::OF | RflagsBits::SF | RflagsBits::ZF | RflagsBits::AF | RflagsBits::CF | RflagsBits::PF;
    let Some(from) = at.checked_sub(start).and_then(|offset| usize::try_from(offset).ok()) else { return false };
    let Some(code) = bytes.get(from..) else { return false };
    let mut decoder = super::decode::new_decoder(code, at);
    let mut unwritten = ARITHMETIC;
    for _ in 0..LIVENESS_WINDOW {
        let Ok(insn) = super::decode::next_instruction(&mut decoder) else { return false };
        if insn.rflags_read() & unwritten != 0 {
            return false;
        }
        if !may_leave_the_flags(&insn) {
            unwritten &= !insn.rflags_modified();
        }
        if unwritten == 0 {
            return true;
        }
        if insn.flow_control() != FlowControl::Next {
            return false;
        }
    }
    false
}

/// Whether `insn` may write no flag though the decoder's flag information says it writes
/// them: a shift or rotate whose count may be zero (by `cl`, or an immediate its operand
/// size masks to 0), or a `rep`-prefixed compare or scan, which does nothing when `rcx` is
/// 0. Either leaves every flag as it was.
fn may_leave_the_flags(insn: &iced_x86::Instruction) -> bool {
    use iced_x86::{Mnemonic, OpKind};
    let mnemonic = insn.mnemonic();
    if matches!(mnemonic, Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq)
        || matches!(mnemonic, Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq)
    {
        return insn.has_repe_prefix() || insn.has_repne_prefix();
    }
    let shift = matches!(
        mnemonic,
        Mnemonic::Shl
            | Mnemonic::Sal
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shld
            | Mnemonic::Shrd
    );
    if !shift {
        return false;
    }
    let count = insn.op_kind(insn.op_count() - 1);
    let mask = if insn.op0_register().size() == 8 || insn.memory_size().size() == 8 { 0x3f } else { 0x1f };
    match count {
        OpKind::Immediate8 => u32::from(insn.immediate8()) & mask == 0,
        _ => true,
    }
}

/// The flags a mid-function detour may put back without `popfq`: the arithmetic ones
/// (CF PF AF ZF SF OF), IF and the always-set bit 1. Any other (DF, TF, AC, ID…) in the
/// frame takes `popfq`.
const ARITHMETIC_FLAGS: i32 = 0x8d5 | 0x200 | 0x2;

/// The frame's flags put back after a mid-function detour's handlers, before the caller-saved
/// registers are reloaded (`rax` and `rcx` serve as scratch), ending with `rsp` at the
/// frame's flags word.
///
/// `popfq` is microcoded: with `pushfq` it cost 8.2 of a mid-function probe's 18.5 ns on the
/// Intel Xeon this was measured on (`dynprobe bench --rows floor-gprs,floor-flags`). When
/// the frame holds nothing but arithmetic flags (the handlers run with DF clear, and a
/// program's DF, TF or AC are rare), they are loaded the way binary translators do it: SF
/// ZF AF PF CF from AH with `sahf`, and OF by `add $0x7f,%al` on `al` = the saved OF
/// (overflows exactly when it is 1; `sahf` leaves OF alone). Anything else in the frame
/// goes the old way, through `popfq`, and jumps to `done`. `lahf`/`sahf` exist in 64-bit
/// mode on every CPU with the LAHF-SAHF CPUID bit (CPUID 8000_0001h ECX bit 0), which is
/// every x86-64 CPU since 2006.
///
/// With `dead` (the arithmetic flags are dead at the probe point), only the `popfq` way is
/// kept, for a handler's change to another flag: the arithmetic ones are left as they are.
fn arithmetic_flags_or_popfq(a: &mut CodeAssembler, done: &mut CodeLabel, dead: bool) -> Result<(), IcedError> {
    let mut arithmetic = a.create_label();
    if dead {
        // Only a change to another flag needs putting back; the arithmetic ones stay.
        a.test(dword_ptr(rsp + FRAME_FLAGS), !ARITHMETIC_FLAGS)?;
        a.jz(arithmetic)?;
    } else {
        let mut other_flags = a.create_label();
        a.mov(rax, qword_ptr(rsp + FRAME_FLAGS))?;
        a.test(eax, !ARITHMETIC_FLAGS)?;
        a.jnz(other_flags)?;
        a.mov(ecx, eax)?;
        a.shr(ecx, 11)?;
        a.and(ecx, 1)?;
        a.mov(ah, al)?;
        a.mov(al, cl)?;
        a.add(al, 0x7f)?;
        a.sahf()?;
        a.jmp(arithmetic)?;
        a.set_label(&mut other_flags)?;
    }
    caller_saved_reload(a)?;
    a.popfq()?;
    a.lea(rsp, ptr(rsp + (16 + RED_ZONE)))?;
    a.jmp(*done)?;
    a.set_label(&mut arithmetic)?;
    Ok(())
}

/// The caller-saved registers reloaded from the frame at `rsp` (moves: the flags are left
/// alone), then `rsp` moved to the frame's flags word.
fn caller_saved_reload(a: &mut CodeAssembler) -> Result<(), IcedError> {
    for (i, reg) in FRAME_GPRS.into_iter().enumerate() {
        if !CALLEE_SAVED.contains(&reg) {
            a.mov(reg, qword_ptr(rsp + 8 * i as i32))?;
        }
    }
    a.lea(rsp, ptr(rsp + 8 * FRAME_GPRS.len() as i32))
}

/// The general registers in frame order (`Regs`), from the lowest address.
pub(crate) const FRAME_GPRS: [AsmRegister64; 15] =
    [r15, r14, r13, r12, r11, r10, r9, r8, rbp, rbx, rax, rcx, rdx, rsi, rdi];
/// The registers every function preserves, the dispatcher included.
const CALLEE_SAVED: [AsmRegister64; 6] = [rbx, rbp, r12, r13, r14, r15];

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Save,
    Restore,
}

/// Offset, from the end of the save area, of the byte [`vector_moves`] sets when the upper
/// halves of the registers it saved (bits 128 and up of ymm/zmm0–15) were not all zero.
/// The area's last 64 bytes hold MXCSR (at -64), its scratch copy (-60), this byte, and
/// the detour's frame address (-8).
const UPPER_FLAG: i32 = -56;

const XMM: [AsmRegisterXmm; 16] =
    [xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13, xmm14, xmm15];
const YMM: [AsmRegisterYmm; 16] =
    [ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13, ymm14, ymm15];
const ZMM: [AsmRegisterZmm; 32] = [
    zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13, zmm14, zmm15, zmm16, zmm17,
    zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26, zmm27, zmm28, zmm29, zmm30, zmm31,
];
const K: [AsmRegisterK; 8] = [k0, k1, k2, k3, k4, k5, k6, k7];

/// Moves every register of `width`, and MXCSR, between the registers and the 64-byte
/// aligned area at `rsp`, keeping the upper state as clean as the program had it (see
/// [`VectorWidth`]). The save clobbers the flags and leaves the upper state clean (after
/// it, the vector registers hold garbage); the restore clobbers eax and the flags.
pub(crate) fn vector_moves(a: &mut CodeAssembler, width: VectorWidth, direction: Direction) -> Result<(), IcedError> {
    let area = width.save_size();
    let mxcsr = dword_ptr(rsp + (area - 64));
    let upper_flag = byte_ptr(rsp + (area + UPPER_FLAG));
    match (width, direction) {
        (VectorWidth::None, _) => return Ok(()),
        (VectorWidth::Sse, Direction::Save) => {
            a.stmxcsr(mxcsr)?;
            for (i, reg) in XMM.into_iter().enumerate() {
                a.movaps(xmmword_ptr(rsp + 16 * i as i32), reg)?;
            }
        }
        (VectorWidth::Sse, Direction::Restore) => {
            for (i, reg) in XMM.into_iter().enumerate() {
                a.movaps(reg, xmmword_ptr(rsp + 16 * i as i32))?;
            }
        }
        (VectorWidth::Avx, Direction::Save) => {
            a.stmxcsr(mxcsr)?;
            for (i, reg) in YMM.into_iter().enumerate() {
                a.vmovdqa(ymmword_ptr(rsp + 32 * i as i32), reg)?;
            }
            // ymm0 = the OR of all sixteen (a tree: four steps deep), then its upper half
            // tested.
            for step in [1, 2, 4, 8] {
                for i in (0..16).step_by(2 * step) {
                    a.vorps(YMM[i], YMM[i], YMM[i + step])?;
                }
            }
            a.vextractf128(xmm0, ymm0, 1)?;
            a.vptest(xmm0, xmm0)?;
            a.setne(upper_flag)?;
            a.vzeroupper()?;
        }
        (VectorWidth::Avx, Direction::Restore) => restore_low_sixteen(a, upper_flag, 32, |a| {
            for (i, reg) in YMM.into_iter().enumerate() {
                a.vmovdqa(reg, ymmword_ptr(rsp + 32 * i as i32))?;
            }
            Ok(())
        })?,
        (VectorWidth::Avx512 { wide_masks }, Direction::Save) => {
            a.stmxcsr(mxcsr)?;
            for (i, reg) in ZMM.into_iter().enumerate() {
                a.vmovdqa64(zmmword_ptr(rsp + 64 * i as i32), reg)?;
            }
            for (i, reg) in K.into_iter().enumerate() {
                let at = rsp + (32 * 64 + 8 * i as i32);
                match wide_masks {
                    true => a.kmovq(qword_ptr(at), reg)?,
                    false => a.kmovw(word_ptr(at), reg)?,
                }
            }
            // zmm0 = the OR of zmm0-15 (three-way ORs, three steps deep); k1 = its non-zero
            // quadwords; the lowest two are xmm0's own.
            const OR3: i32 = 0xfe;
            for i in [0, 3, 6, 9, 12] {
                a.vpternlogq(ZMM[i], ZMM[i + 1], ZMM[i + 2], OR3)?;
            }
            a.vpternlogq(zmm0, zmm3, zmm6, OR3)?;
            a.vpternlogq(zmm9, zmm12, zmm15, OR3)?;
            a.vporq(zmm0, zmm0, zmm9)?;
            a.vptestmq(k1, zmm0, zmm0)?;
            a.kshiftrw(k1, k1, 2)?;
            a.kortestw(k1, k1)?;
            a.setne(upper_flag)?;
            a.vzeroupper()?;
        }
        (VectorWidth::Avx512 { wide_masks }, Direction::Restore) => {
            restore_low_sixteen(a, upper_flag, 64, |a| {
                for (i, reg) in ZMM[..16].iter().enumerate() {
                    a.vmovdqa64(*reg, zmmword_ptr(rsp + 64 * i as i32))?;
                }
                Ok(())
            })?;
            for (i, reg) in ZMM.into_iter().enumerate().skip(16) {
                a.vmovdqa64(reg, zmmword_ptr(rsp + 64 * i as i32))?;
            }
            for (i, reg) in K.into_iter().enumerate() {
                let at = rsp + (32 * 64 + 8 * i as i32);
                match wide_masks {
                    true => a.kmovq(reg, qword_ptr(at))?,
                    false => a.kmovw(reg, word_ptr(at))?,
                }
            }
        }
    }
    if direction == Direction::Restore {
        // ldmxcsr costs about 7 ns on the Zen 4 this was measured on, and handlers rarely
        // change MXCSR (a float operation may set a sticky exception flag): reload it only
        // when it differs. Uses eax and the flags, which the callers restore afterwards.
        let now = dword_ptr(rsp + (area - 60));
        let mut same = a.create_label();
        a.stmxcsr(now)?;
        a.mov(eax, now)?;
        a.cmp(mxcsr, eax)?;
        a.je(same)?;
        a.ldmxcsr(mxcsr)?;
        // The label binds to the callers' next instruction.
        a.set_label(&mut same)?;
    }
    Ok(())
}

/// Restores registers 0-15 from `slot`-byte slots at `rsp`: when the save noted that their
/// upper halves were zero (`upper_flag` clear), `vzeroupper` and the xmm registers by legacy
/// moves, which leaves the upper state clean; otherwise `full`, the full-width moves.
fn restore_low_sixteen(
    a: &mut CodeAssembler,
    upper_flag: AsmMemoryOperand,
    slot: i32,
    full: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>,
) -> Result<(), IcedError> {
    let mut full_width = a.create_label();
    let mut done = a.create_label();
    a.cmp(upper_flag, 0)?;
    a.jne(full_width)?;
    a.vzeroupper()?;
    for (i, reg) in XMM.into_iter().enumerate() {
        a.movaps(reg, xmmword_ptr(rsp + slot * i as i32))?;
    }
    a.jmp(done)?;
    a.set_label(&mut full_width)?;
    full(a)?;
    // Binds to the next instruction the caller emits.
    a.set_label(&mut done)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86_64::decode::decode_instructions;

    const ENTRY: StateSave = StateSave {
        flags: false,
        direction_clear: false,
        arithmetic_dead: false,
        width: VectorWidth::Avx512 { wide_masks: true },
    };
    const MID: StateSave = StateSave {
        flags: true,
        direction_clear: false,
        arithmetic_dead: false,
        width: VectorWidth::Avx512 { wide_masks: true },
    };

    fn spec(save: StateSave, covered: &[u8]) -> DetourSpec<'_> {
        DetourSpec {
            detour_ip: 0x7f00_0000_1000,
            probe_ip: 0x7f00_1000_0000,
            covered,
            save,
            dispatch: 0x5555_0000_2000,
            context: 0x5555_dead_beef,
            entry_filter: &[],
            light: false,
            light_dispatch: 0x5555_0000_3000,
        }
    }

    #[test]
    fn the_copy_follows_the_epilogue_and_jumps_back() {
        // mov %rdi,%rax ; shr $0x1f,%rax
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        let s = spec(ENTRY, &covered);
        let detour = build_detour(&s).unwrap();
        let copy = &detour.code[detour.copy_offset as usize..];
        assert_eq!(&copy[..7], &covered);
        assert_eq!(detour.copy_map, vec![(0, detour.copy_offset), (3, detour.copy_offset + 3)]);
        assert_eq!(detour.copy_address(s.detour_ip, 3), Some(s.detour_ip + u64::from(detour.copy_offset) + 3));
        assert_eq!(detour.copy_address(s.detour_ip, 1), None);
        let instrs = decode_instructions(&detour.code[ENTRY_OFFSET..], s.detour_ip + ENTRY_OFFSET as u64).unwrap();
        let last = instrs.last().unwrap();
        assert_eq!(last.near_branch_target(), s.probe_ip + 7, "jumps back after the covered run");
        assert!(detour.code[..ENTRY_OFFSET].iter().all(|&b| b == 0xcc));
    }

    #[test]
    fn a_filled_in_prefix_is_what_the_assembler_makes() {
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        for save in [
            ENTRY,
            MID,
            StateSave { flags: false, direction_clear: false, arithmetic_dead: false, width: VectorWidth::Sse },
        ] {
            for dispatch in [0x5555_0000_2000, 0x7f00_0100_0000] {
                let first = DetourSpec { dispatch, ..spec(save, &covered) };
                let prefix = DetourPrefix::new(&first).unwrap().expect("the fields are found");
                let again = DetourSpec {
                    detour_ip: 0x7f00_0030_0000,
                    probe_ip: 0x7f00_1234_5678,
                    context: 0x5555_0000_1230,
                    ..first
                };
                assert!(prefix.fits(&again));
                assert_eq!(build_detour_from(Some(&prefix), &again).unwrap(), build_detour(&again).unwrap());
                // Another kind of detour is assembled whole.
                let other = DetourSpec { save: StateSave { flags: !save.flags, ..save }, ..again };
                assert!(!prefix.fits(&other));
                assert_eq!(build_detour_from(Some(&prefix), &other).unwrap(), build_detour(&other).unwrap());
            }
        }
    }

    #[test]
    fn the_frame_is_balanced() {
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        for save in [ENTRY, MID] {
            let s = spec(save, &covered);
            let detour = build_detour(&s).unwrap();
            let body = &detour.code[ENTRY_OFFSET..detour.copy_offset as usize];
            let instrs = decode_instructions(body, s.detour_ip + ENTRY_OFFSET as u64).unwrap();
            let full = save.flags;
            let count = |m| instrs.iter().filter(|i| i.mnemonic() == m).count();
            assert_eq!(count(iced_x86::Mnemonic::Pushfq), full as usize);
            assert_eq!(count(iced_x86::Mnemonic::Popfq), full as usize);
            // Mid-function, the arithmetic flags come back by sahf, popfq being the way for
            // the others.
            assert_eq!(count(iced_x86::Mnemonic::Sahf), full as usize);
            assert_eq!(count(iced_x86::Mnemonic::Push), 0);
            assert_eq!(count(iced_x86::Mnemonic::Pop), 0);
            // Callee-saved registers are compared with the frame, not reloaded; so is MXCSR;
            // and the restore looks at what the save noted of the upper state.
            assert_eq!(count(iced_x86::Mnemonic::Cmp), 6 + 1 + 1);
            let movs_to_frame = instrs
                .iter()
                .filter(|i| {
                    i.mnemonic() == iced_x86::Mnemonic::Mov
                        && i.op0_kind() == iced_x86::OpKind::Memory
                        && i.memory_base() == iced_x86::Register::RSP
                        && i.op1_kind() == iced_x86::OpKind::Register
                })
                .count();
            assert_eq!(movs_to_frame, 15 + 2 + 1, "15 registers, rsp, rip, the frame address");
            let flags_constant = instrs
                .iter()
                .any(|i| i.mnemonic() == iced_x86::Mnemonic::Mov && i.op1_kind() == iced_x86::OpKind::Immediate32to64);
            assert_eq!(flags_constant, !full, "the entry variant stores constant flags");
        }
    }

    /// Where the function sets DF nowhere, a mid-function frame gets its flags without
    /// `pushfq` (`lahf`, `seto`) and the handlers no `cld`; they come back the same ways.
    #[test]
    fn a_mid_function_frame_known_clear_of_df_reads_the_flags_without_pushfq() {
        use iced_x86::Mnemonic::{Call, Cld, Lahf, Popfq, Pushfq, Sahf, Seto};
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        for light in [false, true] {
            let save = StateSave { direction_clear: true, ..MID };
            let s = DetourSpec { light, ..spec(save, &covered) };
            let detour = build_detour(&s).unwrap();
            let body = &detour.code[ENTRY_OFFSET..detour.copy_offset as usize];
            let instrs = decode_instructions(body, s.detour_ip + ENTRY_OFFSET as u64).unwrap();
            let count = |m| instrs.iter().filter(|i| i.mnemonic() == m).count();
            // DF cleared on the full save's path only: a light handler is proven not to read it.
            assert_eq!((count(Pushfq), count(Cld)), (0, 1), "light {light}");
            let cld = instrs.iter().position(|i| i.mnemonic() == Cld).unwrap();
            let calls: Vec<usize> =
                instrs.iter().enumerate().filter(|(_, i)| i.mnemonic() == Call).map(|(k, _)| k).collect();
            // The light dispatcher's call (first, when built light) before it, the full one's after.
            assert_eq!(calls.len(), 1 + light as usize, "light {light}");
            let (light_call, full_call) = if light { (Some(calls[0]), calls[1]) } else { (None, calls[0]) };
            assert!(light_call.is_none_or(|call| call < cld) && cld < full_call, "light {light}");
            assert_eq!((count(Lahf), count(Seto)), (1, 1), "light {light}");
            assert_eq!((count(Sahf), count(Popfq)), (1, 1), "light {light}: sahf, popfq for the others");
            // Read once the registers it clobbers are in the frame, stored into its flags word.
            let lahf = instrs.iter().position(|i| i.mnemonic() == Lahf).unwrap();
            let stores_before = instrs[..lahf].iter().filter(|i| i.op0_kind() == iced_x86::OpKind::Memory).count();
            assert!(stores_before >= 15, "light {light}: {stores_before} stores before lahf");
            let flags_store = instrs[lahf..].iter().find(|i| i.op0_kind() == iced_x86::OpKind::Memory).unwrap();
            assert_eq!(flags_store.memory_displacement64(), FRAME_FLAGS as u64, "light {light}");
        }
    }

    #[test]
    fn the_arithmetic_flags_are_dead_only_where_straight_line_code_overwrites_them_before_reading() {
        let dead = |code: &[u8]| arithmetic_flags_dead(code, 0x1000, 0x1000);
        const MOV: [u8; 3] = [0x48, 0x89, 0xf8]; // mov %rdi,%rax
        const ADD: [u8; 4] = [0x48, 0x83, 0xc0, 0x01]; // add $1,%rax
        const XOR: [u8; 2] = [0x31, 0xc0]; // xor %eax,%eax
        const INC: [u8; 2] = [0xff, 0xc0]; // inc %eax (leaves CF)
        const ADC: [u8; 4] = [0x48, 0x83, 0xd0, 0x00]; // adc $0,%rax (reads CF)
        const SHR: [u8; 4] = [0x48, 0xc1, 0xea, 0x1d]; // shr $0x1d,%rdx (OF, AF undefined)
        const JC: [u8; 2] = [0x72, 0x00]; // jc .+2
        const SHL_CL: [u8; 3] = [0x48, 0xd3, 0xe0]; // shl %cl,%rax (no flag written when cl = 0)
        const SHL_32: [u8; 3] = [0xc1, 0xe0, 0x20]; // shl $0x20,%eax (masked to 0)
        const SHL_1: [u8; 3] = [0x48, 0xd1, 0xe0]; // shl %rax
        const REPE_CMPSB: [u8; 2] = [0xf3, 0xa6]; // repe cmpsb (no flag written when rcx = 0)
        const REPNE_SCASB: [u8; 2] = [0xf2, 0xae]; // repne scasb
        const CMPSB: [u8; 1] = [0xa6]; // cmpsb
        const RET: [u8; 1] = [0xc3];
        const CALL: [u8; 5] = [0xe8, 0, 0, 0, 0];
        const PUSHFQ: [u8; 1] = [0x9c];
        for code in [
            &[&ADD[..]][..],
            &[&MOV, &ADD],
            &[&XOR],
            &[&SHR],
            &[&INC, &ADD],
            &[&MOV, &MOV, &XOR, &RET],
            &[&SHL_1],
            &[&CMPSB],
        ] {
            assert!(dead(&code.concat()), "{code:02x?}");
        }
        let live: [&[&[u8]]; 11] = [
            &[&INC, &JC],
            &[&ADC],
            &[&MOV, &RET],
            &[&MOV, &CALL, &ADD],
            &[&PUSHFQ],
            &[&INC, &RET],
            &[&MOV, &MOV],
            &[&SHL_CL, &JC],
            &[&SHL_32, &JC],
            &[&REPE_CMPSB, &JC],
            &[&REPNE_SCASB, &JC],
        ];
        for code in live {
            assert!(!dead(&code.concat()), "{code:02x?}");
        }
        // `df_after_dead_flags` of the probe tests' optimize_o2.c at +3: add, mov %rsp,%rsi, lodsb.
        assert!(dead(&[&ADD[..], &[0x48, 0x89, 0xe6], &[0xac]].concat()));
        // From `at` on, not from the start; outside the bytes, live.
        let code = [&ADC[..], &ADD].concat();
        assert!(!arithmetic_flags_dead(&code, 0x1000, 0x1000));
        assert!(arithmetic_flags_dead(&code, 0x1000, 0x1004));
        assert!(!arithmetic_flags_dead(&code, 0x1000, 0x1008));
        assert!(!arithmetic_flags_dead(&code, 0x1000, 0xfff));
    }

    /// Where they are dead, the arithmetic flags are not put back: no `sahf`, the `popfq`
    /// way kept for a handler's change to another flag.
    #[test]
    fn dead_arithmetic_flags_are_not_put_back() {
        use iced_x86::Mnemonic::{Popfq, Sahf, Test};
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        for direction_clear in [false, true] {
            let save = StateSave { direction_clear, arithmetic_dead: true, ..MID };
            let s = spec(save, &covered);
            let detour = build_detour(&s).unwrap();
            let body = &detour.code[ENTRY_OFFSET..detour.copy_offset as usize];
            let instrs = decode_instructions(body, s.detour_ip + ENTRY_OFFSET as u64).unwrap();
            let count = |m| instrs.iter().filter(|i| i.mnemonic() == m).count();
            assert_eq!((count(Sahf), count(Popfq)), (0, 1), "DF clear {direction_clear}");
            let test = instrs.iter().find(|i| i.mnemonic() == Test && i.op0_kind() == iced_x86::OpKind::Memory);
            assert_eq!(test.map(|t| t.memory_displacement64()), Some(FRAME_FLAGS as u64), "DF clear {direction_clear}");
        }
    }

    #[test]
    fn only_std_popf_and_iret_or_undecodable_code_may_set_the_direction_flag() {
        // mov %rdi,%rax ; add $1,%rax ; cld ; ret
        let clean = [0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x01, 0xfc, 0xc3];
        assert!(!may_set_direction_flag(&clean, 0x1000));
        for setter in [0xfd /* std */, 0x9d /* popfq */, 0xcf /* iret */] {
            let mut code = clean.to_vec();
            code.insert(3, setter);
            assert!(may_set_direction_flag(&code, 0x1000), "{setter:#x}");
        }
        // A truncated instruction at the end: not decodable whole.
        assert!(may_set_direction_flag(&clean[..5], 0x1000));
    }

    #[test]
    fn handlers_start_with_a_clean_upper_state_and_a_clean_program_gets_it_back_clean() {
        use iced_x86::Mnemonic::{Call, Cmp, Jne, Movaps, Vmovdqa, Vmovdqa64, Vzeroupper};
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        for (width, wide) in [(VectorWidth::Avx512 { wide_masks: true }, Vmovdqa64), (VectorWidth::Avx, Vmovdqa)] {
            let s = spec(StateSave { flags: true, direction_clear: false, arithmetic_dead: false, width }, &covered);
            let detour = build_detour(&s).unwrap();
            let body = &detour.code[ENTRY_OFFSET..detour.copy_offset as usize];
            let instrs = decode_instructions(body, s.detour_ip + ENTRY_OFFSET as u64).unwrap();
            let call = instrs.iter().position(|i| i.mnemonic() == Call).unwrap();
            // Saved whole, then vzeroupper: the handlers' SSE code pays no transition.
            let last_vector = instrs[..call].iter().rposition(|i| i.mnemonic() == Vzeroupper).unwrap();
            assert!(instrs[..last_vector].iter().any(|i| i.mnemonic() == wide), "{width:?}: saved full width");
            assert!(instrs[last_vector + 1..call].iter().all(|i| i.mnemonic() != wide), "{width:?}");
            // The restore: the noted flag, then vzeroupper and the xmm registers by legacy
            // moves (the program stays clean), or full-width moves.
            let restore = &instrs[call..];
            let flag = restore.iter().position(|i| i.mnemonic() == Cmp).unwrap();
            assert_eq!(restore[flag + 1].mnemonic(), Jne);
            assert_eq!(restore[flag + 2].mnemonic(), Vzeroupper, "{width:?}");
            assert!(restore[flag + 3..flag + 19].iter().all(|i| i.mnemonic() == Movaps), "{width:?}: xmm0-15");
            let full = restore.iter().filter(|i| i.mnemonic() == wide).count();
            let expected = if wide == Vmovdqa64 { 32 } else { 16 };
            assert_eq!(full, expected, "{width:?}: every register of the width on the other way");
        }
    }

    #[test]
    fn a_light_path_saves_no_vector_register_and_falls_back_to_the_full_save_on_redo() {
        use iced_x86::Mnemonic::{Call, Cmp, Jne, Mov, Vmovdqa64};
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        for save in [ENTRY, MID] {
            let s = DetourSpec {
                light: true,
                dispatch: 0x7f00_0100_0000,
                light_dispatch: 0x7f00_0100_1000,
                ..spec(save, &covered)
            };
            let detour = build_detour(&s).unwrap();
            assert_eq!(detour.code[LIGHT_FLAG_OFFSET], 0xcc, "built on");
            let body = &detour.code[ENTRY_OFFSET..detour.copy_offset as usize];
            let instrs = decode_instructions(body, s.detour_ip + ENTRY_OFFSET as u64).unwrap();
            let calls: Vec<usize> =
                instrs.iter().enumerate().filter(|(_, i)| i.mnemonic() == Call).map(|(k, _)| k).collect();
            assert_eq!(calls.len(), 2, "light, then full");
            // The light path: its flag tested, no vector register touched up to its call
            // of the light dispatcher; the full save calls the other.
            let test = instrs.iter().position(|i| i.mnemonic() == Cmp && i.is_ip_rel_memory_operand()).unwrap();
            assert_eq!(instrs[test].ip_rel_memory_address(), s.detour_ip + LIGHT_FLAG_OFFSET as u64);
            let vectors = instrs[test + 1].near_branch_target();
            assert!(instrs[test..calls[0]].iter().all(|i| i.mnemonic() != Vmovdqa64));
            assert_eq!(instrs[calls[0]].near_branch_target(), s.light_dispatch);
            assert_eq!(instrs[calls[1]].near_branch_target(), s.dispatch);
            // After it: 2 sends the thread to the full save, with the frame in rsi again.
            let redo = instrs[calls[0]..].iter().position(|i| i.mnemonic() == Cmp).unwrap() + calls[0];
            assert_eq!(instrs[redo].immediate32(), REDO_FULL);
            assert_eq!(instrs[redo + 1].mnemonic(), Jne);
            assert_eq!(instrs[redo + 2].mnemonic(), Mov);
            assert_eq!(instrs[redo + 3].ip(), vectors, "the full save follows");
            assert!(instrs[redo + 3..calls[1]].iter().any(|i| i.mnemonic() == Vmovdqa64));
            // Its prefix is filled in like any other, and light and full kinds differ.
            let prefix = DetourPrefix::new(&s).unwrap().expect("the fields are found");
            let again = DetourSpec { detour_ip: 0x7f00_0030_0000, probe_ip: 0x7f00_1234_5678, ..s };
            assert_eq!(build_detour_from(Some(&prefix), &again).unwrap(), build_detour(&again).unwrap());
            assert!(!prefix.fits(&DetourSpec { light: false, ..again }));
        }
    }

    #[test]
    fn an_entry_filter_lets_other_values_through_to_the_copy_while_its_flag_is_int3() {
        let covered = [0x48, 0x89, 0xf8, 0x48, 0xc1, 0xe8, 0x1f];
        let s = DetourSpec { entry_filter: &[13, 14], ..spec(ENTRY, &covered) };
        let detour = build_detour(&s).unwrap();
        assert_eq!(detour.code[FILTER_FLAG_OFFSET], 0xcc);
        let entry = s.detour_ip + ENTRY_OFFSET as u64;
        let instrs = decode_instructions(&detour.code[ENTRY_OFFSET..], entry).unwrap();
        // cmpb $0xcc,flag(%rip) ; jne full ; cmp $13,%rdi ; je full ; cmp $14,%rdi ; je full ; jmp pass
        assert_eq!(instrs[0].mnemonic(), iced_x86::Mnemonic::Cmp);
        assert_eq!(instrs[0].memory_displacement64(), s.detour_ip + FILTER_FLAG_OFFSET as u64);
        let full = instrs[1].near_branch_target();
        assert_eq!((instrs[2].immediate32(), instrs[4].immediate32()), (13, 14));
        assert_eq!((instrs[3].near_branch_target(), instrs[5].near_branch_target()), (full, full));
        assert_eq!(full, instrs[7].ip(), "the handlers' path starts after the filter");
        let pass = instrs[6].near_branch_target();
        assert_eq!(pass + 1, s.detour_ip + u64::from(detour.copy_offset), "a nop, then the copy");
        // The prefix of a filtered kind is filled in like any other, and kinds differ.
        let prefix = DetourPrefix::new(&s).unwrap().expect("the fields are found");
        let again = DetourSpec { detour_ip: 0x7f00_0030_0000, probe_ip: 0x7f00_1234_5678, ..s };
        assert_eq!(build_detour_from(Some(&prefix), &again).unwrap(), build_detour(&again).unwrap());
        assert!(!prefix.fits(&DetourSpec { entry_filter: &[13], ..again }));
        assert!(!prefix.fits(&spec(ENTRY, &covered)));
    }
}
