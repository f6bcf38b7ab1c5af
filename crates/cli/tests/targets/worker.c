/* The target of the attach tests: a multi-threaded program that is already running when
 * dynprobe attaches to it.
 *
 * It prints "ready <pid>" and then obeys lines on stdin (so it waits in `read`, a system
 * call an injected call can interrupt and restart):
 *   go     four threads each make ROUNDS calls of mix() and label(), then it prints
 *          "checksum <hex>" — the same in every round and every run, probed or not
 *   load P dlopen()s the library P and prints "plugin <plugin_work(7)>"
 *   unload P  dlclose()s the library P a `load` opened, and prints "unloaded" once it is
 *          gone from the process (or "still loaded")
 *   exec   it executes itself again (/proc/self/exe, same arguments): the new image says
 *          "ready <pid>" with the same pid
 *   drop   it drops its privileges, as a daemon does before it forks its workers (to user
 *          and group nobody, 65534: it must run as root), and prints "dropped"
 *   fork   it forks a child that calls mix() every 10 ms until its parent is gone, and
 *          prints "forked <child pid>"
 *   keep   it forks a child that calls mix() every 10 ms for a minute (or until SIGTERM),
 *          also once this process has ended, and prints "forked <child pid>"
 *   late   it forks a child that, once this process has ended and a second more has passed,
 *          forks a grandchild that exits at once, then writes "late fork done" to the log
 *          file and exits; it prints "forked <child pid>"
 *   orphan it forks a child that forks a grandchild and exits at once (a double fork): the
 *          grandchild, an orphan adopted by init, calls mix() every 10 ms until this
 *          process has ended; the child prints "forked <grandchild pid>"
 *   forkexec  the same, but the child first executes this program again (argument
 *          `child` and the worker's pid after LOGFILE), whose new image makes those calls
 *   spawn  the same as forkexec, but the new image (argument `image`) forks a child of its
 *          own that makes those calls while the image lives, prints "grandchild <its pid>",
 *          and lives on, also once this process has ended, until SIGTERM or a minute
 *   disguise  what a hostile program may do, and setproctitle-style code does to the
 *          environment: every thread named dynprobe-* is renamed, and the environment the
 *          process started with (/proc/PID/environ) is written over; it prints "disguised"
 *   quit   it exits with status 0
 * Every call is also logged, one line each, to the file named by argv[1] (appended), so a
 * test can compare the probe events with what the program really did:
 *   mix <tid> <seed> <round> <result>
 *   label <tid> <name> <weight> <result>
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <grp.h>
#include <sys/wait.h>
#include <unistd.h>

#define THREADS 4
#define ROUNDS 300

struct item {
	long id;
	int weight;
};

static FILE *log_file;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

__attribute__((noinline)) long mix(long seed, int round)
{
	unsigned long h = (unsigned long)seed * 0x9e3779b97f4a7c15ul;
	for (int i = 0; i < round % 7 + 1; i++)
		h ^= h >> 29, h *= 0xbf58476d1ce4e5b9ul;
	return (long)(h >> 1);
}

__attribute__((noinline)) int label(const char *name, const struct item *item)
{
	return (int)strlen(name) * 1000 + item->weight;
}

static void log_line(const char *fmt, long a, long b, long c, const char *s)
{
	pthread_mutex_lock(&log_lock);
	if (s)
		fprintf(log_file, fmt, (long)gettid(), s, b, c);
	else
		fprintf(log_file, fmt, (long)gettid(), a, b, c);
	pthread_mutex_unlock(&log_lock);
}

static void *work(void *arg)
{
	long t = (long)arg;
	unsigned long sum = 0;
	char name[32];
	for (int i = 0; i < ROUNDS; i++) {
		long seed = t * 100000 + i;
		long m = mix(seed, i);
		log_line("mix %ld %ld %ld %ld\n", seed, i, m, NULL);
		struct item item = { .id = seed, .weight = (int)(seed % 97) - 40 };
		snprintf(name, sizeof name, "item-%ld-%d", t, i);
		int l = label(name, &item);
		log_line("label %ld %s %ld %ld\n", 0, item.weight, l, name);
		sum += (unsigned long)m ^ (unsigned long)l;
		/* Slow enough for the reader: ~2,400 events per round of the four threads. */
		usleep(200);
	}
	return (void *)sum;
}

