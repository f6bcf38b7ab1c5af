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
