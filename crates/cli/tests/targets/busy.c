/* A target of the `record -p` tests whose threads spend most of their time in traced calls
 * that call traced leaves in a tight loop, so that a stop of every thread often lands in
 * the tracer's own hook code (a detour, its dispatcher).
 *
 *   busy LOG
 *
 * Four threads each run busy_thread, which never returns: it calls busy_outer over and over,
 * and busy_outer calls busy_leaf 64 times. Each thread logs "<tid> busy_thread" to LOG once,
 * before its loop, so every thread is inside busy_thread from then on, and inside busy_outer
 * whenever it is inside busy_leaf: what each thread is inside at any moment is known.
 * It prints "ready <pid>", then obeys lines on stdin: "threads" prints "threads <n>" once
 * every thread has logged, "quit" exits with status 0.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 4

static FILE *log_file;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int logged;
static volatile unsigned long sink[THREADS];

__attribute__((noinline)) unsigned long busy_leaf(unsigned long x)
{
	return x * 0x9e3779b97f4a7c15ul + 1;
}

__attribute__((noinline)) unsigned long busy_outer(unsigned long x)
{
	for (int i = 0; i < 64; i++)
		x = busy_leaf(x);
	return x;
}

__attribute__((noinline)) void *busy_thread(void *arg)
{
	long t = (long)arg;
	pthread_mutex_lock(&lock);
	fprintf(log_file, "%ld busy_thread\n", (long)gettid());
	fflush(log_file);
	logged++;
	pthread_mutex_unlock(&lock);
	unsigned long x = (unsigned long)t;
	for (;;)
		sink[t] = x = busy_outer(x);
	return NULL;
}

int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	log_file = fopen(argv[1], "w");
	if (!log_file)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (long t = 0; t < THREADS; t++) {
		pthread_t thread;
		pthread_create(&thread, NULL, busy_thread, (void *)t);
		pthread_detach(thread);
	}
	printf("ready %d\n", (int)getpid());
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (!strcmp(line, "threads\n")) {
			for (;;) {
				pthread_mutex_lock(&lock);
				int n = logged;
				pthread_mutex_unlock(&lock);
				if (n == THREADS)
					break;
				usleep(1000);
			}
			printf("threads %d\n", THREADS);
		} else if (!strcmp(line, "quit\n")) {
			_exit(0);
		}
	}
	return 0;
}
