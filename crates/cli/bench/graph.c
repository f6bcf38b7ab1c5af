/*
 * The program the `function-graph` and `uftrace` rows of `dynprobe bench` trace: a loop
 * of calls to small functions, built by build.rs with compiler NOP sites at every entry
 * (-pg -mfentry -mnop-mcount -mrecord-mcount), the tracers' fast path.
 *
 *   graph ITERATIONS [wait]
 *
 * With `wait` it prints "ready" and waits for a line on stdin before its loop: the
 * `after-detach` row records it with `dynprobe record -p` meanwhile, then times the loop.
 * Each iteration makes CALLS_PER_ITERATION traced calls: graph_outer, which calls
 * graph_leaf, so the tracer keeps a depth-2 shadow stack as real code makes it do. The
 * loop alone is timed, so neither process start-up, nor the tracer's set-up, nor the
 * writing of the trace at exit is in the figure. Output, on stdout:
 *
 *   calls <traced calls made by the timed loop>
 *   ns_per_call <nanoseconds per traced call>
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CALLS_PER_ITERATION 2

/* A little real work, so a call costs what a small function costs, not a bare `ret`. */
__attribute__((noinline)) long graph_leaf(long x)
{
	unsigned long v = (unsigned long)x;
	v ^= v >> 31;
	v *= 0x7e3779b9ul;
	v ^= v >> 29;
	return (long)v;
}

__attribute__((noinline)) long graph_outer(long x)
{
	return graph_leaf(x) + 1;
}

static double now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
	char *end;
	long iterations = argc >= 2 ? strtol(argv[1], &end, 10) : 0;
	int wait = argc == 3 && strcmp(argv[2], "wait") == 0;
	if (argc < 2 || argc > 2 + wait || *end != '\0' || iterations <= 0) {
		fprintf(stderr, "usage: %s ITERATIONS [wait] (a positive number)\n", argv[0]);
		return 2;
	}
	if (wait) {
		char line[64];
		printf("ready\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			return 2;
	}
	/* volatile: the sum is stored every iteration, so the calls can neither be dropped
	 * nor merged, and a call does not wait on the previous one's result. */
	volatile long sum = 0;
	double start = now_ns();
	for (long i = 0; i < iterations; i++)
		sum += graph_outer(i);
	double elapsed = now_ns() - start;
	long calls = iterations * CALLS_PER_ITERATION;
	printf("calls %ld\nns_per_call %.3f\n", calls, elapsed / (double)calls);
	return 0;
}