#ifdef BIG_TLS
/* Built with -DBIG_TLS: 8 MiB of static TLS, which the C library takes from the top of every
 * thread's stack — dynprobe's own threads' too. */
__thread volatile char big_tls[8 << 20];
#endif

/* A forked child's work: mix() every 10 ms until its parent `parent` is gone. The parent's
 * pid is taken by the parent before it forks: the child's own getppid() may run once the
 * parent has ended already (a child slow to start, on a loaded machine), and say 1 — its
 * loop would then wait for init. */
static void call_mix_while_parent_lives(pid_t parent)
{
	/* Kept: an unused result would let the compiler drop the call. */
	static volatile long sink;
	for (long i = 0; getppid() == parent; i++) {
		sink += mix(i, (int)i);
		usleep(10000);
	}
	_exit(0);
}

/* `orphan`: the grandchild's work, mix() every 10 ms until `alive` (the read end of a pipe
 * whose write end only the worker holds) says the worker has ended. */
static void double_fork(void)
{
	int alive[2];
	if (pipe(alive) != 0) {
		printf("forked -1\n");
		return;
	}
	pid_t child = fork();
	if (child == 0) {
		pid_t grandchild = fork();
		if (grandchild == 0) {
			close(alive[1]);
			static volatile long sink;
			struct pollfd gone = { .fd = alive[0], .events = POLLIN };
			for (long i = 0; poll(&gone, 1, 0) == 0; i++) {
				sink += mix(i, (int)i);
				usleep(10000);
			}
			_exit(0);
		}
		printf("forked %d\n", (int)grandchild);
		fflush(stdout);
		_exit(0);
	}
	close(alive[0]);
	waitpid(child, NULL, 0);
}

/* `keep`: the child's work, mix() every 10 ms for a minute. */
static void call_mix_for_a_minute(void)
{
	static volatile long sink;
	for (long i = 0; i < 6000; i++) {
		sink += mix(i, (int)i);
		usleep(10000);
	}
	_exit(0);
}

/* `late`: the child's work, a fork well after its parent `parent` has ended (its pid taken
 * before the fork, as for call_mix_while_parent_lives). */
static void fork_late(pid_t parent)
{
	while (getppid() == parent)
		usleep(10000);
	sleep(1);
	pid_t grandchild = fork();
	if (grandchild == 0)
		_exit(0);
	waitpid(grandchild, NULL, 0);
	fprintf(log_file, "late fork done\n");
	fclose(log_file);
	_exit(0);
}

/* `disguise`. */
static void disguise(void)
{
	DIR *tasks = opendir("/proc/self/task");
	struct dirent *task;
	char path[300], name[32], stat[4096];
	while (tasks && (task = readdir(tasks))) {
		snprintf(path, sizeof path, "/proc/self/task/%s/comm", task->d_name);
		FILE *comm = task->d_name[0] == '.' ? NULL : fopen(path, "r+");
		if (!comm)
			continue;
		if (fgets(name, sizeof name, comm) && strncmp(name, "dynprobe", 8) == 0) {
			rewind(comm);
			fputs("worker-thread", comm);
		}
		fclose(comm);
	}
	if (tasks)
		closedir(tasks);
	/* Fields 50 and 51 of /proc/self/stat (proc(5)): where the environment starts and ends. */
	FILE *file = fopen("/proc/self/stat", "r");
	size_t got = file ? fread(stat, 1, sizeof stat - 1, file) : 0;
	if (file)
		fclose(file);
	stat[got] = 0;
	char *field = strrchr(stat, ')');
	for (int n = 2; field && n < 50; n++)
		field = strchr(field + 1, ' ');
	if (field) {
		char *end;
		unsigned long env_start = strtoul(field + 1, &end, 10), env_end = strtoul(end, NULL, 10);
		memset((char *)env_start, 'x', env_end - env_start - 1);
	}
	printf("disguised\n");
}

/* The new image of `spawn`. */
static void fork_and_live_on(void)
{
	pid_t image = getpid();
	pid_t child = fork();
	if (child == 0)
		call_mix_while_parent_lives(image);
	printf("grandchild %d\n", (int)child);
	fflush(stdout);
	for (int i = 0; i < 600; i++)
		usleep(100000);
	_exit(0);
}

