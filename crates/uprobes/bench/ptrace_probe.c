/* The ptrace-probe benchmark target (build with `cc -static -O1 -fno-inline`).
 *
 *   ptrace_probe CALLS [OUT]
 *
 * Times CALLS calls of bench_plain() and then CALLS calls of bench_probed(), two identical
 * functions, and prints one line (to OUT if given):
 *
 *   plain_ns=<total> probed_ns=<total> calls=<CALLS>
 *
 * Probing bench_probed alone, (probed_ns - plain_ns) / CALLS is the cost of one hit. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

__attribute__((noinline)) unsigned long bench_plain(unsigned long x)
{
    __asm__ volatile("" : "+r"(x)::"memory");
    return x * 3 + 1;
}

__attribute__((noinline)) unsigned long bench_probed(unsigned long x)
{
    __asm__ volatile("" : "+r"(x)::"memory");
    return x * 3 + 1;
}

static unsigned long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long)ts.tv_sec * 1000000000UL + (unsigned long)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long calls = argc > 1 ? atol(argv[1]) : 10000;
    unsigned long sum = 0, t0 = now_ns();
    for (long i = 0; i < calls; i++)
        sum += bench_plain((unsigned long)i);
    unsigned long t1 = now_ns();
    for (long i = 0; i < calls; i++)
        sum += bench_probed((unsigned long)i);
    unsigned long t2 = now_ns();
    FILE *out = argc > 2 ? fopen(argv[2], "w") : stdout;
    if (!out)
        return 4;
    fprintf(out, "plain_ns=%lu probed_ns=%lu calls=%ld sum=%lu\n", t1 - t0, t2 - t1, calls, sum);
    fclose(out);
    return 0;
}
