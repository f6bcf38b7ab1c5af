/* Functions for the jump-optimization tests, built by the harness as a shared object
 * (-O1 -fPIC) and loaded with dlopen. The assembly ones fix the exact instructions a
 * detour jump covers. */
#include <stddef.h>

#define FUNC(name, body)                                                   \
    __asm__(".text\n.globl " #name "\n.type " #name ",@function\n" #name   \
            ":\n" body "\n.size " #name ",.-" #name "\n");

/* Sums x[i]^2 and x[i] over n doubles (n a multiple of 4) in two ymm accumulators, stored
 * to out[0..8]. Every ymm register it uses is live across the loop body, and the flags of
 * the cmp are live at the jb: the probes go on the vaddpd and on the jb. */
FUNC(avx_sums,
     "vxorpd %ymm0,%ymm0,%ymm0\n"
     " vxorpd %ymm1,%ymm1,%ymm1\n"
     " xor %eax,%eax\n"
     "1: vmovupd (%rdi,%rax,8),%ymm2\n"
     " vmulpd %ymm2,%ymm2,%ymm3\n"
     " vaddpd %ymm3,%ymm0,%ymm0\n"
     " vaddpd %ymm2,%ymm1,%ymm1\n"
     " add $4,%rax\n"
     " cmp %rsi,%rax\n"
     " jb 1b\n"
     " vmovupd %ymm0,(%rdx)\n"
     " vmovupd %ymm1,32(%rdx)\n"
     " vzeroupper\n"
     " ret")

/* x + 1 through a frame: push, mov, lea, pop, ret. */
FUNC(opt_push, "push %rbp\n mov %rsp,%rbp\n lea 1(%rdi),%rax\n pop %rbp\n ret")
/* x + 2, after a short jmp: the instruction after it is not a fall-through. */
FUNC(opt_jmp, "jmp 1f\n ud2\n1: lea 2(%rdi),%rax\n ret")
/* x > 5 ? x + 200 : x + 100, the jcc at +4. */
FUNC(opt_jcc, "cmp $5,%rdi\n jg 1f\n lea 100(%rdi),%rax\n ret\n1: lea 200(%rdi),%rax\n ret")
/* A loop whose head is 3 bytes in: a jump there would land inside a jump written at +0. */
FUNC(opt_loop, "mov %rdi,%rax\n1: add $3,%rax\n cmp $1000,%rax\n jl 1b\n ret")

/* A C function with branches, a loop and a call, for the every-instruction test. */
__attribute__((noinline)) long mix_helper(long v) { return v * 7 + 3; }

__attribute__((noinline)) long mix(long x) {
    long acc = x;
    for (long i = 0; i < (x & 7) + 3; i++) {
        if (acc & 1)
            acc = acc * 3 + i;
        else
            acc = (acc >> 1) ^ i;
    }
    if (x > 100)
        acc += mix_helper(x);
    return acc;
}

/* The hot function of the multi-threaded tests. */
__attribute__((noinline)) long opt_hot(long x) {
    __asm__ volatile("" ::: "memory");
    return x * 2 + 1;
}

/* A function with a split-off cold part that jumps back into its middle, as GCC's
 * hot/cold partitioning makes: x >= 0 ? 5x + 1 : -5x + 1. The cold part's jump lands at
 * hotcold+15, inside the bytes a jump written at hotcold+13 would cover. */
__asm__(".text\n.globl hotcold\n.type hotcold,@function\nhotcold:\n"
        " lea (%rdi,%rdi,4),%rax\n"  /* +0 */
        " test %rdi,%rdi\n"          /* +4 */
        " js hotcold.cold\n"         /* +7, rel32 to another section */
        " xor %edx,%edx\n"           /* +13 */
        "hotcold_join:\n"
        " add $1,%rax\n"             /* +15 */
        " ret\n"
        ".size hotcold,.-hotcold\n"
        ".section .text.unlikely,\"ax\",@progbits\n"
        ".type hotcold.cold,@function\nhotcold.cold:\n"
        " neg %rax\n"
        " jmp hotcold_join\n"
        ".size hotcold.cold,.-hotcold.cold\n"
        ".text\n");

/* rbx + 1, called through a wrapper that gives rbx the argument and restores it: a handler
 * at opt_rbx's entry that changes rbx changes the result and nothing else. */
FUNC(opt_rbx, "mov %rbx,%rax\n add $1,%rax\n ret")
FUNC(opt_rbx_outer, "push %rbx\n mov %rdi,%rbx\n call opt_rbx\n pop %rbx\n ret")

/* Vector state in its initial (all-zero) configuration across a probe at +3: after
 * vzeroupper the upper halves of ymm0-15 are zero, and zmm16 is zeroed; a detour that
 * skips saving them must put zeros back. Returns upper64(ymm0) | zmm16[63:0], so 0. */
FUNC(upper_zero, "vzeroupper\n mov %rdi,%rax\n add $1,%rax\n vextracti128 $1,%ymm0,%xmm1\n vmovq %xmm1,%rax\n vzeroupper\n ret")
FUNC(hi16_zero, "vpxord %zmm16,%zmm16,%zmm16\n mov %rdi,%rax\n add $1,%rax\n vmovq %xmm16,%rax\n ret")

/* The upper state: XINUSE's AVX and ZMM_Hi256 bits (xgetbv with ecx=1), set while the
 * upper halves of ymm/zmm0-15 may be non-zero ("dirty"), which makes legacy SSE code slow
 * on Intel cores. Each function returns it as the program finds it after a probe:
 * 0 when a probe left the clean state of the program clean.
 *   upper_state_after        at +3, mid-function, entered clean (vzeroupper);
 *   upper_state_after_call   after calling f(x) clean: probes at upper_leaf's entry or
 *                            return. */
FUNC(upper_state_after, "vzeroupper\n mov %rdi,%rax\n add $1,%rax\n add $2,%rax\n mov $1,%ecx\n xgetbv\n and $0x44,%eax\n ret")
FUNC(upper_state_after_call, "push %rbx\n mov %rdi,%rax\n mov %rsi,%rdi\n vzeroupper\n call *%rax\n"
     " mov $1,%ecx\n xgetbv\n and $0x44,%eax\n pop %rbx\n ret")
FUNC(upper_leaf, "mov %rdi,%rax\n add $1,%rax\n add $2,%rax\n ret")

/* Dirty upper halves the program keeps: ymm0 all ones across a probe at +4 (after the
 * vpcmpeqd), and ymm2 all ones across dirty_leaf's return. Each returns the upper 64 bits
 * of that register as the program finds it, so -1. */
FUNC(upper_ones, "vpcmpeqd %ymm0,%ymm0,%ymm0\n mov %rdi,%rax\n add $1,%rax\n vextracti128 $1,%ymm0,%xmm1\n"
     " vmovq %xmm1,%rax\n vzeroupper\n ret")
FUNC(dirty_leaf, "vpcmpeqd %ymm2,%ymm2,%ymm2\n mov %rdi,%rax\n ret")
FUNC(dirty_leaf_caller, "push %rbx\n call dirty_leaf\n vextracti128 $1,%ymm2,%xmm1\n vmovq %xmm1,%rax\n vzeroupper\n"
     " pop %rbx\n ret")

/* A caller that keeps values in every register a function may clobber (rcx rsi rdi r8-r11)
 * across a call of a leaf it knows leaves them alone, as GCC's -fipa-ra lets it: 3x + 1
 * (the leaf's rax + rdx) when all are kept, -1 when one is not. */
FUNC(kept_gprs_leaf, "lea 1(%rbx),%rax\n lea (%rbx,%rbx),%rdx\n ret")
FUNC(kept_gprs_caller, "push %rbx\n mov %rdi,%rbx\n mov $0x11,%ecx\n mov $0x12,%esi\n mov $0x13,%edi\n"
     " mov $0x14,%r8d\n mov $0x15,%r9d\n mov $0x16,%r10d\n mov $0x17,%r11d\n call kept_gprs_leaf\n"
     " xor $0x11,%rcx\n xor $0x12,%rsi\n or %rsi,%rcx\n xor $0x13,%rdi\n or %rdi,%rcx\n xor $0x14,%r8\n"
     " or %r8,%rcx\n xor $0x15,%r9\n or %r9,%rcx\n xor $0x16,%r10\n or %r10,%rcx\n xor $0x17,%r11\n"
     " or %r11,%rcx\n jnz 1f\n add %rdx,%rax\n pop %rbx\n ret\n1: mov $-1,%rax\n pop %rbx\n ret")

/* MXCSR as the program sees it just after a probe at +3. */
FUNC(mxcsr_after, "mov %rdi,%rax\n add $1,%rax\n add $2,%rax\n stmxcsr -4(%rsp)\n mov -4(%rsp),%eax\n ret")

/* x + 3 in three instructions, for the test of a thread a signal interrupted at +3. */
FUNC(sig_fn, "mov %rdi,%rax\n add $1,%rax\n add $2,%rax\n ret")

/* A switch as GCC compiles it in position-independent code: a table of 32-bit offsets from
 * the table, loaded and summed before an indirect jump. Its cases come after the bytes a
 * jump at the entry covers (mov + and: 7 bytes), so the entry can be a jump:
 * (x & 3) * 10 + 10. The table is followed by a value pointing far outside the code, as
 * the rest of .rodata would, so that the table's end is the same in every build. */
FUNC(opt_switch,
     "mov %rdi,%rax\n and $3,%rax\n lea opt_switch_table(%rip),%rdx\n movslq (%rdx,%rax,4),%rax\n"
     " add %rdx,%rax\n jmp *%rax\n"
     ".Lsw0: mov $10,%eax\n ret\n.Lsw1: mov $20,%eax\n ret\n.Lsw2: mov $30,%eax\n ret\n.Lsw3: mov $40,%eax\n ret\n"
     ".pushsection .rodata\n .align 4\nopt_switch_table:\n"
     " .long .Lsw0-opt_switch_table, .Lsw1-opt_switch_table, .Lsw2-opt_switch_table, .Lsw3-opt_switch_table\n"
     " .long 0x7fffffff\n.popsection")

/* A loop whose head, 3 bytes into the function, is a case of its own switch: a jump at the
 * entry would cover it. x < 10 ? 10 : x + 1. */
FUNC(opt_switch_head,
     "mov %rdi,%rax\n.Lhead: add $1,%rax\n cmp $10,%rax\n jge .Lout\n mov %rax,%rcx\n and $1,%rcx\n"
     " lea opt_head_table(%rip),%rdx\n movslq (%rdx,%rcx,4),%rcx\n add %rdx,%rcx\n jmp *%rcx\n.Lout: ret\n"
     ".pushsection .rodata\n .align 4\nopt_head_table:\n .long .Lhead-opt_head_table, .Lhead-opt_head_table\n"
     " .long 0x7fffffff\n.popsection")

/* A tail call through a function pointer loaded from memory: x + 5 + 1. */
FUNC(opt_tail_dest, "add $1,%rax\n ret")
FUNC(opt_tailptr, "mov %rdi,%rax\n add $5,%rax\n mov opt_tail_ptr(%rip),%rcx\n jmp *%rcx\n"
     ".pushsection .data.rel.local,\"aw\"\n .align 8\nopt_tail_ptr: .quad opt_tail_dest\n.popsection")

/* Functions whose first five bytes a jump cannot cover, each after alignment padding (GNU
 * as fills .text alignment with NOPs): the entry's short jump reaches a jump written in
 * the padding (the hot-patch layout).
 *   opt_isl_other: x + 100 + 1, entering opt_isl 3 bytes in, as glibc's __mempcpy enters
 *                  __memmove (so a 5-byte jump at opt_isl would cover its landing);
 *   opt_isl:       x + 1;
 *   opt_isl_tiny:  x + 0, in 4 bytes;
 *   opt_isl_fall:  x + 10, falling through the padding into opt_isl_tiny rather than
 *                  returning. */
__asm__(".text\n.p2align 4\n.globl opt_isl_other\n.type opt_isl_other,@function\nopt_isl_other:\n"
        " mov %rdi,%rax\n add $100,%rax\n jmp opt_isl_body\n.size opt_isl_other,.-opt_isl_other\n"
        ".p2align 4\n.globl opt_isl\n.type opt_isl,@function\nopt_isl:\n"
        " mov %rdi,%rax\nopt_isl_body:\n add $1,%rax\n ret\n.size opt_isl,.-opt_isl\n"
        ".p2align 4\n.globl opt_isl_fall\n.type opt_isl_fall,@function\nopt_isl_fall:\n"
        " add $10,%rdi\n.size opt_isl_fall,.-opt_isl_fall\n"
        ".p2align 4\n.globl opt_isl_tiny\n.type opt_isl_tiny,@function\nopt_isl_tiny:\n"
        " mov %rdi,%rax\n ret\n.size opt_isl_tiny,.-opt_isl_tiny\n");
