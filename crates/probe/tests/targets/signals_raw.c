/* Code that changes its thread's signal mask with its own syscall instruction, which no
 * guard on the C library sees: breakpoint probes in a process holding it are refused when
 * they cannot be jump-optimized. Built by the harness as a shared object and loaded with
 * dlopen. */

/* rt_sigprocmask(SIG_BLOCK or SIG_UNBLOCK (how), {SIGTRAP}, NULL, 8); returns its result. */
long raw_block_trap(long how) {
    unsigned long trap = 1UL << (5 - 1);
    long ret;
    register long size __asm__("r10") = 8;
    __asm__ volatile("mov $14,%%eax\n syscall"
                     : "=a"(ret)
                     : "D"(how), "S"(&trap), "d"(0), "r"(size)
                     : "rcx", "r11", "memory");
    return ret;
}
