//! Probes driven from outside the process, as the kernel's uprobes are: an `int3` written
//! by `ptrace`, the hit handled by the tracer, the instruction run out of line. The
//! fallback for programs the in-process agent cannot be loaded into (static binaries).
