//! What a marker site compiles to: the `marker!` macro and the traits that turn its
//! arguments into register slots and argument kinds.
//!
//! The macro expands to a small generic function, instantiated once for the argument
//! types, whose inline assembly emits three things (the C header `dynprobe/marker.h` emits
//! the same three):
//!
//! ```text
//!   990: nopl 0x0(%rax,%rax,1)        the site: 0f 1f 44 00 00, one instruction
//!   dynprobe_markers   (allocated, retained): dynprobe's record — version, argument count,
//!                      size, site (pc-relative), kinds, provider, name
//!   .note.stapsdt      (not allocated): SystemTap's NT_STAPSDT note — pc, .stapsdt.base,
//!                      semaphore 0, provider, name, "-4@%edi 8@%rsi …"
//!   .stapsdt.base      one byte, once per module (comdat), for prelink adjustment
//! ```
//!
//! The arguments are inputs of the assembly in fixed registers (rdi, rsi, rdx, rcx, r8,
//! r9): at the NOP each value is where the record says. The register list is fixed per
//! number of arguments (two per argument, at most six), since a `&str` takes two; slots no
//! argument fills get zero, which costs a register-zeroing idiom, not an execution slot.
//! The argument types reach the assembly as `const` operands of the generic function:
//! the record's kind bytes, and `.if` chains that pick each slot's SDT operand text.

use super::ArgKind;

/// A value a marker can carry: integers, `bool`, `char`, raw pointers (one register
/// each), `&str` and `&[u8]` (two: pointer, length).
///
/// ```
/// use dynprobe::marker::{ArgKind, MarkerValue};
/// assert_eq!(<&str as MarkerValue>::KIND, ArgKind::Str);
/// assert_eq!((-1i32).into_slots(), [u64::MAX, 0]);
/// ```
pub trait MarkerValue {
    /// The kind the record states.
    const KIND: ArgKind;
    /// The register values: the value widened to 64 bits (sign-extended when signed), or
    /// pointer and length.
    fn into_slots(self) -> [u64; 2];
}

macro_rules! unsigned_values {
    ($($t:ty => $kind:ident),*) => {$(
        impl MarkerValue for $t {
            const KIND: ArgKind = ArgKind::$kind;
            #[inline(always)]
            fn into_slots(self) -> [u64; 2] {
                [self as u64, 0]
            }
        }
    )*};
}
unsigned_values!(u8 => U8, u16 => U16, u32 => U32, u64 => U64, usize => U64);

macro_rules! signed_values {
    ($($t:ty => $kind:ident),*) => {$(
        impl MarkerValue for $t {
            const KIND: ArgKind = ArgKind::$kind;
            #[inline(always)]
            fn into_slots(self) -> [u64; 2] {
                [self as i64 as u64, 0]
            }
        }
    )*};
}
signed_values!(i8 => I8, i16 => I16, i32 => I32, i64 => I64, isize => I64);

impl MarkerValue for bool {
    const KIND: ArgKind = ArgKind::Bool;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        [u64::from(self), 0]
    }
}

impl MarkerValue for char {
    const KIND: ArgKind = ArgKind::Char;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        [u64::from(self), 0]
    }
}

impl<T: ?Sized> MarkerValue for *const T {
    const KIND: ArgKind = ArgKind::Pointer;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        [self.cast::<u8>() as usize as u64, 0]
    }
}

impl<T: ?Sized> MarkerValue for *mut T {
    const KIND: ArgKind = ArgKind::Pointer;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        [self.cast::<u8>() as usize as u64, 0]
    }
}

impl MarkerValue for &str {
    const KIND: ArgKind = ArgKind::Str;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        [self.as_ptr() as usize as u64, self.len() as u64]
    }
}

impl MarkerValue for &String {
    const KIND: ArgKind = ArgKind::Str;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        self.as_str().into_slots()
    }
}

impl MarkerValue for &[u8] {
    const KIND: ArgKind = ArgKind::Bytes;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        [self.as_ptr() as usize as u64, self.len() as u64]
    }
}

impl<const N: usize> MarkerValue for &[u8; N] {
    const KIND: ArgKind = ArgKind::Bytes;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        self.as_slice().into_slots()
    }
}

