/* A program's own use of signals, for the tests of probes that must survive it: threads
 * that block every signal, SIGTRAP handlers installed every way, its own int3 and raise.
 * Built by the harness as a shared object (-O1 -fPIC) and loaded with dlopen. */
#define _GNU_SOURCE
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FUNC(name, body)                                                   \
    __asm__(".text\n.globl " #name "\n.type " #name ",@function\n" #name   \
            ":\n" body "\n.size " #name ",.-" #name "\n");

/* x + 2, after a short jmp: cannot be jump-optimized, stays a breakpoint probe. */
FUNC(sig_bp, "jmp 1f\n ud2\n1: lea 2(%rdi),%rax\n ret")
/* x + 1 through a frame: jump-optimized. */
FUNC(sig_jump, "push %rbp\n mov %rsp,%rbp\n lea 1(%rdi),%rax\n pop %rbp\n ret")

/* The kernel's struct sigaction (rt_sigaction takes it, not the C library's). */
/* arch/x86/include/uapi/asm/signal.h */
#define SA_RESTORER 0x04000000

struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

/* Blocks every signal in the calling thread: 0 with pthread_sigmask, 1 with sigprocmask,
 * 2 with a raw rt_sigprocmask through syscall(). Returns 0 on success. */
long block_all(long way) {
    sigset_t all;
    sigfillset(&all);
    if (way == 0)
        return pthread_sigmask(SIG_SETMASK, &all, NULL);
    if (way == 1)
        return sigprocmask(SIG_SETMASK, &all, NULL);
    unsigned long raw = ~0UL;
    return syscall(SYS_rt_sigprocmask, SIG_SETMASK, &raw, NULL, 8);
}

/* 1 when the calling thread blocks SIGTRAP, as the program reads its own mask. */
long trap_blocked(long unused) {
    (void)unused;
    sigset_t now;
    sigemptyset(&now);
    pthread_sigmask(SIG_BLOCK, NULL, &now);
    return sigismember(&now, SIGTRAP);
}

/* SIG_BLOCK (1) or SIG_UNBLOCK (0) of SIGTRAP alone. */
long block_trap(long on) {
    sigset_t trap;
    sigemptyset(&trap);
    sigaddset(&trap, SIGTRAP);
    return pthread_sigmask(on ? SIG_BLOCK : SIG_UNBLOCK, &trap, NULL);
}

static volatile long traps;
static volatile long last_code;

static void on_trap(int sig, siginfo_t *info, void *uc) {
    (void)sig;
    (void)uc;
    traps++;
    last_code = info->si_code;
}

/* How many SIGTRAPs the program's handler saw; the si_code of the last one. */
long traps_seen(long unused) { (void)unused; return traps; }
long last_trap_code(long unused) { (void)unused; return last_code; }

/* Installs `handler` for SIGTRAP with sigaction and SA_SIGINFO | flags. */
static long install(void (*handler)(int, siginfo_t *, void *), long flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = handler;
    sa.sa_flags = SA_SIGINFO | (int)flags;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGTRAP, &sa, NULL);
}

/* Installs on_trap with sigaction and SA_SIGINFO | flags. */
long install_handler(long flags) { return install(on_trap, flags); }

/* Sets SIGTRAP's action to SIG_DFL (0) or SIG_IGN (1) with signal(). */
long trap_disposition(long ignore) {
    return signal(SIGTRAP, ignore ? SIG_IGN : SIG_DFL) == SIG_ERR ? -1 : 0;
}

/* Installs on_trap with a raw rt_sigaction through syscall(), the C library's signal
 * return trampoline borrowed from SIGUSR2's action. Returns the old handler's address. */
long install_raw(long flags) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGUSR2, &sa, NULL);
    struct kernel_sigaction usr2, act, old;
    syscall(SYS_rt_sigaction, SIGUSR2, NULL, &usr2, 8);
    memset(&act, 0, sizeof act);
    act.handler = (void *)on_trap;
    act.flags = SA_SIGINFO | SA_RESTORER | (unsigned long)flags;
    act.restorer = usr2.restorer;
    if (syscall(SYS_rt_sigaction, SIGTRAP, &act, &old, 8) != 0)
        return -1;
    return (long)old.handler;
}

/* 1 when SIGTRAP's handler, as the program reads it, is on_trap; 0 for SIG_DFL; 2 for
 * SIG_IGN; -1 otherwise. `raw` reads it with syscall(SYS_rt_sigaction). */
long trap_handler_is(long raw) {
    void *handler;
    if (raw) {
        struct kernel_sigaction old;
        syscall(SYS_rt_sigaction, SIGTRAP, NULL, &old, 8);
        handler = old.handler;
    } else {
        struct sigaction old;
        sigaction(SIGTRAP, NULL, &old);
        handler = (void *)old.sa_sigaction;
    }
    if (handler == (void *)on_trap)
        return 1;
    if (handler == (void *)SIG_DFL)
        return 0;
    if (handler == (void *)SIG_IGN)
        return 2;
    return -1;
}

