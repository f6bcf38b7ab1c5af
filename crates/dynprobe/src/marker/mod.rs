//! Static markers: tracepoints that cost one NOP while nobody listens.
//!
//! A marker ([`marker!`](crate::marker!) in Rust, `DYNPROBE_MARKER` from the C header
//! `dynprobe/marker.h`) is a 5-byte NOP with its arguments in the SysV argument registers,
//! described twice: by a record in the `dynprobe_markers` section (with exact argument
//! types) and by a SystemTap SDT note, so `readelf -n`, perf and bpftrace see it as a USDT
//! probe. [`markers`] lists the sites of every module of this process (read from their
//! files, so markers of shared libraries count too); [`Marker::attach`] places one
//! jump-optimized probe on each site of `provider:name` — the text layer's verify-then-modify
//! protocol with the other threads stopped, the NOP becoming a jump to a detour that calls
//! the handler — and [`MarkerHandle::detach`] puts the NOPs back.
//!
//! This is the idea of the kernel's static keys (Documentation/staging/static-keys.rst,
//! successors of its markers): a NOP in the code that becomes a jump when enabled, written
//! int3 first (arch/x86/kernel/jump_label.c); here the whole NOP is the switch, patched
//! through the probe layer.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use dynprobe::marker::{ArgValue, Marker};
//!
//! #[inline(never)]
//! fn work(n: u64) {
//!     dynprobe::marker!(doc_example, step, n);
//! }
//!
//! static SUM: AtomicU64 = AtomicU64::new(0);
//! let handle = Marker::attach("doc_example:step", |hit| {
//!     if let Some(ArgValue::Unsigned(n)) = hit.arg(0) {
//!         SUM.fetch_add(n, Ordering::Relaxed);
//!     }
//! })?;
//! for n in 1..=4 {
//!     work(n);
//! }
//! let stats = handle.detach()?;
//! assert_eq!((stats.hits, SUM.load(Ordering::Relaxed)), (4, 10));
//! # Ok::<(), dynprobe::marker::MarkerError>(())
//! ```

mod emit;
mod semaphore;

use std::fmt;
use std::sync::Arc;

use crate::line::Text;
use crate::spec::{Fetch, ProbeSpec, Reg};
use dynprobe_probe::{Location, Probe, ProbeError, ProbeHandle, Regs};
use dynprobe_symbols::{SymbolError, SymbolTable};

pub use dynprobe_symbols::{read_markers, ArgKind, ArgLocation, MarkerArg, MarkerGate, MarkerSite};
pub use emit::{MarkerArgs, MarkerValue};
pub use semaphore::check_semaphore;

/// The bytes of a marker site while no probe is on it: the 5-byte NOP
/// `nopl 0x0(%rax,%rax,1)`.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// The longest C string ([`ArgKind::CStr`]) a handler is given; longer ones are cut.
pub const MAX_CSTR: usize = 4096;

/// Every marker site of every module loaded in this process, sorted by module then address:
/// dynprobe's own markers (with typed arguments) and plain SDT probes (`sys/sdt.h`, e.g.
/// the C library's), read from the modules' files.
///
/// ```
/// for site in dynprobe::markers()? {
///     println!("{} at {:#x} in {}", site.spec(), site.addr, site.path.display());
/// }
/// # Ok::<(), dynprobe::marker::MarkerError>(())
/// ```
pub fn markers() -> Result<Vec<MarkerSite>, MarkerError> {
    markers_in(&SymbolTable::current_process()?)
}

/// [`markers`] of the process `table` describes (this one or another).
pub fn markers_in(table: &SymbolTable) -> Result<Vec<MarkerSite>, MarkerError> {
    let mut sites = Vec::new();
    for module in 0..table.modules().len() {
        sites.extend(table.markers(module)?);
    }
    Ok(sites)
}

/// Attaching handlers to markers by name.
pub struct Marker;

impl Marker {
    /// The sites of this process that `spec` names: `provider:name`, where either part
    /// may be `*` (every provider, every name). An unknown marker is
    /// [`MarkerError::Unknown`], with the nearest names.
    pub fn find(spec: &str) -> Result<Vec<MarkerSite>, MarkerError> {
        Marker::find_in(&SymbolTable::current_process()?, spec)
    }

