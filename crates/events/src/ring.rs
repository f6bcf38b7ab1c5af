//! Per-thread single-producer single-consumer rings of [`Record`]s, all in one shared-memory
//! file that the traced process writes and the recorder drains.
//!
//! ```text
//!   page 0                 file header: magic, version, clock, pid, parent pid, rings,
//!                          capacity, where ring 0 starts, bytes per ring
//!   page 1                 one byte per ring, set once a thread has used it (so that the
//!                          recorder does not touch, and make the kernel allocate, the pages
//!                          of rings nobody uses)
//!   ring_offset            ring 0, then ring i at ring_offset + i × stride:
//!                          64-byte producer line               head, lost, pending_lost, tid,
//!                                                          busy, nested_lost, nested_seen
//!                          64-byte consumer line               tail
//!                          capacity × 16 bytes                 records, slot = index % capacity
//! ```
//!
//! `head` and `tail` count records since the ring was made and never wrap; the ring holds
//! `head - tail` records. The producer stores `head` with Release after writing the records,
//! the consumer stores `tail` with Release after copying them out, and each loads the other's
//! with Acquire: that is the whole protocol, no read-modify-write, so a push is a handful of
//! plain moves on x86-64.
//!
//! The file is created sparse: only the pages a thread touches cost memory, so thousands of
//! rings of 64 Ki records cost nothing until used. It lives on after the traced process dies,
//! with every record it published, which is why a crash loses nothing the recorder has not yet
//! drained.
//!
//! A file is created under a temporary name (`<path>.tmp`) and linked to its final name only
//! once its header is written, so the recorder never sees a half-made one.

use std::ffi::{CStr, OsString};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{compiler_fence, AtomicU64, AtomicU8, Ordering};

use crate::clock::Clock;
use crate::error::EventsError;
use crate::record::{Kind, Record};

/// Rings in a file unless told otherwise: one per thread alive at once.
pub const DEFAULT_RINGS: usize = 4096;
/// Records a ring holds unless told otherwise (1 MiB of records).
pub const DEFAULT_CAPACITY: usize = 65536;

/// `DYNPRING` read as a little-endian u64.
const MAGIC: u64 = u64::from_le_bytes(*b"DYNPRING");
/// Version of the layout above.
const VERSION: u32 = 1;
/// Bytes of the file header's page; the in-use bytes follow it.
const HEADER_BYTES: usize = 4096;
/// The unit the in-use bytes are rounded up to, so that the rings start on a page.
const PAGE: usize = 4096;
/// Bytes of a ring's header (a producer line and a consumer line).
const RING_HEADER_BYTES: usize = std::mem::size_of::<RingHeader>();
/// The bytes a read fault maps around it when the file's pages are in memory: the
/// default of the kernel's `fault_around_bytes` (mm/memory.c). A smaller setting only
/// leaves some pages to the producer's own faults.
const FAULT_AROUND: usize = 64 << 10;
/// How many records ahead of the head a push prefetches the ring's memory (four cache
/// lines): a line is filled every four records, a couple of traced calls, so the prefetch
/// is issued about a microsecond before the line is written.
const PREFETCH_AHEAD: u64 = 16;
/// Records per cache line: a ring's records start on a line (its header is two lines and
/// rings are laid out in whole lines), so record `i` begins a line when `i` is a multiple.
const RECORDS_PER_LINE: u64 = 64 / RECORD_BYTES as u64;
/// Records a populating step makes present and maps in the producer before the next
/// (256 KiB, four fault-around windows): see [`RingFile::populate`].
const POPULATE_STEP: u64 = 1 << 14;
/// Bytes of a record.
const RECORD_BYTES: usize = std::mem::size_of::<Record>();

/// The file header. Written once by the producer before the file gets its name (or, after a
/// fork, before the child's file gets its name), then only read.
#[repr(C)]
struct FileHeader {
    magic: u64,
    version: u32,
    clock: u32,
    pid: u32,
    parent: u32,
    rings: u64,
    capacity: u64,
    ring_offset: u64,
    ring_stride: u64,
    /// Where the producer mapped the file in its address space (0 in files written before
    /// this field existed): the consumer maps ring pages into the producer ahead of its
    /// writing there (see [`RingFile::populate`]).
    producer_base: u64,
}

/// A ring's header: the producer's fields on one cache line, the consumer's on the next, so
/// that neither side's stores invalidate the line the other keeps writing.
#[repr(C, align(64))]
struct RingHeader {
    /// Records published (producer; Release).
    head: AtomicU64,
    /// Records dropped because the ring was full (producer).
    lost: AtomicU64,
    /// Records dropped since the last `Lost` record was written (producer-private).
    pending_lost: AtomicU64,
    /// The thread whose records the ring holds now (producer-private).
    tid: AtomicU64,
    /// Nonzero while a push runs (producer-private): a push that finds it set is a signal
    /// handler that interrupted a push of the same thread.
    busy: AtomicU64,
    /// Records dropped by such interrupting pushes. Only they write it (with one
    /// interrupt-atomic instruction), so the interrupted push cannot overwrite their counts.
    nested_lost: AtomicU64,
    /// How much of `nested_lost` is already in `pending_lost` (producer-private).
    nested_seen: AtomicU64,
    _producer_pad: u64,
    /// Records consumed (consumer; Release).
    tail: AtomicU64,
    _consumer_pad: [u64; 7],
}

const _: () = assert!(RING_HEADER_BYTES == 128);
const _: () = assert!(std::mem::offset_of!(RingHeader, tail) == 64);
const _: () = assert!(std::mem::size_of::<FileHeader>() <= HEADER_BYTES);

/// The start of the name of the memory a forked child that could not be traced maps where
/// its ring was ([`RingFile::detach_in_child_named`]): `dynprobe-untraced-child <errno>
/// <ring directory>`, which `dynprobe record` looks for in the processes' memory maps at the
/// end of a session, to give such a child its code back and say why it was not traced.
pub const UNTRACED_CHILD: &str = "dynprobe-untraced-child";

/// Where things are in a ring file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Layout {
    /// Offset of ring 0.
    ring_offset: usize,
    /// Bytes per ring.
    stride: usize,
    /// Bytes of the whole file.
    len: usize,
}

/// The layout of a file of `rings` rings of `capacity` records, or why these sizes are not
/// allowed.
fn layout(rings: usize, capacity: usize) -> Result<Layout, String> {
    if rings == 0 {
        return Err("a ring file needs at least one ring".into());
    }
    if capacity < 2 || !capacity.is_power_of_two() {
        return Err(format!("ring capacity {capacity} is not a power of two of at least 2"));
    }
    let too_big = || format!("{rings} rings of {capacity} records do not fit in memory");
    let ring_offset =
        rings.checked_next_multiple_of(PAGE).and_then(|b| b.checked_add(HEADER_BYTES)).ok_or_else(too_big)?;
    let stride =
        capacity.checked_mul(RECORD_BYTES).and_then(|data| data.checked_add(RING_HEADER_BYTES)).ok_or_else(too_big)?;
    let len = stride
        .checked_mul(rings)
        .and_then(|all| all.checked_add(ring_offset))
        .filter(|&len| len <= isize::MAX as usize)
        .ok_or_else(too_big)?;
    Ok(Layout { ring_offset, stride, len })
}

