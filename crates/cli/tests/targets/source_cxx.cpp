// A C++ program for source-level probes: a member function defined outside its class, in
// a namespace, reading a member through `this`; it prints what a probe on its lines sees.
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
}  // namespace shop
int main(int argc, char **) {
    shop::Basket basket{argc + 2};
    long sum = 0;
    for (int i = 0; i < 3; i++)
        sum += basket.weigh(i);
    std::printf("sum %ld\n", sum);
}
