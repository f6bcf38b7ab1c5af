/*
 * A program sandboxed by a seccomp(2) filter on one system call, as a systemd unit's
 * SystemCallFilter= or a browser's renderer is: every thread (SECCOMP_FILTER_FLAG_TSYNC)
 * is killed (SECCOMP_RET_KILL_PROCESS) or gets EPERM or ENOSYS (SECCOMP_RET_ERRNO) when
 * it makes that call. It speaks the worker's protocol on stdin/stdout (the tests'
 * attached.rs).
 *
 *   sandboxed NR:kill|NR:eperm|NR:enosys  ->  "ready PID"; "go" -> "sum S"; "quit" ends it
 */
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((noinline)) long step(long x)
{
	return x * 3 + 1;
}

int main(int argc, char **argv)
{
	if (argc < 2 || !strchr(argv[1], ':')) {
		fprintf(stderr, "usage: sandboxed NR:kill|NR:eperm|NR:enosys\n");
		return 2;
	}
	unsigned nr = (unsigned)atoi(argv[1]);
	const char *how = strchr(argv[1], ':') + 1;
	unsigned action = strcmp(how, "kill") == 0    ? SECCOMP_RET_KILL_PROCESS
			  : strcmp(how, "enosys") == 0 ? SECCOMP_RET_ERRNO | ENOSYS
						       : SECCOMP_RET_ERRNO | EPERM;
	struct sock_filter filter[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, nr, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, action),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	struct sock_fprog prog = { .len = sizeof filter / sizeof filter[0], .filter = filter };
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 ||
	    syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog) != 0) {
		perror("seccomp");
		return 2;
	}
	printf("ready %d\n", getpid());
	fflush(stdout);
	char line[64];
	while (fgets(line, sizeof line, stdin)) {
		if (strncmp(line, "quit", 4) == 0)
			return 0;
		long sum = 0;
		for (long i = 0; i < 1000; i++)
			sum += step(i);
		printf("sum %ld\n", sum);
		fflush(stdout);
	}
	return 0;
}
