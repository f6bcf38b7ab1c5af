//! The event line writer: formats one line into a fixed buffer on the stack.
//!
//! It runs inside the probe handler, that is inside a `SIGTRAP` handler of whatever thread
//! hit the probe, possibly in the middle of `malloc`: so it neither allocates nor uses
//! `core::fmt` (whose machinery may, through `Display` impls), only copies bytes.

use dynprobe::spec::{FetchType, Format};

/// The longest line. Pipe writes of at most `PIPE_BUF` (4096) bytes are atomic, so one
/// `write` of a whole line never interleaves with another thread's.
pub const LINE_MAX: usize = 512;

/// Text of at most `N - 1` bytes being written (the last byte is kept for a final `\n` or
/// NUL). Text past that is cut.
pub struct Text<const N: usize> {
    buf: [u8; N],
    len: usize,
}

/// One event line. Text past [`LINE_MAX`] is cut, and the line still ends with `\n` (the
/// CLI would rather show a cut line than none).
pub type Line = Text<LINE_MAX>;

/// A path for a system call, built where nothing may allocate (a `fork` child handler).
pub type PathText = Text<{ libc::PATH_MAX as usize }>;

impl<const N: usize> Text<N> {
    /// Empty text.
    pub const fn new() -> Self {
        Text { buf: [0; N], len: 0 }
    }

    /// Appends bytes, as many as fit while leaving room for the final byte.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let room = N - 1 - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
        self
    }

    /// Appends one byte.
    pub fn byte(&mut self, byte: u8) -> &mut Self {
        self.bytes(&[byte])
    }

    /// Appends an unsigned decimal number.
    pub fn dec(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20]; // u64::MAX has 20 digits
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.bytes(&digits[at..])
    }

    /// Appends a signed decimal number.
    pub fn signed(&mut self, value: i64) -> &mut Self {
        if value < 0 {
            self.byte(b'-');
        }
        self.dec(value.unsigned_abs())
    }

    /// Appends `0x` and the number in lowercase hex, without leading zeros.
    pub fn hex(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 16];
        let mut at = digits.len();
        loop {
            at -= 1;
            digits[at] = b"0123456789abcdef"[(value & 0xf) as usize];
            value >>= 4;
            if value == 0 {
                break;
            }
        }
        self.bytes(b"0x").bytes(&digits[at..])
    }

    /// Appends a fetched value as its type says.
    pub fn value(&mut self, ty: FetchType, raw: u64) -> &mut Self {
        let value = ty.apply(raw);
        match ty.format {
            Format::Unsigned => self.dec(value),
            Format::Signed => self.signed(value as i64),
            Format::Hex => self.hex(value),
        }
    }

    /// The finished line, ending with `\n`.
    pub fn finish(&mut self) -> &[u8] {
        self.buf[self.len] = b'\n';
        &self.buf[..=self.len]
    }
}

impl<const N: usize> Text<N> {
    /// The text so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The text as a C string (NUL-terminated); `None` if it holds a NUL itself.
    pub fn c_str(&mut self) -> Option<&std::ffi::CStr> {
        self.buf[self.len] = 0;
        std::ffi::CStr::from_bytes_with_nul(&self.buf[..=self.len]).ok()
    }
}

impl<const N: usize> Default for Text<N> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(line: &mut Line) -> String {
        String::from_utf8(line.finish().to_vec()).unwrap()
    }

    #[test]
    fn numbers() {
        let mut line = Line::new();
        line.dec(0).byte(b' ').dec(u64::MAX).byte(b' ').signed(i64::MIN);
        line.byte(b' ').signed(42).byte(b' ').hex(0).byte(b' ').hex(u64::MAX);
        assert_eq!(text(&mut line), "0 18446744073709551615 -9223372036854775808 42 0x0 0xffffffffffffffff\n");
    }

    #[test]
    fn values_follow_their_type() {
        let ty = |s: &str| dynprobe::spec::ProbeSpec::parse(&format!("p f v=%rax:{s}")).unwrap().args[0].ty;
        let mut line = Line::new();
        line.value(ty("u64"), -1i64 as u64).byte(b' ');
        line.value(ty("s64"), -1i64 as u64).byte(b' ');
        line.value(ty("x32"), 0x1234_5678_9abc).byte(b' ');
        line.value(ty("s8"), 0xfe);
        assert_eq!(text(&mut line), "18446744073709551615 -1 0x56789abc -2\n");
    }

    #[test]
    fn long_lines_are_cut_but_end_with_a_newline() {
        let mut line = Line::new();
        for _ in 0..100 {
            line.bytes(b"0123456789");
        }
        let out = line.finish();
        assert_eq!(out.len(), LINE_MAX);
        assert_eq!(out.last(), Some(&b'\n'));
    }
}
