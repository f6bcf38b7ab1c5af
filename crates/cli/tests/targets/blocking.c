/* A program whose threads spend their lives in blocking system calls and check what every
 * call returns: `dynprobe probe -p` attaching, placing probes and detaching must never make
 * one of them return early (EINTR).
 *
 * Prints "ready PID", then runs until it reads "quit" on stdin, calling work() from the
 * main thread every 20 ms (the probed function) and waking the read/accept threads. On
 * quit it prints "calls N eintr E" and the calls that returned EINTR, one per line. */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/select.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>

static atomic_long calls, eintrs;
static atomic_int quitting;
static int pipe_fds[2], listener, port;

/* The blocking calls checked, and how often each returned EINTR. */
static const char *names[] = {"nanosleep", "clock_nanosleep", "poll", "ppoll", "select", "epoll_wait",
                              "sigtimedwait", "futex", "read", "accept", "main nanosleep"};
static atomic_long cut[sizeof names / sizeof *names];

/* Records one call's outcome: `rc == -1 && errno == EINTR` is the failure we look for. */
static void check(const char *name, long rc) {
    atomic_fetch_add(&calls, 1);
    if (rc == -1 && errno == EINTR) {
        atomic_fetch_add(&eintrs, 1);
        for (size_t i = 0; i < sizeof names / sizeof *names; i++)
            if (!strcmp(names[i], name)) atomic_fetch_add(&cut[i], 1);
    }
}

static const struct timespec wait_ts = {0, 300 * 1000 * 1000};

static void *sleeper(void *arg) {
    (void)arg;
    while (!quitting) check("nanosleep", nanosleep(&wait_ts, NULL));
    return NULL;
}
static void *clock_sleeper(void *arg) {
    (void)arg;
    while (!quitting) {
        int rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &wait_ts, NULL);
        errno = rc;
        check("clock_nanosleep", rc ? -1 : 0);
    }
    return NULL;
}
static void *poller(void *arg) {
    (void)arg;
    int fds[2];
    if (pipe(fds)) abort();
    while (!quitting) {
        struct pollfd p = {fds[0], POLLIN, 0};
        check("poll", poll(&p, 1, 300));
        struct timespec ts = wait_ts;
        check("ppoll", ppoll(&p, 1, &ts, NULL));
    }
    return NULL;
}
static void *selecter(void *arg) {
    (void)arg;
    int fds[2];
    if (pipe(fds)) abort();
    while (!quitting) {
        fd_set set;
        FD_ZERO(&set);
        FD_SET(fds[0], &set);
        struct timeval tv = {0, 300 * 1000};
        check("select", select(fds[0] + 1, &set, NULL, NULL, &tv));
    }
    return NULL;
}
static void *epoller(void *arg) {
    (void)arg;
    int fds[2];
    if (pipe(fds)) abort();
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN};
    epoll_ctl(ep, EPOLL_CTL_ADD, fds[0], &ev);
    while (!quitting) check("epoll_wait", epoll_wait(ep, &ev, 1, 300));
    return NULL;
}
static void *sigwaiter(void *arg) {
    (void)arg;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR2);
    pthread_sigmask(SIG_BLOCK, &set, NULL);
    while (!quitting) {
        long rc = sigtimedwait(&set, NULL, &wait_ts);
        if (rc == -1 && errno == EAGAIN) rc = 0;
        check("sigtimedwait", rc);
    }
    return NULL;
}
static void *futexer(void *arg) {
    (void)arg;
    static int word;
    while (!quitting) {
        long rc = syscall(SYS_futex, &word, FUTEX_WAIT_PRIVATE, 0, &wait_ts, NULL, 0);
        if (rc == -1 && errno == ETIMEDOUT) rc = 0;
        check("futex", rc);
    }
    return NULL;
}
static void *reader(void *arg) {
    (void)arg;
    char byte;
    while (!quitting) check("read", read(pipe_fds[0], &byte, 1));
    return NULL;
}
static void *acceptor(void *arg) {
    (void)arg;
    while (!quitting) {
        long fd = accept(listener, NULL, NULL);
        check("accept", fd);
        if (fd >= 0) close((int)fd);
    }
    return NULL;
}

/* The function the tests probe. */
__attribute__((noinline)) long work(long n) {
    long sum = 0;
    for (long i = 0; i < n; i++) sum += i * i;
    return sum;
}

static void wake_io(void) {
    if (write(pipe_fds[1], "x", 1) != 1) abort();
    int s = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(0x7f000001)};
    if (connect(s, (struct sockaddr *)&a, sizeof a) == 0) close(s);
    else close(s);
}

static void *stdin_watcher(void *arg) {
    (void)arg;
    char line[64];
    while (fgets(line, sizeof line, stdin))
        if (!strncmp(line, "quit", 4)) break;
    quitting = 1;
    return NULL;
}

int main(void) {
    if (pipe(pipe_fds)) abort();
    listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(0x7f000001)};
    socklen_t len = sizeof a;
    if (bind(listener, (struct sockaddr *)&a, sizeof a) || listen(listener, 16) ||
        getsockname(listener, (struct sockaddr *)&a, &len))
        abort();
    port = ntohs(a.sin_port);
    void *(*bodies[])(void *) = {sleeper, clock_sleeper, poller, selecter, epoller,
                                 sigwaiter, futexer, reader, acceptor, stdin_watcher};
    pthread_t threads[sizeof bodies / sizeof *bodies];
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) pthread_create(&threads[i], NULL, bodies[i], NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    long sum = 0;
    while (!quitting) {
        struct timespec ts = {0, 20 * 1000 * 1000};
        check("main nanosleep", nanosleep(&ts, NULL));
        sum += work(100);
        wake_io();
    }
    wake_io();
    for (size_t i = 0; i < sizeof bodies / sizeof *bodies; i++) {
        wake_io();
        pthread_join(threads[i], NULL);
    }
    printf("calls %ld eintr %ld sum %ld\n", (long)calls, (long)eintrs, sum > 0 ? 1L : 0L);
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (cut[i]) printf("EINTR %s %ld\n", names[i], (long)cut[i]);
    return 0;
}