    /// [`Marker::find`] in the process `table` describes (this one or another).
    pub fn find_in(table: &SymbolTable, spec: &str) -> Result<Vec<MarkerSite>, MarkerError> {
        let (provider, name) = split_spec(spec)?;
        let all = markers_in(table)?;
        let part = |want: &str, have: &str| want == "*" || want == have;
        let (found, others): (Vec<MarkerSite>, Vec<MarkerSite>) =
            all.into_iter().partition(|s| part(provider, &s.provider) && part(name, &s.name));
        if found.is_empty() {
            let suggestions = dynprobe_symbols::nearest_markers(spec, &others);
            return Err(MarkerError::Unknown { spec: spec.to_string(), suggestions });
        }
        Ok(found)
    }

    /// Calls `handler` at every hit of every site `spec` names (see [`Marker::find`]),
    /// until the returned handle is detached or dropped.
    ///
    /// The handler runs on the thread that reached the marker, inside the probe's detour,
    /// like a probe handler: it must not allocate or take locks the program may hold
    /// (atomics and lock-free structures are the tools), and it may be running on several
    /// threads at once.
    pub fn attach(
        spec: &str,
        handler: impl Fn(&MarkerHit<'_>) + Send + Sync + 'static,
    ) -> Result<MarkerHandle, MarkerError> {
        Marker::attach_sites(Marker::find(spec)?, handler)
    }

    /// [`Marker::attach`] for sites already found (by [`markers`] or [`Marker::find`]):
    /// one probe per site, all with `handler`, optimized into jumps before this returns.
    /// A site whose SDT note names a semaphore has it raised once the probe is in place
    /// (and lowered at detach), or the attach is refused: without it the program would
    /// skip the marker. So are the semaphores that gate the site ([`MarkerSite::gates`];
    /// [`MarkerHandle::gates`] lists them). On an error no site keeps a probe and no
    /// semaphore stays raised.
    pub fn attach_sites(
        sites: Vec<MarkerSite>,
        handler: impl Fn(&MarkerHit<'_>) + Send + Sync + 'static,
    ) -> Result<MarkerHandle, MarkerError> {
        // Its own type, not `dyn Fn`: each site's probe then calls it directly, and a
        // handler that leaves the vector state alone gets a light detour (its code is
        // proven by decoding, which cannot follow a call through a pointer).
        let handler = Arc::new(handler);
        let mut handle = MarkerHandle {
            probes: Vec::with_capacity(sites.len()),
            sites: Vec::with_capacity(sites.len()),
            semaphores: Vec::new(),
        };
        for site in sites {
            let site = Arc::new(site);
            let (on_hit, at) = (handler.clone(), site.clone());
            let probe = Probe::at(Location::Address(site.addr));
            // An argument in a vector register (an SDT note's `8f@%xmm1`) is read where the
            // probe's path saved them; only such a site pays for the save.
            let probe = match site.args.iter().any(|a| a.location.vector().is_some()) {
                true => probe
                    .on_hit(move |regs| {
                        let xmm = dynprobe_probe::hit_xmm();
                        on_hit(&MarkerHit { site: &at, regs, xmm: xmm.as_ref() })
                    })
                    .reads_vectors(),
                false => probe.on_hit(move |regs| on_hit(&MarkerHit { site: &at, regs, xmm: None })),
            };
            // A failure drops `handle`, which unregisters the probes placed so far.
            let probe =
                probe.register().map_err(|error| MarkerError::Probe { site: site.spec(), addr: site.addr, error })?;
            handle.probes.push(probe);
            handle.sites.push(site);
        }
        dynprobe_probe::wait_for_optimizer().map_err(MarkerError::Optimizer)?;
        // Raised last: the program takes the marker's path only once a probe is there.
        for site in &handle.sites {
            let own = (site.semaphore != 0).then_some(site.semaphore);
            for addr in own.into_iter().chain(site.gates.iter().map(|g| g.semaphore)) {
                // A failure drops `handle`, which lowers the ones raised so far.
                semaphore::raise(addr).map_err(|reason| MarkerError::Semaphore {
                    site: site.spec(),
                    addr: site.addr,
                    reason,
                })?;
                handle.semaphores.push(addr);
            }
        }
        Ok(handle)
    }
}

fn split_spec(spec: &str) -> Result<(&str, &str), MarkerError> {
    match spec.split_once(':') {
        Some((provider, name)) if !provider.is_empty() && !name.is_empty() && !name.contains(':') => {
            Ok((provider, name))
        }
        _ => Err(MarkerError::BadSpec { spec: spec.to_string() }),
    }
}

/// One hit of a marker: the site and the registers of the thread at its NOP.
pub struct MarkerHit<'a> {
    site: &'a MarkerSite,
    regs: &'a Regs,
    /// The low 64 bits of xmm0–15, when an argument of the site is in one.
    xmm: Option<&'a [u64; 16]>,
}

impl<'a> MarkerHit<'a> {
    /// The site that was reached.
    pub fn site(&self) -> &'a MarkerSite {
        self.site
    }

