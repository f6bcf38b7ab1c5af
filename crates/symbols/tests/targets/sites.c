/* Target of tests/sites.rs: five functions, static and global, one recursive, each kept
 * out of line so that each keeps its own entry site. Built with the site-recording flags
 * the test chooses; with -DWITH_LIB the functions come from sites_lib.c instead (the
 * program itself is then built without those flags). It prints "ready" once loaded and
 * then blocks on stdin, so the test can read its memory. */
#include <stdio.h>
#include <unistd.h>

#define OUT_OF_LINE __attribute__((noinline, noclone))

#ifdef WITH_LIB
int lib_compute(int x);
#define COMPUTE lib_compute
#else
static OUT_OF_LINE int square(int x) { return x * x; }
OUT_OF_LINE int factorial(int n) { return n <= 1 ? 1 : n * factorial(n - 1); }
static OUT_OF_LINE int twice_square(int x) { return square(x) + square(x); }
OUT_OF_LINE int compute(int x) { return twice_square(x) + factorial(x); }
#define COMPUTE compute
#endif

int main(void) {
    printf("ready %d\n", COMPUTE(4));
    fflush(stdout);
    char c;
    (void)read(0, &c, 1);
    return 0;
}
