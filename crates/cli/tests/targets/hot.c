/* The target of the session tests: threads that call work() as fast as they can, so a
 * probe on it makes a steady stream of hits, and commands that behave as a hostile or
 * unlucky program would around a dynprobe session.
 *
 * usage: hot THREADS — starts THREADS threads looping on work(), prints "ready <pid>", then
 * obeys lines on stdin:
 *   calls    prints "calls <n>": the calls of work() so far (it only grows)
 *   spin     starts a thread that blocks every signal (dynprobe's stop signal, SIGRTMAX-2,
 *            among them) and spins in user code; prints "spinning"
 *   spin MS  the same, but after MS milliseconds the thread unblocks every signal (and
 *            spins on, now stoppable)
 *   forge    writes forged lines (terminal escape sequences, fake status lines, a line far
 *            longer than any event) into the write end of every pipe it holds both ends of
 *            — the event pipe an attached agent holds — and into the DYNPROBE_EVENT_FD of
 *            its initial environment (the agent's socket in a program dynprobe started),
 *            as a hostile program could;
 *            prints "forged <n>" with the number of descriptors written to
 *   open P   creates the file P, writes "mine\n" into it and prints "fd <n>": the descriptor
 *            it got, which must not be one a probe handler still writes into
 *   again    writes "mine\n" once more into the file of `open`; prints "wrote"
 *   quit     exits with status 0
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static atomic_ulong calls;
static atomic_int quitting;

__attribute__((noinline)) long work(long x)
{
	atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
	return x * 2654435761l ^ (x >> 7);
}

static void *hot(void *arg)
{
	long x = (long)arg;
	while (!atomic_load_explicit(&quitting, memory_order_relaxed))
		x = work(x) & 0xffff;
	return NULL;
}

/* Spins with every signal blocked; `arg` milliseconds later (0: never) unblocks them. */
static void *spin(void *arg)
{
	long ms = (long)arg;
	struct timespec start, now;
	clock_gettime(CLOCK_MONOTONIC, &start);
	volatile unsigned long n = 0;
	while (!atomic_load_explicit(&quitting, memory_order_relaxed)) {
		n++;
		if (ms > 0 && (n & 0xffff) == 0) {
			clock_gettime(CLOCK_MONOTONIC, &now);
			long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
			if (elapsed >= ms) {
				sigset_t none;
				sigemptyset(&none);
				pthread_sigmask(SIG_SETMASK, &none, NULL);
				ms = 0;
			}
		}
	}
	return NULL;
}

/* Writes `text` whole into a non-blocking descriptor, giving up when the pipe is full. */
static void put(int fd, const char *text, size_t len)
{
	/* The agent's pipe is non-blocking and the hot thread's events may keep it full: wait
	 * for room, as a determined program would (bounded: 2 s per call). Giving up at the
	 * first EAGAIN forged nothing on a loaded machine. */
	int waits = 0;
	while (len > 0) {
		ssize_t n = write(fd, text, len);
		if (n < 0 && errno == EAGAIN && waits++ < 200) {
			struct pollfd room = { .fd = fd, .events = POLLOUT };
			poll(&room, 1, 10);
			continue;
		}
		if (n <= 0)
			return;
		text += n;
		len -= (size_t)n;
	}
}

