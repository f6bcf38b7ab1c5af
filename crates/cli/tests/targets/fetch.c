/* The target of tests/fetch_args.rs: functions taking a struct pointer and strings,
 * reading and changing globals, returning values, one of them slowly. Each probed function
 * prints what a probe on it must report (strings as hex, so any byte fits on one line),
 * the test compares every event with those lines.
 *
 * Built with -fno-omit-frame-pointer: `__builtin_frame_address(0) + 8` is then the stack
 * pointer at the function's entry ($stack).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>

struct record {
	long id;             /* +0 */
	int score;           /* +8 */
	int flags;           /* +12 */
	const char *name;    /* +16 */
	struct record *next; /* +24 */
};

unsigned int global_var = 7;
int table[4] = {10, -20, 30, -40};

static void hex(const char *label, const char *s)
{
	printf(" %s=", label);
	for (; *s; s++)
		printf("%02x", (unsigned char)*s);
}

/* Doubles the record's score in place; returns the new score plus the tag's length. */
__attribute__((noinline)) int score(struct record *r, const char *tag)
{
	printf("score id=%ld score=%d next=%ld global=%u table2=%d ra=%p sp=%p ip=%p nameptr=%p", r->id, r->score,
	       r->next ? r->next->id : -1L, global_var, table[2], __builtin_return_address(0),
	       (void *)((char *)__builtin_frame_address(0) + 8), (void *)score, (void *)r->name);
	hex("name", r->name);
	hex("tag", tag);
	hex("prog", program_invocation_short_name);
	global_var += (unsigned int)r->score;
	table[2] -= 3;
	r->score *= 2;
	int ret = r->score + (int)strlen(tag);
	printf(" after=%d ret=%d\n", r->score, ret);
	return ret;
}

/* Sleeps `ms` milliseconds; returns 3 ms. */
__attribute__((noinline)) long slow(long ms)
{
	struct timespec ts = {0, ms * 1000000L};
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
	printf("slow ms=%ld\n", ms);
	return ms * 3;
}

/* The length of `s`, -1 for NULL. */
__attribute__((noinline)) int name_len(const char *s)
{
	int len = s ? (int)strlen(s) : -1;
	printf("name_len len=%d\n", len);
	return len;
}

/* Calls `score` on every record; its return addresses are inside this function. */
__attribute__((noinline)) long run(struct record *first)
{
	static const char *tags[] = {"t", "two words", "q\"b\\s", "", "\x01\x7f\xff", "end"};
	long sum = 0;
	int i = 0;
	for (struct record *r = first; r; r = r->next, i++)
		sum += score(r, tags[i % 6]);
	return sum;
}

int main(void)
{
	char long_name[301];
	memset(long_name, 'x', 300);
	long_name[300] = 0;
	static const char *names[] = {"plain", "with space", "quote\" back\\slash", "tab\tnew\nline", "utf8 \xc3\xa9", NULL};
	names[5] = long_name;
	struct record records[6];
	for (int i = 0; i < 6; i++) {
		records[i] = (struct record){.id = 100 + i, .score = 5 * i - 7, .flags = i, .name = names[i]};
		records[i].next = i < 5 ? &records[i + 1] : NULL;
	}
	prctl(PR_SET_NAME, "fetch-main");
	printf("run %p\n", (void *)run);
	long sum = run(records);
	slow(20);
	slow(1);
	name_len("abc");
	name_len(NULL);
	printf("sum %ld global %u\n", sum, global_var);
	return 0;
}
