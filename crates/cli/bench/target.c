/*
 * The functions `dynprobe bench` calls in its loop. They are C, compiled with -O2 by
 * build.rs, so that their machine code is fixed and known rather than whatever rustc
 * makes of a Rust function in a given release:
 *
 *   dynprobe_bench_target   the function every probe row instruments. Its first
 *                           instruction is an ordinary relocatable `mov %rdi,%rax`: no endbr64
 *                           (-fcf-protection=none), no 5-byte NOP (-pg is not used), so
 *                           both the kernel's uprobe and dynprobe's int3 probe take the
 *                           general path on it, not a special case.
 *   dynprobe_bench_int3     the same work after an `int3`: the raw SIGTRAP round trip
 *                           with nothing else added (the `sigtrap-floor` row).
 *   dynprobe_bench_sse      calls dynprobe_bench_target, then runs one legacy SSE
 *                           instruction, as most compiled code soon does: what a probe on
 *                           the callee costs a program whose vector state it leaves changed.
 *   dynprobe_bench_upper_dirty
 *                           the same work after a VEX write to ymm1 and one legacy SSE
 *                           instruction: what this CPU charges for SSE code while the upper
 *                           halves of the vector registers are dirty.
 */

/* A little real work, so the call is not a bare `ret` and costs what a small function costs. */
static inline __attribute__((always_inline)) long work(long x)
{
	unsigned long v = (unsigned long)x;
	v ^= v >> 31;
	v *= 0x7e3779b9ul; /* fits an imm32: no 10-byte movabs at the entry */
	v ^= v >> 29;
	return (long)v;
}

__attribute__((noinline, used)) long dynprobe_bench_target(long x)
{
	return work(x);
}

__attribute__((noinline, used)) long dynprobe_bench_int3(long x)
{
	/* The kernel reports the trap with rip already after the int3, so a handler that
	 * does nothing resumes right here. */
	__asm__ volatile("int3" ::: "memory");
	return work(x);
}

/* dynprobe_bench_target behind a 5-byte NOP: the site the kernel's uprobe handles best
 * (since 6.18 it turns a NOP5 into a call instead of trapping), for a fair comparison. */
__asm__(".text\n"
	".globl dynprobe_bench_nop5\n"
	".type dynprobe_bench_nop5,@function\n"
	"dynprobe_bench_nop5:\n"
	"	.byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"
	"	jmp dynprobe_bench_target\n"
	".size dynprobe_bench_nop5, .-dynprobe_bench_nop5\n");

/* A legacy SSE instruction that writes an xmm register: the kind that pays when the upper
 * halves of ymm/zmm0-15 are dirty (see dynprobe_arch's detour module). */
#define SSE_WRITE() __asm__ volatile("xorps %%xmm1, %%xmm1" ::: "xmm1")

__attribute__((noinline, used)) long dynprobe_bench_sse(long x)
{
	long r = dynprobe_bench_target(x);
	SSE_WRITE();
	return r;
}