    /// The thread's registers at the site.
    pub fn regs(&self) -> &'a Regs {
        self.regs
    }

    /// The low 64 bits of the thread's xmm0–15 at the site, when an argument of the site is
    /// in a vector register (`None` otherwise: they were not saved).
    pub fn xmm(&self) -> Option<&'a [u64; 16]> {
        self.xmm
    }

    /// How many arguments the marker has.
    pub fn arg_count(&self) -> usize {
        self.site.args.len()
    }

    /// Argument `n` (0-based), decoded by its kind; `None` past the last one.
    pub fn arg(&self, n: usize) -> Option<ArgValue<'a>> {
        let arg = self.site.args.get(n)?;
        Some(decode(arg, self.regs, self.xmm))
    }

    /// Every argument, in order.
    pub fn args(&self) -> impl Iterator<Item = ArgValue<'a>> + '_ {
        self.site.args.iter().map(|arg| decode(arg, self.regs, self.xmm))
    }
}

/// A marker argument's value at a hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArgValue<'a> {
    /// An unsigned integer (zero-extended).
    Unsigned(u64),
    /// A signed integer (sign-extended).
    Signed(i64),
    /// A `bool`.
    Bool(bool),
    /// A `char`; `None` when the value is not a Unicode scalar value.
    Char(Option<char>),
    /// A pointer.
    Pointer(u64),
    /// A `&str`.
    Str(&'a str),
    /// A `&[u8]`, or a `&str` whose bytes are not UTF-8 (only a lying C caller can make one).
    Bytes(&'a [u8]),
    /// A C string, without its NUL, cut at [`MAX_CSTR`] bytes; empty for a null pointer.
    CStr(&'a [u8]),
    /// A `float` (`bits` 32, the low 32 bits of `raw`) or a `double` (`bits` 64), by its
    /// bits (`f64::from_bits(raw)`): kept as an integer, so that handing it on takes no
    /// vector register.
    Float {
        /// 32 or 64.
        bits: u8,
        /// The value's bits.
        raw: u64,
    },
    /// Where the value is cannot be read here (an SDT operand form this reader does not
    /// know, see [`ArgLocation::Other`]).
    Unavailable,
}

impl fmt::Display for ArgValue<'_> {
    /// Integers in decimal, pointers in hex, strings quoted with escapes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArgValue::Unsigned(v) => write!(f, "{v}"),
            ArgValue::Signed(v) => write!(f, "{v}"),
            ArgValue::Bool(v) => write!(f, "{v}"),
            ArgValue::Char(Some(c)) => write!(f, "{c:?}"),
            ArgValue::Char(None) => write!(f, "<not a char>"),
            ArgValue::Pointer(p) => write!(f, "{p:#x}"),
            ArgValue::Str(s) => write!(f, "{s:?}"),
            ArgValue::Bytes(b) | ArgValue::CStr(b) => write!(f, "\"{}\"", b.escape_ascii()),
            ArgValue::Float { bits: 32, raw } => write!(f, "{}", f32::from_bits(*raw as u32)),
            ArgValue::Float { raw, .. } => write!(f, "{}", f64::from_bits(*raw)),
            ArgValue::Unavailable => write!(f, "<unavailable>"),
        }
    }
}

