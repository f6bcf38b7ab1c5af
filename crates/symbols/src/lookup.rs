//! Resolving a `name` / `module:name` spec to one symbol.

use crate::demangle::{rust_with_hash, strip_rust_hash};
use crate::error::suggest;
use crate::{SymbolError, SymbolTable};

/// At most this many candidates are spelled out in an ambiguity error.
const MAX_CANDIDATES_SHOWN: usize = 8;

pub(crate) fn lookup(table: &SymbolTable, spec: &str) -> Result<usize, SymbolError> {
    let (module, name) = split_spec(spec);
    let module = module.map(|m| find_module(table, m)).transpose()?;
    let in_scope = |i: &usize| module.is_none() || module == Some(table.symbols[*i].module);

    let mut found: Vec<usize> = exact_matches(table, name).into_iter().filter(in_scope).collect();
    if found.is_empty() {
        found = path_suffix_matches(table, name).into_iter().filter(in_scope).collect();
    }
    if found.is_empty() {
        let names = table.symbols.iter().enumerate().filter(|(i, _)| in_scope(i)).map(|(_, s)| s.name.as_str());
        return Err(SymbolError::UnknownSymbol { name: name.to_string(), suggestions: suggest(name, names) });
    }
    found.sort_unstable();
    found.dedup();
    choose(table, name, &found)
}

/// Splits `module:name` at the first lone `:` (a `::` belongs to a C++ or Rust path).
pub fn split_spec(spec: &str) -> (Option<&str>, &str) {
    let bytes = spec.as_bytes();
    let lone_colon = (0..bytes.len())
        .find(|&i| bytes[i] == b':' && bytes.get(i + 1) != Some(&b':') && (i == 0 || bytes[i - 1] != b':'));
    match lone_colon {
        Some(i) if i > 0 => (Some(&spec[..i]), &spec[i + 1..]),
        _ => (None, spec),
    }
}

/// The module a spec's module part names: exactly (file name or path), else as a prefix
/// that stops at a `.` or `-` (`libc` → `libc.so.6`, `libfoo` → `libfoo-1.2.so`).
fn find_module(table: &SymbolTable, wanted: &str) -> Result<usize, SymbolError> {
    let modules = table.modules();
    if let Some(i) = modules.iter().position(|m| m.is_exactly(wanted)) {
        return Ok(i);
    }
    let by_prefix: Vec<usize> = (0..modules.len()).filter(|&i| modules[i].is_named(wanted)).collect();
    match by_prefix.as_slice() {
        [one] => Ok(*one),
        [] => Err(SymbolError::UnknownModule {
            name: wanted.to_string(),
            loaded: modules.iter().map(|m| m.name.clone()).collect(),
        }),
        many => Err(SymbolError::Ambiguous {
            name: wanted.to_string(),
            candidates: many.iter().map(|&i| modules[i].path.display().to_string()).collect(),
        }),
    }
}

/// Symbols whose demangled, mangled, or parameterless C++ name is `name`, or whose Rust
/// name with hash is `name`.
fn exact_matches(table: &SymbolTable, name: &str) -> Vec<usize> {
    let symbols = &table.symbols;
    let mut found = equal_range(&table.by_name, name, |i| &symbols[i].name);
    found.extend(equal_range(&table.by_mangled, name, |i| &symbols[i].mangled));
    found.extend(equal_range(&table.by_short, name, |i| table.extra[i].short.as_deref().unwrap_or_default()));
    if found.is_empty() {
        if let Some(path) = strip_rust_hash(name) {
            found = equal_range(&table.by_name, path, |i| &symbols[i].name)
                .into_iter()
                .filter(|&i| rust_with_hash(&symbols[i].mangled).as_deref() == Some(name))
                .collect();
        }
    }
    found
}

/// The entries of a sorted index whose key equals `name`.
fn equal_range<'t>(index: &[u32], name: &str, key: impl Fn(usize) -> &'t str) -> Vec<usize> {
    let start = index.partition_point(|&i| key(i as usize) < name);
    index[start..].iter().map(|&i| i as usize).take_while(|&i| key(i) == name).collect()
}

/// Symbols whose path ends in `::name` (`work` finds `demo::work`): a convenience for Rust
/// and C++, tried only when nothing matches exactly since it scans every symbol.
fn path_suffix_matches(table: &SymbolTable, name: &str) -> Vec<usize> {
    let suffix = format!("::{name}");
    (0..table.symbols.len())
        .filter(|&i| {
            let s = &table.symbols[i];
            s.name.ends_with(&suffix) || table.extra[i].short.as_deref().is_some_and(|n| n.ends_with(&suffix))
        })
        .collect()
}

/// Picks one of several symbols matching a name: the main executable's, else the first
/// module in load order that exports the name (what the dynamic linker would bind), else
/// the first that has it at all. Within that module the name must mean one address.
fn choose(table: &SymbolTable, name: &str, found: &[usize]) -> Result<usize, SymbolError> {
    let symbols = &table.symbols;
    let module_of = |i: usize| symbols[i].module;
    let module = found
        .iter()
        .copied()
        .find(|&i| table.modules[module_of(i)].is_main)
        .or_else(|| found.iter().copied().filter(|&i| table.extra[i].global).min_by_key(|&i| module_of(i)))
        .or_else(|| found.iter().copied().min_by_key(|&i| module_of(i)))
        .map(module_of)
        .expect("found is not empty");

    let mut in_module: Vec<usize> = found.iter().copied().filter(|&i| module_of(i) == module).collect();
    // `found` is in table order (by address, preferred alias first), so the first of each
    // address is the one to return.
    in_module.dedup_by_key(|i| symbols[*i].addr);
    match in_module.as_slice() {
        [one] => Ok(*one),
        many => {
            let mut candidates: Vec<String> = many
                .iter()
                .take(MAX_CANDIDATES_SHOWN)
                .map(|&i| {
                    let s = &symbols[i];
                    let m = &table.modules[s.module].name;
                    format!("{} at {:#x} [{m}]", s.name, s.addr)
                })
                .collect();
            if many.len() > MAX_CANDIDATES_SHOWN {
                candidates.push(format!("and {} more", many.len() - MAX_CANDIDATES_SHOWN));
            }
            Err(SymbolError::Ambiguous { name: name.to_string(), candidates })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_module_at_a_lone_colon_only() {
        assert_eq!(split_spec("libc:malloc"), (Some("libc"), "malloc"));
        assert_eq!(split_spec("ns::work(int)"), (None, "ns::work(int)"));
        assert_eq!(split_spec("demo:ns::work"), (Some("demo"), "ns::work"));
        assert_eq!(split_spec("<impl a::B as c::D>::f"), (None, "<impl a::B as c::D>::f"));
        assert_eq!(split_spec(":malloc"), (None, ":malloc"));
    }
}
