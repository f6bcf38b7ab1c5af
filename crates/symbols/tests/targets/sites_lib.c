/* The library of tests/sites.rs: four functions, static and global, one recursive. */
#define OUT_OF_LINE __attribute__((noinline, noclone))

static OUT_OF_LINE int lib_square(int x) { return x * x; }
OUT_OF_LINE int lib_factorial(int n) { return n <= 1 ? 1 : n * lib_factorial(n - 1); }
static OUT_OF_LINE int lib_twice_square(int x) { return lib_square(x) + lib_square(x); }
OUT_OF_LINE int lib_compute(int x) { return lib_twice_square(x) + lib_factorial(x); }