impl ArgValue<'_> {
    /// What a line shows for an argument that cannot be read (see [`ArgValue::Unavailable`]).
    pub const UNAVAILABLE: &'static str = "(unavailable)";

    /// Appends the value to an event line in the line protocol ([`crate::line`]): integers
    /// in decimal, pointers in hex, `true`/`false`, strings and chars quoted. Unlike
    /// [`Display`](fmt::Display) it neither allocates nor uses `core::fmt`, so a marker
    /// handler may call it.
    pub fn write_to<const N: usize>(&self, text: &mut Text<N>) {
        match *self {
            ArgValue::Unsigned(v) => text.dec(v),
            ArgValue::Signed(v) => text.signed(v),
            ArgValue::Bool(v) => text.bytes(if v { b"true" } else { b"false" }),
            ArgValue::Char(Some(c)) => text.quoted(c.encode_utf8(&mut [0; 4]).as_bytes()),
            ArgValue::Char(None) => text.bytes(Self::UNAVAILABLE.as_bytes()),
            ArgValue::Pointer(p) => text.hex(p),
            ArgValue::Str(s) => text.quoted(s.as_bytes()),
            ArgValue::Bytes(b) | ArgValue::CStr(b) => text.quoted(b),
            ArgValue::Float { bits, raw } => text.float(bits, raw),
            ArgValue::Unavailable => text.bytes(Self::UNAVAILABLE.as_bytes()),
        };
    }
}

/// An `m:` spec made ready for one of its sites: a `*` in its (default) event name becomes
/// the site's provider or name, and each `$argN` of its fields becomes the place where the
/// site keeps argument N (a register, or a stack slot as `+OFF(%REG)`). A constant argument
/// or one in a form the reader does not know cannot be fetched: the error names it.
pub fn spec_for_site(spec: &ProbeSpec, site: &MarkerSite) -> Result<ProbeSpec, String> {
    fn resolve(fetch: &mut Fetch, site: &MarkerSite) -> Result<(), String> {
        match fetch {
            Fetch::Arg(n) => {
                let Some(arg) = site.args.get(usize::from(*n) - 1) else {
                    return Err(format!(
                        "marker `{}` at {:#x} has {} argument(s), not an argument {n}",
                        site.spec(),
                        site.addr,
                        site.args.len()
                    ));
                };
                let reg = |name: &str| {
                    Reg::from_name(name).ok_or_else(|| format!("argument {n} is in register `{name}`, unknown here"))
                };
                *fetch = match &arg.location {
                    ArgLocation::Register { name, .. } => Fetch::Reg(reg(name)?),
                    ArgLocation::Memory { base, offset } => {
                        Fetch::Deref { offset: *offset, base: Box::new(Fetch::Reg(reg(base)?)) }
                    }
                    other => {
                        return Err(format!(
                            "argument {n} of marker `{}` at {:#x} is `{other}`, which has no place to read from; \
                             leave out the fields to see every argument",
                            site.spec(),
                            site.addr
                        ))
                    }
                };
                Ok(())
            }
            Fetch::Deref { base, .. } => resolve(base, site),
            _ => Ok(()),
        }
    }
    let mut spec = spec.clone();
    if spec.group.as_deref() == Some("*") {
        spec.group = Some(site.provider.clone());
    }
    if spec.event == "*" {
        spec.event = site.name.clone();
    }
    for arg in &mut spec.args {
        resolve(&mut arg.fetch, site).map_err(|e| format!("field `{}`: {e}", arg.name))?;
    }
    Ok(spec)
}

/// The value of a register by its 64-bit name, or the low 64 bits of vector register `xmmN`
/// (from `xmm`, the hit's, when it was saved).
fn register(regs: &Regs, xmm: Option<&[u64; 16]>, name: &str) -> Option<u64> {
    Some(match name {
        "rax" => regs.rax,
        "rbx" => regs.rbx,
        "rcx" => regs.rcx,
        "rdx" => regs.rdx,
        "rsi" => regs.rsi,
        "rdi" => regs.rdi,
        "rbp" => regs.rbp,
        "rsp" => regs.rsp,
        "r8" => regs.r8,
        "r9" => regs.r9,
        "r10" => regs.r10,
        "r11" => regs.r11,
        "r12" => regs.r12,
        "r13" => regs.r13,
        "r14" => regs.r14,
        "r15" => regs.r15,
        _ => return xmm?.get(name.strip_prefix("xmm")?.parse::<usize>().ok()?).copied(),
    })
}

