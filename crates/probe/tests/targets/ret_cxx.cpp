/* C++ exceptions thrown through functions with return probes. Built by the test harness
 * with g++ as a shared object and loaded with dlopen. */
#include <stdexcept>

#define NOINLINE __attribute__((noinline, noipa))

static long destroyed = 0;
/* Its destructor runs during unwinding: proof that the unwinder walked the frame. */
struct Guard {
    ~Guard() { destroyed++; }
};

extern "C" {
NOINLINE long thrower(long x) {
    Guard g;
    if (x > 0) throw std::runtime_error("thrower");
    return x;
}
NOINLINE long mid(long x) {
    Guard g;
    return thrower(x) + 1;
}
/* Caught above two probed frames. */
NOINLINE long catch_above_two(long x) {
    try {
        return mid(x);
    } catch (const std::exception &) {
        return -x;
    }
}
/* Caught by the direct caller. */
NOINLINE long catch_direct(long x) {
    try {
        return thrower(x);
    } catch (...) {
        return -2 * x;
    }
}
long destroyed_count(long unused) {
    (void)unused;
    return destroyed;
}
}
