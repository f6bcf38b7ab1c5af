/* A program that does what real programs do with signals (xz's workers, LLVM's handlers):
 * replaces SIGTRAP's action with SA_ONSTACK|SA_NODEFER|SA_RESETHAND, uses int3 and
 * raise(SIGTRAP) itself, installs a handler with a raw rt_sigaction, and runs work() in
 * threads that block every signal (pthread_sigmask, sigprocmask, raw rt_sigprocmask).
 * Prints what it computed and how many of its own traps it saw: the same with and
 * without dynprobe. Usage: `signals ROUNDS` runs once; `signals LOG` (the attach tests'
 * worker protocol; LOG unused) says "ready PID", then runs 200 rounds per "go" line on
 * stdin, answering with its line, until "quit"; `signals exec ROUNDS` executes itself with
 * SIGTRAP blocked first. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SA_RESTORER 0x04000000 /* arch/x86/include/uapi/asm/signal.h */

struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

static volatile long traps;
static long rounds;

static void on_trap(int sig, siginfo_t *info, void *uc) {
    (void)sig;
    (void)info;
    (void)uc;
    traps++;
}

__attribute__((noinline)) long work(long x) {
    __asm__ volatile("" ::: "memory");
    return x * 3 + 1;
}

static void block_all(long way) {
    sigset_t all;
    sigfillset(&all);
    unsigned long raw = ~0UL;
    if (way == 0)
        pthread_sigmask(SIG_SETMASK, &all, NULL);
    else if (way == 1)
        sigprocmask(SIG_SETMASK, &all, NULL);
    else
        syscall(SYS_rt_sigprocmask, SIG_SETMASK, &raw, NULL, 8);
}

static void *worker(void *arg) {
    long *sum = arg;
    block_all(*sum);
    *sum = 0;
    for (long i = 0; i < rounds; i++)
        *sum += work(i);
    return NULL;
}

/* One run: the line the program prints. */
static void run(void) {
    traps = 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_trap;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER | SA_RESETHAND;
    sigaction(SIGTRAP, &sa, NULL);
    __asm__ volatile("int3");
    struct sigaction now;
    sigaction(SIGTRAP, NULL, &now);
    long reset = now.sa_handler == SIG_DFL;

    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGTRAP, &sa, NULL);
    raise(SIGTRAP);

    /* A raw rt_sigaction, with the C library's return trampoline read from SIGTRAP's. */
    struct kernel_sigaction kact, kold;
    syscall(SYS_rt_sigaction, SIGTRAP, NULL, &kold, 8);
    kact = kold;
    kact.flags = SA_SIGINFO | SA_RESTORER | SA_NODEFER;
    syscall(SYS_rt_sigaction, SIGTRAP, &kact, NULL, 8);
    __asm__ volatile("int3");

    long total = 0;
    for (long way = 0; way < 3; way++) {
        /* As xz does: the new thread starts with every signal blocked. */
        sigset_t all, old;
        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        long sum = way;
        pthread_t t;
        pthread_create(&t, NULL, worker, &sum);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
        pthread_join(t, NULL);
        total += sum;
    }
    sigset_t old;
    pthread_sigmask(SIG_BLOCK, NULL, &old);
    block_all(1);
    total += work(1);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    printf("total=%ld traps=%ld reset=%ld\n", total, traps, reset);
    fflush(stdout);
}

int main(int argc, char **argv) {
    if (argc > 2 && strcmp(argv[1], "exec") == 0) {
        /* `signals exec ROUNDS`: executes itself with SIGTRAP blocked, which the new image
         * must find blocked (the mask survives execve). */
        sigset_t trap;
        sigemptyset(&trap);
        sigaddset(&trap, SIGTRAP);
        pthread_sigmask(SIG_BLOCK, &trap, NULL);
        execl("/proc/self/exe", argv[0], "blocked", argv[2], (char *)NULL);
        return 127;
    }
    if (argc > 2 && strcmp(argv[1], "blocked") == 0) {
        sigset_t now, trap;
        pthread_sigmask(SIG_BLOCK, NULL, &now);
        long blocked = sigismember(&now, SIGTRAP);
        long first = work(blocked); /* called while SIGTRAP is blocked */
        sigemptyset(&trap);
        sigaddset(&trap, SIGTRAP);
        pthread_sigmask(SIG_UNBLOCK, &trap, NULL);
        printf("blocked=%ld first=%ld\n", blocked, first);
        rounds = atol(argv[2]);
        run();
        return 0;
    }
    if (argc > 1 && atol(argv[1]) > 0) {
        rounds = atol(argv[1]);
        run();
        return 0;
    }
    rounds = 200;
    printf("ready %d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin) && strncmp(line, "quit", 4) != 0)
        run();
    return 0;
}
