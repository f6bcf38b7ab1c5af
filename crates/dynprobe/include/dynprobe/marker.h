/*
 * dynprobe/marker.h — static markers for C and C++: one 5-byte NOP in the hot path,
 * turned into a call of a handler only while someone listens.
 *
 *     #include <dynprobe/marker.h>
 *
 *     void serve(int id, const char *path) {
 *         DYNPROBE_MARKER(myserver, request, id, path);
 *         ...
 *     }
 *
 * DYNPROBE_MARKER(provider, name, args...) takes up to six integer or pointer arguments
 * (a `char *` is shown as a C string). Each site is the NOP `0f 1f 44 00 00` with the
 * arguments forced into the SysV argument registers (rdi, rsi, rdx, rcx, r8, r9), plus:
 *
 *   - a record in the section `dynprobe_markers` (version, argument count, size, the site
 *     pc-relative, argument kinds, provider, name): the layout the Rust macro
 *     `dynprobe::marker!` emits and dynprobe-symbols reads, with exact argument types;
 *   - a SystemTap SDT note in `.note.stapsdt` (NT_STAPSDT, owner "stapsdt": pc,
 *     `.stapsdt.base`, semaphore 0, provider, name, "-4@%edi 8@%rsi …") and the one-byte
 *     `.stapsdt.base` section, exactly as <sys/sdt.h> emits them, so `readelf -n`, perf,
 *     bpftrace and gdb see the marker as a USDT probe.
 *
 * `dynprobe list-markers PROG` lists the sites; `dynprobe::Marker::attach` (in-process)
 * turns them into jumps to a handler. Disabled, a marker costs the NOP and the moves of its
 * arguments into registers.
 *
 * Arguments are evaluated once, before the NOP. A pointer's target is not forced to
 * memory before the marker (as with <sys/sdt.h>): pass data that is already there.
 * Needs GCC or Clang on x86-64, and binutils 2.36 or later (the section flag `R` keeps the
 * records from `--gc-sections`).
 */
#ifndef DYNPROBE_MARKER_H
#define DYNPROBE_MARKER_H

#if !defined(__x86_64__)
#error "dynprobe/marker.h: markers are implemented for x86-64 only"
#endif

/* Argument kinds, as records hold them: low nibble the size in bytes, high nibble the class
 * (0 unsigned, 1 signed, 2 bool, 3 pointer, 6 C string). The same codes as
 * dynprobe_symbols::ArgKind. */
#define DYNPROBE_KIND_U8 0x01
#define DYNPROBE_KIND_U16 0x02
#define DYNPROBE_KIND_U32 0x04
#define DYNPROBE_KIND_U64 0x08
#define DYNPROBE_KIND_I8 0x11
#define DYNPROBE_KIND_I16 0x12
#define DYNPROBE_KIND_I32 0x14
#define DYNPROBE_KIND_I64 0x18
#define DYNPROBE_KIND_BOOL 0x21
#define DYNPROBE_KIND_POINTER 0x38
#define DYNPROBE_KIND_CSTR 0x68

#ifdef __cplusplus
#include <type_traits>

template <typename T>
struct dynprobe_marker_kind {
	static_assert(std::is_integral<T>::value || std::is_enum<T>::value || std::is_pointer<T>::value ||
			      std::is_null_pointer<T>::value,
		      "a marker argument is an integer, an enum or a pointer");
	static const unsigned char value =
		std::is_pointer<T>::value || std::is_null_pointer<T>::value ? DYNPROBE_KIND_POINTER
		: std::is_same<T, bool>::value                              ? DYNPROBE_KIND_BOOL
		: (unsigned char)((std::is_signed<T>::value ? 0x10 : 0) | sizeof(T));
};
template <>
struct dynprobe_marker_kind<char *> {
	static const unsigned char value = DYNPROBE_KIND_CSTR;
};
template <>
struct dynprobe_marker_kind<const char *> {
	static const unsigned char value = DYNPROBE_KIND_CSTR;
};
#define _DYNPROBE_KIND(x) (dynprobe_marker_kind<typename std::decay<decltype(x)>::type>::value)
#else
/* `default` takes every other pointer; a float or a struct fails to compile further on. */
#define _DYNPROBE_KIND(x)                                                                              \
	_Generic((x), _Bool: DYNPROBE_KIND_BOOL, char: DYNPROBE_KIND_I8, signed char: DYNPROBE_KIND_I8,  \
		 unsigned char: DYNPROBE_KIND_U8, short: DYNPROBE_KIND_I16,                              \
		 unsigned short: DYNPROBE_KIND_U16, int: DYNPROBE_KIND_I32,                              \
		 unsigned int: DYNPROBE_KIND_U32, long: DYNPROBE_KIND_I64,                               \
		 unsigned long: DYNPROBE_KIND_U64, long long: DYNPROBE_KIND_I64,                         \
		 unsigned long long: DYNPROBE_KIND_U64, char *: DYNPROBE_KIND_CSTR,                      \
		 const char *: DYNPROBE_KIND_CSTR, float: "not a marker argument",                      \
		 double: "not a marker argument", default: DYNPROBE_KIND_POINTER)