/* Executes an int3 of the program's own; returns x. */
long own_int3(long x) {
    __asm__ volatile("int3");
    return x;
}

/* raise(SIGTRAP); returns its result. */
long own_raise(long unused) {
    (void)unused;
    return raise(SIGTRAP);
}

long sig_bp(long x);
static volatile long in_usr1;

/* Calls sig_bp, which carries a breakpoint probe, with every signal blocked. */
static void on_usr1(int sig) {
    (void)sig;
    in_usr1 = sig_bp(40);
}

/* Installs a SIGUSR1 handler whose sa_mask is every signal and raises SIGUSR1. Returns
 * what the handler's call of sig_bp returned, plus 1000 when reading the action back
 * shows SIGTRAP in that mask, as set. */
long usr1_full_mask(long unused) {
    (void)unused;
    struct sigaction sa, back;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_usr1;
    sigfillset(&sa.sa_mask);
    sigaction(SIGUSR1, &sa, NULL);
    raise(SIGUSR1);
    sigaction(SIGUSR1, NULL, &back);
    return in_usr1 + 1000 * sigismember(&back.sa_mask, SIGTRAP);
}

#include <execinfo.h>
#include <pthread.h>
#include <sys/mman.h>
#include <ucontext.h>

#define ALT_SIZE (1 << 20)
static char *volatile alt_base;
static volatile long on_alt;

/* LLVM-style: a handler that needs more stack than the thread has, on its alternate stack. */
static void on_trap_onstack(int sig, siginfo_t *info, void *uc) {
    (void)sig;
    (void)info;
    volatile char big[256 << 10];
    big[0] = 1;
    big[sizeof big - 1] = 1;
    char *here = (char *)&big[0];
    on_alt = here >= alt_base && here < alt_base + ALT_SIZE;
    /* Its own backtrace (LLVM prints one) walks back to the interrupted code. */
    void *frames[64];
    int n = backtrace(frames, 64);
    void *rip = (void *)((ucontext_t *)uc)->uc_mcontext.gregs[REG_RIP];
    for (int i = 0; i < n; i++)
        if (frames[i] == rip)
            on_alt += 100;
    traps++;
}

static void *onstack_thread(void *flags) {
    stack_t ss = {.ss_sp = alt_base, .ss_size = ALT_SIZE, .ss_flags = (int)(long)flags};
    if (sigaltstack(&ss, NULL) != 0)
        return (void *)-1L;
    install(on_trap_onstack, SA_ONSTACK | SA_NODEFER | SA_RESETHAND);
    __asm__ volatile("int3");
    stack_t after;
    sigaltstack(NULL, &after);
    /* The alternate stack is the thread's as before (SS_AUTODISARM re-armed it). */
    return (void *)(on_alt + 10 * (after.ss_sp == alt_base && !(after.ss_flags & SS_DISABLE)));
}

/* Runs, in a thread with a 64 KiB stack and a 1 MiB alternate stack (sigaltstack flags
 * `flags`: 0 or SS_AUTODISARM), an int3 whose SA_ONSTACK handler needs 256 KiB of stack.
 * Returns 111 when the handler ran on the alternate stack, its backtrace() reached the
 * int3, and the thread still has the stack. */
long onstack_trap(long flags) {
    void *warm[1];
    backtrace(warm, 1); /* loads the unwinder before the handler needs it */
    alt_base = mmap(NULL, ALT_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    on_alt = 0;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 << 10);
    pthread_t t;
    void *ret;
    pthread_create(&t, &attr, onstack_thread, (void *)flags);
    pthread_join(t, &ret);
    munmap(alt_base, ALT_SIZE);
    return (long)ret;
}

#include <errno.h>

/* In a new thread: 1 when it reads SIGTRAP in its mask, plus 10 when a raise(SIGTRAP)
 * waited for its unblock (on_trap installed), plus 100 when a breakpoint-probed call ran. */
static void *new_thread_view(void *unused) {
    (void)unused;
    long blocked = trap_blocked(0);
    long seen = traps;
    raise(SIGTRAP);
    long waited = traps == seen;
    block_trap(0);
    long ok = blocked + 10 * (blocked && waited && traps == seen + 1) + 100 * (sig_bp(1) == 3);
    return (void *)ok;
}

/* Creates a thread while blocking SIGTRAP (block 1) or not (0); returns new_thread_view. */
long new_thread_blocks(long block) {
    block_trap(block);
    pthread_t t;
    void *ret;
    pthread_create(&t, NULL, new_thread_view, NULL);
    pthread_join(t, &ret);
    block_trap(0);
    return (long)ret;
}

/* Blocks SIGTRAP (block 1) or not, then executes grep on its own status: the process
 * exits 0 when the new image blocks SIGTRAP (0x10 in SigBlk, proc(5)), 1 when not. */
