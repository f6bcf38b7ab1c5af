/* A library whose functions carry -fpatchable-function-entry=5 NOP sites, for the
 * tracer's in-process test: leaf() is called by outer(). */
__attribute__((noinline)) long leaf(long x) { return x * 3 + 1; }
__attribute__((noinline)) long outer(long x) { return leaf(x) + leaf(x + 1); }
