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
 *                   the exception (n: what it carried), or "lost" if it did not; after
 *                   `hold`, the thread prints "handling" instead when the personality
 *                   routine is called for ex_catch as the frame that catches, and waits
 *                   there (blocked reading a pipe) for `release`
 *   hold            prints "holding": the next `resume` stops in the personality routine
 *   release         lets it return; prints "caught <n>" or "lost" as `resume` does
 *   frames          prints "frames <n> unplaced <m>": the backtrace taken (glibc's
 *                   backtrace()) when the C++ runtime's personality routine was called for
 *                   ex_catch as the frame that catches, with _Unwind_Resume on the stack: n
 *                   frames, m of them in no loaded module (dladdr finds none)
 *   quit            exits with status 0
 */
#include <cstdio>
#include <cstring>
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <unistd.h>
#include <unwind.h>

struct Thrown {
	int value;
};

static int gate[2];

/* Waits until one byte comes through `pipe_ends`. */
static void wait_for(int pipe_ends[2])
{
	char byte;
	while (read(pipe_ends[0], &byte, 1) != 1) {
	}
}

struct Pause {
	~Pause()
	{
		printf("unwinding\n");
		wait_for(gate);
	}
};

/* The C++ runtime's personality routine, interposed (this program's definition is the one
 * its functions' unwind tables name): the frame that catches is given its handler while
 * the unwinder (_Unwind_Resume, called from the cleanup of the frame below or from
 * dynprobe's resume stub) is still on the stack, and a backtrace taken then must show
 * only the program's frames and the runtime's, as a profiler's would. */
typedef _Unwind_Reason_Code (*Personality)(int, _Unwind_Action, _Unwind_Exception_Class, _Unwind_Exception *,
					   _Unwind_Context *);
static Personality real_personality;
static void *handler_frames[64];
static int handler_frame_count = -1;
static bool hold;
static int release_gate[2];


extern "C" _Unwind_Reason_Code __gxx_personality_v0(int version, _Unwind_Action actions,
						    _Unwind_Exception_Class exception_class,
						    _Unwind_Exception *exception, _Unwind_Context *context)
{
	if ((actions & _UA_HANDLER_FRAME) && handler_frame_count < 0) {
		handler_frame_count = backtrace(handler_frames, 64);
		if (hold) {
			printf("handling\n");
			wait_for(release_gate);
		}
	}
	return real_personality(version, actions, exception_class, exception, context);
}

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

/* Waits for the thrower to end: prints "caught <n>", or "lost" if ex_catch did not catch. */
static void report(pthread_t thread)
{
	void *result;
	pthread_join(thread, &result);
	long value = reinterpret_cast<long>(result);
	if (value == 42)
		printf("caught %ld\n", value);
	else
		printf("lost\n");
}

int main()
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	real_personality = (Personality)dlsym(RTLD_NEXT, "__gxx_personality_v0");
	if (pipe(gate) != 0 || pipe(release_gate) != 0 || !real_personality)
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
		} else if (strncmp(line, "hold", 4) == 0) {
			hold = true;
			printf("holding\n");
		} else if (strncmp(line, "resume", 6) == 0 && started) {
			if (write(gate[1], "g", 1) != 1)
				return 2;
			if (!hold) {
				report(thread);
				started = false;
			}
		} else if (strncmp(line, "release", 7) == 0 && started) {
			if (write(release_gate[1], "g", 1) != 1)
				return 2;
			report(thread);
			started = false;
		} else if (strncmp(line, "frames", 6) == 0) {
			int unplaced = 0;
			for (int i = 0; i < handler_frame_count; i++) {
				Dl_info info;
				unplaced += dladdr(handler_frames[i], &info) == 0;
			}
			printf("frames %d unplaced %d\n", handler_frame_count, unplaced);
		}
	}
	return 0;
}
