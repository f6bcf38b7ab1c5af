/* A multi-threaded target for the remote tests.
 *
 * Prints `ready PID SLEEPER_TID combine text_length slow_square &counter message`, then:
 * the main thread blocks in read(0), a sleeper thread in a 2-second nanosleep, two workers
 * compute checksums. After stdin delivers a line, everything the program saw is printed:
 * what read returned, whether nanosleep slept its whole time, the checksums, the globals,
 * and how many SIGUSR1 it handled. With nothing done to it, the output after the ready
 * line is always the same. With WORKER_NOT_DUMPABLE set it makes itself non-dumpable. */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

volatile long counter = 5;
char message[32] = "original";
static volatile sig_atomic_t usr1_count;
static volatile pid_t sleeper_tid;
static int sleep_result = -2;
static long slept_ms;

__attribute__((noinline)) long combine(long a, long b, long c, long d, long e, long f)
{
	return a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f;
}

__attribute__((noinline)) long text_length(const char *s)
{
	return (long)strlen(s);
}

static long ms_since(const struct timespec *start)
{
	struct timespec now;
	clock_gettime(CLOCK_MONOTONIC, &now);
	return (now.tv_sec - start->tv_sec) * 1000 + (now.tv_nsec - start->tv_nsec) / 1000000;
}

/* Busy for 1.5 s, so that a signal sent 100 ms into a remote call of it arrives during the
 * call even on a loaded machine (one arriving after it would meet a stopped thread). */
__attribute__((noinline)) long slow_square(long x)
{
	struct timespec start;
	clock_gettime(CLOCK_MONOTONIC, &start);
	while (ms_since(&start) < 1500)
		;
	return x * x;
}

static void on_usr1(int sig)
{
	(void)sig;
	usr1_count++;
}

static long checksum(long seed)
{
	unsigned long h = seed;
	for (long i = 0; i < 1000000; i++)
		h = h * 31 + i;
	return (long)h;
}

static void *worker(void *arg)
{
	long t = (long)arg, sum = 0;
	for (long round = 0; round < 100; round++)
		sum += checksum(t * 1000 + round);
	return (void *)sum;
}

static void *sleeper(void *arg)
{
	(void)arg;
	struct timespec want = { 2, 0 }, start;
	clock_gettime(CLOCK_MONOTONIC, &start);
	sleeper_tid = gettid();
	sleep_result = nanosleep(&want, NULL);
	slept_ms = ms_since(&start);
	return NULL;
}

int main(void)
{
	if (getenv("WORKER_NOT_DUMPABLE"))
		prctl(PR_SET_DUMPABLE, 0);
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_handler = on_usr1;
	sa.sa_flags = SA_RESTART;
	sigaction(SIGUSR1, &sa, NULL);

	pthread_t workers[2], sleep_thread;
	for (long t = 0; t < 2; t++)
		pthread_create(&workers[t], NULL, worker, (void *)(t + 1));
	pthread_create(&sleep_thread, NULL, sleeper, NULL);
	while (!sleeper_tid)
		usleep(100);
	printf("ready %d %d %p %p %p %p %p\n", getpid(), (int)sleeper_tid, (void *)combine, (void *)text_length,
	       (void *)slow_square, (void *)&counter, (void *)message);
	fflush(stdout);

	char buf[64];
	ssize_t n = read(0, buf, sizeof buf - 1);
	printf("read returned %zd: %.*s\n", n, n > 0 ? (int)n - 1 : 0, buf);
	for (long t = 0; t < 2; t++) {
		void *sum;
		pthread_join(workers[t], &sum);
		printf("worker %ld checksum %ld\n", t + 1, (long)sum);
	}
	pthread_join(sleep_thread, NULL);
	printf("sleeper: nanosleep returned %d, slept the whole 2 s: %s\n", sleep_result,
	       slept_ms >= 2000 ? "yes" : "no");
	printf("counter %ld message %s usr1 handled %d\n", counter, message, (int)usr1_count);
	return 0;
}
