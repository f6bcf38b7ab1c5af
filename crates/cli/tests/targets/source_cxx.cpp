// A C++ program for source-level probes: a member function defined outside its class, in
// a namespace, reading a member through `this`; another class's function of the same name,
// and two overloads of a free function of that name (one with floating-point parameters);
// it prints what a probe on their lines sees.
#include <cstdio>
namespace shop {
struct Basket {
    int items;
    long weigh(int extra) const;
};
__attribute__((noinline)) long Basket::weigh(int extra) const {
    long total = items * 10L + extra;
    std::printf("weigh items=%d extra=%d total=%ld\n", items, extra, total);
    return total;
}
struct Crate {
    long boxes;
    __attribute__((noipa)) long weigh(int extra) const {
        long total = boxes * 100 + extra;
        std::printf("crate boxes=%ld extra=%d total=%ld\n", boxes, extra, total);
        return total;
    }
};
__attribute__((noipa)) long weigh(long grams) {
    std::printf("grams=%ld\n", grams);
    return grams / 1000;
}
__attribute__((noipa)) double weigh(double kg, float rate) {
    std::printf("kg=%g rate=%g\n", kg, rate);
    return kg * rate;
}
}  // namespace shop
int main(int argc, char **) {
    shop::Basket basket{argc + 2};
    shop::Crate crate{argc + 4L};
    long sum = 0;
    double heavy = 0;
    for (int i = 0; i < 3; i++) {
        sum += basket.weigh(i);
        sum += crate.weigh(i);
        sum += shop::weigh(i * 1000L);
        heavy += shop::weigh(i + 0.5, 2.0f);
    }
    std::printf("sum %ld %g\n", sum, heavy);
}
