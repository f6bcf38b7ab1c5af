//! Turning linker names into the names people type.

use cpp_demangle::DemangleOptions;

/// The readable forms of one linker name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Demangled {
    /// Rust without the hash (`demo::work`), C++ with its parameters (`ns::f(int)`), or the
    /// name itself for C.
    pub name: String,
    /// C++ only: the name without parameters or return type (`ns::f`), so that people can
    /// type what they would write in source. `None` when it equals `name`.
    pub short: Option<String>,
}

/// Demangles Rust (legacy and v0) and Itanium C++ names; anything else is returned as is.
///
/// A symbol-version suffix (`memcpy@GLIBC_2.2.5`, found in some `.symtab`s) is not part of
/// the mangling: it is split off, the base demangled, and the suffix kept.
pub(crate) fn demangle(mangled: &str) -> Demangled {
    let (base, version) = match mangled.find('@') {
        Some(at) => mangled.split_at(at),
        None => (mangled, ""),
    };
    // Rust first: legacy Rust names also start with `_ZN` and C++ would render them with
    // their hash as a path element; rustc-demangle refuses real C++ names (they carry
    // parameter types after the closing `E`).
    if base.starts_with("_ZN") || base.starts_with("_R") {
        if let Ok(d) = rustc_demangle::try_demangle(base) {
            return Demangled { name: format!("{d:#}{version}"), short: None };
        }
    }
    if base.starts_with("_Z") {
        if let Ok(sym) = cpp_demangle::Symbol::new(base) {
            if let Ok(full) = sym.demangle(&DemangleOptions::default()) {
                // Parsing is the expensive part; rendering a second time without the
                // parameters reuses the parse.
                let short = sym
                    .demangle(&DemangleOptions::new().no_params().no_return_type())
                    .ok()
                    .filter(|s| *s != full)
                    .map(|s| format!("{s}{version}"));
                return Demangled { name: format!("{full}{version}"), short };
            }
        }
    }
    Demangled { name: mangled.to_string(), short: None }
}

/// If `spec` ends in a legacy Rust hash (`::h0123456789abcdef`), the name without it.
pub(crate) fn strip_rust_hash(spec: &str) -> Option<&str> {
    let (path, hash) = spec.rsplit_once("::h")?;
    (hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit())).then_some(path)
}

/// The Rust demangling *with* the hash, to compare against a spec that names it.
pub(crate) fn rust_with_hash(mangled: &str) -> Option<String> {
    rustc_demangle::try_demangle(mangled).ok().map(|d| d.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_legacy_loses_its_hash() {
        let d = demangle("_ZN4demo4work17h0123456789abcdefE");
        assert_eq!(d.name, "demo::work");
        assert_eq!(d.short, None);
        assert_eq!(
            rust_with_hash("_ZN4demo4work17h0123456789abcdefE").as_deref(),
            Some("demo::work::h0123456789abcdef")
        );
    }

    #[test]
    fn rust_v0_loses_crate_disambiguators() {
        // `demo::work` as rustc -C symbol-mangling-version=v0 spells it.
        let d = demangle("_RNvCs1234_4demo4work");
        assert_eq!(d.name, "demo::work");
    }

    #[test]
    fn cpp_keeps_params_and_offers_a_short_form() {
        let d = demangle("_ZN2ns4workEi");
        assert_eq!(d.name, "ns::work(int)");
        assert_eq!(d.short.as_deref(), Some("ns::work"));
        // A template function has a return type in its mangling.
        let t = demangle("_Z3addIiET_S0_S0_");
        assert_eq!(t.name, "int add<int>(int, int)");
        assert_eq!(t.short.as_deref(), Some("add<int>"));
    }

    #[test]
    fn c_names_and_versions_pass_through() {
        assert_eq!(demangle("getpid").name, "getpid");
        assert_eq!(demangle("memcpy@GLIBC_2.2.5").name, "memcpy@GLIBC_2.2.5");
        assert_eq!(demangle("_Z3fooi@V1").name, "foo(int)@V1");
        // Not a valid mangling: kept verbatim rather than half-demangled.
        assert_eq!(demangle("_Zgarbage").name, "_Zgarbage");
    }

    #[test]
    fn recognises_hash_suffixes() {
        assert_eq!(strip_rust_hash("demo::work::h0123456789abcdef"), Some("demo::work"));
        assert_eq!(strip_rust_hash("demo::work::hello"), None);
        assert_eq!(strip_rust_hash("work"), None);
    }
}