/* Needs AVX: the bench checks before calling it. Leaves the upper state clean. */
__attribute__((noinline, used)) long dynprobe_bench_upper_dirty(long x)
{
	__asm__ volatile("vpcmpeqd %%ymm1, %%ymm1, %%ymm1" ::: "xmm1");
	SSE_WRITE();
	__asm__ volatile("vzeroupper" ::: "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
			 "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
	return work(x);
}

/*
 * The floors of the optimized and return paths: hand-built copies of what dynprobe's
 * detours and return sled do, one part added at a time, on the same work as
 * dynprobe_bench_target (written out in assembly as gcc -O2 compiles it, so every copy is
 * that function's code). Each row's added cost minus the previous one's is what that part
 * costs on the host; dynprobe's real rows minus the last floor is dynprobe's own work.
 * The layouts copy dynprobe_arch's detour.rs (the entry variant: no flags saved) and
 * trampoline.rs (the return sled's `common`, general registers only); where those load a
 * 64-bit immediate, these use a rip-relative lea (no text relocation in a PIE).
 *
 *   dynprobe_floor_jump        the probe point's jmp to a detour in another section, the
 *                              covered instructions there, the jmp back
 *   dynprobe_floor_gprs        + the register frame: 15 general registers stored, rsp and
 *                              rip stored, caller-saved reloaded, callee-saved compared
 *   dynprobe_floor_flags       + pushfq/cld ... popfq around it (a probe mid-function)
 *   dynprobe_floor_sahf        dynprobe_floor_flags with the flags put back as a mid-function
 *                              detour does when they are arithmetic ones only: sahf, and
 *                              OF by an add (no popfq)
 *   dynprobe_floor_call        dynprobe_floor_gprs + the aligned call of a dispatcher that
 *                              returns 0 at once, as a light detour makes it
 *   dynprobe_floor_least       dynprobe_floor_call whose dispatcher does the least any
 *                              in-process probe must: the thread's slot found, the
 *                              recursion guard set and cleared, the hit counted per thread,
 *                              an empty handler called through a pointer
 *   dynprobe_floor_ret_swap    a return hook's bookkeeping without the hook: the return
 *                              address kept aside and written back unchanged
 *   dynprobe_floor_ret_miss    the return address replaced by a trampoline's: one
 *                              mispredicted ret, then an indirect jmp back to the caller
 *                              (the floor of any return hook)
 *   dynprobe_floor_ret_sled    + the sled's shape: `call common`, common's frame, the
 *                              original address left below rsp, `ret` and `jmp *-16(%rsp)`
 *   dynprobe_floor_ret_call    + common's nine general registers saved and restored around
 *                              the call of a dispatcher that only returns the address
 *   dynprobe_floor_ret_probe   dynprobe_floor_call whose dispatcher diverts the return
 *                              address into dynprobe_floor_ret_call's sled: both paths of a
 *                              return probe with an optimized entry, nothing done in either
 *   dynprobe_floor_ret_least   dynprobe_floor_ret_probe whose dispatchers do the least any
 *                              return probe must with dynprobe's thread slots: dynprobe_floor_least's work at
 *                              each end, an instance pushed at the entry and popped at the
 *                              return
 *
 * The return floors keep the caller's address in one static slot: their rows run on one
 * thread.
 */
#define FLOOR_COPY "	mov %rdi,%rax\n	shr $0x1f,%rax\n"
#define FLOOR_REST                                                                                                   \
	"	xor %rdi,%rax\n	imul $0x7e3779b9,%rax,%rax\n	mov %rax,%rdx\n	shr $0x1d,%rdx\n	xor %rdx,%rax\n" \
	"	ret\n"

/* A function whose first 7 bytes (the covered run) are a jmp to DETOUR then int3 padding. */
#define FLOOR_ENTRY(name, detour)                                                                                    \
	__asm__(".text\n.globl " name "\n.type " name ",@function\n.p2align 4\n" name ":\n"                          \
		"	jmp " name "_detour\n	int3\n	int3\n" name "_back:\n" FLOOR_REST ".size " name ", .-" name      \
		"\n.section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 6\n" name "_detour:\n" detour FLOOR_COPY  \
		"	jmp " name "_back\n	int3\n.text\n")

/* The entry frame of detour.rs: below the red zone, constant flags, the registers in Regs
 * order (r15 at the lowest address), the original rsp and the probe address. */
#define FRAME_SAVE(name)                                                                                             \
	"	mov %r15,0(%rsp)\n	mov %r14,8(%rsp)\n	mov %r13,16(%rsp)\n	mov %r12,24(%rsp)\n"                          \
	"	mov %r11,32(%rsp)\n	mov %r10,40(%rsp)\n	mov %r9,48(%rsp)\n	mov %r8,56(%rsp)\n"                           \
	"	mov %rbp,64(%rsp)\n	mov %rbx,72(%rsp)\n	mov %rax,80(%rsp)\n	mov %rcx,88(%rsp)\n"                          \
	"	mov %rdx,96(%rsp)\n	mov %rsi,104(%rsp)\n	mov %rdi,112(%rsp)\n"                                             \
	"	lea 272(%rsp),%rax\n	mov %rax,128(%rsp)\n	lea " name "(%rip),%rax\n	mov %rax,136(%rsp)\n"
#define FRAME_RESTORE                                                                                                \
	"	cmp %r15,0(%rsp)\n	jne dynprobe_floor_trap\n	cmp %r14,8(%rsp)\n	jne dynprobe_floor_trap\n"          \
	"	cmp %r13,16(%rsp)\n	jne dynprobe_floor_trap\n	cmp %r12,24(%rsp)\n	jne dynprobe_floor_trap\n"         \
	"	mov 32(%rsp),%r11\n	mov 40(%rsp),%r10\n	mov 48(%rsp),%r9\n	mov 56(%rsp),%r8\n"                           \
	"	cmp %rbp,64(%rsp)\n	jne dynprobe_floor_trap\n	cmp %rbx,72(%rsp)\n	jne dynprobe_floor_trap\n"         \
	"	mov 80(%rsp),%rax\n	mov 88(%rsp),%rcx\n	mov 96(%rsp),%rdx\n	mov 104(%rsp),%rsi\n"                         \
	"	mov 112(%rsp),%rdi\n	lea 120(%rsp),%rsp\n"
#define ENTRY_FRAME(name, inside)                                                                                    \
	"	lea -272(%rsp),%rsp\n	movq $0x202,120(%rsp)\n" FRAME_SAVE(name) inside FRAME_RESTORE                    \
	"	lea 152(%rsp),%rsp\n"
/* The light path's call of DISPATCH(context, frame): rsp aligned, the frame and context kept
 * across the call. */
#define LIGHT_CALL_TO(dispatch)                                                                                      \
	"	mov %rsp,%rsi\n	movabs $0,%rdi\n	and $-16,%rsp\n	sub $16,%rsp\n	mov %rsi,8(%rsp)\n"                  \
	"	mov %rdi,(%rsp)\n	call " dispatch "\n	mov %eax,%r11d\n	mov (%rsp),%rdi\n"                             \
	"	mov 8(%rsp),%rsp\n	test %r11d,%r11d\n	jnz dynprobe_floor_trap\n"
#define LIGHT_CALL LIGHT_CALL_TO("dynprobe_floor_dispatch")

__asm__(".section .text.dynprobe_floor,\"ax\",@progbits\n"
	".p2align 4\ndynprobe_floor_trap:\n	ud2\n"
	".p2align 4\ndynprobe_floor_dispatch:\n	xor %eax,%eax\n	ret\n"
	".text\n");

FLOOR_ENTRY("dynprobe_floor_jump", "");
FLOOR_ENTRY("dynprobe_floor_gprs", ENTRY_FRAME("dynprobe_floor_gprs", ""));
FLOOR_ENTRY("dynprobe_floor_flags",
	    "	lea -144(%rsp),%rsp\n	pushfq\n	cld\n	lea -120(%rsp),%rsp\n" FRAME_SAVE("dynprobe_floor_flags")
		    FRAME_RESTORE "	popfq\n	lea 144(%rsp),%rsp\n");
FLOOR_ENTRY("dynprobe_floor_sahf",
	    "	lea -144(%rsp),%rsp\n	pushfq\n	cld\n	lea -120(%rsp),%rsp\n" FRAME_SAVE("dynprobe_floor_sahf")
		    "	mov 120(%rsp),%rax\n	test $0xfffff528,%eax\n	jnz dynprobe_floor_trap\n	mov %eax,%ecx\n"
		    "	shr $11,%ecx\n	and $1,%ecx\n	mov %al,%ah\n	mov %cl,%al\n	add $0x7f,%al\n	sahf\n"
		    FRAME_RESTORE "	lea 152(%rsp),%rsp\n");
FLOOR_ENTRY("dynprobe_floor_call", ENTRY_FRAME("dynprobe_floor_call", LIGHT_CALL));

/* floor-call whose dispatcher does what any in-process probe's must, and nothing else: find
 * the calling thread's slot without thread-local storage (its thread pointer hashed as
 * dynprobe's thread_slot.rs does, into 4096 slots of 128 bytes, owner and tid compared;
 * the tid read where glibc keeps it in the TCB, as dynprobe's thread.rs does), refuse a hit
 * from inside a handler (the recursion guard: a mark set and cleared), count the hit in the
 * thread's own cell, and call the handler through a pointer (an empty one). A slot not the
 * caller's is claimed, once. One thread at a time (the claim is not atomic). */
/* The calling thread's slot into %rdx (its thread pointer in %rax, its tid in %ecx); a slot
 * not the caller's is claimed at label 3 (defined by the user: write %rax and %ecx there,
 * then on at 1). Slots: 128 bytes — owner, tid, guard, hits, then a return floor's words. */
#define FLOOR_SLOT                                                                                                   \
	"	mov %fs:0,%rax\n	movabs $0x9e3779b97f4a7c15,%rcx\n	imul %rax,%rcx\n	shr $52,%rcx\n"                 \
	"	shl $7,%rcx\n	lea dynprobe_floor_slots(%rip),%rdx\n	add %rcx,%rdx\n	mov %fs:0x2d0,%ecx\n"             \
	"	cmp %rax,(%rdx)\n	jne 3f\n	cmp %ecx,8(%rdx)\n	jne 3f\n1:"
#define FLOOR_CLAIM "3:	mov %rax,(%rdx)\n	mov %ecx,8(%rdx)\n	jmp 1b\n"
__asm__(".bss\n.p2align 7\ndynprobe_floor_slots:\n	.zero 4096 * 128\n"
	".section .data.rel.local,\"aw\",@progbits\n.p2align 3\n"
	"dynprobe_floor_handler:\n	.quad dynprobe_floor_empty_handler\n"
	".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 4\n"
	"dynprobe_floor_empty_handler:\n	ret\n"
	".p2align 4\ndynprobe_floor_dispatch_min:\n" FLOOR_SLOT
	"	cmpq $0,16(%rdx)\n	jne 2f\n	movq $1,16(%rdx)\n	incq 24(%rdx)\n	push %rdx\n"
	"	mov %rsi,%rdi\n	call *dynprobe_floor_handler(%rip)\n	pop %rdx\n	movq $0,16(%rdx)\n"
	"2:	xor %eax,%eax\n	ret\n" FLOOR_CLAIM
	".text\n");
FLOOR_ENTRY("dynprobe_floor_least", ENTRY_FRAME("dynprobe_floor_least", LIGHT_CALL_TO("dynprobe_floor_dispatch_min")));

/* A return floor: NAME's entry keeps the caller's address in NAME_slot and puts what
 * LOAD loads into %r11 in its place; NAME_tramp (in the floor section) is TRAMP. */
#define FLOOR_RETURN(name, load, tramp)                                                                              \
	__asm__(".bss\n.p2align 3\n" name "_slot:\n	.zero 8\n"                                                        \
		".text\n.globl " name "\n.type " name ",@function\n.p2align 4\n" name ":\n"                          \
		"	mov (%rsp),%r11\n	mov %r11," name "_slot(%rip)\n" load "	mov %r11,(%rsp)\n" FLOOR_COPY     \
		FLOOR_REST ".size " name ", .-" name "\n"                                                            \
		".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 6\n" name "_tramp:\n" tramp "	int3\n.text\n")
#define TO_TRAMP(name) "	lea " name "_tramp(%rip),%r11\n"

/* common of trampoline.rs with nothing saved: its frame, the original address at 8(%rbp). */
#define SLED_COMMON(name, inside)                                                                                    \
	"	call " name "_common\n	jmp *-16(%rsp)\n	int3\n.p2align 4\n" name "_common:\n"                          \
	"	lea -8(%rsp),%rsp\n	push %rbp\n	mov %rsp,%rbp\n" inside "	mov %rbp,%rsp\n	pop %rbp\n"              \
	"	lea 8(%rsp),%rsp\n	ret\n"
/* The nine registers a function may clobber, around the call of a dispatcher that returns
 * the original address. */
#define SLED_CALL(name)                                                                                              \
	"	and $-64,%rsp\n	sub $192,%rsp\n	mov %rax,64(%rsp)\n	mov %rdx,72(%rsp)\n	mov %rcx,80(%rsp)\n"         \
	"	mov %rsi,88(%rsp)\n	mov %rdi,96(%rsp)\n	mov %r8,104(%rsp)\n	mov %r9,112(%rsp)\n"                          \
	"	mov %r10,120(%rsp)\n	mov %r11,128(%rsp)\n	mov 16(%rbp),%rdi\n	lea 64(%rsp),%rsi\n"                     \
	"	lea 24(%rbp),%rdx\n	lea " name "_dispatch(%rip),%rax\n	call *%rax\n	mov %rax,8(%rbp)\n"                 \
	"	mov 64(%rsp),%rax\n	mov 72(%rsp),%rdx\n	mov 80(%rsp),%rcx\n	mov 88(%rsp),%rsi\n"                          \
	"	mov 96(%rsp),%rdi\n	mov 104(%rsp),%r8\n	mov 112(%rsp),%r9\n	mov 120(%rsp),%r10\n"                         \
	"	mov 128(%rsp),%r11\n"

/* ret_swap's trampoline is never reached: its entry writes the caller's address back. */
FLOOR_RETURN("dynprobe_floor_ret_swap", "	mov dynprobe_floor_ret_swap_slot(%rip),%r11\n", "");
FLOOR_RETURN("dynprobe_floor_ret_miss", TO_TRAMP("dynprobe_floor_ret_miss"),
	     "	jmp *dynprobe_floor_ret_miss_slot(%rip)\n");
FLOOR_RETURN("dynprobe_floor_ret_sled", TO_TRAMP("dynprobe_floor_ret_sled"),
	     SLED_COMMON("dynprobe_floor_ret_sled",
			 "	mov dynprobe_floor_ret_sled_slot(%rip),%r11\n	mov %r11,8(%rbp)\n"));
FLOOR_RETURN("dynprobe_floor_ret_call", TO_TRAMP("dynprobe_floor_ret_call"),
	     SLED_COMMON("dynprobe_floor_ret_call", SLED_CALL("dynprobe_floor_ret_call")));
__asm__(".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 4\n"
	"dynprobe_floor_ret_call_dispatch:\n	mov dynprobe_floor_ret_call_slot(%rip),%rax\n	ret\n.text\n");

/* Both floors in one: floor-call's entry, whose dispatcher diverts the return address (in
 * the frame's rsp slot, 128 bytes in) to a sled entry, and floor-ret-call's sled behind it —
 * what a return probe with an optimized entry costs before any of dynprobe's work. */
__asm__(".bss\n.p2align 3\ndynprobe_floor_ret_probe_slot:\n	.zero 8\n"
	".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 4\n"
	"dynprobe_floor_ret_probe_divert:\n	mov 128(%rsi),%rax\n	mov (%rax),%rcx\n"
	"	mov %rcx,dynprobe_floor_ret_probe_slot(%rip)\n	lea dynprobe_floor_ret_probe_tramp(%rip),%rcx\n"
	"	mov %rcx,(%rax)\n	xor %eax,%eax\n	ret\n"
	".p2align 6\ndynprobe_floor_ret_probe_tramp:\n"
	SLED_COMMON("dynprobe_floor_ret_probe", SLED_CALL("dynprobe_floor_ret_probe")) "	int3\n"
	".p2align 4\ndynprobe_floor_ret_probe_dispatch:\n	mov dynprobe_floor_ret_probe_slot(%rip),%rax\n	ret\n"
	".text\n");
FLOOR_ENTRY("dynprobe_floor_ret_probe",
	    ENTRY_FRAME("dynprobe_floor_ret_probe", LIGHT_CALL_TO("dynprobe_floor_ret_probe_divert")));

/* floor-ret-probe whose two dispatchers do what a return probe's must with dynprobe's thread
 * slots (a thread pointer hashed into a table; not thread-local storage), and nothing else — floor-dispatch's work at each end. The entry: the thread's slot found (as
 * dynprobe_floor_dispatch_min), the guard set, the hit counted, an empty entry handler called
 * through a pointer, an instance pushed on the thread's stack in its slot (the original
 * return address and the address of its stack slot, for a later check that it is stale) and
 * the return address diverted, the guard cleared. The return: the slot found, the guard set,
 * the instance popped, an empty return handler called through a pointer, the guard cleared,
 * the original address returned. No instance limit but the slot's four, no check of stale
 * instances, no count of returns, no unregistering: less than dynprobe must do. The slot's
 * words: 32 the stack's top, 48 + 16 * i instance i. */
__asm__(".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 4\n"
	"dynprobe_floor_ret_least_enter:\n" FLOOR_SLOT
	"	cmpq $0,16(%rdx)\n	jne 2f\n	movq $1,16(%rdx)\n	incq 24(%rdx)\n	push %rdx\n	push %rsi\n"
	"	sub $8,%rsp\n	mov %rsi,%rdi\n	call *dynprobe_floor_handler(%rip)\n	add $8,%rsp\n	pop %rsi\n"
	"	pop %rdx\n	mov 32(%rdx),%rcx\n	cmp $4,%rcx\n	jae 4f\n	mov 128(%rsi),%rax\n	mov (%rax),%r8\n"
	"	shl $4,%rcx\n	mov %r8,48(%rdx,%rcx)\n	mov %rax,56(%rdx,%rcx)\n"
	"	lea dynprobe_floor_ret_least_tramp(%rip),%r8\n	mov %r8,(%rax)\n	incq 32(%rdx)\n"
	"4:	movq $0,16(%rdx)\n"
	"2:	xor %eax,%eax\n	ret\n" FLOOR_CLAIM
	".p2align 4\ndynprobe_floor_ret_least_dispatch:\n" FLOOR_SLOT
	"	mov 16(%rdx),%r8\n	movq $1,16(%rdx)\n	decq 32(%rdx)\n	mov 32(%rdx),%rcx\n	shl $4,%rcx\n"
	"	mov 48(%rdx,%rcx),%rax\n	test %r8,%r8\n	jne 2f\n	push %rdx\n	push %rax\n	sub $8,%rsp\n"
	"	mov %rsi,%rdi\n	call *dynprobe_floor_handler(%rip)\n	add $8,%rsp\n	pop %rax\n	pop %rdx\n"
	"	movq $0,16(%rdx)\n"
	"2:	ret\n" FLOOR_CLAIM
	".p2align 6\ndynprobe_floor_ret_least_tramp:\n"
	SLED_COMMON("dynprobe_floor_ret_least", SLED_CALL("dynprobe_floor_ret_least")) "	int3\n"
	".text\n");
FLOOR_ENTRY("dynprobe_floor_ret_least",
	    ENTRY_FRAME("dynprobe_floor_ret_least", LIGHT_CALL_TO("dynprobe_floor_ret_least_enter")));

/*
 * The function-graph tracer's floor on this host: what a traced call must cost before any
 * of dynprobe's own work, built as the tracer's path is (dynprobe_arch's ftrace.rs and
 * trampoline.rs, light: no vector register saved).
 *
 *   dynprobe_floor_rdtsc       one rdtsc before the work: the clock read each record pays
 *   dynprobe_floor_graph       the entry's `call` (an mcount site patched) to a stub that
 *                              pushes the function's id, the caller's nine registers saved
 *                              around the call of an entry dispatcher that reads the clock,
 *                              writes a 16-byte record into a ring (head kept in memory) and
 *                              diverts the return address; the return through a sled entry
 *                              and its `common` (nine registers) to an exit dispatcher that
 *                              reads the clock, writes a record and hands back the original
 *                              return address: two rdtsc, two ring records, one diverted
 *                              return, nothing else
 *   dynprobe_floor_graph_least dynprobe_floor_graph as a tracer of many threads with dynprobe's slots
 *                              must do it: each end finds the thread's slot and sets and
 *                              clears the guard, the records go to the thread's own head,
 *                              the entry pushes the call on the thread's stack of calls in
 *                              flight and the exit pops it
 *
 * The ring is 4096 records (64 KiB, mapped and warm: no page fault is in the floor); the
 * return address waits in one static slot: one thread at a time.
 */
__asm__(".text\n.globl dynprobe_floor_rdtsc\n.type dynprobe_floor_rdtsc,@function\n.p2align 4\n"
	"dynprobe_floor_rdtsc:\n	rdtsc\n" FLOOR_COPY FLOOR_REST ".size dynprobe_floor_rdtsc, .-dynprobe_floor_rdtsc\n");

/* A record into the floor's ring: the time (rdtsc) and ID_REG, at the head, which moves on. */
#define FLOOR_RECORD(id_reg)                                                                                         \
	"	rdtsc\n	shl $32,%rdx\n	or %rdx,%rax\n	mov dynprobe_floor_graph_head(%rip),%rcx\n"                      \
	"	mov %rcx,%rdx\n	and $4095,%rdx\n	shl $4,%rdx\n	add dynprobe_floor_graph_ring_base(%rip),%rdx\n"          \
	"	mov %rax,(%rdx)\n	movq " id_reg ",8(%rdx)\n	inc %rcx\n	mov %rcx,dynprobe_floor_graph_head(%rip)\n"
__asm__(".bss\n.p2align 6\ndynprobe_floor_graph_ring:\n	.zero 4096 * 16\n"
	".p2align 6\ndynprobe_floor_graph_head:\n	.zero 8\n"
	"dynprobe_floor_graph_slot:\n	.zero 8\n"
	".section .data.rel.local,\"aw\",@progbits\n.p2align 3\n"
	"dynprobe_floor_graph_ring_base:\n	.quad dynprobe_floor_graph_ring\n"
	".text\n.globl dynprobe_floor_graph\n.type dynprobe_floor_graph,@function\n.p2align 4\n"
	"dynprobe_floor_graph:\n	call dynprobe_floor_graph_stub\n" FLOOR_COPY FLOOR_REST
	".size dynprobe_floor_graph, .-dynprobe_floor_graph\n"
	".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 4\n"
	"dynprobe_floor_graph_stub:\n	push $7\n	jmp dynprobe_floor_graph_caller\n"
	".p2align 4\ndynprobe_floor_graph_caller:\n"
	"	push %rdi\n	push %rsi\n	push %rdx\n	push %rcx\n	push %rax\n	push %r8\n	push %r9\n	push %r10\n"
	"	push %r11\n	push %rbp\n	mov %rsp,%rbp\n	and $-64,%rsp\n	mov 80(%rbp),%rdi\n	lea 96(%rbp),%rsi\n"
	"	call dynprobe_floor_graph_enter\n	mov %rbp,%rsp\n	pop %rbp\n	pop %r11\n	pop %r10\n	pop %r9\n"
	"	pop %r8\n	pop %rax\n	pop %rcx\n	pop %rdx\n	pop %rsi\n	pop %rdi\n	lea 8(%rsp),%rsp\n	ret\n"
	".p2align 4\ndynprobe_floor_graph_enter:\n" FLOOR_RECORD("%rdi")
	"	mov (%rsi),%rcx\n	mov %rcx,dynprobe_floor_graph_slot(%rip)\n	lea dynprobe_floor_graph_tramp(%rip),%rcx\n"
	"	mov %rcx,(%rsi)\n	ret\n"
	".p2align 6\ndynprobe_floor_graph_tramp:\n"
	SLED_COMMON("dynprobe_floor_graph", SLED_CALL("dynprobe_floor_graph")) "	int3\n"
	".p2align 4\ndynprobe_floor_graph_dispatch:\n" FLOOR_RECORD("$7")
	"	mov dynprobe_floor_graph_slot(%rip),%rax\n	ret\n"
	".text\n");

/* floor-graph as a tracer of many threads must do it with dynprobe's thread slots, and no more: each end finds the
 * thread's slot (dynprobe_floor_least's), refuses a hit inside the tracer (the guard set and
 * cleared) and writes its record at the thread's own head (in the slot); the entry pushes
 * the original return address and the function's id on the thread's stack of calls in
 * flight (in the slot, four deep), the exit pops them. The slot's words: 32 the stack's
 * top, 40 the ring's head, 48 + 16 * i call i. */
#define FLOOR_SLOT_RECORD(id_reg)                                                                                    \
	"	rdtsc\n	shl $32,%rdx\n	or %rdx,%rax\n	mov 40(%r8),%rcx\n"                                             \
	"	mov %rcx,%rdx\n	and $4095,%rdx\n	shl $4,%rdx\n	add dynprobe_floor_graph_ring_base(%rip),%rdx\n"          \
	"	mov %rax,(%rdx)\n	mov " id_reg ",8(%rdx)\n	inc %rcx\n	mov %rcx,40(%r8)\n"
__asm__(".text\n.globl dynprobe_floor_graph_least\n.type dynprobe_floor_graph_least,@function\n.p2align 4\n"
	"dynprobe_floor_graph_least:\n	call dynprobe_floor_graph_least_stub\n" FLOOR_COPY FLOOR_REST
	".size dynprobe_floor_graph_least, .-dynprobe_floor_graph_least\n"
	".section .text.dynprobe_floor,\"ax\",@progbits\n.p2align 4\n"
	"dynprobe_floor_graph_least_stub:\n	push $7\n	jmp dynprobe_floor_graph_least_caller\n"
	".p2align 4\ndynprobe_floor_graph_least_caller:\n"
	"	push %rdi\n	push %rsi\n	push %rdx\n	push %rcx\n	push %rax\n	push %r8\n	push %r9\n	push %r10\n"
	"	push %r11\n	push %rbp\n	mov %rsp,%rbp\n	and $-64,%rsp\n	mov 80(%rbp),%rdi\n	lea 96(%rbp),%rsi\n"
	"	call dynprobe_floor_graph_least_enter\n	mov %rbp,%rsp\n	pop %rbp\n	pop %r11\n	pop %r10\n	pop %r9\n"
	"	pop %r8\n	pop %rax\n	pop %rcx\n	pop %rdx\n	pop %rsi\n	pop %rdi\n	lea 8(%rsp),%rsp\n	ret\n"
	".p2align 4\ndynprobe_floor_graph_least_enter:\n" FLOOR_SLOT
	"	cmpq $0,16(%rdx)\n	jne 2f\n	movq $1,16(%rdx)\n	mov %rdx,%r8\n	mov 32(%r8),%r9\n	cmp $4,%r9\n"
	"	jae 4f\n" FLOOR_SLOT_RECORD("%rdi") "	shl $4,%r9\n	mov (%rsi),%rax\n	mov %rax,48(%r8,%r9)\n"
	"	mov %rdi,56(%r8,%r9)\n	lea dynprobe_floor_graph_least_tramp(%rip),%rax\n	mov %rax,(%rsi)\n"
	"	incq 32(%r8)\n"
	"4:	movq $0,16(%r8)\n"
	"2:	ret\n" FLOOR_CLAIM
	".p2align 6\ndynprobe_floor_graph_least_tramp:\n"
	SLED_COMMON("dynprobe_floor_graph_least", SLED_CALL("dynprobe_floor_graph_least")) "	int3\n"
	".p2align 4\ndynprobe_floor_graph_least_dispatch:\n" FLOOR_SLOT
	"	mov %rdx,%r8\n	mov 16(%r8),%r10\n	movq $1,16(%r8)\n	decq 32(%r8)\n	mov 32(%r8),%r9\n	shl $4,%r9\n"
	"	test %r10,%r10\n	jne 2f\n	mov 56(%r8,%r9),%rdi\n" FLOOR_SLOT_RECORD("%rdi")
	"2:	mov 48(%r8,%r9),%rax\n	mov %r10,16(%r8)\n	ret\n" FLOOR_CLAIM
	".text\n");