/// The raw 64 bits at `location`, the low `size` bytes meaningful.
fn raw(location: &ArgLocation, regs: &Regs, xmm: Option<&[u64; 16]>) -> Option<u64> {
    match location {
        ArgLocation::Register { name, .. } => register(regs, xmm, name),
        ArgLocation::Immediate(value) => Some(*value as u64),
        ArgLocation::Memory { base, offset } => {
            let addr = register(regs, None, base)?.wrapping_add(*offset as u64);
            // SAFETY: an SDT memory operand is what the compiler used at this very
            // instruction (a stack slot, a field): it is mapped and holds the value now,
            // on this thread, which is stopped at the site.
            Some(unsafe { std::ptr::read_unaligned(addr as *const u64) })
        }
        ArgLocation::Other(_) => None,
    }
}

fn decode<'a>(arg: &MarkerArg, regs: &Regs, xmm: Option<&[u64; 16]>) -> ArgValue<'a> {
    let Some(value) = raw(&arg.location, regs, xmm) else { return ArgValue::Unavailable };
    let bits = u32::from(arg.kind.size()) * 8;
    let low = if bits >= 64 { value } else { value & ((1u64 << bits) - 1) };
    let signed = if bits >= 64 { value as i64 } else { ((value << (64 - bits)) as i64) >> (64 - bits) };
    match arg.kind {
        ArgKind::Bool => ArgValue::Bool(low != 0),
        ArgKind::Char => ArgValue::Char(char::from_u32(low as u32)),
        ArgKind::Pointer => ArgValue::Pointer(value),
        ArgKind::Str | ArgKind::Bytes => {
            let Some(len) = arg.length.as_ref().and_then(|l| raw(l, regs, xmm)) else { return ArgValue::Unavailable };
            let bytes: &'a [u8] = if len == 0 {
                &[]
            } else {
                // SAFETY: the site's record says these slots are a `&str`/`&[u8]` the
                // marker passed: pointer and length of memory that stays borrowed while the
                // thread is at the NOP, which it is until the handler returns.
                unsafe { std::slice::from_raw_parts(value as *const u8, len as usize) }
            };
            // The check alone, then the same pointer and length: moving the `&str` out of
            // from_utf8's `Result` is a 16-byte vector copy, which a light detour's
            // handler must not have (see `dynprobe_probe::light_verdict`).
            match arg.kind == ArgKind::Str && std::str::from_utf8(bytes).is_ok() {
                // SAFETY: checked to be UTF-8 just now.
                true => ArgValue::Str(unsafe { std::str::from_utf8_unchecked(bytes) }),
                false => ArgValue::Bytes(bytes),
            }
        }
        ArgKind::CStr => {
            if value == 0 {
                return ArgValue::CStr(&[]);
            }
            let start = value as *const u8;
            let mut len = 0;
            // SAFETY: the C header passes a `char *` as this kind: a NUL-terminated string
            // that is readable up to its NUL while the thread is at the site. Reading stops
            // at the NUL (or at MAX_CSTR), never past it.
            while len < MAX_CSTR && unsafe { *start.add(len) } != 0 {
                len += 1;
            }
            // SAFETY: the `len` bytes were just read one by one.
            ArgValue::CStr(unsafe { std::slice::from_raw_parts(start, len) })
        }
        kind if kind.is_float() => ArgValue::Float { bits: kind.size() * 8, raw: low },
        kind if kind.is_signed() => ArgValue::Signed(signed),
        _ => ArgValue::Unsigned(low),
    }
}

/// Handlers attached to the sites of a marker. Dropping it detaches them (errors ignored;
/// [`MarkerHandle::detach`] reports them).
#[must_use = "dropping the handle detaches the handler at once: keep it for as long as the handler should run"]
pub struct MarkerHandle {
    probes: Vec<ProbeHandle>,
    sites: Vec<Arc<MarkerSite>>,
    /// The semaphores raised (one count per site that has one), lowered at detach.
    semaphores: Vec<u64>,
}

impl MarkerHandle {
    /// The sites the handler is attached to.
    pub fn sites(&self) -> impl Iterator<Item = &MarkerSite> {
        self.sites.iter().map(|s| &**s)
    }

