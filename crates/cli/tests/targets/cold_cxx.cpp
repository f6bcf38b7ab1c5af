// A C++ program whose member function has a part GCC moves out of it at -O2: the throwing
// branch becomes `work::Parser::parse(...) [clone .cold]`, entered by a jump from the hot
// part (never by a call) while the hot part's locals sit at the top of its stack. Prints
// what it computed and how many lines it refused, the same traced or not.
#include <cstdio>
#include <stdexcept>
#include <string>

namespace work {
struct Parser {
    long total = 0;
    __attribute__((noinline)) long parse(const std::string &line, int i)
    {
        if (__builtin_expect(line.size() > 24, 0)) {
            std::fprintf(stderr, "refusing line %d\n", i);
            throw std::length_error("too long: " + line);
        }
        total += static_cast<long>(line.size()) * 31 + i;
        return total;
    }
};
} // namespace work

int main()
{
    work::Parser parser;
    int refused = 0;
    for (int i = 0; i < 2000; i++) {
        std::string line = i % 97 == 0 ? std::string(30 + i % 7, 'x') : "line " + std::to_string(i);
        try {
            parser.parse(line, i);
        } catch (const std::length_error &) {
            refused++;
        }
    }
    std::printf("total=%ld refused=%d\n", parser.total, refused);
    return 0;
}
