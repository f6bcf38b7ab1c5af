/*
 * A C program with dynprobe markers (dynprobe/marker.h) in a loop: integers, a pointer and
 * a C string. `markers ROUNDS [--wait]` runs ROUNDS rounds (with --wait, only after a line
 * on stdin, so a tracer can attach first) and prints what it computed, which must not
 * depend on whether anything is attached. Built with -shared -DMARKERS_LIBRARY it is a
 * library exporting markers_run() instead, for tests that load it into their own process.
 */
#include <dynprobe/marker.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const names[] = {"alpha", "beta", "gamma"};

__attribute__((noinline)) unsigned long markers_run(long rounds)
{
	unsigned long sum = 0;
	int cell = 42;
	for (long i = 0; i < rounds; i++) {
		const char *name = names[i % 3];
		DYNPROBE_MARKER(cmarkers, tick, (int)i, -i, &cell, name);
		sum = sum * 31 + ((unsigned long)i ^ strlen(name));
	}
	DYNPROBE_MARKER(cmarkers, done, sum, (unsigned char)7, (short)-3, (_Bool)1);
	return sum;
}

#ifndef MARKERS_LIBRARY
int main(int argc, char **argv)
{
	long rounds = argc > 1 ? atol(argv[1]) : 1000;
	if (argc > 2 && strcmp(argv[2], "--wait") == 0) {
		char line[16];
		if (!fgets(line, sizeof line, stdin))
			return 1;
	}
	printf("rounds %ld sum %lu\n", rounds, markers_run(rounds));
	return 0;
}
#endif