impl MarkerValue for &Vec<u8> {
    const KIND: ArgKind = ArgKind::Bytes;
    #[inline(always)]
    fn into_slots(self) -> [u64; 2] {
        self.as_slice().into_slots()
    }
}

/// A marker's whole argument list: a tuple of up to six [`MarkerValue`]s. Its constants
/// are what the site's assembly is built from.
pub trait MarkerArgs {
    /// The record's kind bytes, 0 past the last argument.
    const KINDS: [u8; 6];
    /// How many arguments.
    const COUNT: u8;
    /// Per register slot, what the SDT note says of it: the size in bytes, plus 0x10 when
    /// signed; 0 for a slot no argument fills.
    const SLOT_DESC: [u8; 6];
    /// The register values, in slot order (rdi first).
    fn into_slots(self) -> [u64; 6];
}

/// [`MarkerArgs::SLOT_DESC`] from the kinds; fails the build when they need more than six
/// registers.
const fn slot_desc(kinds: [u8; 6]) -> [u8; 6] {
    let mut desc = [0u8; 6];
    let (mut arg, mut slot) = (0, 0);
    while arg < 6 && kinds[arg] != 0 {
        let two = kinds[arg] == ArgKind::Str as u8 || kinds[arg] == ArgKind::Bytes as u8;
        assert!(
            slot + if two { 2 } else { 1 } <= 6,
            "a marker's arguments take at most six registers (a &str or &[u8] takes two)"
        );
        let size = kinds[arg] & 0x0f;
        desc[slot] = if kinds[arg] >> 4 == 1 { size | 0x10 } else { size };
        if two {
            desc[slot + 1] = 8;
        }
        slot += if two { 2 } else { 1 };
        arg += 1;
    }
    desc
}

/// Puts one value's slots at `at` of `slots`; returns the next free slot.
#[inline(always)]
fn put<V: MarkerValue>(slots: &mut [u64; 6], at: usize, value: V) -> usize {
    let v = value.into_slots();
    slots[at] = v[0];
    if V::KIND.slots() == 2 {
        slots[at + 1] = v[1];
    }
    at + V::KIND.slots()
}

macro_rules! tuple_args {
    ($count:literal; $($v:ident),*) => {
        impl<$($v: MarkerValue),*> MarkerArgs for ($($v,)*) {
            const KINDS: [u8; 6] = {
                let given = [$($v::KIND as u8),*];
                let mut kinds = [0u8; 6];
                let mut i = 0;
                while i < given.len() {
                    kinds[i] = given[i];
                    i += 1;
                }
                kinds
            };
            const COUNT: u8 = $count;
            const SLOT_DESC: [u8; 6] = slot_desc(Self::KINDS);
            #[inline(always)]
            #[allow(non_snake_case, unused_mut, unused_variables, unused_assignments)]
            fn into_slots(self) -> [u64; 6] {
                // Fails the build, not the run, when the arguments need too many registers.
                let _checked = Self::SLOT_DESC;
                let ($($v,)*) = self;
                let mut slots = [0u64; 6];
                let mut at = 0;
                $(at = put(&mut slots, at, $v);)*
                slots
            }
        }
    };
}
tuple_args!(0;);
tuple_args!(1; A);
tuple_args!(2; A, B);
tuple_args!(3; A, B, C);
tuple_args!(4; A, B, C, D);
tuple_args!(5; A, B, C, D, E);
tuple_args!(6; A, B, C, D, E, F);