int main(int argc, char **argv)
{
#ifdef BIG_TLS
	big_tls[0] = 1;
#endif
	if (argc < 2) {
		fprintf(stderr, "usage: worker LOGFILE\n");
		return 2;
	}
	/* The new image of forkexec: argv[3] is the pid of the worker that forked it. */
	if (argc > 3 && strcmp(argv[2], "child") == 0)
		call_mix_while_parent_lives((pid_t)atoi(argv[3]));
	if (argc > 2 && strcmp(argv[2], "image") == 0)
		fork_and_live_on();
	log_file = fopen(argv[1], "a");
	if (!log_file)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	printf("ready %d\n", (int)getpid());
	pid_t worker = getpid();
	char worker_pid[16];
	snprintf(worker_pid, sizeof worker_pid, "%d", (int)worker);
	char line[4096];
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "quit", 4) == 0)
			break;
		if (strncmp(line, "load ", 5) == 0) {
			line[strcspn(line, "\n")] = 0;
			void *lib = dlopen(line + 5, RTLD_NOW);
			int (*plugin_work)(int) = lib ? (int (*)(int))dlsym(lib, "plugin_work") : NULL;
			printf("plugin %d\n", plugin_work ? plugin_work(7) : -1);
			continue;
		}
		if (strncmp(line, "unload ", 7) == 0) {
			line[strcspn(line, "\n")] = 0;
			void *lib = dlopen(line + 7, RTLD_NOW | RTLD_NOLOAD);
			if (lib) {
				dlclose(lib); /* this lookup's reference */
				dlclose(lib); /* the load's */
			}
			printf("%s\n", dlopen(line + 7, RTLD_NOW | RTLD_NOLOAD) ? "still loaded" : "unloaded");
			continue;
		}
		if (strncmp(line, "keep", 4) == 0) {
			fflush(log_file);
			pid_t child = fork();
			if (child == 0)
				call_mix_for_a_minute();
			printf("forked %d\n", (int)child);
			continue;
		}
		if (strncmp(line, "late", 4) == 0) {
			fflush(log_file);
			pid_t child = fork();
			if (child == 0)
				fork_late(worker);
			printf("forked %d\n", (int)child);
			continue;
		}
		if (strncmp(line, "orphan", 6) == 0) {
			fflush(log_file);
			double_fork();
			continue;
		}
		if (strncmp(line, "fork", 4) == 0 || strncmp(line, "spawn", 5) == 0) {
			fflush(log_file);
			pid_t child = fork();
			if (child == 0) {
				/* The new image of forkexec makes the calls; spawn's forks a child that does. */
				char *role = NULL;
				if (line[0] == 's')
					role = "image";
				else if (strncmp(line, "forkexec", 8) == 0)
					role = "child";
				if (role) {
					char *child_argv[] = { argv[0], argv[1], role, worker_pid, NULL };
					execv("/proc/self/exe", child_argv);
					_exit(127);
				}
				call_mix_while_parent_lives(worker);
			}
			printf("forked %d\n", (int)child);
			continue;
		}
		if (strncmp(line, "drop", 4) == 0) {
			if (setgroups(0, NULL) != 0 || setresgid(65534, 65534, 65534) != 0 ||
			    setresuid(65534, 65534, 65534) != 0)
				printf("drop failed\n");
			else
				printf("dropped\n");
			continue;
		}
		if (strncmp(line, "disguise", 8) == 0) {
			disguise();
			continue;
		}
		if (strncmp(line, "exec", 4) == 0) {
			fflush(log_file);
			execv("/proc/self/exe", argv);
			printf("exec failed\n");
			continue;
		}
		if (strncmp(line, "go", 2) != 0)
			continue;
		pthread_t threads[THREADS];
		unsigned long checksum = 0;
		for (long t = 0; t < THREADS; t++)
			pthread_create(&threads[t], NULL, work, (void *)(t + 1));
		for (long t = 0; t < THREADS; t++) {
			void *sum;
			pthread_join(threads[t], &sum);
			checksum = checksum * 31 + (unsigned long)sum;
		}
		fflush(log_file);
		printf("checksum %lx\n", checksum);
	}
	fclose(log_file);
	return 0;
}
