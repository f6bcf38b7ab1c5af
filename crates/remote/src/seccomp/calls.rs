//! The system calls the injection and dynprobe's agent make in a process they attach to, as
//! a seccomp filter would see them (x86-64): each with the arguments a filter is likely to
//! look at (`mmap`'s and `mprotect`'s protections, `socket`'s domain and type, `clone`'s
//! flags, the `futex` operation, `openat`'s flags, the signals sent). Gathered from every
//! call an attach, a probe session with every kind of probe, a `record -p` session and a
//! detach made (`perf trace` of the target) and from the agent's code, with the C library's
//! fallbacks beside them. A filter that looks at the calling instruction's address is not
//! judged rightly: the address given is 0.

/// `AUDIT_ARCH_X86_64`: what `struct seccomp_data`'s `arch` says for a 64-bit call.
pub(crate) const ARCH: u32 = 0xc000_003e;

/// A system call of the injection or the agent, with arguments as it makes them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentCall {
    pub name: &'static str,
    pub nr: i64,
    pub args: [u64; 6],
    /// The `errno` a filter may make it fail with (its failure handled: a fallback, or a
    /// feature lost); a kill or a trap never is.
    pub may_fail: MayFail,
}

/// Which failures of a call are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MayFail {
    /// None: the call is needed.
    Never,
    /// This `errno` only (glibc falls back from `clone3` to `clone` on `ENOSYS` alone).
    With(i32),
    /// Any `errno`.
    Always,
}

impl MayFail {
    /// Whether failing with `errno` is handled.
    pub fn allows(self, errno: i32) -> bool {
        match self {
            MayFail::Never => false,
            MayFail::With(e) => e == errno,
            MayFail::Always => true,
        }
    }
}

const fn call(name: &'static str, nr: i64, args: [u64; 6]) -> AgentCall {
    AgentCall { name, nr, args, may_fail: MayFail::Never }
}

const fn optional(name: &'static str, nr: i64, args: [u64; 6]) -> AgentCall {
    AgentCall { name, nr, args, may_fail: MayFail::Always }
}

const AT_FDCWD: u64 = libc::AT_FDCWD as i64 as u64;
const FD: u64 = 3;
const PAGE: u64 = 4096;
const R: u64 = libc::PROT_READ as u64;
const RW: u64 = (libc::PROT_READ | libc::PROT_WRITE) as u64;
const RX: u64 = (libc::PROT_READ | libc::PROT_EXEC) as u64;
const PRIVATE: u64 = libc::MAP_PRIVATE as u64;
const SHARED: u64 = libc::MAP_SHARED as u64;
const FIXED: u64 = libc::MAP_FIXED as u64;
const DENYWRITE: u64 = libc::MAP_DENYWRITE as u64;
const ANON: u64 = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
const NORESERVE: u64 = libc::MAP_NORESERVE as u64;
const NO_FD: u64 = -1i64 as u64;
const CLOEXEC: u64 = libc::O_CLOEXEC as u64;
/// The flags of glibc's `pthread_create` (`clone`, or `clone3`'s `clone_args.flags`).
const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;
const FUTEX_PRIVATE: u64 = libc::FUTEX_PRIVATE_FLAG as u64;
/// dynprobe's stop signal, `SIGRTMAX - 2` (`dynprobe_text::stop::stop_signal`; glibc's
/// `SIGRTMAX` is 64 on x86-64).
const STOP_SIGNAL: u64 = 62;

