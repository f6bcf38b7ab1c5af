/* A small program whose hot functions get return probes: its output must be byte-for-byte
 * the same with and without them. The comparator is called back from libc's qsort, so
 * probed returns land in library code too. Built by the test harness as a shared object. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NOINLINE __attribute__((noinline, noipa))
#define WORDS 400

static char words[WORDS][16];
static char *sorted[WORDS];
static char output[64 * WORDS];
static unsigned long state;

NOINLINE unsigned long next_random(void) {
    state = state * 6364136223846793005UL + 1442695040888963407UL;
    return state >> 33;
}

NOINLINE int compare_words(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

NOINLINE unsigned long hash_word(const char *s) {
    unsigned long h = 5381;
    while (*s) h = h * 33 + (unsigned char)*s++;
    return h;
}

NOINLINE double mean_length(char **list, long n) {
    double total = 0;
    for (long i = 0; i < n; i++) total += (double)strlen(list[i]);
    return total / (double)n;
}

/* Fills `output` and returns its length. */
long run_program(long seed) {
    state = (unsigned long)seed;
    for (int i = 0; i < WORDS; i++) {
        int len = 3 + (int)(next_random() % 10);
        for (int j = 0; j < len; j++) words[i][j] = (char)('a' + next_random() % 26);
        words[i][len] = 0;
        sorted[i] = words[i];
    }
    qsort(sorted, WORDS, sizeof sorted[0], compare_words);
    long at = 0;
    for (int i = 0; i < WORDS; i++)
        at += snprintf(output + at, sizeof output - at, "%s %016lx\n", sorted[i], hash_word(sorted[i]));
    at += snprintf(output + at, sizeof output - at, "mean %.6f\n", mean_length(sorted, WORDS));
    return at;
}

long program_output(long unused) {
    (void)unused;
    return (long)output;
}