    /// The other markers whose semaphores were raised because they gate these sites
    /// (`provider:name`, each once); see [`MarkerGate`].
    pub fn gates(&self) -> Vec<String> {
        let mut gates: Vec<String> = self.sites.iter().flat_map(|s| s.gates.iter().map(|g| g.marker.clone())).collect();
        gates.sort();
        gates.dedup();
        gates
    }

    /// How many times the handler ran, over every site.
    pub fn hits(&self) -> u64 {
        self.probes.iter().map(ProbeHandle::hits).sum()
    }

    /// Hits not handled because the thread was already inside a probe handler.
    pub fn nmissed(&self) -> u64 {
        self.probes.iter().map(ProbeHandle::nmissed).sum()
    }

    /// Whether every site's probe is a jump to a detour (not a breakpoint): the fast path.
    pub fn all_optimized(&self) -> bool {
        self.probes.iter().all(|p| p.info().optimized)
    }

    /// Removes the handler from every site, restoring the NOPs; returns once no thread is
    /// still inside it, with the final counts. A site whose probe could not be removed
    /// keeps working as if leaked, and the first such error is returned.
    pub fn detach(mut self) -> Result<MarkerStats, MarkerError> {
        let result = self.try_detach();
        // The sites left are kept working, as if leaked: this handle lets go of them.
        self.probes.drain(..).for_each(ProbeHandle::leak);
        result
    }

    /// [`Self::detach`] that can be tried again: the sites whose probe could not be removed
    /// stay with the handle (registered and working, [`Self::sites`] lists them) for a later
    /// call, and the first such error is returned.
    pub fn try_detach(&mut self) -> Result<MarkerStats, MarkerError> {
        self.lower_semaphores();
        let mut stats = MarkerStats { hits: 0, nmissed: 0 };
        let mut first_error = None;
        let mut left = (Vec::new(), Vec::new());
        for (mut probe, site) in self.probes.drain(..).zip(self.sites.drain(..)) {
            match probe.try_unregister() {
                Ok(counts) => {
                    stats.hits += counts.hits;
                    stats.nmissed += counts.nmissed;
                }
                Err(error) => {
                    first_error.get_or_insert(MarkerError::Probe { site: site.spec(), addr: site.addr, error });
                    left.0.push(probe);
                    left.1.push(site);
                }
            }
        }
        (self.probes, self.sites) = left;
        first_error.map_or(Ok(stats), Err)
    }
}

impl MarkerHandle {
    /// Lowers the semaphores this handle raised, first: the program stops taking the
    /// markers' paths before their probes go.
    fn lower_semaphores(&mut self) {
        self.semaphores.drain(..).for_each(semaphore::lower);
    }
}

impl Drop for MarkerHandle {
    fn drop(&mut self) {
        self.lower_semaphores();
    }
}

impl fmt::Debug for MarkerHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sites: Vec<String> = self.sites.iter().map(|s| format!("{} at {:#x}", s.spec(), s.addr)).collect();
        f.debug_struct("MarkerHandle").field("sites", &sites).finish()
    }
}

/// A detached marker's final counts, from [`MarkerHandle::detach`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerStats {
    /// Handler runs.
    pub hits: u64,
    /// Hits not handled (the thread was already inside a handler).
    pub nmissed: u64,
}

/// Why a marker could not be found, attached or detached.
#[derive(Debug)]
#[non_exhaustive]
pub enum MarkerError {
    /// The spec is not `provider:name`.
    BadSpec {
        /// The spec as given.
        spec: String,
    },
    /// No loaded module has a marker of that name.
    Unknown {
        /// The spec as given.
        spec: String,
        /// Close `provider:name`s that do exist, best first.
        suggestions: Vec<String>,
    },
    /// The modules or their markers could not be read.
    Symbols(SymbolError),
    /// The probes were placed but the optimizer's pass that turns them into jumps failed
    /// (a thread that would not stop); they were removed again.
    Optimizer(ProbeError),
    /// A site's semaphore could not be raised, so the program would never reach it.
    Semaphore {
        /// The marker's `provider:name`.
        site: String,
        /// The site's address.
        addr: u64,
        /// Why.
        reason: String,
    },
    /// The probe on a site could not be placed or removed.
    Probe {
        /// The marker's `provider:name`.
        site: String,
        /// The site's address.
        addr: u64,
        /// Why.
        error: ProbeError,
    },
}