/// The SDT operand text of slot `$d` in register `$r64`/`$r32`/`$r16`/`$r8`, chosen by the
/// assembler from the slot's descriptor (`$sep` goes before it: a space past the first).
#[doc(hidden)]
#[macro_export]
macro_rules! __marker_sdt_slot {
    ($d:literal, $sep:literal, $r64:literal, $r32:literal, $r16:literal, $r8:literal) => {
        concat!(
            ".if ",
            $d,
            " == 8\n.ascii \"",
            $sep,
            "8@%",
            $r64,
            "\"\n",
            ".elseif ",
            $d,
            " == 4\n.ascii \"",
            $sep,
            "4@%",
            $r32,
            "\"\n",
            ".elseif ",
            $d,
            " == 2\n.ascii \"",
            $sep,
            "2@%",
            $r16,
            "\"\n",
            ".elseif ",
            $d,
            " == 1\n.ascii \"",
            $sep,
            "1@%",
            $r8,
            "\"\n",
            ".elseif ",
            $d,
            " == 0x18\n.ascii \"",
            $sep,
            "-8@%",
            $r64,
            "\"\n",
            ".elseif ",
            $d,
            " == 0x14\n.ascii \"",
            $sep,
            "-4@%",
            $r32,
            "\"\n",
            ".elseif ",
            $d,
            " == 0x12\n.ascii \"",
            $sep,
            "-2@%",
            $r16,
            "\"\n",
            ".elseif ",
            $d,
            " == 0x11\n.ascii \"",
            $sep,
            "-1@%",
            $r8,
            "\"\n",
            ".endif\n"
        )
    };
}

/// The site itself, given the register operands for the argument count.
#[doc(hidden)]
#[macro_export]
macro_rules! __marker_site {
    ($provider:ident, $name:ident, ($($arg:expr),*), [$($reg:tt => $slot:tt),*]) => {{
        #[inline(always)]
        fn __dynprobe_marker<A: $crate::marker::MarkerArgs>(args: A) {
            let slots = <A as $crate::marker::MarkerArgs>::into_slots(args);
            // SAFETY: the assembly is one NOP at run time; everything else it emits is
            // data in other sections. It reads no memory the compiler does not know of,
            // writes none, leaves every register and the flags as they were, and touches
            // no stack (a probe placed on the NOP steps over the red zone itself).
            unsafe {
                ::core::arch::asm!(
                    "990: .byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                    ".pushsection dynprobe_markers, \"aR\", @progbits",
                    ".balign 4",
                    "997: .byte 1, {count}",
                    ".2byte 998f - 997b",
                    ".4byte 990b - .",
                    ".byte {k0}, {k1}, {k2}, {k3}, {k4}, {k5}",
                    concat!(".asciz \"", stringify!($provider), "\""),
                    concat!(".asciz \"", stringify!($name), "\""),
                    ".balign 4",
                    "998:",
                    ".popsection",
                    ".pushsection .note.stapsdt, \"\", \"note\"",
                    ".balign 4",
                    ".4byte 992f - 991f, 994f - 993f, 3",
                    "991: .asciz \"stapsdt\"",
                    "992: .balign 4",
                    "993: .8byte 990b",
                    ".8byte _.stapsdt.base",
                    ".8byte 0",
                    concat!(".asciz \"", stringify!($provider), "\""),
                    concat!(".asciz \"", stringify!($name), "\""),
                    $crate::__marker_sdt_slot!("{d0}", "", "rdi", "edi", "di", "dil"),
                    $crate::__marker_sdt_slot!("{d1}", " ", "rsi", "esi", "si", "sil"),
                    $crate::__marker_sdt_slot!("{d2}", " ", "rdx", "edx", "dx", "dl"),
                    $crate::__marker_sdt_slot!("{d3}", " ", "rcx", "ecx", "cx", "cl"),
                    $crate::__marker_sdt_slot!("{d4}", " ", "r8", "r8d", "r8w", "r8b"),
                    $crate::__marker_sdt_slot!("{d5}", " ", "r9", "r9d", "r9w", "r9b"),
                    ".byte 0",
                    "994: .balign 4",
                    ".popsection",
                    ".ifndef _.stapsdt.base",
                    ".pushsection .stapsdt.base, \"aGR\", @progbits, .stapsdt.base, comdat",
                    ".weak _.stapsdt.base",
                    ".hidden _.stapsdt.base",
                    "_.stapsdt.base: .space 1",
                    ".size _.stapsdt.base, 1",
                    ".popsection",
                    ".endif",
                    count = const <A as $crate::marker::MarkerArgs>::COUNT,
                    k0 = const <A as $crate::marker::MarkerArgs>::KINDS[0],
                    k1 = const <A as $crate::marker::MarkerArgs>::KINDS[1],
                    k2 = const <A as $crate::marker::MarkerArgs>::KINDS[2],
                    k3 = const <A as $crate::marker::MarkerArgs>::KINDS[3],
                    k4 = const <A as $crate::marker::MarkerArgs>::KINDS[4],
                    k5 = const <A as $crate::marker::MarkerArgs>::KINDS[5],
                    d0 = const <A as $crate::marker::MarkerArgs>::SLOT_DESC[0],
                    d1 = const <A as $crate::marker::MarkerArgs>::SLOT_DESC[1],
                    d2 = const <A as $crate::marker::MarkerArgs>::SLOT_DESC[2],
                    d3 = const <A as $crate::marker::MarkerArgs>::SLOT_DESC[3],
                    d4 = const <A as $crate::marker::MarkerArgs>::SLOT_DESC[4],
                    d5 = const <A as $crate::marker::MarkerArgs>::SLOT_DESC[5],
                    $(in($reg) slots[$slot],)*
                    options(readonly, nostack, preserves_flags)
                );
            }
        }
        __dynprobe_marker(($($arg,)*))
    }};
}

