/* Functions whose probed instruction is of a chosen kind, for the breakpoint-probe tests.
 * Linked with -Bsymbolic so that the hand-written direct references bind locally.
 * Hand-written in assembly where the kind must be exact; built by the test harness as a
 * shared object (-O1 -fPIC) and loaded with dlopen. */
#include <stdio.h>

long counter = 100;

#define FUNC(name, body)                                                   \
    __asm__(".text\n.globl " #name "\n.type " #name ",@function\n" #name   \
            ":\n" body "\n.size " #name ",.-" #name "\n");

/* push %rbp first; returns x + 1 */
FUNC(f_push, "push %rbp\n mov %rsp,%rbp\n lea 1(%rdi),%rax\n pop %rbp\n ret")
/* sub $24,%rsp first; returns x + 2 */
FUNC(f_sub, "sub $24,%rsp\n lea 2(%rdi),%rax\n add $24,%rsp\n ret")
/* RIP-relative load first; returns counter + x */
FUNC(f_riprel, "mov counter(%rip),%rax\n add %rdi,%rax\n ret")
/* RIP-relative lea first; returns counter + x */
FUNC(f_lea, "lea counter(%rip),%rax\n mov (%rax),%rax\n add %rdi,%rax\n ret")
/* helper: returns x + 10 */
FUNC(f_helper, "lea 10(%rdi),%rax\n ret")
/* relative call first; returns x + 11 */
FUNC(f_call, "sub $8,%rsp\n call f_helper\n add $1,%rax\n add $8,%rsp\n ret")
/* f_call's call is at f_call+4; this one starts with it: the stack is misaligned by the
 * call, which f_helper does not care about; returns x + 12 */
FUNC(f_call_first, "call f_helper\n add $2,%rax\n ret")
/* a jcc at +4: x > 5 ? x + 200 : x + 100 */
FUNC(f_jcc, "cmp $5,%rdi\n jg 1f\n lea 100(%rdi),%rax\n ret\n1: lea 200(%rdi),%rax\n ret")
/* endbr64 first; returns x + 7 */
FUNC(f_endbr, "endbr64\n lea 7(%rdi),%rax\n ret")
/* short jmp first; returns x + 9 */
FUNC(f_jmp, "jmp 1f\n ud2\n1: lea 9(%rdi),%rax\n ret")
/* near jmp (rel32) first, as a tail-call thunk's; returns x + 9 */
FUNC(f_jmp32, "jmp.d32 1f\n ud2\n1: lea 9(%rdi),%rax\n ret")
/* a syscall at +5 (getpid), which cannot run out of line */
FUNC(f_syscall, "mov $39,%eax\n syscall\n ret")
/* probed by the test of a failed unregister only, which leaves its probe behind */
FUNC(f_spare, "lea 4(%rdi),%rax\n ret")
/* a ret at +4 */
FUNC(f_ret, "lea 3(%rdi),%rax\n ret")

/* A C function the tests rewrite an argument of: prints into buf. */
__attribute__((noinline)) int format_sum(char *buf, long a, long b) {
    return snprintf(buf, 64, "sum=%ld", a + b);
}

/* The hot function of the multi-threaded tests. */
__attribute__((noinline)) long hot(long x) {
    __asm__ volatile("" ::: "memory");
    return x * 2 + 1;
}
