/* The program `dynprobe record` tests trace: each mode exercises one thing the function
 * tracer must get right, and prints what it did, so the test can check the program's own
 * output is unchanged under tracing. Built with each kind of site (see tests/record.rs). */
#include <dirent.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#define NOINLINE __attribute__((noinline))

NOINLINE int fib(int n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

NOINLINE int step(int x) { return x * 7 + 3; }

NOINLINE int down(int n) { return n == 0 ? 0 : down(n - 1) + 1; }

NOINLINE void *worker(void *arg) {
    long sum = 0;
    for (int i = 0; i < 3; i++) sum += step(i + (int)(long)arg);
    return (void *)sum;
}

static jmp_buf env;

NOINLINE void jump_back(int depth) {
    if (depth == 0) longjmp(env, 1);
    jump_back(depth - 1);
}

NOINLINE int leap(void) {
    if (setjmp(env) == 0) {
        jump_back(2);
        return 0;
    }
    return step(1);
}

/* Frames larger than the red zone: their memory keeps the tracer's return addresses after
 * the longjmp leaves them. */
NOINLINE void jump_back_big(int depth) {
    volatile char buf[4096];
    for (int i = 0; i < 4096; i += 64) buf[i] = (char)depth;
    if (depth == 0) longjmp(env, 1);
    jump_back_big(depth - 1);
    buf[1] = 0;
}

NOINLINE void run_big(void) { jump_back_big(2); }

NOINLINE int child_work(void) { return step(5); }

static volatile long handled;

NOINLINE long in_handler(long x) { return x + 1; }

static void on_signal(int sig) { handled = in_handler(sig); }

/* Raises the signal from inside a traced function: its handler's traced call nests there. */
NOINLINE long wait_signal(int sig) {
    raise(sig);
    return handled;
}

/* The same with the handler on an alternate signal stack. */
NOINLINE long on_altstack(void) {
    static char stack[64 * 1024];
    stack_t ss = { .ss_sp = stack, .ss_size = sizeof stack, .ss_flags = 0 };
    sigaltstack(&ss, NULL);
    struct sigaction sa = { .sa_handler = on_signal, .sa_flags = SA_ONSTACK };
    sigaction(SIGUSR2, &sa, NULL);
    return wait_signal(SIGUSR2);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "fib";
    if (!strcmp(mode, "fib")) {
        printf("fib(4) = %d\n", fib(4));
    } else if (!strcmp(mode, "deep")) {
        printf("down = %d\n", down(200));
    } else if (!strcmp(mode, "threads")) {
        pthread_t t[2];
        for (long i = 0; i < 2; i++) pthread_create(&t[i], NULL, worker, (void *)(i * 10));
        long total = 0;
        for (int i = 0; i < 2; i++) {
            void *r;
            pthread_join(t[i], &r);
            total += (long)r;
        }
        printf("threads total = %ld\n", total);
    } else if (!strcmp(mode, "longjmp")) {
        printf("leap = %d\n", leap());
        printf("after = %d\n", step(2));
    } else if (!strcmp(mode, "longjmp-loop")) {
        /* Recovering with longjmp in a main loop, as servers and interpreters do. */
        for (int i = 0; i < 200; i++)
            if (setjmp(env) == 0) run_big();
        printf("after = %d\n", step(2));
    } else if (!strcmp(mode, "fork")) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            printf("child = %d\n", child_work());
            exit(0);
        }
        int status;
        waitpid(pid, &status, 0);
        printf("parent = %d\n", step(9));
    } else if (!strcmp(mode, "exec")) {
        printf("before exec = %d\n", step(3));
        fflush(stdout);
        execl("/proc/self/exe", argv[0], "fib", (char *)NULL);
        perror("execl");
        return 1;
    } else if (!strcmp(mode, "signal")) {
        signal(SIGUSR1, on_signal);
        printf("signal = %ld\n", wait_signal(SIGUSR1));
        printf("altstack = %ld\n", on_altstack());
    } else if (!strcmp(mode, "spawn")) {
        /* posix_spawn's child runs in our memory with every signal handler reset. */
        extern char **environ;
        int sys = system("true");
        pid_t pid;
        char *args[] = { "/bin/true", NULL };
        int spawned = posix_spawn(&pid, "/bin/true", NULL, NULL, args, environ);
        int status = -1;
        if (spawned == 0)
            waitpid(pid, &status, 0);
        printf("system = %d, posix_spawn = %d, status = %d\n", sys, spawned, status);
    } else if (!strcmp(mode, "loop")) {
        long n = argc > 2 ? atol(argv[2]) : 1000000, sum = 0;
        for (long i = 0; i < n; i++) sum += step((int)i);
        printf("loop sum = %ld\n", sum);
    } else if (!strcmp(mode, "ringdir")) {
        /* The ring directory dynprobe record made (its path is what the agent was given),
           and the files the agent made there: each with its mode. The agent took its
           settings out of the environment; the kernel's copy of the one the program was
           started with still has them. */
        static char env[65536];
        const char *dir = NULL;
        FILE *f = fopen("/proc/self/environ", "r");
        size_t n = f ? fread(env, 1, sizeof env - 1, f) : 0;
        if (f) fclose(f);
        for (size_t i = 0; i < n; i += strlen(env + i) + 1)
            if (!strncmp(env + i, "DYNPROBE_RECORD=", 16)) dir = env + i + 16;
        struct stat st;
        if (!dir || stat(dir, &st)) return 1;
        printf("dir %s %o\n", dir, st.st_mode & 07777);
        DIR *d = opendir(dir);
        for (struct dirent *e; d && (e = readdir(d));) {
            char path[4096];
            if (e->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            if (!stat(path, &st)) printf("file %s %o\n", strrchr(e->d_name, '.') + 1, st.st_mode & 07777);
        }
        if (d) closedir(d);
    } else if (!strcmp(mode, "crash")) {
        printf("step = %d\n", step(4));
        fflush(stdout);
        *(volatile int *)0 = fib(3);
    }
    return 0;
}
