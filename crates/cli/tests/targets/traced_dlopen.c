/* Loads the library named by argv[1] with dlopen after start and calls into it: a
 * `dynprobe record -F 'libplugin:*'` must trace the library's calls though it was not loaded
 * when recording began.
 *
 * With `closefrom FILE` after it, it first closes every descriptor from 3 up, as a sandbox
 * or a daemon does with those it did not open itself (bubblewrap does), then opens FILE and
 * fills the low descriptor numbers with it: a tracer that kept one of its own there and
 * uses its number afterwards writes into the program's file or reads from it. The file's
 * size at the end is printed: 0 unless something wrote into it.
 *
 * With `reload N` after it, it loads the library, calls into it and unloads it (dlclose)
 * N times over. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) int call_plugin(int (*work)(int), int x) { return work(x); }

int main(int argc, char **argv) {
    if (argc > 3 && strcmp(argv[2], "reload") == 0) {
        int sum = 0;
        for (int i = atoi(argv[3]); i > 0; i--) {
            void *lib = dlopen(argv[1], RTLD_NOW);
            if (!lib) {
                fprintf(stderr, "dlopen: %s\n", dlerror());
                return 1;
            }
            sum += call_plugin((int (*)(int))dlsym(lib, "plugin_work"), 3);
            dlclose(lib);
        }
        printf("plugin sum = %d\n", sum);
        return 0;
    }
    int fd = -1;
    if (argc > 3 && strcmp(argv[2], "closefrom") == 0) {
        syscall(SYS_close_range, 3, ~0U, 0);
        fd = open(argv[3], O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        for (int i = 0; i < 32; i++)
            dup(fd);
    }
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    int (*work)(int) = (int (*)(int))dlsym(lib, "plugin_work");
    printf("plugin = %d\n", call_plugin(work, 3));
    if (fd >= 0) {
        struct stat st;
        fstat(fd, &st);
        printf("file bytes = %ld\n", (long)st.st_size);
    }
    return 0;
}
