/* Loads the library named by argv[1] with dlopen after start and calls into it: a
 * `dynprobe record -F 'libplugin:*'` must trace the library's calls though it was not loaded
 * when recording began. */
#include <dlfcn.h>
#include <stdio.h>

__attribute__((noinline)) int call_plugin(int (*work)(int), int x) { return work(x); }

int main(int argc, char **argv) {
    void *lib = dlopen(argv[1], RTLD_NOW);
    if (!lib) {
        fprintf(stderr, "dlopen: %s\n", dlerror());
        return 1;
    }
    int (*work)(int) = (int (*)(int))dlsym(lib, "plugin_work");
    printf("plugin = %d\n", call_plugin(work, 3));
    return 0;
}