#endif

/* What the SDT note says of a slot: the size, plus 0x10 when signed. */
#define _DYNPROBE_DESC(k) ((((k) >> 4) == 1) ? (k) : ((k) & 0x0f))

/* The SDT operand text of one slot, chosen by the assembler from its descriptor `d`. */
#define _DYNPROBE_SDT_SLOT(d, sep, r64, r32, r16, r8)                                            \
	".if " d " == 8\n.ascii \"" sep "8@%%" r64 "\"\n"                                          \
	".elseif " d " == 4\n.ascii \"" sep "4@%%" r32 "\"\n"                                      \
	".elseif " d " == 2\n.ascii \"" sep "2@%%" r16 "\"\n"                                      \
	".elseif " d " == 1\n.ascii \"" sep "1@%%" r8 "\"\n"                                       \
	".elseif " d " == 0x18\n.ascii \"" sep "-8@%%" r64 "\"\n"                                  \
	".elseif " d " == 0x14\n.ascii \"" sep "-4@%%" r32 "\"\n"                                  \
	".elseif " d " == 0x12\n.ascii \"" sep "-2@%%" r16 "\"\n"                                  \
	".elseif " d " == 0x11\n.ascii \"" sep "-1@%%" r8 "\"\n"                                   \
	".endif\n"

/* The site: the NOP, the record, the note. `q0`..`q5` are the kinds (0 for no argument), the
 * trailing arguments the register operands. */
