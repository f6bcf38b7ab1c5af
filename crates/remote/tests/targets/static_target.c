/* A statically linked program: no dynamic loader to load a library with. */
#include <stdio.h>
#include <unistd.h>

int main(void)
{
	printf("ready %d\n", getpid());
	fflush(stdout);
	char c;
	(void)read(0, &c, 1);
	return 0;
}
