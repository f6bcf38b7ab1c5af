/* Holds process argv[1] under ptrace (PTRACE_SEIZE: it keeps running) until killed, to test
 * what a second tracer is told. */
#include <stdio.h>
#include <stdlib.h>
#include <sys/ptrace.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	if (argc != 2)
		return 2;
	if (ptrace(PTRACE_SEIZE, atoi(argv[1]), 0, 0) != 0) {
		perror("PTRACE_SEIZE");
		return 1;
	}
	printf("attached\n");
	fflush(stdout);
	for (;;)
		pause();
}
