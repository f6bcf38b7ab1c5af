/* A static program with traps of its own, for the ptrace tests: the tracer's fallback
 * SIGTRAP handler stands in for the program's action while probes are placed, and every
 * trap of the program's must still reach the program's own handler (or, without one, kill
 * it as it would untraced).
 *
 *   static_traps ROUNDS [nohandler|blocked]
 *
 * Calls work(i) ROUNDS times; every 10th round it executes an int3 and raises SIGTRAP with
 * raise(). Prints "traps=<handled> sum=<hex>", the traps its handler counted (checking each
 * one's si_code) and the sum of work's results. With "nohandler" it installs no handler
 * and the first int3 kills it. With "blocked", it prints "waiting PID" once its handler is
 * installed and waits for a line on stdin (a tracer attaches meanwhile); then every work()
 * call is made first, 1 ms apart, by a thread that blocks every signal (a probe's int3 hit
 * there is a SIGTRAP forced on a thread that blocks it), and the traps after, by the main
 * thread. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static volatile long traps, bad;

__attribute__((noinline)) unsigned long work(unsigned long i)
{
    unsigned long r = i * 2654435761UL;
    __asm__ volatile("" : "+r"(r)::"memory");
    return r ^ (r >> 7);
}

static long rounds;

/* Every work() call, made with every signal blocked. */
static void *blocked_worker(void *arg)
{
    (void)arg;
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    unsigned long sum = 0;
    for (long i = 0; i < rounds; i++) {
        sum += work((unsigned long)i);
        usleep(1000);
    }
    return (void *)sum;
}

static void on_trap(int sig, siginfo_t *info, void *uc)
{
    (void)uc;
    if (sig != SIGTRAP || (info->si_code != 0x80 && info->si_code != SI_TKILL))
        bad++;
    traps++;
}

int main(int argc, char **argv)
{
    rounds = argc > 1 ? atol(argv[1]) : 100;
    int blocked = argc > 2 && strcmp(argv[2], "blocked") == 0;
    if (argc < 3 || strcmp(argv[2], "nohandler") != 0) {
        struct sigaction action;
        memset(&action, 0, sizeof action);
        action.sa_sigaction = on_trap;
        action.sa_flags = SA_SIGINFO;
        sigaction(SIGTRAP, &action, NULL);
    }
    unsigned long sum = 0;
    if (blocked) {
        char line[16];
        printf("waiting %d\n", (int)getpid());
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 3;
        pthread_t t;
        void *result;
        if (pthread_create(&t, NULL, blocked_worker, NULL) || pthread_join(t, &result))
            return 5;
        sum = (unsigned long)result;
    }
    for (long i = 0; i < rounds; i++) {
        if (!blocked)
            sum += work((unsigned long)i);
        if (i % 10 == 9) {
            __asm__ volatile("int3");
            raise(SIGTRAP);
        }
    }
    printf("traps=%ld bad=%ld sum=%lx\n", traps, bad, sum);
    return 0;
}
