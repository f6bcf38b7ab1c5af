// The C++ target of `dynprobe record -a` (tests/record_args.rs): a member function (its
// `this` is the first argument), a free function of doubles, and a function calling
// both. Each call writes what `dynprobe replay` shows into the log file (argv[2]).
#include <cstdio>
#include <cstdlib>
#include <cstring>

static FILE *log_file;

struct Parser {
    int base;
    __attribute__((noinline)) int parse(const char *line, int len) {
        int n = base + std::atoi(std::strchr(line, ',') + 1);
        std::fprintf(log_file, "Parser::parse(this=%p, line=\"%s\", len=%d) = %d;\n", (void *)this, line, len, n);
        return n;
    }
};

__attribute__((noinline)) double area(double w, double h) {
    double a = w * h;
    std::fprintf(log_file, "area(w=%g, h=%g) = %g;\n", w, h, a);
    return a;
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? std::atoi(argv[1]) : 3;
    log_file = std::fopen(argc > 2 ? argv[2] : "/dev/null", "w");
    if (!log_file)
        return 1;
    Parser p{100};
    static const char *lines[] = {"alpha,12", "beta,-7"};
    double total = 0;
    for (int i = 0; i < rounds; i++) {
        const char *line = lines[i % 2];
        total += p.parse(line, (int)std::strlen(line));
        total += area(0.5 + i, 4);
    }
    std::fclose(log_file);
    std::printf("total %g\n", total);
    return 0;
}
