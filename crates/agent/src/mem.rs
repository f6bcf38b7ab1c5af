//! The agent's own `memcpy`, `memmove`, `memset`, `memcmp`, `bcmp` and `strlen`.
//!
//! The compiler turns copies, fills and comparisons into calls of these C functions, in
//! dynprobe's code and in the standard library alike, and so do the trap path, the detours'
//! handlers and the event writers. Were those calls the C library's, a probe on libc's
//! `memcpy` would fire inside dynprobe's own handlers (a miss at best; a breakpoint hit
//! while the stop signal's handler blocks every signal makes the kernel kill the process),
//! and such probes would have to be refused. Defined here, `.hidden` and global, every
//! reference in the agent library binds to them when the library is linked (ld(1): a
//! hidden symbol is resolved inside its component and not exported), so no call from the
//! agent reaches the program's C library for them, and the C library's are free to probe.
//! The probe registry checks that fact at run time (`libc::memcpy as usize` lies in the
//! agent) instead of trusting this file.
//!
//! Written in assembly: a Rust loop could be recognised by LLVM as a copy and compiled into
//! a call of `memcpy` — itself. `rep movsb`/`rep stosb` are the copies and fills the Intel
//! optimization manual recommends where "enhanced REP MOVSB/STOSB" (`erms`) is present
//! (Intel® 64 and IA-32 Architectures Optimization Reference Manual, 3.7.6); the System V
//! ABI (x86-64 psABI §3.2.1) guarantees the direction flag is clear on every call, and
//! the kernel clears it for a signal handler, so the one backwards copy sets and clears
//! it itself.

// Each function: SysV arguments rdi, rsi, rdx; result in rax; clobbers only rcx, r8 (and
// flags), which the ABI leaves to the callee.
std::arch::global_asm!(
    ".pushsection .text.dynprobe_mem,\"ax\",@progbits",
    // void *memcpy(void *dst, const void *src, size_t n)
    ".globl memcpy",
    ".hidden memcpy",
    ".type memcpy,@function",
    ".p2align 4",
    "memcpy:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    rep movsb",
    "    ret",
    ".size memcpy, .-memcpy",
    // void *memmove(void *dst, const void *src, size_t n): forwards unless dst lies
    // inside [src, src + n), where a forward copy would overwrite bytes not yet read.
    ".globl memmove",
    ".hidden memmove",
    ".type memmove,@function",
    ".p2align 4",
    "memmove:",
    "    mov rax, rdi",
    "    mov rcx, rdx",
    "    mov r8, rdi",
    "    sub r8, rsi",
    "    cmp r8, rdx",
    "    jae 2f",
    "    lea rsi, [rsi + rdx - 1]",
    "    lea rdi, [rdi + rdx - 1]",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    "2:  rep movsb",
    "    ret",
    ".size memmove, .-memmove",
    // void *memset(void *dst, int c, size_t n)
    ".globl memset",
    ".hidden memset",
    ".type memset,@function",
    ".p2align 4",
    "memset:",
    "    mov r8, rdi",
    "    mov eax, esi",
    "    mov rcx, rdx",
    "    rep stosb",
    "    mov rax, r8",
    "    ret",
    ".size memset, .-memset",
    // int memcmp(const void *a, const void *b, size_t n), and bcmp (any non-zero result
    // for a difference will do for it): the difference of the first unequal bytes, as
    // unsigned char.
    ".globl memcmp",
    ".hidden memcmp",
    ".type memcmp,@function",
    ".globl bcmp",
    ".hidden bcmp",
    ".type bcmp,@function",
    ".p2align 4",
    "memcmp:",
    "bcmp:",
    "    xor eax, eax",
    "    xor ecx, ecx",
    "3:  cmp rcx, rdx",
    "    jae 4f",
    "    movzx eax, byte ptr [rdi + rcx]",
    "    movzx r8d, byte ptr [rsi + rcx]",
    "    inc rcx",
    "    sub eax, r8d",
    "    jz 3b",
    "4:  ret",
    ".size memcmp, .-memcmp",
    ".size bcmp, .-bcmp",
    // size_t strlen(const char *s)
    ".globl strlen",
    ".hidden strlen",
    ".type strlen,@function",
    ".p2align 4",
    "strlen:",
    "    mov rax, rdi",
    "5:  cmp byte ptr [rax], 0",
    "    je 6f",
    "    inc rax",
    "    jmp 5b",
    "6:  sub rax, rdi",
    "    ret",
    ".size strlen, .-strlen",
    ".popsection",
);

#[cfg(test)]
mod tests {
    // These resolve to the definitions above: the test binary links this crate too.
    extern "C" {
        fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
        fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8;
        fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8;
        fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32;
        fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32;
        fn strlen(s: *const u8) -> usize;
    }

    #[test]
    fn copies_fills_and_compares_like_the_c_library() {
        let src: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        for n in [0usize, 1, 7, 64, 1000] {
            let mut dst = vec![0xaau8; 1000];
            // SAFETY: both buffers hold at least `n` bytes and do not overlap.
            let r = unsafe { memcpy(dst.as_mut_ptr(), src.as_ptr(), n) };
            assert_eq!(r, dst.as_mut_ptr());
            assert_eq!(&dst[..n], &src[..n]);
            assert!(dst[n..].iter().all(|&b| b == 0xaa));
            // SAFETY: `dst` holds 1000 bytes.
            let r = unsafe { memset(dst.as_mut_ptr(), 0x1ff, n) };
            assert_eq!(r, dst.as_mut_ptr());
            assert!(dst[..n].iter().all(|&b| b == 0xff), "the fill is the low byte of c");
        }
        // Overlapping moves, both ways, against Vec::copy_within.
        for (from, to) in [(0usize, 10usize), (10, 0), (5, 5), (0, 1), (1, 0)] {
            let mut a = src.clone();
            let mut b = src.clone();
            // SAFETY: both ranges lie inside `a`'s 1000 bytes.
            let r = unsafe { memmove(a.as_mut_ptr().add(to), a.as_ptr().add(from), 900) };
            assert_eq!(r, a[to..].as_mut_ptr());
            b.copy_within(from..from + 900, to);
            assert_eq!(a, b, "memmove {from} -> {to}");
        }
        let x = c"abcdef";
        let y = c"abcxef";
        // Through a pointer: an optimizing build expands a call of `memcmp` inline (LLVM's
        // ExpandMemCmp, which returns the C standard's sign only) instead of calling ours.
        let memcmp = std::hint::black_box(memcmp as unsafe extern "C" fn(*const u8, *const u8, usize) -> i32);
        // SAFETY: each string holds 7 bytes, NUL-terminated.
        unsafe {
            assert_eq!(memcmp(x.as_ptr().cast(), y.as_ptr().cast(), 3), 0);
            assert_eq!(memcmp(x.as_ptr().cast(), y.as_ptr().cast(), 0), 0);
            assert_eq!(memcmp(x.as_ptr().cast(), y.as_ptr().cast(), 6), i32::from(b'd') - i32::from(b'x'));
            assert!(memcmp(y.as_ptr().cast(), x.as_ptr().cast(), 6) > 0);
            assert_ne!(bcmp(x.as_ptr().cast(), y.as_ptr().cast(), 6), 0);
            assert_eq!(bcmp(x.as_ptr().cast(), x.as_ptr().cast(), 7), 0);
            // Bytes compare unsigned.
            assert!(memcmp([0x80u8].as_ptr(), [0x7fu8].as_ptr(), 1) > 0);
            assert_eq!(strlen(x.as_ptr().cast()), 6);
            assert_eq!(strlen(c"".as_ptr().cast()), 0);
        }
    }
}
