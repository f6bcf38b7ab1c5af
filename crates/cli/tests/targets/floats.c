/* A program for probes of floating-point values: `float` and `double` parameters, locals
 * and return values, which the SysV x86-64 ABI passes and returns in the vector registers
 * xmm0-7 (and GCC keeps in xmm registers at -O2), and a `long double` one (x87). Every
 * value is a short binary fraction, which C's %g and Rust's shortest form print alike; the
 * program prints what a probe on each function must fetch, so the tests compare the two.
 * Line numbers matter to the tests (`p:mix:3` is the printf): append below, do not insert. */
#include <stdio.h>
#include <stdlib.h>

__attribute__((noipa)) double mix(double x, float y, int k) {
    double scaled = x * k + y;
    float part = y * 2 + (float)k;
    printf("mix x=%g y=%g k=%d scaled=%g part=%g\n", x, (double)y, k, scaled, (double)part);
    return scaled / 2;
}

__attribute__((noipa)) float halve(float v) {
    return v / 2;
}

__attribute__((noipa)) long double widen(long double v) {
    return v * 2;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    double sum = 0;
    for (int i = 0; i < rounds; i++) {
        double r = mix(1.5 + i, 0.25f * (float)(i + 1), i + 2);
        float h = halve((float)r);
        printf("round %d mix=%g halve=%g\n", i, r, (double)h);
        sum += r + h + (double)widen(i);
    }
    printf("sum %g\n", sum);
    return 0;
}
