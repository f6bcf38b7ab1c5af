/*
 * USDT probes (<sys/sdt.h>) passing floating-point values, for marker_probe.rs and
 * record_markers.rs. `floats:mix` is placed as the compiler chooses (sdt.h marks a
 * floating-point argument `f`: `8f@%rax` at -O2, `8f@-8(%rbp)` at -O0); `floats:vec` names
 * vector registers (`8f@%xmm2 4f@%xmm1 -8@%rdi`: the asm's "x" operands) beside an integer.
 *
 * `usdt_floats ROUNDS` prints, for each round, what it passed, as dynprobe shows marker
 * arguments: `mix D F K` and `vec T F K` (short binary fractions, which C's %g and Rust's
 * shortest form print alike).
 */
#include <sys/sdt.h>
#include <stdio.h>
#include <stdlib.h>

__attribute__((noinline)) double work(double d, float f, long k)
{
	double twice = d * 2;
	STAP_PROBE3(floats, mix, d, f, k);
	__asm__ volatile(STAP_PROBE_ASM(floats, vec, 8f@%[t] 4f@%[f] -8@%[k]) ::[t] "x"(twice), [f] "x"(f), [k] "r"(k));
	printf("mix %g %g %ld\nvec %g %g %ld\n", d, (double)f, k, twice, (double)f, k);
	return twice + f;
}

int main(int argc, char **argv)
{
	int rounds = argc > 1 ? atoi(argv[1]) : 3;
	double sum = 0;
	for (int i = 0; i < rounds; i++)
		sum += work(1.5 + i, 0.25f * (float)i - 1, -i);
	return sum < 0;
}