/// A ring file, mapped: the producer side ([`RingFile::create`], [`RingFile::push`],
/// [`RingFile::reopen_in_child`]) and the consumer side ([`RingFile::open`],
/// [`RingFile::drain`]).
///
/// Each ring has one producer (the thread the caller assigns to it) and one consumer at a
/// time; any number of threads may push into different rings at once.
pub struct RingFile {
    base: *mut u8,
    layout: Layout,
    rings: usize,
    capacity: usize,
    clock: Clock,
    /// The file's device and inode, for a consumer (see [`RingFile::producer_maps_this_file`]).
    file_id: Option<(u64, u64)>,
}

// SAFETY: the mapping is shared memory reached only through atomics (ring headers and
// records) or written once before it is shared (the file header); which thread may push
// into which ring is the caller's contract, documented on `push`.
unsafe impl Send for RingFile {}
// SAFETY: as above.
unsafe impl Sync for RingFile {}

impl RingFile {
    /// Creates the ring file `path` (it must not exist) with `rings` rings of `capacity`
    /// records each, a power of two of at least 2, stamped with `clock`, and maps it. The
    /// traced process calls it once at startup.
    ///
    /// The file is sparse, mode 0600, created with `O_EXCL | O_CLOEXEC` under `<path>.tmp` and
    /// linked to `path` once its header is written.
    pub fn create(path: &Path, rings: usize, capacity: usize, clock: Clock) -> io::Result<RingFile> {
        let layout = layout(rings, capacity).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let tmp = tmp_path(path);
        let file = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&tmp)?;
        let made =
            file.set_len(layout.len as u64).and_then(|()| map(file.as_raw_fd(), layout.len, std::ptr::null_mut()));
        let base = match made {
            Ok(base) => base,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let ring = RingFile { base, layout, rings, capacity, clock, file_id: None };
        // SAFETY: getpid cannot fail.
        let pid = unsafe { libc::getpid() } as u32;
        ring.write_header(pid, 0);
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        linked.map(|()| ring)
    }

    /// Opens a ring file the producer made, for draining, and checks that it is one.
    pub fn open(path: &Path) -> Result<RingFile, EventsError> {
        let bad = |what: String| EventsError::BadRingFile { path: path.to_owned(), what };
        let file = OpenOptions::new().read(true).write(true).open(path).map_err(EventsError::io("open", path))?;
        let meta = file.metadata().map_err(EventsError::io("stat", path))?;
        let len = meta.len();
        if len < HEADER_BYTES as u64 {
            return Err(bad(format!("it has {len} bytes, fewer than its {HEADER_BYTES}-byte header")));
        }
        let len = usize::try_from(len).map_err(|_| bad(format!("its size {len} does not fit in memory")))?;
        let base = map(file.as_raw_fd(), len, std::ptr::null_mut()).map_err(EventsError::io("map", path))?;
        // Until checked, the sizes are placeholders that make the header readable and the
        // mapping unmapped on every error path below.
        let placeholder = Layout { ring_offset: 0, stride: 0, len };
        let file_id = Some((std::os::unix::fs::MetadataExt::dev(&meta), std::os::unix::fs::MetadataExt::ino(&meta)));
        let mut ring =
            RingFile { base, layout: placeholder, rings: 0, capacity: 0, clock: Clock::MonotonicNs, file_id };
        let h = ring.read_header();
        if h.magic != MAGIC {
            return Err(bad(format!("magic {:#018x}, not {MAGIC:#018x} (\"DYNPRING\")", h.magic)));
        }
        if h.version != VERSION {
            return Err(bad(format!("layout version {}, this dynprobe reads version {VERSION}", h.version)));
        }
        ring.clock = Clock::from_raw(h.clock).ok_or_else(|| bad(format!("unknown clock number {}", h.clock)))?;
        let (rings, capacity) = (h.rings as usize, h.capacity as usize);
        let expected = layout(rings, capacity).map_err(bad)?;
        if h.ring_offset != expected.ring_offset as u64 || h.ring_stride != expected.stride as u64 {
            return Err(bad(format!(
                "rings at offset {} every {} bytes, expected {} and {}",
                h.ring_offset, h.ring_stride, expected.ring_offset, expected.stride
            )));
        }
        if expected.len != len {
            return Err(bad(format!(
                "{rings} rings of {capacity} records need {} bytes, the file has {len}",
                expected.len
            )));
        }
        (ring.rings, ring.capacity, ring.layout) = (rings, capacity, expected);
        Ok(ring)
    }

    /// Appends `rec`, as thread `tid`'s, to ring `ring`. The traced threads' hot path.
    ///
    /// Only one thread may push into a ring at a time (the caller assigns rings); a signal
    /// handler may interrupt a push and push into the same ring (its record is counted lost).
    /// Allocates nothing, takes no lock, calls nothing, never blocks: async-signal-safe. (No
    /// system call either: the traced thread's only system calls are the program's own — a
    /// sandbox's seccomp(2) filter must never see one of ours. Its ring pages are mapped
    /// ahead of it by the consumer, [`RingFile::populate`].)
    ///
    /// * When `tid` is not the ring's current thread, a [`Kind::Thread`] record goes first.
    /// * When records were dropped since the last [`Kind::Lost`] record, a `Lost` record with
    ///   their count goes first (before the `Thread` record, the losses being the previous
    ///   thread's, except those at the takeover itself).
    /// * When the ring has no room for all that, `rec` is dropped and counted.
    ///
    /// A `ring` out of range is ignored (a caller's bug, which must not write out of bounds).
    ///
    /// Nothing here can panic, and the arithmetic wraps (it cannot overflow: counts of
    /// records): the push runs in light detours, whose proof refuses any path to a panic
    /// (`dynprobe_probe::light_verdict`).
    #[inline(always)]
    pub fn push(&self, ring: usize, tid: u32, rec: Record) {
        self.push_all(ring, tid, std::slice::from_ref(&rec))
    }

    /// Appends `recs` (at least one), as thread `tid`'s, to ring `ring`, one after the other
    /// or not at all: a record and the records that belong to it (a marker hit and its
    /// arguments) are never separated, nor is any of them lost without the others — all of
    /// them are counted lost when they do not fit. Otherwise as [`RingFile::push`].
    #[inline(always)]
    pub fn push_all(&self, ring: usize, tid: u32, recs: &[Record]) {
        if recs.is_empty() || ring >= self.rings {
            return;
        }
        let h = self.ring_header(ring);
        if h.busy.load(Ordering::Relaxed) != 0 {
            for _ in recs {
                bump(&h.nested_lost);
            }
            return;
        }
        h.busy.store(1, Ordering::Relaxed);
        // Orders the flag before the pushing for a signal handler on this thread (the only
        // other party that looks at it).
        compiler_fence(Ordering::SeqCst);

        let head = h.head.load(Ordering::Relaxed);
        let tail = h.tail.load(Ordering::Acquire);
        let nested = h.nested_lost.load(Ordering::Relaxed);
        let count = recs.len() as u64;
        // The push nearly every push is: nothing lost to report, the same thread as the last
        // record's, and room.
        let quiet = h.pending_lost.load(Ordering::Relaxed) == 0
            && nested == h.nested_seen.load(Ordering::Relaxed)
            && h.tid.load(Ordering::Relaxed) == tid as u64;
        if quiet && (self.capacity as u64).saturating_sub(head.wrapping_sub(tail)) >= count {
            self.write_records(h, head, recs);
        } else {
            self.push_with_news(ring, h, tid, recs, head, tail, nested);
        }

        compiler_fence(Ordering::SeqCst);
        h.busy.store(0, Ordering::Relaxed);
    }

