/* The target of the `record -p` tests: a server-like program whose four threads serve
 * requests while dynprobe attaches to it, records and detaches.
 *
 *   server LOG              (SERVER_THROW=1 in the environment: the exceptions below)
 *
 * It prints "ready <pid>" and obeys lines on stdin:
 *   go            every thread serves requests, one after the other, until `stop`
 *   stop          ends a `go`; prints "checksum <hex> <n1> <n2> <n3> <n4>": the checksum of
 *                 every thread's results and how many requests each served
 *   run N1 N2 N3 N4  every thread serves exactly that many requests; prints the same line
 *                 (what an untraced run computes for the counts a traced `go` served)
 *   backtraces    prints "backtraces <taken> <wrong>" (see SERVER_BACKTRACE below)
 *   quit          exits with status 0
 * Between rounds the threads wait on a condition variable (a futex), blocked.
 *
 * A request goes srv_handle -> srv_parse -> srv_field (1 to 3 times), srv_depth (a
 * recursion 1 to 5 deep whose innermost call sleeps 100 us: calls are in flight whenever
 * dynprobe attaches or detaches) and srv_reply. With SERVER_THROW=1, the innermost srv_depth of
 * every other request throws a C++ exception through the recursion to srv_handle, which
 * catches it. Thread 1 logs the entry of every srv_* call it makes to LOG, one line each,
 * "<tid> <depth> <name>" (depth 0 for srv_serve, the thread's loop), so that a test can
 * compare the calls recorded with the calls made.
 * With SERVER_BACKTRACE=1, the innermost srv_depth takes a backtrace (glibc's backtrace(),
 * libgcc's unwinder) after its sleep and checks it: every frame in a loaded object (no
 * trampoline of a tracer shown), and its callers in order — every srv_depth of the
 * recursion, srv_handle, srv_serve; a backtrace that is not so counts as wrong.
 */
#include <atomic>
#include <condition_variable>
#include <dlfcn.h>
#include <execinfo.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <unistd.h>

#define THREADS 4

static FILE *log_file;
static bool throwing;
static thread_local bool logging;
static thread_local int depth;

static std::mutex lock;
static std::condition_variable wake, done;
static long generation, finished;
static bool serving, stopping, quitting;
static long limit[THREADS], served[THREADS];
static unsigned long sums[THREADS];

/* Logs a call's entry (thread 1 only) and counts its depth; `Leave` undoes the count. */
struct Enter {
	explicit Enter(const char *name)
	{
		if (logging)
			fprintf(log_file, "%ld %d %s\n", (long)gettid(), depth, name);
		depth++;
	}
	~Enter() { depth--; }
};

static bool backtracing;
static std::atomic<long> backtraces_taken, backtraces_wrong;

extern "C" unsigned long srv_depth(int n, unsigned long seed);
extern "C" unsigned long srv_handle(unsigned long seed);
extern "C" unsigned long srv_serve(int t, long max, long *count);

/* The function of ours whose code holds `addr` (the one starting nearest below it), or
 * NULL when none starts below it within 4 KiB. */
static void *function_of(void *addr)
{
	void *functions[] = { (void *)srv_depth, (void *)srv_handle, (void *)srv_serve };
	void *best = NULL;
	for (void *f : functions)
		if ((char *)f <= (char *)addr && (char *)addr - (char *)f < 4096 && (!best || f > best))
			best = f;
	return best;
}

/* Checks a backtrace taken in the innermost of `depths` srv_depth calls (see above): after
 * this function's own frame come exactly those, srv_handle and srv_serve. */
static void check_backtrace(int depths)
{
	void *frames[64];
	int n = backtrace(frames, 64);
	bool wrong = n < depths + 3;
	for (int i = 0; i < n; i++) {
		Dl_info info;
		if (!dladdr(frames[i], &info) || !info.dli_fname)
			wrong = true;
	}
	for (int i = 1; !wrong && i < depths + 3; i++) {
		void *expected = i <= depths ? (void *)srv_depth : i == depths + 1 ? (void *)srv_handle : (void *)srv_serve;
		wrong = function_of(frames[i]) != expected;
	}
	backtraces_taken++;
	if (wrong)
		backtraces_wrong++;
}

struct Boom : std::runtime_error {
	unsigned long value;
	explicit Boom(unsigned long v) : std::runtime_error("boom"), value(v) {}
};

