/*
 * The program the `function-graph` and `uftrace` rows of `dynprobe bench` trace: a loop
 * of calls to small functions, built by build.rs with compiler NOP sites at every entry
 * (-pg -mfentry -mnop-mcount -mrecord-mcount), the tracers' fast path.
 *
 *   graph ITERATIONS [wait | THREADS]
 *
 * With `wait` it prints "ready" and waits for a line on stdin before its loop: the
 * `after-detach` row records it with `dynprobe record -p` meanwhile, then times the loop.
 * Each iteration makes CALLS_PER_ITERATION traced calls: graph_outer, which calls
 * graph_leaf, so the tracer keeps a depth-2 shadow stack as real code makes it do. The
 * loop alone is timed, so neither process start-up, nor the tracer's set-up, nor the
 * writing of the trace at exit is in the figure. Output, on stdout:
 *
 *   calls <traced calls made by the timed loop(s)>
 *   ns_per_call <nanoseconds per traced call>
 *   faults <page faults the timed loop(s) took: a tracer's first-lap buffer pages, mostly>
 *
 * With THREADS, that many threads run the loop at once, from one barrier, and each times
 * its own loop in CPU time (CLOCK_THREAD_CPUTIME_ID: what the calls cost the thread,
 * without the time it waited for a CPU on a shared machine); ns_per_call is their mean.
 */
#define _GNU_SOURCE /* RUSAGE_THREAD */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
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

/* Page faults the calling thread has taken so far. */
static long thread_faults(void)
{
	struct rusage ru;
	getrusage(RUSAGE_THREAD, &ru);
	return ru.ru_minflt + ru.ru_majflt;
}

static double thread_cpu_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

struct worker {
	pthread_t thread;
	long iterations;
	double cpu_ns;
	long faults;
};

static pthread_barrier_t start_line;

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	volatile long sum = 0;
	pthread_barrier_wait(&start_line);
	long faults = thread_faults();
	double start = thread_cpu_ns();
	for (long i = 0; i < w->iterations; i++)
		sum += graph_outer(i);
	w->cpu_ns = thread_cpu_ns() - start;
	w->faults = thread_faults() - faults;
	return NULL;
}

/* THREADS threads run the loop at once; the mean of their CPU time per call. */
static int run_threads(long iterations, long threads)
{
	struct worker *workers = calloc((size_t)threads, sizeof *workers);
	if (!workers || pthread_barrier_init(&start_line, NULL, (unsigned)threads) != 0) {
		fprintf(stderr, "cannot set up %ld threads\n", threads);
		return 1;
	}
	for (long t = 0; t < threads; t++) {
		workers[t].iterations = iterations;
		if (pthread_create(&workers[t].thread, NULL, worker_main, &workers[t]) != 0) {
			fprintf(stderr, "cannot start thread %ld\n", t);
			return 1;
		}
	}
	double cpu_ns = 0;
	long faults = 0;
	for (long t = 0; t < threads; t++) {
		pthread_join(workers[t].thread, NULL);
		cpu_ns += workers[t].cpu_ns;
		faults += workers[t].faults;
	}
	long per_thread = iterations * CALLS_PER_ITERATION;
	printf("calls %ld\nns_per_call %.3f\nfaults %ld\n", per_thread * threads,
	       cpu_ns / (double)threads / (double)per_thread, faults);
	free(workers);
	return 0;
}

int main(int argc, char **argv)
{
	char *end = "";
	long iterations = argc >= 2 ? strtol(argv[1], &end, 10) : 0;
	if (argc < 2 || argc > 3 || *end != '\0' || iterations <= 0) {
		fprintf(stderr, "usage: %s ITERATIONS [wait | THREADS] (positive numbers)\n", argv[0]);
		return 2;
	}
	if (argc == 3 && strcmp(argv[2], "wait") == 0) {
		char line[64];
		printf("ready\n");
		fflush(stdout);
		if (!fgets(line, sizeof line, stdin))
			return 2;
	} else if (argc == 3) {
		long threads = strtol(argv[2], &end, 10);
		if (*end != '\0' || threads <= 0) {
			fprintf(stderr, "usage: %s ITERATIONS [wait | THREADS] (positive numbers)\n", argv[0]);
			return 2;
		}
		return run_threads(iterations, threads);
	}
	/* volatile: the sum is stored every iteration, so the calls can neither be dropped
	 * nor merged, and a call does not wait on the previous one's result. */
	volatile long sum = 0;
	long faults = thread_faults();
	double start = now_ns();
	for (long i = 0; i < iterations; i++)
		sum += graph_outer(i);
	double elapsed = now_ns() - start;
	faults = thread_faults() - faults;
	long calls = iterations * CALLS_PER_ITERATION;
	printf("calls %ld\nns_per_call %.3f\nfaults %ld\n", calls, elapsed / (double)calls, faults);
	return 0;
}
