/* A program for source-level probes: lines, parameters and locals of several types, a
 * struct reached through a pointer, and a function inlined at three places. It prints
 * what a probe on each marked line must fetch, so the tests compare the two. Line
 * numbers matter to the tests (they probe `handle:1`, `handle:3`, `source.c:30`...):
 * append below, do not insert. */
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>

enum color { RED, GREEN = 5, BLUE };

struct limits { int soft; int hard; };

struct request {
    const char *path;
    int len;
    enum color color;
    bool urgent;
    char tag;
    struct limits limits[3];
};

static inline __attribute__((always_inline)) int scale(int v) {
    int doubled = v * 2;
    return doubled + 1;
}

__attribute__((noinline)) int handle(struct request *req, int round) {
    int total = req->len + round;

    if (req->urgent)
        total += scale(round);
    printf("handle path=%s len=%d round=%d total=%d color=%d tag=%c hard=%d\n", req->path, req->len, round, total,
           req->color, req->tag, req->limits[round % 3].hard);
    return total;
}

__attribute__((noinline)) long count_up(long *count, short step) {
    *count += step;
    long seen = *count;
    return seen * scale(step);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    struct request req = { "/index.html", 11, GREEN, true, 'x', { { 1, 2 }, { 3, 4 }, { 5, 6 } } };
    long count = 0;
    long sum = 0;
    for (int i = 0; i < rounds; i++) {
        sum += handle(&req, i);
        sum += count_up(&count, (short)(i + 1));
        sum += scale(i);
        req.len += 1;
    }
    printf("sum %ld count %ld\n", sum, count);
    return 0;
}
