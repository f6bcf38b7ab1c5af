/*
 * A C program with a USDT probe guarded by its semaphore, built with <sys/sdt.h> and
 * _SDT_HAS_SEMAPHORES the way CPython builds its markers: a round takes the probe's path
 * (counts itself "enabled" and fires usdt_app:work) only while the semaphore is non-zero,
 * that is while a tracer has raised it.
 *
 * `usdt ROUNDS` runs ROUNDS rounds and prints `enabled E semaphore S` (S: the semaphore
 * afterwards). Without arguments it does the same for each number read from stdin, so a
 * tracer can attach and detach between rounds; it prints `ready PID` first. Built with
 * -shared -DUSDT_LIBRARY it is a library exporting usdt_run() and usdt_semaphore().
 */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

/* The name <sys/sdt.h> gives the semaphore of usdt_app:work; the section is `.probes`. */
unsigned short usdt_app_work_semaphore __attribute__((section(".probes"), used));

__attribute__((noinline)) long usdt_run(long rounds)
{
	long enabled = 0;
	for (long i = 0; i < rounds; i++) {
		if (__builtin_expect(usdt_app_work_semaphore != 0, 0)) {
			enabled++;
			STAP_PROBE2(usdt_app, work, i, enabled);
		}
	}
	return enabled;
}

unsigned usdt_semaphore(void)
{
	return *(volatile unsigned short *)&usdt_app_work_semaphore;
}

#ifndef USDT_LIBRARY
static void report(long rounds)
{
	long enabled = usdt_run(rounds);
	printf("enabled %ld semaphore %u\n", enabled, usdt_semaphore());
	fflush(stdout);
}

int main(int argc, char **argv)
{
	if (argc > 1) {
		report(atol(argv[1]));
		return 0;
	}
	printf("ready %d\n", (int)getpid());
	fflush(stdout);
	long rounds;
	while (scanf("%ld", &rounds) == 1)
		report(rounds);
	return 0;
}
#endif
