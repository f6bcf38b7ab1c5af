/* The library the injection tests load. Its constructor writes the file named by the
 * target's DYNPROBE_TEST_CTOR_FILE; its entry writes "entered ARG" to ARG's file and
 * returns 7; `slow_entry` does the same after sleeping 1.5 s. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <time.h>

__attribute__((constructor)) static void loaded(void)
{
	const char *path = getenv("DYNPROBE_TEST_CTOR_FILE");
	FILE *f = path ? fopen(path, "w") : NULL;
	if (f) {
		fprintf(f, "constructor ran in %d\n", getpid());
		fclose(f);
	}
}

int test_entry(const char *path)
{
	FILE *f = fopen(path, "w");
	if (!f)
		return -2;
	fprintf(f, "entered %s\n", path);
	fclose(f);
	return 7;
}

int slow_entry(const char *path)
{
	struct timespec left = { 1, 500000000 };
	while (nanosleep(&left, &left) != 0)
		;
	return test_entry(path);
}
