/*
 * The program `dynprobe demo` runs: it parses a few "name,value" records and checksums
 * them, through small functions that are kept out of line so they can be probed by name.
 */
#include <stdio.h>
#include <string.h>

/* Parses the number after the comma of `line` (`len` bytes); -1 if there is none. */
__attribute__((noinline)) long parse_record(const char *line, long len)
{
	const char *comma = memchr(line, ',', len);
	if (!comma)
		return -1;
	long value = 0;
	for (const char *p = comma + 1; p < line + len; p++)
		value = value * 10 + (*p - '0');
	return value;
}

/* A little multiplicative checksum of n rounds from seed. */
__attribute__((noinline)) long checksum(long seed, long n)
{
	unsigned long h = (unsigned long)seed;
	for (long i = 0; i < n; i++)
		h = h * 1099511628211UL + (unsigned long)i;
	return (long)(h & 0xffffffff);
}

int main(void)
{
	/* Line by line, so the program's output interleaves with dynprobe's events. */
	setvbuf(stdout, NULL, _IOLBF, 0);
	static const char *records[] = { "alpha,12", "beta,7", "gamma", "delta,30" };
	long total = 0;
	for (unsigned i = 0; i < sizeof records / sizeof records[0]; i++) {
		long value = parse_record(records[i], (long)strlen(records[i]));
		if (value < 0) {
			printf("%-6s  malformed\n", records[i]);
			continue;
		}
		long sum = checksum(value, (long)i + 1);
		printf("%-9s value=%-3ld checksum=%#lx\n", records[i], value, sum);
		total += sum;
	}
	printf("total %#lx\n", total);
	return 0;
}