extern "C" {

__attribute__((noinline)) unsigned long srv_field(unsigned long seed, int i)
{
	Enter e("srv_field");
	return (seed >> (i * 7)) * 0x9e3779b97f4a7c15ul;
}

__attribute__((noinline)) unsigned long srv_parse(unsigned long seed)
{
	Enter e("srv_parse");
	unsigned long v = seed;
	for (int i = 0; i < (int)(seed % 3) + 1; i++)
		v ^= srv_field(seed, i);
	return v;
}

__attribute__((noinline)) unsigned long srv_depth(int n, unsigned long seed)
{
	Enter e("srv_depth");
	if (n == 0) {
		usleep(100);
		if (backtracing)
			check_backtrace((int)(seed % 5) + 2);
		if (throwing && seed % 2)
			throw Boom(seed * 3);
		return seed;
	}
	return srv_depth(n - 1, seed) * 31 + (unsigned long)n;
}

__attribute__((noinline)) unsigned long srv_reply(unsigned long v)
{
	Enter e("srv_reply");
	return v ^ (v >> 17);
}

__attribute__((noinline)) unsigned long srv_handle(unsigned long seed)
{
	Enter e("srv_handle");
	unsigned long v = srv_parse(seed);
	try {
		v ^= srv_depth((int)(seed % 5) + 1, seed);
	} catch (const Boom &boom) {
		v += boom.value;
	}
	return srv_reply(v);
}

/* One thread's part of a round: requests until its limit, or until `stop`. */
__attribute__((noinline)) unsigned long srv_serve(int t, long max, long *count)
{
	Enter e("srv_serve");
	unsigned long sum = 0;
	long r = 0;
	for (; max < 0 || r < max; r++) {
		if (max < 0) {
			std::lock_guard<std::mutex> guard(lock);
			if (stopping)
				break;
		}
		sum = sum * 1099511628211ul + srv_handle((unsigned long)t * 1000003ul + (unsigned long)r);
	}
	*count = r;
	return sum;
}
}

static void thread_main(int t)
{
	logging = t == 1;
	long seen = 0;
	for (;;) {
		long max;
		{
			std::unique_lock<std::mutex> guard(lock);
			wake.wait(guard, [&] { return generation != seen || quitting; });
			if (quitting)
				return;
			seen = generation;
			max = limit[t];
		}
		long count;
		unsigned long sum = srv_serve(t, max, &count);
		if (logging)
			fflush(log_file);
		std::lock_guard<std::mutex> guard(lock);
		sums[t] = sum;
		served[t] = count;
		finished++;
		done.notify_all();
	}
}

/* Starts a round with these limits (-1: until `stop`). */
static void start(const long *limits)
{
	std::lock_guard<std::mutex> guard(lock);
	for (int t = 0; t < THREADS; t++)
		limit[t] = limits[t];
	stopping = false;
	finished = 0;
	serving = true;
	generation++;
	wake.notify_all();
}

/* Waits for the round's end and prints its line. */
static void finish(void)
{
	std::unique_lock<std::mutex> guard(lock);
	stopping = true;
	done.wait(guard, [] { return finished == THREADS; });
	serving = false;
	unsigned long checksum = 0;
	for (int t = 0; t < THREADS; t++)
		checksum = checksum * 31 + sums[t];
	printf("checksum %lx %ld %ld %ld %ld\n", checksum, served[0], served[1], served[2], served[3]);
}

int main(int argc, char **argv)
{
	if (argc < 2) {
		fprintf(stderr, "usage: server LOG\n");
		return 2;
	}
	log_file = fopen(argv[1], "w");
	if (!log_file)
		return 2;
	throwing = getenv("SERVER_THROW") && strcmp(getenv("SERVER_THROW"), "1") == 0;
	backtracing = getenv("SERVER_BACKTRACE") && strcmp(getenv("SERVER_BACKTRACE"), "1") == 0;
	setvbuf(stdout, NULL, _IOLBF, 0);
	std::thread threads[THREADS];
	for (int t = 0; t < THREADS; t++)
		threads[t] = std::thread(thread_main, t);
	printf("ready %d\n", (int)getpid());
	char line[256];
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "quit", 4) == 0)
			break;
		if (strncmp(line, "go", 2) == 0 && !serving) {
			long forever[THREADS] = { -1, -1, -1, -1 };
			start(forever);
		} else if (strncmp(line, "backtraces", 10) == 0) {
			printf("backtraces %ld %ld\n", backtraces_taken.load(), backtraces_wrong.load());
		} else if (strncmp(line, "stop", 4) == 0 && serving) {
			finish();
		} else if (strncmp(line, "run ", 4) == 0 && !serving) {
			long counts[THREADS];
			if (sscanf(line + 4, "%ld %ld %ld %ld", &counts[0], &counts[1], &counts[2], &counts[3]) != 4)
				continue;
			start(counts);
			finish();
		}
	}
	{
		std::lock_guard<std::mutex> guard(lock);
		quitting = true;
		stopping = true;
		wake.notify_all();
	}
	for (int t = 0; t < THREADS; t++)
		threads[t].join();
	fclose(log_file);
	return 0;
}
