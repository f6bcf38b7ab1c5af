/* A static program whose threads spend their lives blocked in system calls, for the
 * ptrace tests: attaching, placing probes (the tracer maps pages and installs its fallback
 * SIGTRAP action with system calls made on one of the program's threads) and detaching
 * (the action put back the same way), many times over, must leave every call to return
 * exactly as it would untraced — and a thread being created must be created once.
 *
 *   static_sleepers
 *
 * Prints "waiting PID" and runs until its stdin ends. Meanwhile one thread each loops on
 * clock_nanosleep, nanosleep, a futex wait and epoll_wait, each with a relative timeout of
 * WAIT_MS, checking every call: its result (0, or the timeout's error), never EINTR, never
 * back before WAIT_MS (CLOCK_MONOTONIC) and never later than LATE_MS. One thread reads a
 * pipe another writes a byte to every WAIT_MS (every byte read in order, never EINTR). One
 * thread creates and joins short-lived threads without pause, so that a thread is often
 * inside clone3 when the tracer stops the process; each created thread checks that it is
 * the only one started for its creation.
 *
 * tick() (called after each blocking call) and spawned() (by each created thread) are the
 * functions the tests probe. At the end it prints one line per check, "<name> ok" or what
 * went wrong:
 *
 *   clock_nanosleep ok
 *   nanosleep ok
 *   futex ok
 *   epoll_wait ok
 *   read ok
 *   threads ok */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define WAIT_MS 7
/* Far beyond a stop of every thread by the tracer, even on a loaded machine. */
#define LATE_MS 3000

enum { CLOCK_NANOSLEEP, NANOSLEEP, FUTEX, EPOLL_WAIT, READ, KINDS };
static const char *names[KINDS] = {"clock_nanosleep", "nanosleep", "futex", "epoll_wait", "read"};

struct tally {
    atomic_long calls, eintr, wrong, early, late, worst_ns;
};
static struct tally tallies[KINDS];
static atomic_int quitting;
static atomic_long threads_created, threads_duplicated, threads_failed;
static int pipe_fds[2];

__attribute__((noinline)) long tick(long kind)
{
    long r = kind * 3 + 1;
    __asm__ volatile("" : "+r"(r)::"memory");
    return r;
}

__attribute__((noinline)) long spawned(long seq)
{
    long r = seq ^ 0x55;
    __asm__ volatile("" : "+r"(r)::"memory");
    return r;
}

static long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* One call's outcome: `ok` says its result was the expected one; a timed call (`start`
 * not 0) must have taken WAIT_MS at least and LATE_MS at most. */
static void record(int kind, int ok, int err, long start)
{
    struct tally *t = &tallies[kind];
    atomic_fetch_add(&t->calls, 1);
    if (!ok && err == EINTR)
        atomic_fetch_add(&t->eintr, 1);
    else if (!ok)
        atomic_fetch_add(&t->wrong, 1);
    if (start) {
        long took = now_ns() - start;
        if (took < WAIT_MS * 1000000L)
            atomic_fetch_add(&t->early, 1);
        if (took > LATE_MS * 1000000L)
            atomic_fetch_add(&t->late, 1);
        if (took > t->worst_ns)
            t->worst_ns = took;
    }
    tick(kind);
}

static const struct timespec wait_ts = {0, WAIT_MS * 1000000L};

static void *clock_sleeper(void *arg)
{
    (void)arg;
    while (!quitting) {
        long start = now_ns();
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &wait_ts, NULL);
        record(CLOCK_NANOSLEEP, rc == 0, rc, start);
    }
    return NULL;
}

static void *sleeper(void *arg)
{
    (void)arg;
    while (!quitting) {
        long start = now_ns();
        int rc = nanosleep(&wait_ts, NULL);
        record(NANOSLEEP, rc == 0, errno, start);
    }
    return NULL;
}

static void *futexer(void *arg)
{
    (void)arg;
    static int word;
    while (!quitting) {
        long start = now_ns();
        long rc = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &wait_ts, NULL, 0);
        record(FUTEX, rc == -1 && errno == ETIMEDOUT, errno, start);
    }
    return NULL;
}

static void *epoller(void *arg)
{
    (void)arg;
    int fds[2];
    if (pipe(fds))
        abort();
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    if (ep < 0 || epoll_ctl(ep, EPOLL_CTL_ADD, fds[0], &ev))
        abort();
    while (!quitting) {
        long start = now_ns();
        int rc = epoll_wait(ep, &ev, 1, WAIT_MS);
        record(EPOLL_WAIT, rc == 0, errno, start);
    }
    return NULL;
}

static void *reader(void *arg)
{
    (void)arg;
    unsigned char expected = 0, byte;
    for (;;) {
        long rc = read(pipe_fds[0], &byte, 1);
        if (rc == 0)
            break;
        record(READ, rc == 1 && byte == expected, rc < 0 ? errno : 0, 0);
        expected++;
    }
    return NULL;
}

static void *writer(void *arg)
{
    (void)arg;
    unsigned char byte = 0;
    while (!quitting) {
        if (write(pipe_fds[1], &byte, 1) != 1)
            abort();
        byte++;
        while (clock_nanosleep(CLOCK_MONOTONIC, 0, &wait_ts, NULL) == EINTR)
            ;
    }
    close(pipe_fds[1]);
    return NULL;
}

struct creation {
    atomic_int started;
    long seq;
};

static void *child(void *arg)
{
    struct creation *c = arg;
    if (atomic_fetch_add(&c->started, 1) != 0)
        atomic_fetch_add(&threads_duplicated, 1);
    spawned(c->seq);
    return NULL;
}

static void *spawner(void *arg)
{
    (void)arg;
    for (long seq = 0; !quitting; seq++) {
        struct creation c = {0, seq};
        pthread_t t;
        int rc = pthread_create(&t, NULL, child, &c);
        if (rc) {
            atomic_fetch_add(&threads_failed, 1);
            continue;
        }
        pthread_join(t, NULL);
        atomic_fetch_add(&threads_created, 1);
        if (c.started != 1)
            atomic_fetch_add(&threads_duplicated, 1);
    }
    return NULL;
}

int main(void)
{
    if (pipe(pipe_fds))
        abort();
    void *(*bodies[])(void *) = {clock_sleeper, sleeper, futexer, epoller, reader, writer, spawner};
    enum { BODIES = sizeof bodies / sizeof *bodies };
    pthread_t threads[BODIES];
    for (int i = 0; i < BODIES; i++)
        if (pthread_create(&threads[i], NULL, bodies[i], NULL))
            abort();
    printf("waiting %d\n", (int)getpid());
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin))
        ;
    quitting = 1;
    for (int i = 0; i < BODIES; i++)
        pthread_join(threads[i], NULL);
    for (int k = 0; k < KINDS; k++) {
        struct tally *t = &tallies[k];
        if (t->calls && !t->eintr && !t->wrong && !t->early && !t->late)
            printf("%s ok\n", names[k]);
        else
            printf("%s calls=%ld eintr=%ld wrong=%ld early=%ld late=%ld worst_ms=%ld\n", names[k], (long)t->calls,
                   (long)t->eintr, (long)t->wrong, (long)t->early, (long)t->late, (long)t->worst_ns / 1000000);
    }
    if (threads_created && !threads_duplicated && !threads_failed)
        printf("threads ok\n");
    else
        printf("threads created=%ld duplicated=%ld failed=%ld\n", (long)threads_created, (long)threads_duplicated,
               (long)threads_failed);
    return 0;
}