#define _DYNPROBE_ASM(provider, name, n_, q0, q1, q2, q3, q4, q5, ...)                          \
	__asm__ __volatile__(                                                                      \
		"990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00\n"                                        \
		".pushsection dynprobe_markers, \"aR?\", @progbits\n"                              \
		".balign 4\n"                                                                      \
		"997: .byte 1, %c[count]\n"                                                        \
		".2byte 998f - 997b\n"                                                             \
		".4byte 990b - .\n"                                                                \
		".byte %c[k0], %c[k1], %c[k2], %c[k3], %c[k4], %c[k5]\n"                           \
		".asciz \"" #provider "\"\n"                                                       \
		".asciz \"" #name "\"\n"                                                           \
		".balign 4\n"                                                                      \
		"998:\n"                                                                           \
		".popsection\n"                                                                    \
		".pushsection .note.stapsdt, \"?\", \"note\"\n"                                    \
		".balign 4\n"                                                                      \
		".4byte 992f - 991f, 994f - 993f, 3\n"                                             \
		"991: .asciz \"stapsdt\"\n"                                                        \
		"992: .balign 4\n"                                                                 \
		"993: .8byte 990b\n"                                                               \
		".8byte _.stapsdt.base\n"                                                          \
		".8byte 0\n"                                                                       \
		".asciz \"" #provider "\"\n"                                                       \
		".asciz \"" #name "\"\n"                                                           \
		_DYNPROBE_SDT_SLOT("%c[d0]", "", "rdi", "edi", "di", "dil")                        \
		_DYNPROBE_SDT_SLOT("%c[d1]", " ", "rsi", "esi", "si", "sil")                       \
		_DYNPROBE_SDT_SLOT("%c[d2]", " ", "rdx", "edx", "dx", "dl")                        \
		_DYNPROBE_SDT_SLOT("%c[d3]", " ", "rcx", "ecx", "cx", "cl")                        \
		_DYNPROBE_SDT_SLOT("%c[d4]", " ", "r8", "r8d", "r8w", "r8b")                       \
		_DYNPROBE_SDT_SLOT("%c[d5]", " ", "r9", "r9d", "r9w", "r9b")                       \
		".byte 0\n"                                                                        \
		"994: .balign 4\n"                                                                 \
		".popsection\n"                                                                    \
		".ifndef _.stapsdt.base\n"                                                         \
		".pushsection .stapsdt.base, \"aG\", @progbits, .stapsdt.base, comdat\n"           \
		".weak _.stapsdt.base\n"                                                           \
		".hidden _.stapsdt.base\n"                                                         \
		"_.stapsdt.base: .space 1\n"                                                       \
		".size _.stapsdt.base, 1\n"                                                        \
		".popsection\n"                                                                    \
		".endif\n"                                                                         \
		:                                                                                  \
		: [count] "n"(n_), [k0] "n"(q0), [k1] "n"(q1), [k2] "n"(q2), [k3] "n"(q3),           \
		  [k4] "n"(q4), [k5] "n"(q5), [d0] "n"(_DYNPROBE_DESC(q0)),                        \
		  [d1] "n"(_DYNPROBE_DESC(q1)), [d2] "n"(_DYNPROBE_DESC(q2)),                      \
		  [d3] "n"(_DYNPROBE_DESC(q3)), [d4] "n"(_DYNPROBE_DESC(q4)),                      \
		  [d5] "n"(_DYNPROBE_DESC(q5)), ##__VA_ARGS__)

/* Arguments are evaluated into ordinary temporaries first: a call made while evaluating one
 * could clobber an argument register already loaded. */
#define _DYNPROBE_VAL(i, x) unsigned long _dynprobe_v##i = (unsigned long)(x)
#define _DYNPROBE_REG(i, r) register unsigned long _dynprobe_r##i __asm__(r) = _dynprobe_v##i

#define _DYNPROBE_MARKER0(p, n) _DYNPROBE_ASM(p, n, 0, 0, 0, 0, 0, 0, 0)
#define _DYNPROBE_MARKER1(p, n, a)                                                                 \
	do {                                                                                       \
		_DYNPROBE_VAL(0, a);                                                               \
		_DYNPROBE_REG(0, "rdi");                                                           \
		_DYNPROBE_ASM(p, n, 1, _DYNPROBE_KIND(a), 0, 0, 0, 0, 0, "r"(_dynprobe_r0));       \
	} while (0)
#define _DYNPROBE_MARKER2(p, n, a, b)                                                              \
	do {                                                                                       \
		_DYNPROBE_VAL(0, a);                                                               \
		_DYNPROBE_VAL(1, b);                                                               \
		_DYNPROBE_REG(0, "rdi");                                                           \
		_DYNPROBE_REG(1, "rsi");                                                           \
		_DYNPROBE_ASM(p, n, 2, _DYNPROBE_KIND(a), _DYNPROBE_KIND(b), 0, 0, 0, 0,           \
			      "r"(_dynprobe_r0), "r"(_dynprobe_r1));                               \
	} while (0)
#define _DYNPROBE_MARKER3(p, n, a, b, c)                                                           \
	do {                                                                                       \
		_DYNPROBE_VAL(0, a);                                                               \
		_DYNPROBE_VAL(1, b);                                                               \
		_DYNPROBE_VAL(2, c);                                                               \
		_DYNPROBE_REG(0, "rdi");                                                           \
		_DYNPROBE_REG(1, "rsi");                                                           \
		_DYNPROBE_REG(2, "rdx");                                                           \
		_DYNPROBE_ASM(p, n, 3, _DYNPROBE_KIND(a), _DYNPROBE_KIND(b), _DYNPROBE_KIND(c), 0, \
			      0, 0, "r"(_dynprobe_r0), "r"(_dynprobe_r1), "r"(_dynprobe_r2));      \
	} while (0)
#define _DYNPROBE_MARKER4(p, n, a, b, c, d)                                                        \
	do {                                                                                       \
		_DYNPROBE_VAL(0, a);                                                               \
		_DYNPROBE_VAL(1, b);                                                               \
		_DYNPROBE_VAL(2, c);                                                               \
		_DYNPROBE_VAL(3, d);                                                               \
		_DYNPROBE_REG(0, "rdi");                                                           \
		_DYNPROBE_REG(1, "rsi");                                                           \
		_DYNPROBE_REG(2, "rdx");                                                           \
		_DYNPROBE_REG(3, "rcx");                                                           \
		_DYNPROBE_ASM(p, n, 4, _DYNPROBE_KIND(a), _DYNPROBE_KIND(b), _DYNPROBE_KIND(c),    \
			      _DYNPROBE_KIND(d), 0, 0, "r"(_dynprobe_r0), "r"(_dynprobe_r1),       \
			      "r"(_dynprobe_r2), "r"(_dynprobe_r3));                               \
	} while (0)
#define _DYNPROBE_MARKER5(p, n, a, b, c, d, e)                                                     \
	do {                                                                                       \
		_DYNPROBE_VAL(0, a);                                                               \
		_DYNPROBE_VAL(1, b);                                                               \
		_DYNPROBE_VAL(2, c);                                                               \
		_DYNPROBE_VAL(3, d);                                                               \
		_DYNPROBE_VAL(4, e);                                                               \
		_DYNPROBE_REG(0, "rdi");                                                           \
		_DYNPROBE_REG(1, "rsi");                                                           \
		_DYNPROBE_REG(2, "rdx");                                                           \
		_DYNPROBE_REG(3, "rcx");                                                           \
		_DYNPROBE_REG(4, "r8");                                                            \
		_DYNPROBE_ASM(p, n, 5, _DYNPROBE_KIND(a), _DYNPROBE_KIND(b), _DYNPROBE_KIND(c),    \
			      _DYNPROBE_KIND(d), _DYNPROBE_KIND(e), 0, "r"(_dynprobe_r0),          \
			      "r"(_dynprobe_r1), "r"(_dynprobe_r2), "r"(_dynprobe_r3),             \
			      "r"(_dynprobe_r4));                                                  \
	} while (0)
#define _DYNPROBE_MARKER6(p, n, a, b, c, d, e, f)                                                  \
	do {                                                                                       \
		_DYNPROBE_VAL(0, a);                                                               \
		_DYNPROBE_VAL(1, b);                                                               \
		_DYNPROBE_VAL(2, c);                                                               \
		_DYNPROBE_VAL(3, d);                                                               \
		_DYNPROBE_VAL(4, e);                                                               \
		_DYNPROBE_VAL(5, f);                                                               \
		_DYNPROBE_REG(0, "rdi");                                                           \
		_DYNPROBE_REG(1, "rsi");                                                           \
		_DYNPROBE_REG(2, "rdx");                                                           \
		_DYNPROBE_REG(3, "rcx");                                                           \
		_DYNPROBE_REG(4, "r8");                                                            \
		_DYNPROBE_REG(5, "r9");                                                            \
		_DYNPROBE_ASM(p, n, 6, _DYNPROBE_KIND(a), _DYNPROBE_KIND(b), _DYNPROBE_KIND(c),    \
			      _DYNPROBE_KIND(d), _DYNPROBE_KIND(e), _DYNPROBE_KIND(f),             \
			      "r"(_dynprobe_r0), "r"(_dynprobe_r1), "r"(_dynprobe_r2),             \
			      "r"(_dynprobe_r3), "r"(_dynprobe_r4), "r"(_dynprobe_r5));            \
	} while (0)

#define _DYNPROBE_CAT(a, b) _DYNPROBE_CAT_(a, b)
#define _DYNPROBE_CAT_(a, b) a##b
#define _DYNPROBE_NARG(...) _DYNPROBE_NARG_(_, ##__VA_ARGS__, 6, 5, 4, 3, 2, 1, 0)
#define _DYNPROBE_NARG_(_, a, b, c, d, e, f, n, ...) n

/* A marker `provider:name` with up to six integer or pointer arguments; `provider` and `name`
 * are identifiers. */
#define DYNPROBE_MARKER(provider, name, ...)                                                       \
	_DYNPROBE_CAT(_DYNPROBE_MARKER, _DYNPROBE_NARG(__VA_ARGS__))(provider, name, ##__VA_ARGS__)

#endif /* DYNPROBE_MARKER_H */
