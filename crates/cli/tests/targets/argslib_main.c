/* record_args.rs: a program calling the functions of the shared library `argslib.c` with
 * known arguments, `argv[1]` rounds; the library logs each call into the file `argv[2]`. */
#include <stdio.h>
#include <stdlib.h>

void argslib_log_to(FILE *file);
int lib_add(int a, int b);
long lib_count(const char *text, char c);
double lib_scale(double x, int n);

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 1;
    FILE *log_file = fopen(argc > 2 ? argv[2] : "/dev/null", "w");
    if (!log_file)
        return 1;
    argslib_log_to(log_file);
    static const char *texts[] = {"banana", "a,b,c", ""};
    long total = 0;
    for (int i = 0; i < rounds; i++) {
        total += lib_add(i, -7 * i);
        total += lib_count(texts[i % 3], i % 2 ? ',' : 'a');
        total += (long)lib_scale(0.5 + i, 3 - i);
    }
    fclose(log_file);
    printf("total %ld\n", total);
    return 0;
}
