/* The C target of `dynprobe record -a` (tests/record_args.rs): functions taking strings,
 * ints, negative ints, chars, bools, enums, a pointer, doubles and a float, a struct by
 * value (on the stack, and in a register) and more than six integer arguments. Each call writes its arguments and result
 * into the log file (argv[2]) as `dynprobe replay` shows them, for the test to compare. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum color { RED, GREEN = 5, BLUE };

struct triple { long a, b, c; }; /* 24 bytes: passed on the stack */
struct point { int x, y; };       /* 8 bytes: passed in a register, shown (unknown) */

static FILE *log_file;

/* A string as replay shows it: quoted, its first 64 bytes, `...` when longer. */
static void log_string(const char *s) {
    fprintf(log_file, "\"%.64s\"%s", s, strlen(s) > 64 ? "..." : "");
}

static const char *color_name(enum color c) {
    return c == RED ? "RED" : c == GREEN ? "GREEN" : c == BLUE ? "BLUE" : "?";
}

__attribute__((noinline)) int parse_record(const char *line, int len) {
    int n = atoi(strchr(line, ',') + 1);
    fprintf(log_file, "parse_record(line=");
    log_string(line);
    fprintf(log_file, ", len=%d) = %d;\n", len, n);
    return n;
}

__attribute__((noinline)) long scale(long value, short factor, unsigned char shift, _Bool neg) {
    long r = (value * factor) >> shift;
    if (neg)
        r = -r;
    fprintf(log_file, "scale(value=%ld, factor=%d, shift='\\x%02x', neg=%s) = %ld;\n", value, factor, shift,
            neg ? "true" : "false", r);
    return r;
}

__attribute__((noinline)) enum color paint(enum color c, char tag, int *slot) {
    *slot += c;
    enum color next = c == RED ? GREEN : c == GREEN ? BLUE : RED;
    fprintf(log_file, "paint(c=%s, tag='%c', slot=%p) = %s;\n", color_name(c), tag, (void *)slot, color_name(next));
    return next;
}

__attribute__((noinline)) double mix(double x, int k, float y) {
    double r = x * k + y;
    fprintf(log_file, "mix(x=%g, k=%d, y=%g) = %g;\n", x, k, (double)y, r);
    return r;
}

__attribute__((noinline)) long many(long a1, long a2, long a3, long a4, long a5, long a6, long a7, int a8) {
    long r = a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8;
    fprintf(log_file, "many(a1=%ld, a2=%ld, a3=%ld, a4=%ld, a5=%ld, a6=%ld, a7=%ld, a8=%d) = %ld;\n", a1, a2, a3, a4, a5,
            a6, a7, a8, r);
    return r;
}

__attribute__((noinline)) long sum_triple(int first, struct triple t, int last) {
    long r = first + t.a + t.b + t.c + last;
    fprintf(log_file, "sum_triple(first=%d, t_a=%ld, t_b=%ld, t_c=%ld, last=%d) = %ld;\n", first, t.a, t.b, t.c, last, r);
    return r;
}

__attribute__((noinline)) int shift_point(struct point p, int dx) {
    int r = p.x + dx + p.y;
    fprintf(log_file, "shift_point(p=(unknown), dx=%d) = %d;\n", dx, r);
    return r;
}

/* Returned in memory: the caller passes where in rdi, and the arguments come after it. */
__attribute__((noinline)) struct triple make_triple(long a, int b) {
    struct triple t = {a, b, a + b};
    fprintf(log_file, "make_triple(a=%ld, b=%d) = (unknown);\n", a, b);
    return t;
}

__attribute__((noinline)) void note(const char *what) {
    fprintf(log_file, "note(what=");
    log_string(what);
    fprintf(log_file, ");\n");
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    log_file = fopen(argc > 2 ? argv[2] : "/dev/null", "w");
    if (!log_file)
        return 1;
    static const char *lines[] = {"alpha,12", "beta,-7",
                                  "a rather long line that the recorder cuts, being longer than 64 bytes,3"};
    static const enum color colors[] = {RED, GREEN, BLUE};
    int slot = 0;
    long total = 0;
    for (int i = 0; i < rounds; i++) {
        const char *line = lines[i % 3];
        total += parse_record(line, (int)strlen(line));
        total += scale(-1000 - i, (short)(3 - i), (unsigned char)(i % 4), i % 2);
        paint(colors[i % 3], 'a' + i, &slot);
        total += (long)mix(1.5 + i, i - 1, 0.25f);
        total += many(1, -2, 3, -4, 5, -6, 7 + i, -8);
        total += sum_triple(i, (struct triple){10, -20, 30 + i}, -i);
        total += shift_point((struct point){i, -i * 2}, 3 + i);
        total += make_triple(5 + i, -3 - i).c;
        note(i % 2 ? "odd" : "even");
    }
    fclose(log_file);
    printf("total %ld slot %d\n", total, slot);
    return 0;
}