long exec_blocking(long block) {
    block_trap(block);
    char *argv[] = {"grep", "-q", "^SigBlk:.*[13579bdf].$", "/proc/self/status", NULL};
    execv("/usr/bin/grep", argv);
    return 100 + errno;
}

/* Blocks SIGTRAP and executes a file that does not exist: 1 when execv failed with ENOENT
 * and the thread still reads SIGTRAP in its mask. Leaves SIGTRAP blocked. */
long exec_fails_blocking(long unused) {
    (void)unused;
    block_trap(1);
    char *argv[] = {"none", NULL};
    long r = execv("/nonexistent/dynprobe-test", argv);
    return r == -1 && errno == ENOENT && trap_blocked(0);
}

#include <sys/wait.h>

/* Blocks SIGTRAP and forks: the child exits with 1 when it reads SIGTRAP in its mask, plus
 * 10 when its raise(SIGTRAP) waits (on_trap installed). Returns that status. */
long forked_child_blocks(long unused) {
    (void)unused;
    block_trap(1);
    pid_t pid = fork();
    if (pid == 0) {
        long seen = traps;
        raise(SIGTRAP);
        _exit((int)(trap_blocked(0) + 10 * (traps == seen)));
    }
    int status = 0;
    waitpid(pid, &status, 0);
    block_trap(0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -WTERMSIG(status);
}

#include <time.h>

static long trap_pending(void) {
    sigset_t pending;
    sigemptyset(&pending);
    sigpending(&pending);
    return sigismember(&pending, SIGTRAP);
}

/* With SIGTRAP blocked, sends one (way 0: raise, 1: kill) and waits for it (how 0: sigwait,
 * 1: sigwaitinfo, 2: sigtimedwait), under a 5 s alarm. Returns 0 when it was pending
 * before the wait and not after, the wait returned it at once (with SI_USER and our pid
 * for the two that say), no handler ran and unblocking delivers nothing; else the number
 * of the first check that failed. */
long wait_for_held(long way_how) {
    long way = way_how / 10, how = way_how % 10;
    alarm(5);
    block_trap(1);
    long seen = traps;
    if (way == 0)
        raise(SIGTRAP);
    else
        kill(getpid(), SIGTRAP);
    if (!trap_pending())
        return 1;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTRAP);
    siginfo_t info;
    memset(&info, 0, sizeof info);
    info.si_pid = getpid();
    int sig = -1;
    if (how == 0) {
        if (sigwait(&set, &sig) != 0)
            return 2;
    } else if (how == 1) {
        sig = sigwaitinfo(&set, &info);
    } else {
        struct timespec ts = {1, 0};
        sig = sigtimedwait(&set, &info, &ts);
    }
    if (sig != SIGTRAP)
        return 3;
    if (info.si_code != SI_USER || info.si_pid != getpid())
        return 4;
    if (trap_pending())
        return 5;
    block_trap(0);
    return traps == seen ? 0 : 6;
}

/* With SIGTRAP blocked, raise(SIGTRAP), then sigsuspend on a mask without it: 0 when it
 * returned EINTR after the handler ran once, and unblocking delivers nothing more. */
long suspend_with_held(long unused) {
    (void)unused;
    alarm(5);
    block_trap(1);
    long seen = traps;
    raise(SIGTRAP);
    sigset_t mask;
    sigemptyset(&mask);
    long r = sigsuspend(&mask);
    if (r != -1 || errno != EINTR || traps != seen + 1)
        return 1;
    block_trap(0);
    return traps == seen + 1 ? 0 : 2;
}

static void *wait_trap_thread(void *unused) {
    (void)unused;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTRAP);
    siginfo_t info;
    return (void *)(long)sigwaitinfo(&set, &info);
}

static volatile int go;
static void *unblock_later(void *unused) {
    (void)unused;
    long seen = traps;
    while (!go)
        usleep(1000);
    block_trap(0);
    return (void *)(traps - seen);
}

/* A kill(getpid(), SIGTRAP) while this thread blocks SIGTRAP, in a process whose other
 * thread (created blocking it too) `waits` for it in sigwaitinfo (1), or unblocks it a
 * moment later (0). Returns 0 when that thread got it (sigwaitinfo returned SIGTRAP, or
 * its handler ran once there) and nothing reaches this thread as it unblocks. */
long kill_to_blocking_process(long waits) {
    alarm(5);
    block_trap(1);
    long seen = traps;
    go = 0;
    pthread_t t;
    pthread_create(&t, NULL, waits ? wait_trap_thread : unblock_later, NULL);
    usleep(100 * 1000);
    kill(getpid(), SIGTRAP);
    go = 1;
    void *ret;
    pthread_join(t, &ret);
    if ((long)ret != (waits ? SIGTRAP : 1))
        return 1;
    long after = traps;
    block_trap(0);
    return traps == after && after == seen + !waits ? 0 : 2;
}