impl fmt::Display for MarkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MarkerError::BadSpec { spec } => {
                write!(f, "`{spec}` is not a marker: write `provider:name` (either part may be `*`)")
            }
            MarkerError::Unknown { spec, suggestions } => {
                write!(f, "no marker `{spec}` in any module of the process")?;
                match suggestions.as_slice() {
                    [] => write!(f, " (`dynprobe list-markers -p PID` lists them)"),
                    [one] => write!(f, "; did you mean `{one}`?"),
                    many => write!(f, "; did you mean one of `{}`?", many.join("`, `")),
                }
            }
            MarkerError::Symbols(e) => write!(f, "reading the process's markers: {e}"),
            MarkerError::Optimizer(e) => write!(f, "optimizing the markers' probes into jumps: {e}"),
            MarkerError::Probe { site, addr, error } => write!(f, "marker `{site}` at {addr:#x}: {error}"),
            MarkerError::Semaphore { site, addr, reason } => {
                write!(f, "marker `{site}` at {addr:#x} cannot fire: {reason}")
            }
        }
    }
}

/// The error this one wraps, where it wraps one (its message is part of this one's
/// `Display` too, which is complete on its own).
impl std::error::Error for MarkerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            MarkerError::Symbols(e) => Some(e),
            MarkerError::Optimizer(e) | MarkerError::Probe { error: e, .. } => Some(e),
            _ => None,
        }
    }
}