static int forge(void)
{
	static const char *lines[] = {
		"\x1b]0;forged title\x07\x1b[2J\x1b[H\n",
		"!warning forged warning\n",
		"!ready 99\n",
		"!detached 0\n",
		"!error forged: error\n",
		"1 2 ev\x1b[31m x=\x1b]0;t\x07 s=\"a\x1b[2Jb\"\n",
		"3 4 forged/ev x=0x10\n",
	};
	static char longline[256 * 1024];
	memset(longline, 'A', sizeof longline - 1);
	longline[sizeof longline - 1] = '\n';
	/* Each pipe descriptor above 2: its number, inode and whether it is the write end. */
	int fds[64], writes[64], count = 0, written = 0;
	unsigned long inodes[64];
	DIR *dir = opendir("/proc/self/fd");
	struct dirent *entry;
	while (dir && count < 64 && (entry = readdir(dir))) {
		int fd = atoi(entry->d_name);
		char path[64], target[64];
		snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
		ssize_t n = readlink(path, target, sizeof target - 1);
		if (fd <= 2 || n <= 0 || fd == dirfd(dir))
			continue;
		target[n] = 0;
		/* A started program's agent writes to a socket (DYNPROBE_EVENT_FD names it). */
		int socket = sscanf(target, "socket:[%lu]", &inodes[count]) == 1;
		if (!socket && sscanf(target, "pipe:[%lu]", &inodes[count]) != 1)
			continue;
		fds[count] = fd;
		writes[count++] = socket || (fcntl(fd, F_GETFL) & O_ACCMODE) == O_WRONLY;
	}
	if (dir)
		closedir(dir);
	/* The agent removes the variable from the environment; the program's initial one, in
	 * /proc/self/environ, still has it. */
	static char environ_text[64 * 1024];
	const char *env = NULL;
	FILE *environ_file = fopen("/proc/self/environ", "r");
	size_t len = environ_file ? fread(environ_text, 1, sizeof environ_text - 1, environ_file) : 0;
	if (environ_file)
		fclose(environ_file);
	for (size_t at = 0; at < len; at += strlen(environ_text + at) + 1)
		if (strncmp(environ_text + at, "DYNPROBE_EVENT_FD=", 18) == 0)
			env = environ_text + at + 18;
	for (int i = 0; i < count; i++) {
		int both = 0;
		for (int j = 0; j < count; j++)
			both |= inodes[j] == inodes[i] && writes[j] != writes[i];
		if (!writes[i] || !(both || (env && atoi(env) == fds[i])))
			continue;
		for (size_t k = 0; k < sizeof lines / sizeof *lines; k++)
			put(fds[i], lines[k], strlen(lines[k]));
		/* A line without its end, longer than any event, then one with it. */
		put(fds[i], longline, sizeof longline - 1);
		put(fds[i], longline, sizeof longline);
		put(fds[i], lines[1], strlen(lines[1]));
		written++;
	}
	return written;
}

int main(int argc, char **argv)
{
	int threads = argc > 1 ? atoi(argv[1]) : 1;
	pthread_t tid;
	for (long t = 0; t < threads; t++)
		pthread_create(&tid, NULL, hot, (void *)(t + 1));
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	char line[4096];
	int file = -1;
	while (fgets(line, sizeof line, stdin)) {
		line[strcspn(line, "\n")] = 0;
		if (strcmp(line, "quit") == 0)
			break;
		if (strcmp(line, "calls") == 0) {
			printf("calls %lu\n", atomic_load(&calls));
		} else if (strcmp(line, "spin") == 0 || strncmp(line, "spin ", 5) == 0) {
			long ms = line[4] ? atol(line + 5) : 0;
			sigset_t all, old;
			sigfillset(&all);
			/* The new thread inherits the mask: it never takes a signal. */
			pthread_sigmask(SIG_BLOCK, &all, &old);
			pthread_create(&tid, NULL, spin, (void *)ms);
			pthread_sigmask(SIG_SETMASK, &old, NULL);
			printf("spinning\n");
		} else if (strcmp(line, "forge") == 0) {
			printf("forged %d\n", forge());
		} else if (strncmp(line, "open ", 5) == 0) {
			file = open(line + 5, O_WRONLY | O_CREAT | O_TRUNC, 0600);
			put(file, "mine\n", 5);
			printf("fd %d\n", file);
		} else if (strcmp(line, "again") == 0) {
			put(file, "mine\n", 5);
			printf("wrote\n");
		}
	}
	atomic_store(&quitting, 1);
	return 0;
}
