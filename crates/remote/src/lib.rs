//! Another process under `ptrace`: attaching to it (with the reason when that is not
//! allowed), reading and writing its registers and memory, calling a function or making a
//! system call on one of its stopped threads, and loading the dynprobe agent into it.
