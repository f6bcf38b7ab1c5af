//! Dynamic ftrace for a Linux process (the kernel's `kernel/trace/ftrace.c` and its
//! function-graph tracer): finds the functions to trace, patches their entry sites in one
//! batch, and records every entry and exit into per-thread ring buffers.
