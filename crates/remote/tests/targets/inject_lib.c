/* The library the injection tests load. Its constructor writes the file named by the
 * target's DYNPROBE_TEST_CTOR_FILE; its entry writes "entered ARG" to ARG's file and
 * returns 7; `hang_entry` never returns. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

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

int hang_entry(const char *arg)
{
	(void)arg;
	for (;;)
		pause();
}
