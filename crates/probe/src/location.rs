//! Where a probe goes.

/// A probe point: a function symbol, a symbol plus a byte offset, or a raw address.
///
/// Symbols may name a module: `"libc:malloc"`. Strings convert with [`Location::parse`]:
///
/// ```
/// # extern crate dynprobe_probe as dynprobe;
/// # use dynprobe::Location;
/// assert_eq!(Location::parse("work"), Location::Symbol("work".into()));
/// assert_eq!(Location::parse("work+0x8"), Location::SymbolOffset("work".into(), 8));
/// assert_eq!(Location::parse("0x401126"), Location::Address(0x401126));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The first instruction of a function.
    Symbol(String),
    /// `offset` bytes into a function; must be an instruction boundary.
    SymbolOffset(String, u64),
    /// An absolute address in this process.
    Address(u64),
}

impl Location {
    /// Parses `SYMBOL`, `SYMBOL+OFFSET` (decimal or `0x` hex) or `0xADDRESS`.
    pub fn parse(text: &str) -> Location {
        if let Some(addr) = parse_number(text).filter(|_| text.starts_with("0x")) {
            return Location::Address(addr);
        }
        match text.rsplit_once('+') {
            Some((name, offset)) if !name.is_empty() => match parse_number(offset) {
                Some(offset) => Location::SymbolOffset(name.to_string(), offset),
                None => Location::Symbol(text.to_string()),
            },
            _ => Location::Symbol(text.to_string()),
        }
    }
}

fn parse_number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

impl From<&str> for Location {
    fn from(text: &str) -> Self {
        Location::parse(text)
    }
}

impl From<u64> for Location {
    fn from(addr: u64) -> Self {
        Location::Address(addr)
    }
}

/// A [`Location`] naming a symbol, optionally with an offset: `sym!("work")`,
/// `sym!("libc:malloc")`, `sym!("work", 4)`.
///
/// ```
/// # extern crate dynprobe_probe as dynprobe;
/// # use dynprobe::{sym, Location};
/// assert_eq!(sym!("work"), Location::Symbol("work".into()));
/// assert_eq!(sym!("work", 4), Location::SymbolOffset("work".into(), 4));
/// ```
#[macro_export]
macro_rules! sym {
    ($name:expr) => {
        $crate::Location::Symbol(::std::string::String::from($name))
    };
    ($name:expr, $offset:expr) => {
        $crate::Location::SymbolOffset(::std::string::String::from($name), $offset)
    };
}
