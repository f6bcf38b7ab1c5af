/* The target of `dynprobe record -a` (tests/record_args.rs): functions taking strings,
 * ints, negative ints, enums, a pointer, doubles, a struct by value and more than six
 * integer arguments. Each call logs its arguments and its result on stderr, in the form
 * replay shows them, for the test to compare with the trace. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum color { RED, GREEN = 5, BLUE };

struct pair { long a, b, c; }; /* 24 bytes: passed on the stack */

__attribute__((noinline)) int parse_record(const char *line, int len) {
    int n = atoi(strchr(line, ',') + 1);
    fprintf(stderr, "parse_record(line=\"%s\", len=%d) = %d\n", line, len, n);
    return n;
}

__attribute__((noinline)) long scale(long value, short factor, unsigned char shift, _Bool neg) {
    long r = (value * factor) >> shift;
    if (neg)
        r = -r;
    fprintf(stderr, "scale(value=%ld, factor=%d, shift=%u, neg=%s) = %ld\n", value, factor, shift,
            neg ? "true" : "false", r);
    return r;
}

__attribute__((noinline)) enum color paint(enum color c, char tag, int *slot) {
    *slot += c;
    enum color next = c == BLUE ? RED : c + 1;
    fprintf(stderr, "paint(c=%s, tag='%c', slot=%p) = %s\n", c == RED ? "RED" : c == GREEN ? "GREEN" : "BLUE", tag,
            (void *)slot, next == RED ? "RED" : next == GREEN ? "GREEN" : next == BLUE ? "BLUE" : "?");
    return next;
}

__attribute__((noinline)) double mix(double x, int k, float y) {
    double r = x * k + y;
    fprintf(stderr, "mix(x=%g, k=%d, y=%g) = %g\n", x, k, (double)y, r);
    return r;
}

__attribute__((noinline)) long many(long a1, long a2, long a3, long a4, long a5, long a6, long a7, int a8) {
    long r = a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8;
    fprintf(stderr, "many(a1=%ld, a2=%ld, a3=%ld, a4=%ld, a5=%ld, a6=%ld, a7=%ld, a8=%d) = %ld\n", a1, a2, a3, a4, a5,
            a6, a7, a8, r);
    return r;
}

__attribute__((noinline)) long sum_pair(int first, struct pair p, int last) {
    long r = first + p.a + p.b + p.c + last;
    fprintf(stderr, "sum_pair(first=%d, p_a=%ld, p_b=%ld, p_c=%ld, last=%d) = %ld\n", first, p.a, p.b, p.c, last, r);
    return r;
}

__attribute__((noinline)) void note(const char *what) {
    fprintf(stderr, "note(what=\"%s\")\n", what);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 2;
    static const char *lines[] = {"alpha,12", "beta,-7", "a rather long line that is cut by the recorder,3"};
    int slot = 0;
    long total = 0;
    for (int i = 0; i < rounds; i++) {
        const char *line = lines[i % 3];
        total += parse_record(line, (int)strlen(line));
        total += scale(-1000 - i, (short)(3 - i), (unsigned char)(i % 4), i % 2);
        paint((enum color[]){RED, GREEN, BLUE}[i % 3], 'a' + i, &slot);
        total += (long)mix(1.5 + i, i - 1, 0.25f);
        total += many(1, -2, 3, -4, 5, -6, 7 + i, -8);
        total += sum_pair(i, (struct pair){10, -20, 30 + i}, -i);
        note(i % 2 ? "odd" : "even");
    }
    printf("total %ld slot %d\n", total, slot);
    return 0;
}