/// Every call, with each way it is made.
pub(crate) const AGENT_CALLS: &[AgentCall] = &[
    // The injection's return stub, then the loader's `dlopen`.
    call("getpid", libc::SYS_getpid, [0; 6]),
    call("openat", libc::SYS_openat, [AT_FDCWD, 0, libc::O_RDONLY as u64 | CLOEXEC, 0, 0, 0]),
    call("read", libc::SYS_read, [FD, 0, 832, 0, 0, 0]),
    call("pread64", libc::SYS_pread64, [FD, 0, 784, 64, 0, 0]),
    call("newfstatat", libc::SYS_newfstatat, [FD, 0, 0, libc::AT_EMPTY_PATH as u64, 0, 0]),
    call("mmap", libc::SYS_mmap, [0, PAGE, R, PRIVATE | DENYWRITE, FD, 0]),
    call("mmap", libc::SYS_mmap, [PAGE, PAGE, RX, PRIVATE | FIXED | DENYWRITE, FD, PAGE]),
    call("mmap", libc::SYS_mmap, [PAGE, PAGE, RW, PRIVATE | FIXED | DENYWRITE, FD, PAGE]),
    call("mmap", libc::SYS_mmap, [0, PAGE, RW, ANON, NO_FD, 0]),
    call("mmap", libc::SYS_mmap, [PAGE, PAGE, RW, ANON | FIXED, NO_FD, 0]),
    call("mprotect", libc::SYS_mprotect, [PAGE, PAGE, libc::PROT_NONE as u64, 0, 0, 0]),
    call("mprotect", libc::SYS_mprotect, [PAGE, PAGE, R, 0, 0, 0]),
    call("close", libc::SYS_close, [FD, 0, 0, 0, 0, 0]),
    call("munmap", libc::SYS_munmap, [PAGE, PAGE, 0, 0, 0, 0]),
    call("brk", libc::SYS_brk, [0; 6]),
    // The agent's code and data: its code pool made executable, the rings and the
    // counters' pages, the text written through /proc/self/mem.
    call("mprotect", libc::SYS_mprotect, [PAGE, PAGE, RX, 0, 0, 0]),
    call("mprotect", libc::SYS_mprotect, [PAGE, PAGE, RW, 0, 0, 0]),
    call("mmap", libc::SYS_mmap, [0, PAGE, RW, SHARED, FD, 0]),
    call("mmap", libc::SYS_mmap, [PAGE, PAGE, RW, SHARED | FIXED, FD, 0]),
    call("mmap", libc::SYS_mmap, [0, PAGE, libc::PROT_NONE as u64, ANON | NORESERVE, NO_FD, 0]),
    // The code pool's pages near the code they serve.
    call("mmap", libc::SYS_mmap, [PAGE, PAGE, RW, ANON | libc::MAP_FIXED_NOREPLACE as u64, NO_FD, 0]),
    call("openat", libc::SYS_openat, [AT_FDCWD, 0, libc::O_RDWR as u64 | CLOEXEC, 0, 0, 0]),
    call(
        "openat",
        libc::SYS_openat,
        [AT_FDCWD, 0, (libc::O_RDWR | libc::O_CREAT | libc::O_EXCL) as u64 | CLOEXEC, 0o600, 0, 0],
    ),
    call(
        "openat",
        libc::SYS_openat,
        [AT_FDCWD, 0, (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64 | CLOEXEC, 0o666, 0, 0],
    ),
    call("pwrite64", libc::SYS_pwrite64, [FD, 0, 5, PAGE, 0, 0]),
    call("write", libc::SYS_write, [FD, 0, 64, 0, 0, 0]),
    call("lseek", libc::SYS_lseek, [FD, 0, libc::SEEK_CUR as u64, 0, 0, 0]),
    call("ftruncate", libc::SYS_ftruncate, [FD, PAGE, 0, 0, 0, 0]),
    // A forked child that cannot be traced marks the memory of its ring (a fallback to
    // anonymous memory when it cannot).
    optional("memfd_create", libc::SYS_memfd_create, [0, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0]),
    call("fcntl", libc::SYS_fcntl, [FD, libc::F_GETFL as u64, 0, 0, 0, 0]),
    call("fcntl", libc::SYS_fcntl, [FD, libc::F_SETFL as u64, libc::O_NONBLOCK as u64, 0, 0, 0]),
    call("fcntl", libc::SYS_fcntl, [FD, libc::F_SETFD as u64, libc::FD_CLOEXEC as u64, 0, 0, 0]),
    call("dup3", libc::SYS_dup3, [FD, FD + 1, CLOEXEC, 0, 0, 0]),
    call("rename", libc::SYS_rename, [0; 6]),
    call("linkat", libc::SYS_linkat, [AT_FDCWD, 0, AT_FDCWD, 0, 0, 0]),
    call("unlink", libc::SYS_unlink, [0; 6]),
    call("fchmod", libc::SYS_fchmod, [FD, 0o644, 0, 0, 0, 0]),
    call("getdents64", libc::SYS_getdents64, [FD, 0, 32768, 0, 0, 0]),
    call("readlink", libc::SYS_readlink, [0, 0, 4096, 0, 0, 0]),
    call("statx", libc::SYS_statx, [AT_FDCWD, 0, 0, libc::STATX_BASIC_STATS as u64, 0, 0]),
    // Reading the program's memory safely (probe arguments, stacks).
    call("process_vm_readv", libc::SYS_process_vm_readv, [0, 0, 1, 0, 1, 0]),
    // The agent's threads (glibc tries clone3 first, and falls back to clone on ENOSYS).
    AgentCall {
        name: "clone3",
        nr: libc::SYS_clone3,
        args: [0, 88, 0, 0, 0, 0],
        may_fail: MayFail::With(libc::ENOSYS),
    },
    call("clone", libc::SYS_clone, [THREAD_FLAGS, 0, 0, 0, 0, 0]),
    optional("set_robust_list", libc::SYS_set_robust_list, [0, 24, 0, 0, 0, 0]),
    optional("rseq", libc::SYS_rseq, [0, 32, 0, 0x5305_3053, 0, 0]),
    call("prctl", libc::SYS_prctl, [libc::PR_SET_NAME as u64, 0, 0, 0, 0, 0]),
    call("sigaltstack", libc::SYS_sigaltstack, [0; 6]),
    call("exit", libc::SYS_exit, [0; 6]),
    optional("madvise", libc::SYS_madvise, [PAGE, PAGE, libc::MADV_DONTNEED as u64, 0, 0, 0]),
    call("sched_yield", libc::SYS_sched_yield, [0; 6]),
    call("clock_nanosleep", libc::SYS_clock_nanosleep, [libc::CLOCK_MONOTONIC as u64, 0, 0, 0, 0, 0]),
    call("nanosleep", libc::SYS_nanosleep, [0; 6]),
    call("poll", libc::SYS_poll, [0, 1, 100, 0, 0, 0]),
    optional("clock_gettime", libc::SYS_clock_gettime, [libc::CLOCK_MONOTONIC as u64, 0, 0, 0, 0, 0]),
    optional("getrandom", libc::SYS_getrandom, [0, 16, libc::GRND_NONBLOCK as u64, 0, 0, 0]),
    // Signals: the handlers dynprobe installs, the stop of every thread while code changes,
    // the masks around its own work.
    call("rt_sigaction", libc::SYS_rt_sigaction, [libc::SIGTRAP as u64, 0, 0, 8, 0, 0]),
    call("rt_sigprocmask", libc::SYS_rt_sigprocmask, [libc::SIG_SETMASK as u64, 0, 0, 8, 0, 0]),
    call("rt_sigreturn", libc::SYS_rt_sigreturn, [0; 6]),
    // A system call a stop cut short, and the injection's own resumption.
    call("restart_syscall", libc::SYS_restart_syscall, [0; 6]),
    // The stop signal (`SIGRTMAX - 2`) to each thread; the program's own SIGTRAP passed on.
    call("tgkill", libc::SYS_tgkill, [0, 0, STOP_SIGNAL, 0, 0, 0]),
    call("rt_sigqueueinfo", libc::SYS_rt_sigqueueinfo, [0, libc::SIGTRAP as u64, 0, 0, 0, 0]),
    call("rt_tgsigqueueinfo", libc::SYS_rt_tgsigqueueinfo, [0, 0, libc::SIGTRAP as u64, 0, 0, 0]),
    call("kill", libc::SYS_kill, [0, libc::SIGTRAP as u64, 0, 0, 0, 0]),
    // A forked child's fork handler names its parent.
    call("getppid", libc::SYS_getppid, [0; 6]),
    call("gettid", libc::SYS_gettid, [0; 6]),
    call("futex", libc::SYS_futex, [0, libc::FUTEX_WAIT as u64 | FUTEX_PRIVATE, 0, 0, 0, 0]),
    call("futex", libc::SYS_futex, [0, libc::FUTEX_WAKE as u64 | FUTEX_PRIVATE, 1, 0, 0, 0]),
    call(
        "futex",
        libc::SYS_futex,
        [0, (libc::FUTEX_WAIT_BITSET | libc::FUTEX_CLOCK_REALTIME) as u64 | FUTEX_PRIVATE, 0, 0, 0, u32::MAX as u64],
    ),
    optional("membarrier", libc::SYS_membarrier, [0; 6]),
    call("getuid", libc::SYS_getuid, [0; 6]),
    call("geteuid", libc::SYS_geteuid, [0; 6]),
    // The control channel to the dynprobe process (a Unix socket).
    call(
        "socket",
        libc::SYS_socket,
        [libc::AF_UNIX as u64, (libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC) as u64, 0, 0, 0, 0],
    ),
    call("connect", libc::SYS_connect, [FD, 0, 110, 0, 0, 0]),
    call("getsockopt", libc::SYS_getsockopt, [FD, libc::SOL_SOCKET as u64, libc::SO_PEERCRED as u64, 0, 0, 0]),
    call("sendto", libc::SYS_sendto, [FD, 0, 64, libc::MSG_NOSIGNAL as u64, 0, 0]),
    call("recvfrom", libc::SYS_recvfrom, [FD, 0, 4096, 0, 0, 0]),
    call("recvmsg", libc::SYS_recvmsg, [FD, 0, 0, 0, 0, 0]),
];
