/* Jump-optimization targets built at -O2, where GCC's interprocedural register allocation
 * (-fipa-ra) lets a caller keep values in registers the ABI calls clobbered. */

#define FUNC(name, body)                                                   \
    __asm__(".text\n.globl " #name "\n.type " #name ",@function\n" #name   \
            ":\n" body "\n.size " #name ",.-" #name "\n");

/* work() keeps doubles in xmm8 and up across its calls to leaf(), which it knows leaves
 * them alone. */
__attribute__((noinline)) static int leaf(int x) { return x * 3 + 1; }
void *ipa_leaf(void) { return (void *)leaf; }
int ipa_sink;
double ipa_work(const double *v, int n)
{
    double a0 = v[0], a1 = v[1], a2 = v[2], a3 = v[3], a4 = v[4], a5 = v[5], a6 = v[6], a7 = v[7], a8 = v[8],
           a9 = v[9];
    for (int i = 0; i < n; i++) {
        ipa_sink += leaf(i);
        a0 += a1; a1 += a2; a2 += a3; a3 += a4; a4 += a5; a5 += a6; a6 += a7; a7 += a8; a8 += a9; a9 += a0;
    }
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9;
}

/* The direction flag is set at +1: std ; mov ; add ; add ; cld ; ret. Returns x + 3. */
FUNC(df_set, "std\n mov %rdi,%rax\n add $1,%rax\n add $2,%rax\n cld\n ret")

/* The flags of x + x, read after two moves (the probed run, at +6: moves leave the flags
 * alone); cld after the read, in case a handler set DF in the frame. */
FUNC(flags_of_double, "mov %rdi,%rax\n add %rdi,%rax\n mov %rdi,%rdx\n mov %rdi,%rcx\n pushfq\n pop %rax\n cld\n ret")

/* The direction lodsb stepped in (+1, or -1 with DF set) after an add that overwrites every
 * arithmetic flag: at +3 (the add) those are dead, DF is not. */
FUNC(df_after_dead_flags, "mov %rdi,%rax\n add $1,%rax\n mov %rsp,%rsi\n lodsb\n sub %rsp,%rsi\n mov %rsi,%rax\n cld\n ret")

/* A function that sets DF nowhere (at +3 its probe reads the flags without pushfq), and a
 * caller that breaks the ABI by calling it with DF set. */
FUNC(no_std_inside, "mov %rdi,%rax\n add $1,%rax\n add $2,%rax\n ret")
FUNC(call_with_df_set, "std\n call no_std_inside\n cld\n ret")

/* Two entries into one body, like glibc's __mempcpy jumping into __memmove: shared_a
 * continues at shared_b+3, inside a jump written at shared_b's entry. */
FUNC(shared_a, "mov %rdi,%rax\n add $100,%rax\n jmp .Lshared_mid")
FUNC(shared_b, "mov %rdi,%rax\n.Lshared_mid: add $1,%rax\n add $2,%rax\n ret")
