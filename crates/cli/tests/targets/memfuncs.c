/* Calls memset, memcpy and strlen (glibc's indirect functions, each reached through the
 * implementation the dynamic linker chose for this CPU) ARGV[1] times each, with sizes it
 * logs itself, one line a round on stdout: "<memset n> <memcpy n> <strlen result>"; then
 * clock_gettime(CLOCK_MONOTONIC) and __errno_location (errno = 0) once a round.
 * Nothing else of the C library copies, fills or measures a string here: the log is
 * formatted by hand and written with write(2), since stdio's internals call the same
 * functions. Built with -fno-builtin so that every call is a real call. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char src[8192], dst[8192];

/* Appends v in decimal to buf at *at. */
static void put(char *buf, int *at, unsigned long v) {
    char digits[24];
    int n = 0;
    do {
        digits[n++] = '0' + v % 10;
        v /= 10;
    } while (v);
    while (n) buf[(*at)++] = digits[--n];
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 10;
    for (int i = 0; i < rounds; i++) {
        size_t fill = 100 + 7 * (size_t)i;
        size_t copy = 3000 + 11 * (size_t)i;
        memset(src, 'a' + i % 26, fill);
        src[fill] = 0;
        memcpy(dst, src, copy);
        size_t len = strlen(dst);
        char line[80];
        int at = 0;
        put(line, &at, fill);
        line[at++] = ' ';
        put(line, &at, copy);
        line[at++] = ' ';
        put(line, &at, len);
        line[at++] = '\n';
        if (write(1, line, at) != at) return 1;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        errno = 0;
    }
    return 0;
}
