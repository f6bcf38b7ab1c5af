/*
 * A program whose seccomp(2) filter answers madvise(2) with SIGSYS (SECCOMP_RET_TRAP) — a
 * sandbox that never expects the call — then makes traced calls enough to fill many pages
 * of a tracer's ring. Its SIGSYS handler counts the trapped calls and makes each fail with
 * EPERM: a tracer making system calls on the program's thread shows as a count above 0.
 *
 *   seccomp_madvise N   ->  "sum S\nsigsys K\n"
 */
#define _GNU_SOURCE /* REG_RAX */
#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static volatile sig_atomic_t trapped;

static void on_sigsys(int sig, siginfo_t *info, void *context)
{
	(void)sig;
	(void)info;
	ucontext_t *uc = context;
	trapped++;
	uc->uc_mcontext.gregs[REG_RAX] = -EPERM;
}

__attribute__((noinline)) long step(long x)
{
	return x * 3 + 1;
}

int main(int argc, char **argv)
{
	long n = argc > 1 ? atol(argv[1]) : 1000;
	struct sigaction sa;
	memset(&sa, 0, sizeof sa);
	sa.sa_sigaction = on_sigsys;
	sa.sa_flags = SA_SIGINFO;
	sigaction(SIGSYS, &sa, NULL);
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_madvise, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof filter / sizeof filter[0], .filter = filter };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog) != 0) {
		perror("seccomp");
		return 2;
	}
	long sum = 0;
	for (long i = 0; i < n; i++)
		sum += step(i);
	printf("sum %ld\nsigsys %d\n", sum, (int)trapped);
	return 0;
}