    /// [`RingFile::push_all`] when something must be said before `recs`, or they do not fit:
    /// losses to report (a `Lost` record), another thread taking the ring over (a `Thread`
    /// record), or no room (`recs` counted lost).
    #[cold]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    fn push_with_news(
        &self,
        ring: usize,
        h: &RingHeader,
        tid: u32,
        recs: &[Record],
        head: u64,
        tail: u64,
        nested: u64,
    ) {
        let Some(first) = recs.first() else { return };
        let pending = h
            .pending_lost
            .load(Ordering::Relaxed)
            .wrapping_add(nested.wrapping_sub(h.nested_seen.load(Ordering::Relaxed)));
        h.nested_seen.store(nested, Ordering::Relaxed);
        let switch = h.tid.load(Ordering::Relaxed) != tid as u64;
        let count = recs.len() as u64;
        let need = count.wrapping_add((pending != 0) as u64).wrapping_add(switch as u64);
        let free = (self.capacity as u64).saturating_sub(head.wrapping_sub(tail));
        if free < need {
            h.pending_lost.store(pending.wrapping_add(count), Ordering::Relaxed);
            h.lost.store(h.lost.load(Ordering::Relaxed).wrapping_add(count), Ordering::Relaxed);
            return;
        }
        let mut at = head;
        if pending != 0 {
            self.write_slot(h, at, Record::new(Kind::Lost, first.time, 0, pending));
            at = at.wrapping_add(1);
            h.pending_lost.store(0, Ordering::Relaxed);
        }
        if switch {
            self.write_slot(h, at, Record::new(Kind::Thread, first.time, 0, tid as u64));
            at = at.wrapping_add(1);
            h.tid.store(tid as u64, Ordering::Relaxed);
            // Published with the records by the Release store of `head` below.
            self.used_flag(ring).store(1, Ordering::Relaxed);
        }
        self.write_records(h, at, recs);
    }

    /// Writes `recs` from record `at` on and publishes them (`head`), then, when the head
    /// moved onto another cache line, fetches the line a few records on for writing while
    /// this thread does its own work: a first lap writes memory no cache holds. Once per
    /// line, not per push: the other three prefetches of a line fetched nothing and cost
    /// the traced thread their address arithmetic (0.9 ns of a traced call's two pushes on
    /// an AMD EPYC Zen 4 host, `graph 2000000 1` under `record`, alternated builds).
    #[inline(always)]
    fn write_records(&self, h: &RingHeader, from: u64, recs: &[Record]) {
        let mut at = from;
        for &rec in recs {
            self.write_slot(h, at, rec);
            at = at.wrapping_add(1);
        }
        h.head.store(at, Ordering::Release);
        if at / RECORDS_PER_LINE != from / RECORDS_PER_LINE {
            prefetch_for_write(self.slot_after(h, at.wrapping_add(PREFETCH_AHEAD)).as_ptr().cast());
        }
    }

    /// In a child right after `fork()`: moves this mapping onto a new ring file `path` (which
    /// must not exist), at the same address so that every pointer into it stays valid, with
    /// empty rings and a header naming this process and `parent_pid`. The parent's file is
    /// left alone.
    ///
    /// For a `pthread_atfork` child handler: system calls only, no allocation, no lock. On
    /// failure the mapping is still detached from the parent's file (replaced by anonymous
    /// memory nobody drains, so the child cannot corrupt the parent's rings) and the `errno`
    /// is returned: the caller should say that the child's events are lost.
    pub fn reopen_in_child(&self, path: &CStr, parent_pid: u32) -> Result<(), i32> {
        let result = self.try_reopen(path, parent_pid);
        if result.is_err() {
            self.detach_in_child();
        }
        result
    }

    /// Detaches a forked child from the parent's file: the mapping becomes anonymous memory
    /// nobody drains (the child's records are lost, but the parent's rings stay intact).
    /// For a child that cannot get a ring file of its own; system calls only.
    pub fn detach_in_child(&self) {
        self.let_go_of_file();
    }

    /// [`RingFile::detach_in_child`] onto memory that says so: a memfd named `name`, which
    /// the process's memory map shows (`/memfd:<name> (deleted)`, proc(5)) where the ring
    /// was, so that a tracer looking at the process later can tell a child of its session
    /// that could not be traced (and still runs the code it was forked with) from any other
    /// process. Anonymous memory when a memfd cannot be had. System calls only.
    pub fn detach_in_child_named(&self, name: &CStr) {
        // SAFETY: a NUL-terminated name; the descriptor is closed below on every path.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: `fd` is our new memfd; `map` replaces exactly this object's mapping.
            let mapped = unsafe { libc::ftruncate(fd, self.layout.len as libc::off_t) } == 0
                && map(fd, self.layout.len, self.base).is_ok();
            // SAFETY: `fd` is ours; a mapping keeps the memory.
            unsafe { libc::close(fd) };
            if mapped {
                return;
            }
        }
        self.let_go_of_file();
    }

    /// Lets go of the file while producers may still be pushing (the end of a recording of
    /// a process that goes on running): the mapping becomes anonymous memory at the same
    /// address, so that a push under way completes into memory nobody drains, and the
    /// file's pages are freed once the consumer removes it. System calls only.
    pub fn let_go_of_file(&self) {
        // SAFETY: replaces exactly this object's own mapping (same address and length) with
        // zeroed shared memory in one mmap(2) call (MAP_FIXED replaces the old pages
        // atomically): a thread writing into a ring meanwhile writes into the file or into
        // the new memory, never into unmapped space. It cannot fail for lack of address
        // space, the range being ours already.
        unsafe {
            libc::mmap(
                self.base.cast(),
                self.layout.len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_FIXED | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
    }

    fn try_reopen(&self, path: &CStr, parent_pid: u32) -> Result<(), i32> {
        // `<path>.tmp`, built on the stack: no allocation here.
        let mut tmp = [0u8; libc::PATH_MAX as usize];
        let name = path.to_bytes();
        let suffix = b".tmp\0";
        if name.len() + suffix.len() > tmp.len() {
            return Err(libc::ENAMETOOLONG);
        }
        tmp[..name.len()].copy_from_slice(name);
        tmp[name.len()..name.len() + suffix.len()].copy_from_slice(suffix);
        let tmp = tmp.as_ptr().cast::<libc::c_char>();
        let errno = || io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO);

        // SAFETY: `tmp` is NUL-terminated (above).
        let fd = unsafe {
            libc::open(tmp, libc::O_RDWR | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC, 0o600 as libc::c_uint)
        };
        if fd < 0 {
            return Err(errno());
        }
        let cleanup = |e: i32| {
            // SAFETY: `fd` is ours and open; `tmp` is NUL-terminated.
            unsafe {
                libc::close(fd);
                libc::unlink(tmp);
            }
            Err(e)
        };
        // SAFETY: `fd` is an open, writable file.
        if unsafe { libc::ftruncate(fd, self.layout.len as libc::off_t) } != 0 {
            return cleanup(errno());
        }
        if let Err(e) = map(fd, self.layout.len, self.base) {
            return cleanup(e.raw_os_error().unwrap_or(libc::EIO));
        }
        // SAFETY: `fd` is ours; the mapping keeps the file.
        unsafe { libc::close(fd) };
        // SAFETY: getpid cannot fail (and glibc no longer caches it across fork).
        self.write_header(unsafe { libc::getpid() } as u32, parent_pid);
        // SAFETY: both paths are NUL-terminated.
        let linked = unsafe { libc::link(tmp, path.as_ptr()) };
        let link_errno = errno();
        // SAFETY: `tmp` is NUL-terminated.
        unsafe { libc::unlink(tmp) };
        if linked != 0 {
            return Err(link_errno);
        }
        Ok(())
    }

    /// The consumer's help on a ring's first lap: makes the pages of records `[from, to)`
    /// of `ring` present (allocated and zeroed) from this process, and mapped in the
    /// producer's page tables too, so that the producing thread, writing them later, takes
    /// no page fault at all — a page every 256 records, which on a fast thread's first lap
    /// costs more than the records themselves (a write fault on a shared memory page costs
    /// a microsecond or more, even when the page exists already). Best effort: kernels
    /// before 5.14 refuse the populating, a producer this process may not read
    /// (`process_vm_readv(2)`'s ptrace access check) is left to fault its pages in, and
    /// either way the producer then pays as before. Records past the first lap are ignored
    /// (their pages exist and are mapped).
    ///
    /// It goes a step of 16,384 records (256 KiB) at a time, nearest first, each step
    /// mapped in the producer before the next is made present: done whole, the producer got
    /// nothing until the last page of the range was made, a few milliseconds in which a fast
    /// thread ran into faults over pages about to be ready. A step the producer has got past
    /// meanwhile is skipped (it faulted those pages in itself).
    pub fn populate(&self, ring: usize, from: u64, to: u64) {
        assert!(ring < self.rings, "populate ring {ring} of {}", self.rings);
        let to = to.min(self.capacity as u64);
        let producer = self.producer_mapping();
        let mut from = from;
        loop {
            from = from.max(self.written(ring));
            if from >= to {
                return;
            }
            let step_to = to.min(from + POPULATE_STEP);
            let first = self.slot(ring, from).as_ptr() as usize;
            let end = first + (step_to - from) as usize * RECORD_BYTES;
            // madvise wants whole pages; records start 128 bytes into a ring.
            let start = first & !(PAGE - 1);
            // SAFETY: the range is records of this ring, inside our mapping, rounded out to
            // the pages that hold them (at most a neighbouring ring's header page beyond);
            // populating changes no byte.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end.next_multiple_of(PAGE) - start, libc::MADV_POPULATE_WRITE)
            };
            if let Some((pid, base)) = producer {
                map_in_producer(pid, base + (start - self.base as usize), base + (end - self.base as usize));
            }
            from = step_to;
        }
    }

    /// The producer's process and where it maps this file, when this process may map pages
    /// into it: the header's word, checked ([`RingFile::producer_maps_this_file`]).
    fn producer_mapping(&self) -> Option<(u32, usize)> {
        let header = self.read_header();
        let base = header.producer_base as usize;
        (base != 0 && self.producer_maps_this_file(header.pid, base)).then_some((header.pid, base))
    }

    /// Whether process `pid` maps this very file at `base` (its whole length, as the producer
    /// maps it): the pid and address in the header are the producer's word, and are not
    /// trusted to name the process this consumer reads — the producer may have exec'd a
    /// moment ago, its pid may be reused, or it may see itself under another pid (a pid
    /// namespace). `/proc/PID/map_files/START-END` names a mapping of that exact range
    /// (proc(5)), and its `stat` is the mapped file's; anything else, or no access, is no.
    fn producer_maps_this_file(&self, pid: u32, base: usize) -> bool {
        let Some((dev, ino)) = self.file_id else { return false };
        // The mapping ends at the page its last byte is in.
        let end = (base + self.layout.len).next_multiple_of(PAGE);
        let link = format!("/proc/{pid}/map_files/{base:x}-{end:x}");
        std::fs::metadata(link).is_ok_and(|m| {
            std::os::unix::fs::MetadataExt::dev(&m) == dev && std::os::unix::fs::MetadataExt::ino(&m) == ino
        })
    }

    /// Counts one call the tracer could not record at all (its thread was inside the
    /// tracer already, or nested deeper than the tracer follows): shown with the losses, so
    /// that nothing is left out silently. Async-signal-safe; one locked add, off the hot
    /// path.
    pub fn count_missed(&self) {
        self.missed_counter().fetch_add(1, Ordering::Relaxed);
    }

    /// Calls counted by [`Self::count_missed`] so far, by every thread of the process.
    pub fn missed(&self) -> u64 {
        self.missed_counter().load(Ordering::Relaxed)
    }

    /// Records written to `ring` so far (its head).
    pub fn written(&self, ring: usize) -> u64 {
        assert!(ring < self.rings, "written ring {ring} of {}", self.rings);
        self.ring_header(ring).head.load(Ordering::Acquire)
    }

    /// Copies every record ring `ring` holds to `out` and frees their slots; returns how many.
    /// The consumer side: one drainer per ring at a time.
    ///
    /// # Panics
    /// If `ring` is out of range.
    pub fn drain(&self, ring: usize, out: &mut Vec<Record>) -> usize {
        self.drain_up_to(ring, out, usize::MAX)
    }

    /// [`RingFile::drain`] of at most `max` records (the oldest), leaving the others for the
    /// next drain: a consumer with other work to do between chunks of a long backlog (see
    /// [`RingFile::populate`]).
    ///
    /// # Panics
    /// If `ring` is out of range.
    pub fn drain_up_to(&self, ring: usize, out: &mut Vec<Record>, max: usize) -> usize {
        assert!(ring < self.rings, "drain ring {ring} of {}", self.rings);
        let h = self.ring_header(ring);
        let head = h.head.load(Ordering::Acquire);
        let tail = h.tail.load(Ordering::Relaxed);
        // More than a full ring is only possible if the traced program scribbled over its
        // header; take what a ring can hold rather than read garbage.
        let n = head.wrapping_sub(tail).min(self.capacity as u64).min(max as u64);
        out.reserve(n as usize);
        for index in tail..tail + n {
            let slot = self.slot(ring, index);
            out.push(Record { time: slot[0].load(Ordering::Relaxed), word: slot[1].load(Ordering::Relaxed) });
        }
        if n != 0 {
            // Only when something moved: a store would make the kernel allocate the page of a
            // ring that was never used.
            h.tail.store(tail + n, Ordering::Release);
        }
        n as usize
    }

    /// The process that wrote the file.
    pub fn pid(&self) -> u32 {
        self.read_header().pid
    }

    /// The traced process it was forked from, or 0.
    pub fn parent_pid(&self) -> u32 {
        self.read_header().parent
    }

    /// How many rings the file has.
    pub fn rings(&self) -> usize {
        self.rings
    }

    /// How many records a ring holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The clock of the records' times.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Whether a thread has ever pushed into ring `ring`: rings that were not are empty, and
    /// leaving them alone spares the memory their pages would cost once touched.
    ///
    /// # Panics
    /// If `ring` is out of range.
    pub fn in_use(&self, ring: usize) -> bool {
        assert!(ring < self.rings, "in_use of ring {ring} of {}", self.rings);
        self.used_flag(ring).load(Ordering::Acquire) != 0
    }

    /// How many records ring `ring` has lost so far (full ring, or pushed by a signal handler
    /// during a push), whether or not their `Lost` record is written yet.
    ///
    /// # Panics
    /// If `ring` is out of range.
    pub fn lost(&self, ring: usize) -> u64 {
        assert!(ring < self.rings, "lost of ring {ring} of {}", self.rings);
        let h = self.ring_header(ring);
        h.lost.load(Ordering::Relaxed) + h.nested_lost.load(Ordering::Relaxed)
    }

    fn write_header(&self, pid: u32, parent: u32) {
        let header = FileHeader {
            magic: MAGIC,
            version: VERSION,
            clock: self.clock.to_raw(),
            pid,
            parent,
            rings: self.rings as u64,
            capacity: self.capacity as u64,
            ring_offset: self.layout.ring_offset as u64,
            ring_stride: self.layout.stride as u64,
            producer_base: self.base as u64,
        };
        // SAFETY: the mapping is at least HEADER_BYTES long and page-aligned; nobody else
        // reads the header before the file gets its final name. A volatile write is one
        // store per field: no call to memcpy in a fork child.
        unsafe { self.base.cast::<FileHeader>().write_volatile(header) };
    }

    /// The process-wide count of calls the tracer could not record (see
    /// [`RingFile::count_missed`]), on the header page's last cache line.
    fn missed_counter(&self) -> &AtomicU64 {
        // SAFETY: the header page is HEADER_BYTES long, page-aligned, and FileHeader ends far
        // before its last 64 bytes; the word is only accessed through atomics.
        unsafe { &*self.base.add(HEADER_BYTES - 64).cast::<AtomicU64>() }
    }

    fn read_header(&self) -> FileHeader {
        // SAFETY: as in `write_header`; the header is not written while the file is in use.
        unsafe { self.base.cast::<FileHeader>().read_volatile() }
    }

    #[inline(always)]
    fn ring_header(&self, ring: usize) -> &RingHeader {
        // SAFETY: `ring < rings` (the callers check), so the header lies inside the mapping,
        // 64-byte aligned (ring_offset and stride are multiples of 64); it is only accessed
        // through atomics, and zeroed memory is a valid RingHeader.
        unsafe {
            let at = self.layout.ring_offset.wrapping_add(ring.wrapping_mul(self.layout.stride));
            &*self.base.add(at).cast::<RingHeader>()
        }
    }

    /// The two words of the slot of record `index` in ring `ring`.
    #[inline(always)]
    fn slot(&self, ring: usize, index: u64) -> &[AtomicU64; 2] {
        self.slot_after(self.ring_header(ring), index)
    }

    /// [`Self::slot`] in the ring whose header is `h` (one of this file's, from
    /// [`Self::ring_header`]): its records follow the header. A push, which has the header
    /// already, finds its slots from it rather than from the file's layout again: every
    /// store it makes before may alias the layout fields as far as the compiler knows, so
    /// they were loaded again and the ring's start recomputed for each slot.
    #[inline(always)]
    fn slot_after<'a>(&'a self, h: &'a RingHeader, index: u64) -> &'a [AtomicU64; 2] {
        let slot = index as usize & self.capacity.wrapping_sub(1);
        // SAFETY: `h` is the header of a ring of this mapping, followed by the ring's
        // `capacity` records, and `slot < capacity`, so the record lies inside the ring's
        // data; it is 16-byte aligned (the header is 64-byte aligned and 128 bytes long) and
        // only accessed through atomics.
        unsafe {
            &*(h as *const RingHeader)
                .cast::<u8>()
                .add(RING_HEADER_BYTES.wrapping_add(slot.wrapping_mul(RECORD_BYTES)))
                .cast()
        }
    }

    /// Ring `ring`'s in-use byte.
    #[inline(always)]
    fn used_flag(&self, ring: usize) -> &AtomicU8 {
        // SAFETY: `ring < rings` (the callers check), and the in-use bytes (`rings` of them)
        // follow the header page inside the mapping; only accessed through atomics.
        unsafe { &*self.base.add(HEADER_BYTES.wrapping_add(ring)).cast::<AtomicU8>() }
    }

    #[inline(always)]
    fn write_slot(&self, h: &RingHeader, index: u64, rec: Record) {
        let slot = self.slot_after(h, index);
        slot[0].store(rec.time, Ordering::Relaxed);
        slot[1].store(rec.word, Ordering::Relaxed);
    }
}

