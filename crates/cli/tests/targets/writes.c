/* Makes exactly ARGV[1] calls of write(2) on stdout, each of a distinct length, and nothing
 * else that writes (no stdio): a probe on libc's `write` must see exactly these. */
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10;
    char line[64];
    for (int i = 0; i < n; i++) {
        int len = 1 + i % 40;
        memset(line, 'a' + i % 26, len);
        line[len - 1] = '\n';
        if (write(1, line, len) != len) return 1;
    }
    return 0;
}