impl From<SymbolError> for MarkerError {
    fn from(e: SymbolError) -> Self {
        MarkerError::Symbols(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(args: Vec<MarkerArg>) -> MarkerSite {
        MarkerSite {
            provider: "p".into(),
            name: "n".into(),
            addr: 0,
            file_offset: 0,
            path: "x".into(),
            semaphore: 0,
            args,
            dynprobe: true,
            sdt_args: String::new(),
            gates: Vec::new(),
        }
    }

    fn reg(name: &'static str, size: u8) -> ArgLocation {
        ArgLocation::Register { name, size }
    }

    #[test]
    fn arguments_decode_by_kind_from_their_registers() {
        let text = "hello";
        let regs = Regs {
            rdi: 0xffff_ffff_ffff_fffe,
            rsi: text.as_ptr() as u64,
            rdx: text.len() as u64,
            rcx: 0x1_0000_00ff,
            r8: 1,
            r9: 'λ' as u64,
            ..Regs::default()
        };
        let site = site(vec![
            MarkerArg { kind: ArgKind::I32, location: reg("rdi", 4), length: None },
            MarkerArg { kind: ArgKind::Str, location: reg("rsi", 8), length: Some(reg("rdx", 8)) },
            MarkerArg { kind: ArgKind::U8, location: reg("rcx", 1), length: None },
            MarkerArg { kind: ArgKind::Bool, location: reg("r8", 1), length: None },
            MarkerArg { kind: ArgKind::Char, location: reg("r9", 4), length: None },
            MarkerArg { kind: ArgKind::I64, location: ArgLocation::Immediate(-3), length: None },
            MarkerArg { kind: ArgKind::U64, location: ArgLocation::Other("sym(%rip)".into()), length: None },
        ]);
        let hit = MarkerHit { site: &site, regs: &regs, xmm: None };
        let values: Vec<ArgValue> = hit.args().collect();
        assert_eq!(
            values,
            [
                ArgValue::Signed(-2),
                ArgValue::Str("hello"),
                ArgValue::Unsigned(0xff),
                ArgValue::Bool(true),
                ArgValue::Char(Some('λ')),
                ArgValue::Signed(-3),
                ArgValue::Unavailable
            ]
        );
        let shown: Vec<String> = values.iter().map(|v| v.to_string()).collect();
        assert_eq!(shown, ["-2", "\"hello\"", "255", "true", "'λ'", "-3", "<unavailable>"]);
    }

    #[test]
    fn values_write_to_a_line_as_the_protocol_says() {
        let values = [
            ArgValue::Unsigned(7),
            ArgValue::Signed(-2),
            ArgValue::Bool(true),
            ArgValue::Char(Some('λ')),
            ArgValue::Pointer(0x1000),
            ArgValue::Str("a \"b\""),
            ArgValue::CStr(b"c\n"),
            ArgValue::Unavailable,
        ];
        let mut line = crate::line::Line::new();
        for v in values {
            v.write_to(&mut line);
            line.byte(b' ');
        }
        assert_eq!(line.as_bytes(), b"7 -2 true \"\\xce\\xbb\" 0x1000 \"a \\\"b\\\"\" \"c\\n\" (unavailable) ");
    }

    #[test]
    fn a_marker_spec_is_made_for_each_site() {
        let mut s = site(vec![
            MarkerArg { kind: ArgKind::I32, location: reg("rdi", 4), length: None },
            MarkerArg { kind: ArgKind::U64, location: ArgLocation::Memory { base: "rbp", offset: -24 }, length: None },
            MarkerArg { kind: ArgKind::U64, location: ArgLocation::Immediate(5), length: None },
        ]);
        s.name = "tick".into();
        let spec = ProbeSpec::parse("m:p:* a=$arg1:s32 b=+8($arg2) c=%rax").unwrap();
        let for_site = spec_for_site(&spec, &s).unwrap();
        assert_eq!(for_site.full_event_name(), "p/tick");
        assert_eq!(for_site.args[0].fetch, Fetch::Reg(Reg::Rdi));
        let slot = Fetch::Deref { offset: -24, base: Box::new(Fetch::Reg(Reg::Rbp)) };
        assert_eq!(for_site.args[1].fetch, Fetch::Deref { offset: 8, base: Box::new(slot) });
        assert_eq!(for_site.args[2].fetch, Fetch::Reg(Reg::Rax));
        // A named event keeps its name.
        let named = spec_for_site(&ProbeSpec::parse("m:g/ev *:*").unwrap(), &s).unwrap();
        assert_eq!(named.full_event_name(), "g/ev");
        let err = spec_for_site(&ProbeSpec::parse("m:p:tick c=$arg3").unwrap(), &s).unwrap_err();
        assert_eq!(err, "field `c`: argument 3 of marker `p:tick` at 0x0 is `$5`, which has no place to read from; leave out the fields to see every argument");
        let err = spec_for_site(&ProbeSpec::parse("m:p:tick d=$arg4").unwrap(), &s).unwrap_err();
        assert_eq!(err, "field `d`: marker `p:tick` at 0x0 has 3 argument(s), not an argument 4");
    }

    #[test]
    fn c_strings_stop_at_their_nul() {
        let text = b"abc\0def";
        let regs = Regs { rdi: text.as_ptr() as u64, ..Regs::default() };
        let site = site(vec![MarkerArg { kind: ArgKind::CStr, location: reg("rdi", 8), length: None }]);
        assert_eq!(MarkerHit { site: &site, regs: &regs, xmm: None }.arg(0), Some(ArgValue::CStr(b"abc")));
        assert_eq!(MarkerHit { site: &site, regs: &regs, xmm: None }.arg(1), None);
    }

    #[test]
    fn specs_need_a_provider_and_a_name() {
        assert_eq!(split_spec("app:tick").unwrap(), ("app", "tick"));
        assert_eq!(split_spec("*:tick").unwrap(), ("*", "tick"));
        for bad in ["tick", ":tick", "app:", "a:b:c"] {
            let e = split_spec(bad).unwrap_err();
            assert!(e.to_string().contains("provider:name"), "{e}");
        }
    }

    #[test]
    fn the_emitted_kind_codes_are_the_readers() {
        // The macro's const tables and the ELF reader share ArgKind: check the descriptors.
        type Args = (u32, &'static str, i8, *const u8);
        assert_eq!(<Args as MarkerArgs>::KINDS, [0x04, 0x48, 0x11, 0x38, 0, 0]);
        assert_eq!(<Args as MarkerArgs>::SLOT_DESC, [4, 8, 8, 0x11, 8, 0]);
        assert_eq!(<Args as MarkerArgs>::COUNT, 4);
        let p = 0x1234 as *const u8;
        assert_eq!((7u32, "ab", -1i8, p).into_slots()[..5], [7, "ab".as_ptr() as u64, 2, u64::MAX, 0x1234]);
    }
}
