/* record_args.rs: a shared library (built with -g) whose functions take ints, a string and
 * a double, each writing its call into the log as `dynprobe replay -a` shows it, for the
 * test to compare with the replay of `record -a -F 'libargslib:lib_*'`. */
#include <stdio.h>
#include <string.h>

static FILE *log_file;

void argslib_log_to(FILE *file) { log_file = file; }

__attribute__((noinline)) int lib_add(int a, int b) {
    int r = a + b;
    fprintf(log_file, "lib_add(a=%d, b=%d) = %d;\n", a, b, r);
    return r;
}

__attribute__((noinline)) long lib_count(const char *text, char c) {
    long n = 0;
    for (const char *p = text; *p; p++)
        n += *p == c;
    fprintf(log_file, "lib_count(text=\"%s\", c='%c') = %ld;\n", text, c, n);
    return n;
}

__attribute__((noinline)) double lib_scale(double x, int n) {
    double r = x * n;
    fprintf(log_file, "lib_scale(x=%g, n=%d) = %g;\n", x, n, r);
    return r;
}