impl Drop for RingFile {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are this object's own mapping, unmapped only here.
        unsafe { libc::munmap(self.base.cast(), self.layout.len) };
    }
}

impl std::fmt::Debug for RingFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingFile")
            .field("pid", &self.pid())
            .field("rings", &self.rings)
            .field("capacity", &self.capacity)
            .field("clock", &self.clock)
            .finish()
    }
}

/// Adds one to a counter that a signal handler on the same thread might also be adding to:
/// one instruction, so an interrupting handler's addition is never overwritten (no `lock`:
/// only this thread writes it).
#[inline(always)]
fn bump(counter: &AtomicU64) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the pointer is a valid, aligned u64 (the atomic's own storage); the instruction
    // touches nothing else but the flags, which `asm!` assumes clobbered by default.
    unsafe {
        core::arch::asm!("inc qword ptr [{0}]", in(reg) counter.as_ptr(), options(nostack))
    };
    #[cfg(not(target_arch = "x86_64"))]
    counter.store(counter.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
}

/// Asks for the cache line at `addr` in the first-level cache (`prefetcht0`, baseline
/// x86-64): a line no other CPU holds — a ring's first lap — arrives exclusive, so the
/// write that follows needs no further trip to memory. A hint, which never faults, for
/// memory not mapped yet either (Intel SDM, PREFETCHh). `prefetchw` measured the same on
/// an Intel Xeon host, and some older CPUs lack it.
#[inline(always)]
fn prefetch_for_write(addr: *const i8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads and writes nothing; any address is allowed.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(addr)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// Maps the bytes `[start, end)` of process `pid`'s mapping of a ring file (its addresses),
/// present in memory, into its page tables: it reads one byte of every [`FAULT_AROUND`]
/// window of them with `process_vm_readv(2)`, whose read fault in the producer's address
/// space maps the whole window's pages that are in the page cache (the kernel's
/// fault-around, `do_fault_around` in mm/memory.c), writable, a shared memory file asking
/// for no write notification (`vma_wants_writenotify`). Reading changes nothing in the
/// producer; a failure (no permission, the producer gone) leaves its pages to its own
/// faults.
///
/// In the first window every page is read: its first pages were usually mapped by the
/// previous call's fault-around, and a read of a mapped page faults nothing, which left
/// the rest of that window — up to 15 pages a call — to the producer's own faults.
fn map_in_producer(pid: u32, start: usize, end: usize) {
    const BATCH: usize = 64;
    let mut remote = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
    let mut bytes = [0u8; BATCH];
    let mut at = start;
    let first_window_end = (at + FAULT_AROUND) & !(FAULT_AROUND - 1);
    while at < end {
        let mut n = 0;
        while n < BATCH && at < end {
            remote[n] = libc::iovec { iov_base: at as *mut libc::c_void, iov_len: 1 };
            n += 1;
            let step = if at < first_window_end { PAGE } else { FAULT_AROUND };
            at = (at + step) & !(step - 1);
        }
        let local = libc::iovec { iov_base: bytes.as_mut_ptr().cast(), iov_len: n };
        // SAFETY: reads `n` bytes of the producer into `bytes`, which holds `BATCH`;
        // nothing of this process but `bytes` is written.
        let read = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, remote.as_ptr(), n as _, 0) };
        if read != n as isize {
            return;
        }
    }
}

