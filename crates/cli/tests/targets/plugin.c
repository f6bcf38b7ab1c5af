/* A library traced_dlopen.c loads with dlopen: its functions exist only after that. */
__attribute__((noinline)) int plugin_leaf(int x) { return x * 5 + 1; }
__attribute__((noinline)) int plugin_work(int x) { return plugin_leaf(x) + plugin_leaf(x + 1); }
