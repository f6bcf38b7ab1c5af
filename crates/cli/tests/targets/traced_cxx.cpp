// C++ exceptions through traced frames: thrower() throws two frames below the catch.
#include <cstdio>
#include <stdexcept>

#define NOINLINE __attribute__((noinline))

NOINLINE int thrower(int x) {
    if (x > 0) throw std::runtime_error("boom");
    return x;
}

NOINLINE int middle(int x) { return thrower(x) + 1; }

NOINLINE int catcher(int x) {
    try {
        return middle(x);
    } catch (const std::exception &e) {
        return -1;
    }
}

NOINLINE int after(int x) { return x * 2; }

int main() {
    int a = catcher(1);
    int b = after(a);
    std::printf("caught = %d, after = %d\n", a, b);
    return 0;
}