/// Maps `len` bytes of `fd` shared, read-write; at exactly `at` when it is not null.
fn map(fd: libc::c_int, len: usize, at: *mut u8) -> io::Result<*mut u8> {
    let fixed = if at.is_null() { 0 } else { libc::MAP_FIXED };
    // SAFETY: a new shared mapping of a file we hold open; with MAP_FIXED the callers pass
    // their own mapping of exactly `len` bytes, which nothing else uses at that moment.
    let base =
        unsafe { libc::mmap(at.cast(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED | fixed, fd, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(base.cast())
}

/// `<path>.tmp`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = OsString::from(path);
    tmp.push(".tmp");
    tmp.into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;

    fn entry(seq: u64) -> Record {
        Record::new(Kind::Entry, seq, 0, seq)
    }

    fn drained(ring: &RingFile, index: usize) -> Vec<Record> {
        let mut out = Vec::new();
        ring.drain(index, &mut out);
        out
    }

    fn thread(time: u64, tid: u32) -> Record {
        Record::new(Kind::Thread, time, 0, tid as u64)
    }

    fn lost(time: u64, count: u64) -> Record {
        Record::new(Kind::Lost, time, 0, count)
    }

    #[test]
    fn pushed_records_drain_in_order_with_the_thread_first() {
        let dir = TempDir::new("ring-basic");
        let path = dir.path().join("1.0.ring");
        let producer = RingFile::create(&path, 4, 16, Clock::MonotonicNs).unwrap();
        for seq in 1..=3 {
            producer.push(2, 77, entry(seq));
        }
        let consumer = RingFile::open(&path).unwrap();
        assert_eq!((consumer.rings(), consumer.capacity(), consumer.clock()), (4, 16, Clock::MonotonicNs));
        assert_eq!((0..4).map(|r| consumer.in_use(r)).collect::<Vec<_>>(), [false, false, true, false]);
        assert_eq!(consumer.pid(), std::process::id());
        assert_eq!(consumer.parent_pid(), 0);
        assert_eq!(drained(&consumer, 2), [thread(1, 77), entry(1), entry(2), entry(3)]);
        assert_eq!(drained(&consumer, 2), []);
        assert_eq!(drained(&consumer, 0), []);
        assert!(!tmp_path(&path).exists(), "the temporary name is gone");
    }

    #[test]
    fn indices_wrap_around_the_ring() {
        let dir = TempDir::new("ring-wrap");
        let ring = RingFile::create(&dir.path().join("r"), 1, 8, Clock::MonotonicNs).unwrap();
        ring.push(0, 5, entry(0));
        assert_eq!(drained(&ring, 0), [thread(0, 5), entry(0)]);
        let mut seq = 1;
        for round in 0..50 {
            let batch = 1 + round % 8;
            for _ in 0..batch {
                ring.push(0, 5, entry(seq));
                seq += 1;
            }
            let expected: Vec<_> = (seq - batch as u64..seq).map(entry).collect();
            assert_eq!(drained(&ring, 0), expected, "round {round}");
        }
        assert_eq!(ring.lost(0), 0);
    }

    #[test]
    fn a_new_thread_on_a_ring_gets_a_marker() {
        let dir = TempDir::new("ring-thread");
        let ring = RingFile::create(&dir.path().join("r"), 1, 16, Clock::MonotonicNs).unwrap();
        ring.push(0, 10, entry(1));
        ring.push(0, 10, entry(2));
        ring.push(0, 11, entry(3));
        ring.push(0, 10, entry(4));
        assert_eq!(
            drained(&ring, 0),
            [thread(1, 10), entry(1), entry(2), thread(3, 11), entry(3), thread(4, 10), entry(4)]
        );
    }

    #[test]
    fn a_full_ring_counts_every_loss_and_says_where() {
        let dir = TempDir::new("ring-loss");
        let ring = RingFile::create(&dir.path().join("r"), 2, 8, Clock::MonotonicNs).unwrap();
        // The marker and 7 records fill the 8 slots; the other 13 are lost.
        for seq in 0..20 {
            ring.push(1, 3, entry(seq));
        }
        assert_eq!(ring.lost(1), 13);
        let mut expected = vec![thread(0, 3)];
        expected.extend((0..7).map(entry));
        assert_eq!(drained(&ring, 1), expected);
        // The next push says how many were lost before it.
        ring.push(1, 3, entry(20));
        assert_eq!(drained(&ring, 1), [lost(20, 13), entry(20)]);
        assert_eq!(ring.lost(1), 13);
        assert_eq!(ring.lost(0), 0);
    }

    #[test]
    fn records_pushed_together_stay_together_or_are_all_lost() {
        let dir = TempDir::new("ring-push-all");
        let ring = RingFile::create(&dir.path().join("r"), 1, 8, Clock::MonotonicNs).unwrap();
        ring.push_all(0, 3, &[entry(1), entry(2), entry(3)]);
        ring.push_all(0, 3, &[]);
        // Three more do not fit in the four slots left with a Lost record: all are lost.
        ring.push(0, 3, entry(4));
        ring.push_all(0, 3, &[entry(5), entry(6), entry(7), entry(8)]);
        assert_eq!(ring.lost(0), 4);
        assert_eq!(drained(&ring, 0), [thread(1, 3), entry(1), entry(2), entry(3), entry(4)]);
        ring.push_all(0, 3, &[entry(9), entry(10)]);
        assert_eq!(drained(&ring, 0), [lost(9, 4), entry(9), entry(10)]);
    }

    #[test]
    fn a_drain_up_to_a_count_takes_the_oldest_and_leaves_the_rest_in_order() {
        let dir = TempDir::new("ring-drain-up-to");
        let ring = RingFile::create(&dir.path().join("r"), 1, 8, Clock::MonotonicNs).unwrap();
        for seq in 1..=5 {
            ring.push(0, 3, entry(seq));
        }
        let mut out = Vec::new();
        assert_eq!(ring.drain_up_to(0, &mut out, 2), 2);
        assert_eq!(out, [thread(1, 3), entry(1)]);
        // Freed slots take new records; the older ones still come first.
        ring.push(0, 3, entry(6));
        ring.push(0, 3, entry(7));
        assert_eq!(ring.drain_up_to(0, &mut out, 0), 0);
        assert_eq!(ring.drain_up_to(0, &mut out, 3), 3);
        assert_eq!(out[2..], [entry(2), entry(3), entry(4)]);
        assert_eq!(drained(&ring, 0), [entry(5), entry(6), entry(7)]);
        assert_eq!(ring.lost(0), 0);
    }

    #[test]
    fn a_lost_record_needs_room_for_the_record_after_it() {
        let dir = TempDir::new("ring-loss-room");
        let ring = RingFile::create(&dir.path().join("r"), 1, 4, Clock::MonotonicNs).unwrap();
        for seq in 0..5 {
            ring.push(0, 3, entry(seq));
        }
        // [T, 0, 1, 2], 3 and 4 lost. Free one slot: not enough for Lost + record.
        let mut out = Vec::new();
        ring.drain(0, &mut out);
        for seq in 5..9 {
            ring.push(0, 3, entry(seq));
        }
        // 5: Lost(2) + 5; 6, 7: fill; 8: lost.
        assert_eq!(drained(&ring, 0), [lost(5, 2), entry(5), entry(6), entry(7)]);
        assert_eq!(ring.lost(0), 3);
        // A thread switch with pending losses needs three slots: Lost, Thread, record.
        ring.push(0, 4, entry(9));
        assert_eq!(drained(&ring, 0), [lost(9, 1), thread(9, 4), entry(9)]);
    }

    #[test]
    fn a_push_interrupting_a_push_is_counted_lost() {
        let dir = TempDir::new("ring-reentry");
        let ring = RingFile::create(&dir.path().join("r"), 1, 16, Clock::MonotonicNs).unwrap();
        ring.push(0, 9, entry(1));
        // What a signal handler sees when it interrupts a push of its thread.
        ring.ring_header(0).busy.store(1, Ordering::Relaxed);
        ring.push(0, 9, entry(2));
        ring.push(0, 9, entry(3));
        ring.ring_header(0).busy.store(0, Ordering::Relaxed);
        assert_eq!(ring.lost(0), 2);
        ring.push(0, 9, entry(4));
        assert_eq!(drained(&ring, 0), [thread(1, 9), entry(1), lost(4, 2), entry(4)]);
        ring.push(0, 9, entry(5));
        assert_eq!(drained(&ring, 0), [entry(5)], "the nested losses are reported once");
        assert_eq!(ring.lost(0), 2);
    }

    #[test]
    fn the_default_size_is_sparse() {
        let dir = TempDir::new("ring-default");
        let path = dir.path().join("r");
        let ring = RingFile::create(&path, DEFAULT_RINGS, DEFAULT_CAPACITY, Clock::Tsc).unwrap();
        let last = DEFAULT_RINGS - 1;
        ring.push(last, 1, entry(1));
        assert_eq!(drained(&RingFile::open(&path).unwrap(), last), [thread(1, 1), entry(1)]);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), (2 * PAGE + DEFAULT_RINGS * (RING_HEADER_BYTES + DEFAULT_CAPACITY * 16)) as u64);
        // Three pages touched (the header's, the in-use bytes' and the last ring's), not 4 GiB.
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "{} bytes allocated", meta.blocks() * 512);
    }

    #[test]
    fn bad_sizes_are_refused() {
        let dir = TempDir::new("ring-sizes");
        for (rings, capacity) in [(1, 12), (1, 1), (0, 16)] {
            let err = RingFile::create(&dir.path().join("r"), rings, capacity, Clock::Tsc).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{rings} × {capacity}: {err}");
        }
        let path = dir.path().join("r");
        RingFile::create(&path, 1, 2, Clock::Tsc).unwrap();
        let again = RingFile::create(&path, 1, 2, Clock::Tsc).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
    }

    #[test]
    fn a_concurrent_consumer_sees_every_record_or_its_loss_in_order() {
        const N: u64 = 1_000_000;
        let dir = TempDir::new("ring-stress");
        let path = dir.path().join("r");
        let producer = RingFile::create(&path, 2, 1024, Clock::MonotonicNs).unwrap();
        let consumer = RingFile::open(&path).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (mut expected, mut lost_records, mut drains) = (0u64, 0u64, 0u64);
        std::thread::scope(|s| {
            s.spawn(|| {
                for seq in 0..N {
                    producer.push(1, 42, entry(seq));
                }
                done.store(true, Ordering::Release);
            });
            let mut out = Vec::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                out.clear();
                consumer.drain(1, &mut out);
                drains += 1;
                for r in &out {
                    match r.kind() {
                        Some(Kind::Thread) => assert_eq!((expected, r.payload()), (0, 42)),
                        Some(Kind::Lost) => {
                            assert!(r.payload() > 0);
                            expected += r.payload();
                            lost_records += r.payload();
                        }
                        Some(Kind::Entry) => {
                            assert_eq!(r.payload(), expected, "a gap not accounted for by a Lost record");
                            expected += 1;
                        }
                        other => panic!("unexpected record {other:?}"),
                    }
                }
                if finished && out.is_empty() {
                    break;
                }
                // Fall behind now and then, so that the ring fills and losses happen.
                if drains % 256 == 0 {
                    std::thread::sleep(std::time::Duration::from_micros(50));
                }
            }
        });
        // Losses at the very end have no record after them to carry their Lost record.
        let total_lost = consumer.lost(1);
        assert_eq!(expected + (total_lost - lost_records), N);
        eprintln!("stress: {N} pushed, {total_lost} lost, {drains} drains");
    }

    #[test]
    fn a_forked_child_writes_its_own_file() {
        let dir = TempDir::new("ring-fork");
        let parent_path = dir.path().join("parent.ring");
        let child_path = dir.path().join("child.ring");
        let ring = RingFile::create(&parent_path, 2, 16, Clock::MonotonicNs).unwrap();
        // SAFETY: gettid cannot fail.
        let parent_tid = unsafe { libc::gettid() } as u32;
        ring.push(0, parent_tid, entry(1));
        let child_cpath = CString::new(child_path.as_os_str().as_bytes()).unwrap();
        let parent_pid = std::process::id();
        // SAFETY: the child only makes system calls and pushes (no allocation, no lock) and
        // leaves with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            let code = match ring.reopen_in_child(&child_cpath, parent_pid) {
                Ok(()) => {
                    // SAFETY: gettid cannot fail.
                    let tid = unsafe { libc::gettid() } as u32;
                    ring.push(0, tid, entry(2));
                    ring.push(1, tid, entry(3));
                    0
                }
                Err(errno) => errno,
            };
            // SAFETY: ends the child without running the parent's atexit handlers or tests.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "reopen_in_child failed with this errno");

        let child = RingFile::open(&child_path).unwrap();
        assert_eq!((child.pid(), child.parent_pid()), (pid as u32, parent_pid));
        // The child's one thread is its main thread: its tid is the child's pid.
        assert_eq!(drained(&child, 0), [thread(2, pid as u32), entry(2)]);
        assert_eq!(drained(&child, 1), [thread(3, pid as u32), entry(3)]);

        let parent = RingFile::open(&parent_path).unwrap();
        assert_eq!((parent.pid(), parent.parent_pid()), (parent_pid, 0));
        assert_eq!(drained(&parent, 0), [thread(1, parent_tid), entry(1)]);
        assert_eq!(drained(&parent, 1), []);
        // The parent's mapping still writes its own file.
        ring.push(0, parent_tid, entry(4));
        assert_eq!(drained(&parent, 0), [entry(4)]);
    }

    #[test]
    fn open_names_what_is_wrong_with_a_file() {
        let dir = TempDir::new("ring-open");
        let short = dir.path().join("short.ring");
        std::fs::write(&short, b"DYNPRING").unwrap();
        let err = RingFile::open(&short).unwrap_err().to_string();
        assert!(err.contains("short.ring") && err.contains("fewer than"), "{err}");

        let zeros = dir.path().join("zeros.ring");
        std::fs::write(&zeros, vec![0u8; 8192]).unwrap();
        let err = RingFile::open(&zeros).unwrap_err().to_string();
        assert!(err.contains("magic"), "{err}");

        let truncated = dir.path().join("trunc.ring");
        drop(RingFile::create(&truncated, 2, 16, Clock::MonotonicNs).unwrap());
        let file = OpenOptions::new().write(true).open(&truncated).unwrap();
        file.set_len(5000).unwrap();
        let err = RingFile::open(&truncated).unwrap_err().to_string();
        assert!(err.contains("the file has 5000"), "{err}");

        let missing = RingFile::open(&dir.path().join("none.ring")).unwrap_err().to_string();
        assert!(missing.contains("cannot open") && missing.contains("none.ring"), "{missing}");
    }

    /// Counts the page faults the calling thread takes as exceptions from now on: the
    /// kernel's software event `PERF_COUNT_SW_PAGE_FAULTS_MIN` (perf_event_open(2)), which,
    /// unlike `getrusage(2)`, leaves out pages a system call faults in (`madvise`), whose
    /// cost is not an exception's. `read` gives the count so far.
    struct FaultCounter(std::fs::File);

    impl FaultCounter {
        fn start() -> FaultCounter {
            use std::os::fd::FromRawFd;
            // struct perf_event_attr of PERF_ATTR_SIZE_VER0 (64 bytes): type
            // PERF_TYPE_SOFTWARE (1) and size, config, then zeros (enabled, all modes).
            let attr: [u64; 8] = [1 | (64 << 32), 5, 0, 0, 0, 0, 0, 0];
            // SAFETY: perf_event_open(attr, pid 0 = this thread, cpu -1, group -1, flags 0)
            // reads the 64 bytes of `attr`.
            let fd = unsafe { libc::syscall(libc::SYS_perf_event_open, attr.as_ptr(), 0, -1, -1, 0) };
            assert!(fd >= 0, "perf_event_open of the page-fault counter: {}", io::Error::last_os_error());
            // SAFETY: a new descriptor, ours alone.
            FaultCounter(unsafe { std::fs::File::from_raw_fd(fd as i32) })
        }

        fn read(&self) -> u64 {
            use std::io::Read;
            let mut count = [0u8; 8];
            (&self.0).read_exact(&mut count).unwrap();
            u64::from_ne_bytes(count)
        }
    }

    /// The consumer maps pages into the producer only when the producer named in the header
    /// maps this very file at the address it gave: not another file's mapping there, not
    /// another process (a reused pid, one in another pid namespace).
    #[test]
    fn a_consumer_touches_only_a_producer_mapping_this_very_file() {
        let dir = TempDir::in_memory("ring-producer-check");
        let a = RingFile::create(&dir.path().join("1.0.ring"), 2, 1 << 10, Clock::MonotonicNs).unwrap();
        let b = RingFile::create(&dir.path().join("2.0.ring"), 2, 1 << 10, Clock::MonotonicNs).unwrap();
        let consumer = RingFile::open(&dir.path().join("2.0.ring")).unwrap();
        let me = std::process::id();
        assert!(consumer.producer_maps_this_file(me, b.base as usize), "its own producer");
        assert!(!consumer.producer_maps_this_file(me, a.base as usize), "another ring file's mapping");
        assert!(!consumer.producer_maps_this_file(1, b.base as usize), "another process");
        assert!(!a.producer_maps_this_file(me, a.base as usize), "a producer has no file identity to check");
    }

    /// A producer filling a ring for the first time takes no page fault where the consumer
    /// populated it (before, one per page: the consumer's populating now maps the pages into
    /// the producer too), and one per page where nobody did — the producer makes no system
    /// call of its own to avoid them (a sandboxed program must see none of ours).
    #[test]
    fn a_ring_the_consumer_populated_is_filled_without_page_faults() {
        let dir = TempDir::in_memory("ring-populate");
        let path = dir.path().join("1.0.ring");
        let capacity = 1 << 16;
        let pages = capacity * RECORD_BYTES / PAGE;
        // A few faults of the test's own (its stack, the ring's in-use byte), against one a
        // page (256) without the help.
        let few = 4;
        let producer = RingFile::create(&path, 2, capacity, Clock::MonotonicNs).unwrap();
        let consumer = RingFile::open(&path).unwrap();
        consumer.populate(1, 0, capacity as u64);
        let faults = FaultCounter::start();
        for seq in 1..capacity as u64 {
            producer.push(1, 77, entry(seq));
        }
        assert_eq!(producer.written(1), capacity as u64, "the first push wrote a Thread record too");
        let populated = faults.read();
        assert!(populated <= few, "{populated} faults filling a populated ring of {pages} pages");
        // The same pushes into the ring nobody populated: a fault a page.
        for seq in 1..capacity as u64 {
            producer.push(0, 77, entry(seq));
        }
        let not_populated = faults.read() - populated;
        assert!(not_populated >= pages as u64 / 2, "{not_populated} faults filling {pages} pages nobody populated");
    }

    /// The same when the consumer populates a little at a time, as it does ahead of a thread:
    /// each call's first pages share a fault-around window with the previous call's last
    /// ones, and the rest of that window must be mapped too (a read of a mapped page maps
    /// nothing around it).
    #[test]
    fn a_ring_populated_a_little_at_a_time_is_filled_without_page_faults() {
        let dir = TempDir::in_memory("ring-populate-steps");
        let path = dir.path().join("1.0.ring");
        let capacity = 1 << 16;
        let pages = capacity * RECORD_BYTES / PAGE;
        let producer = RingFile::create(&path, 1, capacity, Clock::MonotonicNs).unwrap();
        let consumer = RingFile::open(&path).unwrap();
        // Steps of a few pages and a bit, never on a window's edge.
        let step = 3 * (PAGE / RECORD_BYTES) as u64 + 37;
        let mut from = 0;
        while from < capacity as u64 {
            consumer.populate(0, from, from + step);
            from += step;
        }
        let faults = FaultCounter::start();
        for seq in 1..capacity as u64 {
            producer.push(0, 77, entry(seq));
        }
        let taken = faults.read();
        assert!(taken <= 4, "{taken} faults filling a ring of {pages} pages populated {step} records at a time");
    }
}
