/* Functions for the return-probe tests: plain, recursive, multi-register and floating
 * return values, longjmp out of a probed function, and a thread exiting inside one. Built
 * by the test harness as a shared object (-O1 -fPIC) and loaded with dlopen. */
#include <pthread.h>
#include <setjmp.h>

#define NOINLINE __attribute__((noinline, noipa))

NOINLINE long work(long x) { return x * 3 + 1; }

NOINLINE long fib(long n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

struct pair { long a, b; };
/* Returned in rax:rdx. */
NOINLINE struct pair make_pair(long x) { struct pair p = { x + 1, x * 2 }; return p; }
NOINLINE long pair_sum(long x) { struct pair p = make_pair(x); return p.a * 1000 + p.b; }

/* Returned in xmm0. */
NOINLINE double halve(double x) { return x / 2.0; }
NOINLINE long halve_times_100(long x) { return (long)(halve((double)x) * 100.0); }

/* Returned in st0. */
NOINLINE long double third(long double x) { return x / 3.0L; }
NOINLINE long third_times_300(long x) { return (long)(third((long double)x) * 300.0L + 0.5L); }

/* longjmp out of a probed function from two probed levels deep. */
static jmp_buf jump_back;
NOINLINE long jumper(long x) {
    if (x > 0) longjmp(jump_back, (int)x);
    return -1;
}
NOINLINE long jump_outer(long x) { return jumper(x) + 1; }
NOINLINE long setjmp_then_jump(long x) {
    volatile long r = 0;
    int v = setjmp(jump_back);
    if (v == 0) r = jump_outer(x);
    else r = v * 10;
    return r;
}

/* A thread that exits from inside a probed function. */
NOINLINE long exit_inside(long x) {
    if (x > 0) pthread_exit((void *)(x + 7));
    return x;
}
NOINLINE long calls_exit_inside(long x) { return exit_inside(x) + 100; }
static void *exiting_thread(void *arg) { return (void *)calls_exit_inside((long)arg); }
NOINLINE long thread_exits_inside(long x) {
    pthread_t t;
    void *ret = 0;
    if (pthread_create(&t, 0, exiting_thread, (void *)x) != 0) return -1;
    pthread_join(t, &ret);
    return (long)ret;
}

/* glibc backtrace() from two probed levels down. */
#include <execinfo.h>
static void *bt_frames[64];
static int bt_count;
NOINLINE long bt_inner(long x) {
    bt_count = backtrace(bt_frames, 64);
    return x + 1;
}
NOINLINE long bt_middle(long x) { return bt_inner(x) * 2; }
NOINLINE long bt_outer(long x) { return bt_middle(x) + 3; }
long bt_frames_taken(long unused) { (void)unused; return bt_count; }
long bt_frame(long i) { return (long)bt_frames[i]; }

/* Spins until *flag is set: a call kept in flight while its probe is unregistered. At -O1
 * the loop's head is the function's first instruction, so the entry probe fires on every
 * iteration of the one call. */
NOINLINE long block_until(long flag_addr) {
    while (!__atomic_load_n((volatile long *)flag_addr, __ATOMIC_ACQUIRE)) {}
    return 7;
}

/* Raises `signal` from inside a probed function: the handler (on an alternate stack, set up
 * by the test) calls probed functions while this call is in flight. */
#include <signal.h>
NOINLINE long raise_inside(long sig) {
    raise((int)sig);
    return sig + 1000;
}

/* The child of a fork inside a probed function returns through the trampoline too. */
#include <sys/wait.h>
#include <unistd.h>
NOINLINE long fork_and_return(long x) {
    (void)x;
    return (long)fork();
}
NOINLINE long fork_driver(long x) {
    long pid = fork_and_return(x);
    if (pid == 0) _exit(work(x) == 3 * x + 1 && fib(10) == 55 ? 42 : 1);
    int status = 0;
    if (waitpid((pid_t)pid, &status, 0) != pid) return -1;
    return WIFEXITED(status) ? WEXITSTATUS(status) : -2;
}

/* A thread cancelled while inside two probed functions (forced unwinding). */
NOINLINE long wait_for_cancel(long x) {
    for (;;) {
        pthread_testcancel();
        __asm__ volatile("pause");
    }
    return x;
}
NOINLINE long calls_wait_for_cancel(long x) { return wait_for_cancel(x) + 1; }
static volatile long cancel_ready;
static void *cancelled_thread(void *arg) {
    cancel_ready = 1;
    return (void *)calls_wait_for_cancel((long)arg);
}
/* Returns 1 when the thread ended cancelled. */
NOINLINE long thread_cancelled_inside(long x) {
    pthread_t t;
    void *ret = 0;
    cancel_ready = 0;
    if (pthread_create(&t, 0, cancelled_thread, (void *)x) != 0) return -1;
    while (!cancel_ready) {}
    pthread_cancel(t);
    pthread_join(t, &ret);
    return ret == PTHREAD_CANCELED;
}

/* A coroutine (ucontext) suspended inside a probed function while the probed function that
 * started it returns on the thread's own stack: the two calls return in the opposite order
 * of their entries. `stack_addr` is a 1 MiB stack for the coroutine, given by the test. */
#include <ucontext.h>
static ucontext_t main_ctx, co_ctx;
static long co_result;
NOINLINE long co_inner(long x) {
    swapcontext(&co_ctx, &main_ctx);
    return x * 7;
}
static void co_body(void) { co_result = co_inner(6); }
NOINLINE long co_outer(long x) {
    swapcontext(&main_ctx, &co_ctx);
    return x + 1;
}
/* 2 * 10000 + work(5) * 100 + 42 when every call returns where it should. */
NOINLINE long coroutine_demo(long stack_addr) {
    getcontext(&co_ctx);
    co_ctx.uc_stack.ss_sp = (void *)stack_addr;
    co_ctx.uc_stack.ss_size = 1 << 20;
    co_ctx.uc_link = &main_ctx;
    makecontext(&co_ctx, co_body, 0);
    long a = co_outer(1); /* returns while co_inner is suspended on the coroutine's stack */
    long b = work(5);
    swapcontext(&main_ctx, &co_ctx); /* co_inner returns; the coroutine ends back here */
    return a * 10000 + b * 100 + co_result;
}
