/* record_args.rs: a program calling the functions of the shared library `argslib.c` with
 * known arguments; the library logs each call into a file, as `dynprobe replay` shows it.
 *
 *   argslib_main ROUNDS LOG   runs ROUNDS rounds, then prints "total N"
 *   argslib_main LOG          a worker (tests/common/attached.rs): prints "ready PID", then
 *                             at each line "go" on stdin runs GO_ROUNDS rounds and answers
 *                             "total N"; "quit" ends it
 *
 * Built with -DARGSLIB_DLOPEN='"PATH"' it is not linked against the library: it dlopens
 * PATH before its first round (the worker: at its first "go", so after a `record -p`
 * attached) and calls the functions through dlsym. */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define GO_ROUNDS 4

void argslib_log_to(FILE *file);
int lib_add(int a, int b);
long lib_count(const char *text, char c);
double lib_scale(double x, int n);

/* The library's functions, however they were found. */
static struct {
    void (*log_to)(FILE *);
    int (*add)(int, int);
    long (*count)(const char *, char);
    double (*scale)(double, int);
} lib;

static FILE *log_file;

static void find_library(void) {
    if (lib.add)
        return;
#ifdef ARGSLIB_DLOPEN
    void *handle = dlopen(ARGSLIB_DLOPEN, RTLD_NOW);
    if (!handle) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        exit(1);
    }
    lib.log_to = (void (*)(FILE *))dlsym(handle, "argslib_log_to");
    lib.count = (long (*)(const char *, char))dlsym(handle, "lib_count");
    lib.scale = (double (*)(double, int))dlsym(handle, "lib_scale");
    lib.add = (int (*)(int, int))dlsym(handle, "lib_add");
    if (!lib.log_to || !lib.count || !lib.scale || !lib.add) {
        fprintf(stderr, "dlsym: %s\n", dlerror());
        exit(1);
    }
#else
    lib.log_to = argslib_log_to;
    lib.count = lib_count;
    lib.scale = lib_scale;
    lib.add = lib_add;
#endif
    lib.log_to(log_file);
}

/* Rounds `from` to `to` (excluded): their results added up. */
static long rounds(int from, int to) {
    static const char *texts[] = {"banana", "a,b,c", ""};
    long total = 0;
    find_library();
    for (int i = from; i < to; i++) {
        total += lib.add(i, -7 * i);
        total += lib.count(texts[i % 3], i % 2 ? ',' : 'a');
        total += (long)lib.scale(0.5 + i, 3 - i);
    }
    fflush(log_file);
    return total;
}

int main(int argc, char **argv) {
    log_file = fopen(argc == 2 ? argv[1] : argc > 2 ? argv[2] : "/dev/null", "w");
    if (!log_file)
        return 1;
    if (argc != 2) {
        printf("total %ld\n", rounds(0, argc > 1 ? atoi(argv[1]) : 1));
        fclose(log_file);
        return 0;
    }
    printf("ready %d\n", getpid());
    fflush(stdout);
    char line[64];
    for (int done = 0; fgets(line, sizeof line, stdin) && strcmp(line, "quit\n"); done += GO_ROUNDS) {
        printf("total %ld\n", rounds(done, done + GO_ROUNDS));
        fflush(stdout);
    }
    fclose(log_file);
    return 0;
}