/// A static marker: one 5-byte NOP in the code, which dynprobe (and perf, bpftrace,
/// SystemTap, gdb — it is also an SDT/USDT probe) can turn into a call of a handler while
/// someone listens. Disabled, it costs the NOP and the moves of its arguments into
/// registers.
///
/// `marker!(provider, name, args…)`: `provider` and `name` are identifiers; up to six
/// arguments of any [`MarkerValue`] type — integers, `bool`, `char`, raw pointers, and
/// `&str`/`&[u8]`, which take two of the six registers (pointer and length).
///
/// ```
/// fn serve(request_id: u64, path: &str, status: i32) {
///     dynprobe::marker!(myserver, request_done, request_id, path, status);
/// }
/// serve(7, "/index.html", 200);
///
/// // Another part of the program (or `dynprobe list-markers`, perf, bpftrace) finds it:
/// let sites = dynprobe::markers()?;
/// let site = sites.iter().find(|s| s.spec() == "myserver:request_done").unwrap();
/// let kinds: Vec<String> = site.args.iter().map(|a| a.kind.to_string()).collect();
/// assert_eq!(kinds, ["u64", "&str", "i32"]);
/// # Ok::<(), dynprobe::marker::MarkerError>(())
/// ```
#[macro_export]
macro_rules! marker {
    ($provider:ident, $name:ident $(,)?) => {
        $crate::__marker_site!($provider, $name, (), [])
    };
    ($provider:ident, $name:ident, $a:expr $(,)?) => {
        $crate::__marker_site!($provider, $name, ($a), ["rdi" => 0, "rsi" => 1])
    };
    ($provider:ident, $name:ident, $a:expr, $b:expr $(,)?) => {
        $crate::__marker_site!($provider, $name, ($a, $b), ["rdi" => 0, "rsi" => 1, "rdx" => 2, "rcx" => 3])
    };
    ($provider:ident, $name:ident, $a:expr, $b:expr, $c:expr $(,)?) => {
        $crate::__marker_site!(
            $provider, $name, ($a, $b, $c),
            ["rdi" => 0, "rsi" => 1, "rdx" => 2, "rcx" => 3, "r8" => 4, "r9" => 5]
        )
    };
    ($provider:ident, $name:ident, $a:expr, $b:expr, $c:expr, $d:expr $(,)?) => {
        $crate::__marker_site!(
            $provider, $name, ($a, $b, $c, $d),
            ["rdi" => 0, "rsi" => 1, "rdx" => 2, "rcx" => 3, "r8" => 4, "r9" => 5]
        )
    };
    ($provider:ident, $name:ident, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr $(,)?) => {
        $crate::__marker_site!(
            $provider, $name, ($a, $b, $c, $d, $e),
            ["rdi" => 0, "rsi" => 1, "rdx" => 2, "rcx" => 3, "r8" => 4, "r9" => 5]
        )
    };
    ($provider:ident, $name:ident, $a:expr, $b:expr, $c:expr, $d:expr, $e:expr, $f:expr $(,)?) => {
        $crate::__marker_site!(
            $provider, $name, ($a, $b, $c, $d, $e, $f),
            ["rdi" => 0, "rsi" => 1, "rdx" => 2, "rcx" => 3, "r8" => 4, "r9" => 5]
        )
    };
}
