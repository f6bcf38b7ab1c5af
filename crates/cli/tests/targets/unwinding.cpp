/* The target of the `record -p` test of an exception on its way when dynprobe attaches: a
 * thread throws through traced functions and stops in a cleanup on the way — the C++
 * runtime has found the catching function already and is running the cleanups below it —
 * until told to go on.
 *
 *   unwinding       prints "ready <pid>" and obeys lines on stdin:
 *   throw           a thread calls ex_catch -> ex_middle -> ex_throw, which throws; the
 *                   destructor of ex_middle's local object prints "unwinding" and waits
 *                   (blocked reading a pipe)
 *   resume          lets the destructor return; prints "caught <n>" once ex_catch caught
 *                   the exception (n: what it carried), or "lost" if it did not
 *   quit            exits with status 0
 */
#include <cstdio>
#include <cstring>
#include <pthread.h>
#include <unistd.h>

struct Thrown {
	int value;
};

static int gate[2];

struct Pause {
	~Pause()
	{
		printf("unwinding\n");
		char byte;
		while (read(gate[0], &byte, 1) != 1) {
		}
	}
};

extern "C" __attribute__((noinline)) int ex_throw(int n)
{
	if (n > 0)
		throw Thrown{ n * 6 };
	return n;
}

extern "C" __attribute__((noinline)) int ex_middle(int n)
{
	Pause pause;
	return ex_throw(n) + 1;
}

extern "C" __attribute__((noinline)) int ex_catch(int n)
{
	try {
		return ex_middle(n);
	} catch (const Thrown &thrown) {
		return thrown.value;
	}
}

static void *thrower(void *)
{
	int caught = ex_catch(7);
	return reinterpret_cast<void *>(static_cast<long>(caught));
}

int main()
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (pipe(gate) != 0)
		return 2;
	printf("ready %d\n", (int)getpid());
	pthread_t thread;
	bool started = false;
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "quit", 4) == 0)
			break;
		if (strncmp(line, "throw", 5) == 0 && !started) {
			started = pthread_create(&thread, NULL, thrower, NULL) == 0;
		} else if (strncmp(line, "resume", 6) == 0 && started) {
			if (write(gate[1], "g", 1) != 1)
				return 2;
			void *result;
			pthread_join(thread, &result);
			started = false;
			long value = reinterpret_cast<long>(result);
			if (value == 42)
				printf("caught %ld\n", value);
			else
				printf("lost\n");
		}
	}
	return 0;
}
