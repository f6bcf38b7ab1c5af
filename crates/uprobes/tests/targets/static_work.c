/* The ptrace-probe tests' target, linked statically (no dynamic loader, so the dynprobe
 * agent cannot be loaded into it and only ptrace-driven probes work).
 *
 *   static_work THREADS ROUNDS WAIT [OUT]
 *
 * THREADS threads each call fold() ROUNDS times (fold calls mix()), raise SIGUSR1 every 64
 * rounds, and add the results into a checksum. With WAIT=1 they start only after a line
 * arrives on stdin, so a tracer can attach first; with WAIT=2 each thread also sleeps 1 ms
 * every 16 rounds, so a run lasts long enough to be detached from midway; WAIT=3 sleeps
 * the same without waiting for stdin (for a program the tracer starts). The checksum,
 * the number of SIGUSR1 handled and the rounds are printed as one line, to OUT if given
 * (else stdout):
 *
 *   checksum=<hex> signals=<n> calls=<n>
 *
 * Every value is computed in unsigned arithmetic, so the tests can recompute what each
 * call received and returned. */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static volatile long signals;
static int rounds, wait_mode;

__attribute__((noinline)) unsigned long mix(unsigned long a, unsigned long b)
{
    unsigned long r = a * 31 + (b ^ 0x5bd1e995UL);
    __asm__ volatile("" : "+r"(r)::"memory");
    return r;
}

__attribute__((noinline)) unsigned long fold(unsigned long x, unsigned long k)
{
    unsigned long r = (x >> 3) + k * 7;
    __asm__ volatile("" : "+r"(r)::"memory");
    return r ^ mix(x, k);
}

static void on_usr1(int sig)
{
    (void)sig;
    __atomic_add_fetch(&signals, 1, __ATOMIC_RELAXED);
}

static void *worker(void *arg)
{
    unsigned long t = (unsigned long)arg, sum = 0;
    for (int i = 0; i < rounds; i++) {
        sum += fold(t * 1000003UL + (unsigned long)i, (unsigned long)(i & 7));
        if (i % 64 == 63)
            pthread_kill(pthread_self(), SIGUSR1);
        if (wait_mode >= 2 && i % 16 == 15) {
            struct timespec ms = {0, 1000000};
            nanosleep(&ms, NULL);
        }
    }
    return (void *)sum;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: %s THREADS ROUNDS WAIT [OUT]\n", argv[0]);
        return 2;
    }
    int threads = atoi(argv[1]);
    rounds = atoi(argv[2]);
    wait_mode = atoi(argv[3]);
    signal(SIGUSR1, on_usr1);
    if (wait_mode == 1 || wait_mode == 2) {
        char line[16];
        printf("waiting %d\n", (int)getpid());
        fflush(stdout);
        if (!fgets(line, sizeof line, stdin))
            return 3;
    }
    pthread_t tids[64];
    unsigned long checksum = 0;
    for (int t = 0; t < threads && t < 64; t++)
        pthread_create(&tids[t], NULL, worker, (void *)(unsigned long)t);
    for (int t = 0; t < threads && t < 64; t++) {
        void *sum;
        pthread_join(tids[t], &sum);
        checksum = checksum * 1099511628211UL + (unsigned long)sum;
    }
    FILE *out = argc > 4 ? fopen(argv[4], "w") : stdout;
    if (!out)
        return 4;
    fprintf(out, "checksum=%lx signals=%ld calls=%ld\n", checksum, signals, (long)threads * rounds);
    fclose(out);
    return 0;
}
