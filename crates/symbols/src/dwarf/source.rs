//! Functions, inlined copies and line tables: where a source location is in the code.

use gimli::{AttributeValue, Reader, UnitOffset};

use super::load::{DebugInfo, R};
use super::DwarfError;

/// A source location a probe can name, as `perf probe` takes them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourcePoint {
    /// `FUNC` or `FUNC@FILE`: the function's entry, and that of each inlined copy.
    Function {
        /// The function's name.
        name: String,
        /// `@FILE`: the file it is defined in, when several define one of that name.
        file: Option<String>,
    },
    /// `FUNC:RELLINE` (or `FUNC@FILE:RELLINE`): a line counted from the function's opening
    /// line (the one with its name, line 0).
    FunctionLine {
        /// The function's name.
        name: String,
        /// `@FILE`, as for [`SourcePoint::Function`].
        file: Option<String>,
        /// Lines after the function's declaration line.
        line: u64,
    },
    /// `FILE:LINE`: an absolute line of a source file (matched by its name or the end of
    /// its path).
    FileLine {
        /// The file.
        file: String,
        /// The line, 1-based.
        line: u64,
    },
}

impl std::fmt::Display for SourcePoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourcePoint::Function { name, file: None } => write!(f, "{name}"),
            SourcePoint::Function { name, file: Some(file) } => write!(f, "{name}@{file}"),
            SourcePoint::FunctionLine { name, file: None, line } => write!(f, "{name}:{line}"),
            SourcePoint::FunctionLine { name, file: Some(file), line } => write!(f, "{name}@{file}:{line}"),
            SourcePoint::FileLine { file, line } => write!(f, "{file}:{line}"),
        }
    }
}

/// One function of the program, with its inlined copies.
#[derive(Debug, Clone)]
pub struct Function {
    /// Its name (as the source spells it).
    pub name: String,
    /// Its name with the namespaces and classes it is declared in (`shop::Basket::weigh`,
    /// a Rust `crate::module::function`); the name alone at file scope.
    pub qualified_name: String,
    /// The file it is declared in (full path as the compiler saw it).
    pub file: String,
    /// Its declaration line (the line of its name).
    pub line: u64,
    /// The address ranges of its out-of-line copy (empty when it exists only inlined).
    pub ranges: Vec<(u64, u64)>,
    /// Each inlined copy: its ranges and where it starts.
    pub inlined: Vec<Inlined>,
    /// The compilation unit it belongs to.
    pub(crate) unit: usize,
    /// Its abstract (or only) DIE, in `unit`.
    pub(crate) die: UnitOffset,
    /// The unit of its out-of-line copy's code (another than `unit` after link-time
    /// optimization).
    pub(crate) code_unit: Option<usize>,
    /// Where its out-of-line copy is entered.
    pub(crate) entry_pc: Option<u64>,
}

/// One inlined copy of a function.
#[derive(Debug, Clone)]
pub struct Inlined {
    /// Its address ranges.
    pub ranges: Vec<(u64, u64)>,
    /// Where it starts (`DW_AT_entry_pc`, else its lowest address).
    pub entry: u64,
    /// The line of the call it replaces.
    pub call_line: u64,
    /// The compilation unit its code is in.
    pub(crate) unit: usize,
}

impl Function {
    /// The address of the out-of-line copy's entry.
    pub fn entry(&self) -> Option<u64> {
        self.entry_pc
    }
}

/// A place in the code that a source location resolved to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSite {
    /// Link-time address.
    pub addr: u64,
    /// The function whose code this is (for an inlined copy, the inlined function).
    pub function: String,
    /// The source file and line of the code there.
    pub file: String,
    /// The line.
    pub line: u64,
    /// Whether the code is an inlined copy of `function`.
    pub inlined: bool,
    /// Whether this is the function's entry (its parameters are in the ABI's registers).
    pub entry: bool,
    /// Set when the line asked for had no code: what was probed instead.
    pub note: Option<String>,
    /// The compilation unit (for variables).
    pub(crate) unit: usize,
}

/// A row of a line table, as kept here.
#[derive(Debug, Clone, Copy)]
struct Row {
    addr: u64,
    file: u64,
    line: u64,
    is_stmt: bool,
    /// The first row of its sequence, or one after an end of sequence.
    starts_sequence: bool,
}

impl DebugInfo {
    /// The unit and DIE a reference attribute of a DIE of unit `u` points to: in the same
    /// unit, or anywhere in `.debug_info` (`DW_FORM_ref_addr`, which link-time optimization
    /// uses between the units it makes).
    pub(crate) fn reference(&self, u: usize, value: AttributeValue<R>) -> Option<(usize, UnitOffset)> {
        match value {
            AttributeValue::UnitRef(offset) => Some((u, offset)),
            AttributeValue::DebugInfoRef(offset) => {
                let i = self.unit_containing(offset)?;
                Some((i, offset.to_unit_offset(&self.headers[i])?))
            }
            _ => None,
        }
    }

    /// The DIE a subprogram or inlined copy is a copy of (`DW_AT_abstract_origin`, or
    /// `DW_AT_specification`), or its own.
    /// Link-time optimization chains them: a copy in one of its units refers to a DIE
    /// that refers to the compiler's early one; the end of the chain is the function.
    pub(crate) fn origin(&self, u: usize, entry: &gimli::DebuggingInformationEntry<R>) -> (usize, UnitOffset) {
        let next = |u, e: &gimli::DebuggingInformationEntry<R>| {
            e.attr_value(gimli::DW_AT_abstract_origin)
                .or_else(|| e.attr_value(gimli::DW_AT_specification))
                .and_then(|v| self.reference(u, v))
        };
        let mut at = (u, entry.offset());
        let mut link = next(u, entry);
        for _ in 0..4 {
            let Some((nu, offset)) = link else { break };
            at = (nu, offset);
            link = self.unit(nu).and_then(|unit| unit.entry(offset).ok()).and_then(|e| next(nu, &e));
        }
        at
    }

    /// The unit whose part of `.debug_info` holds `offset`.
    pub(crate) fn unit_containing(&self, offset: gimli::DebugInfoOffset) -> Option<usize> {
        self.headers.partition_point(|h| h.debug_info_offset().is_some_and(|o| o <= offset)).checked_sub(1)
    }

    /// Every function with a name, out-of-line or inlined only (built once, on first use:
    /// this reads every unit, which lookups by name or address avoid, see
    /// [`DebugInfo::find_functions`]).
    pub fn functions(&self) -> &[Function] {
        self.functions.get_or_init(|| self.index_functions(0..self.unit_count()))
    }

    /// The functions whose name or qualified name (`ns::Class::method`) `matches` says yes
    /// to (`probe --funcs GLOB`), without indexing every unit: as `perf probe -F` lists
    /// functions, through the symbol table — the units that hold the code of a function
    /// symbol `matches` takes (by its demangled name without parameters, or that name's last
    /// component) are indexed, and their functions that match are given, those inlined
    /// there included. A function may come once per unit that has code of it. When no
    /// symbol leads to one, every unit is read ([`functions`](Self::functions)): a function
    /// that exists only inlined is found then, not beside ones that have a symbol.
    pub fn functions_matching(&self, matches: &dyn Fn(&str) -> bool) -> Vec<&Function> {
        let wanted = |f: &&Function| matches(&f.name) || matches(&f.qualified_name);
        if self.functions.get().is_none() {
            let mut units: Vec<usize> = self
                .symbols
                .iter()
                .filter(|s| {
                    // GCC's clones keep the name before a dot (`parse.constprop.0`).
                    let plain = s.mangled.split('.').next().unwrap_or(&s.mangled);
                    if !plain.starts_with("_Z") && !plain.starts_with("_R") {
                        return matches(plain);
                    }
                    let d = crate::demangle::demangle(plain);
                    let short = d.short.unwrap_or(d.name);
                    let short = crate::demangle::strip_rust_hash(&short).unwrap_or(&short);
                    matches(short) || short.rsplit("::").next().is_some_and(matches)
                })
                .filter_map(|s| self.unit_at(s.value))
                .collect();
            units.sort();
            units.dedup();
            let found: Vec<&Function> = units.iter().flat_map(|&u| self.unit_functions(u)).filter(wanted).collect();
            if !found.is_empty() {
                return found;
            }
        }
        self.functions().iter().filter(wanted).collect()
    }

    /// The functions with code (out of line or an inlined copy) in unit `u`, each with only
    /// the code that is in `u` (indexed once, on first use).
    pub(crate) fn unit_functions(&self, u: usize) -> &[Function] {
        match self.unit_functions.get(u) {
            Some(cell) => cell.get_or_init(|| self.index_functions(u..u + 1)),
            None => &[],
        }
    }

    fn index_functions(&self, units: std::ops::Range<usize>) -> Vec<Function> {
        let mut functions: Vec<Function> = Vec::new();
        let mut by_die = std::collections::HashMap::new();
        // The end of each chain of origins, by its first link: a C++ unit has thousands of
        // inlined copies of a few hundred functions, each DIE of a chain parsed once.
        let mut origins: std::collections::HashMap<(usize, UnitOffset), (usize, UnitOffset)> =
            std::collections::HashMap::new();
        for u in units {
            let Some(unit) = self.unit(u) else { continue };
            let mut offsets = Vec::new();
            // A damaged unit gives the functions read before the damage.
            let _ = code_dies(unit, &mut offsets);
            for offset in offsets {
                let Ok(entry) = unit.entry(offset) else { continue };
                let entry = &entry;
                let tag = entry.tag();
                let ranges = self.ranges(unit, entry);
                if tag == gimli::DW_TAG_subprogram && ranges.is_empty() && !is_inline_candidate(entry) {
                    continue;
                }
                let link = entry
                    .attr_value(gimli::DW_AT_abstract_origin)
                    .or_else(|| entry.attr_value(gimli::DW_AT_specification))
                    .and_then(|v| self.reference(u, v));
                let (ou, origin) = match link {
                    None => (u, entry.offset()),
                    Some(link) => *origins.entry(link).or_insert_with(|| {
                        match self.unit(link.0).and_then(|lu| lu.entry(link.1).ok()) {
                            Some(linked) => self.origin(link.0, &linked),
                            None => link,
                        }
                    }),
                };
                let key = (ou, origin);
                let index = match by_die.get(&key) {
                    Some(&i) => i,
                    None => {
                        let Some((name, file, line)) = self.name_of(ou, origin) else { continue };
                        let qualified_name = match self.scope_of(ou, origin) {
                            Some(scope) => format!("{scope}::{name}"),
                            None => name.clone(),
                        };
                        functions.push(Function {
                            qualified_name,
                            name,
                            file,
                            line,
                            ranges: Vec::new(),
                            inlined: Vec::new(),
                            unit: ou,
                            die: origin,
                            code_unit: None,
                            entry_pc: None,
                        });
                        by_die.insert(key, functions.len() - 1);
                        functions.len() - 1
                    }
                };
                let address =
                    |at| entry.attr_value(at).and_then(|v| self.dwarf_for(unit).attr_address(unit, v).ok().flatten());
                if tag == gimli::DW_TAG_subprogram {
                    if !ranges.is_empty() {
                        // The definition's own line: a C++ member defined outside its class
                        // refers (DW_AT_specification) to a declaration on another line.
                        if let Some((_, file, line)) = self.name_of(u, entry.offset()) {
                            (functions[index].file, functions[index].line) = (file, line);
                        }
                        functions[index].code_unit = Some(u);
                        // Where it is entered: its low_pc, or the first of its ranges (a GCC
                        // `.cold` part may lie below it).
                        functions[index].entry_pc = address(gimli::DW_AT_entry_pc)
                            .or_else(|| address(gimli::DW_AT_low_pc))
                            .or_else(|| ranges.first().map(|r| r.0));
                    }
                    functions[index].ranges.extend(ranges);
                } else {
                    // DW_AT_entry_pc is the first instruction of the copy even when it lies in
                    // an empty range (GCC merges a copy's code into its caller's and leaves a
                    // zero-length range at the place it would start); else the low end.
                    let address = |at| {
                        entry.attr_value(at).and_then(|v| self.dwarf_for(unit).attr_address(unit, v).ok().flatten())
                    };
                    let entry_pc = address(gimli::DW_AT_entry_pc)
                        .or_else(|| address(gimli::DW_AT_low_pc))
                        .or_else(|| ranges.iter().map(|r| r.0).min());
                    let Some(entry_pc) = entry_pc.filter(|&pc| pc != 0) else { continue };
                    let call_line = match entry.attr_value(gimli::DW_AT_call_line) {
                        Some(v) => v.udata_value().unwrap_or(0),
                        None => 0,
                    };
                    functions[index].inlined.push(Inlined { entry: entry_pc, ranges, call_line, unit: u });
                }
            }
        }
        functions.retain(|f| !f.ranges.is_empty() || !f.inlined.is_empty());
        functions.sort_by(|a, b| a.name.cmp(&b.name).then(a.entry().cmp(&b.entry())));
        functions
    }

    /// The address ranges of a DIE (empty when it has none or they are malformed).
    pub(crate) fn ranges(&self, unit: &gimli::Unit<R>, entry: &gimli::DebuggingInformationEntry<R>) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if let Ok(mut ranges) = self.dwarf_for(unit).die_ranges(unit, entry) {
            while let Ok(Some(r)) = ranges.next() {
                if r.begin <= r.end && r.begin != 0 {
                    out.push((r.begin, r.end));
                }
            }
        }
        out
    }

    /// Name, declaration file and line of the DIE at `offset` (following
    /// `DW_AT_abstract_origin` and `DW_AT_specification` for what it lacks).
    fn name_of(&self, u: usize, offset: UnitOffset) -> Option<(String, String, u64)> {
        let (mut u, mut offset) = (u, offset);
        let (mut name, mut file, mut line) = (None, None, None);
        for _ in 0..4 {
            let unit = self.unit(u)?;
            let entry = unit.entry(offset).ok()?;
            if name.is_none() {
                name = entry.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v));
            }
            if file.is_none() {
                file = entry
                    .attr_value(gimli::DW_AT_decl_file)
                    .and_then(|v| match v {
                        AttributeValue::FileIndex(i) => Some(i),
                        v => v.udata_value(),
                    })
                    .and_then(|f| self.file_name(unit, f));
            }
            if line.is_none() {
                line = entry.attr_value(gimli::DW_AT_decl_line).and_then(|v| v.udata_value());
            }
            match entry
                .attr_value(gimli::DW_AT_specification)
                .or_else(|| entry.attr_value(gimli::DW_AT_abstract_origin))
                .and_then(|v| self.reference(u, v))
            {
                Some(next) => (u, offset) = next,
                None => break,
            }
        }
        Some((name?, file.unwrap_or_default(), line.unwrap_or(0)))
    }

    /// The namespaces and classes the subprogram DIE at `offset` of unit `u` is declared
    /// in, joined by `::`, if any.
    fn scope_of(&self, u: usize, offset: UnitOffset) -> Option<&str> {
        let scopes = self.scopes.get(u)?.get_or_init(|| {
            let mut out = std::collections::HashMap::new();
            if let Some(unit) = self.unit(u) {
                // A damaged unit gives the scopes read before the damage.
                let _ = self.read_scopes(unit, &mut out);
            }
            out
        });
        scopes.get(&offset).map(String::as_str)
    }

    /// One pass over a unit's DIEs reading only the names of namespaces, classes, structs
    /// and unions (each subprogram inside them gets their path), skipping everything else.
    fn read_scopes(
        &self,
        unit: &gimli::Unit<R>,
        out: &mut std::collections::HashMap<UnitOffset, String>,
    ) -> gimli::Result<()> {
        let mut raw = unit.entries_raw(None)?;
        let mut stack: Vec<(isize, String)> = Vec::new();
        while !raw.is_empty() {
            let depth = raw.next_depth();
            let offset = raw.next_offset();
            let Some(abbrev) = raw.read_abbreviation()? else { continue };
            while stack.last().is_some_and(|(d, _)| *d >= depth) {
                stack.pop();
            }
            match abbrev.tag() {
                gimli::DW_TAG_namespace
                | gimli::DW_TAG_class_type
                | gimli::DW_TAG_structure_type
                | gimli::DW_TAG_union_type => {
                    let mut name = None;
                    for spec in abbrev.attributes() {
                        let attr = raw.read_attribute(*spec)?;
                        if attr.name() == gimli::DW_AT_name {
                            name = self.string(unit, attr.value());
                        }
                    }
                    let name = name.unwrap_or_else(|| match abbrev.tag() {
                        gimli::DW_TAG_namespace => "(anonymous namespace)".into(),
                        _ => "(anonymous)".into(),
                    });
                    if abbrev.has_children() {
                        stack.push((depth, name));
                    }
                }
                tag => {
                    if tag == gimli::DW_TAG_subprogram && !stack.is_empty() {
                        let path: Vec<&str> = stack.iter().map(|(_, n)| n.as_str()).collect();
                        out.insert(offset, path.join("::"));
                    }
                    raw.skip_attributes(abbrev.attributes())?;
                }
            }
        }
        Ok(())
    }

    /// A string attribute's text.
    pub(crate) fn string(&self, unit: &gimli::Unit<R>, value: AttributeValue<R>) -> Option<String> {
        let s = self.dwarf_for(unit).attr_string(unit, value).ok()?;
        Some(s.to_string_lossy().ok()?.into_owned())
    }

    /// A string of a unit's line-table header: in the file's own sections, where the line
    /// table is even for a split unit (its skeleton's).
    fn line_string(&self, unit: &gimli::Unit<R>, value: AttributeValue<R>) -> Option<String> {
        let s = self.dwarf.attr_string(unit, value).ok()?;
        Some(s.to_string_lossy().ok()?.into_owned())
    }

    /// The path of file `index` of the unit's line table, joined to its directory.
    pub(crate) fn file_name(&self, unit: &gimli::Unit<R>, index: u64) -> Option<String> {
        let header = unit.line_program.as_ref()?.header();
        let file = header.file(index)?;
        let name = self.line_string(unit, file.path_name())?;
        if name.starts_with('/') {
            return Some(normalize(&name));
        }
        let dir = file.directory(header).and_then(|d| self.line_string(unit, d)).unwrap_or_default();
        let dir = match (dir.starts_with('/'), &unit.comp_dir) {
            (false, Some(comp_dir)) => {
                let comp_dir = comp_dir.to_string_lossy().ok()?.into_owned();
                match dir.is_empty() {
                    true => comp_dir,
                    false => format!("{comp_dir}/{dir}"),
                }
            }
            _ => dir,
        };
        Some(normalize(&match dir.is_empty() {
            true => name,
            false => format!("{dir}/{name}"),
        }))
    }

    /// The rows of a unit's line table, in sequence order. Rows outside the binary's
    /// executable sections are left out: they are the code of functions the linker
    /// discarded (`--gc-sections`), whose addresses GNU ld resolves near 0.
    fn rows(&self, unit: &gimli::Unit<R>) -> Vec<Row> {
        let Some(program) = unit.line_program.clone() else { return Vec::new() };
        let mut rows = program.rows();
        let mut out = Vec::new();
        let mut start = true;
        let in_code = |addr: u64| self.code.is_empty() || self.code.iter().any(|(lo, hi)| *lo <= addr && addr < *hi);
        while let Ok(Some((_, row))) = rows.next_row() {
            if row.end_sequence() {
                start = true;
                continue;
            }
            if !in_code(row.address()) {
                start = true;
                continue;
            }
            let line = row.line().map_or(0, |l| l.get());
            out.push(Row {
                addr: row.address(),
                file: row.file_index(),
                line,
                is_stmt: row.is_stmt(),
                starts_sequence: start,
            });
            start = false;
        }
        out
    }

    /// The functions `name` (and `@file`) names: every function of that name, or the one
    /// the file narrows it to.
    ///
    /// Without reading every unit: the symbol table gives the addresses of the functions of
    /// that name, `.debug_aranges` (else the units' own ranges) the units their code is in,
    /// and only those are indexed — then the units whose line tables name the function's
    /// file, the only ones that can hold copies of it inlined (a function defined in a
    /// header, or split among units by link-time optimization). A name no symbol has (a
    /// function that exists only inlined) is looked for in every unit.
    pub fn find_functions(&self, name: &str, file: Option<&str>) -> Result<Vec<&Function>, DwarfError> {
        // `ns::Class::method` by the path it is declared in, `method` in any scope.
        let qualified = name.contains("::");
        let matches = |f: &&Function| {
            (if qualified { f.qualified_name == name } else { f.name == name })
                && file.is_none_or(|w| file_matches(&f.file, w))
        };
        let mut found: Vec<&Function> = match self.functions.get() {
            Some(all) => all.iter().filter(matches).collect(),
            None => self.find_functions_lazily(name, &matches),
        };
        if found.is_empty() && self.functions.get().is_none() {
            found = self.functions().iter().filter(matches).collect();
        }
        if found.is_empty() {
            let names = self.functions().iter().map(|f| if qualified { &f.qualified_name } else { &f.name });
            let suggestions = crate::error::suggest(name, names.map(String::as_str));
            let shown = match file {
                Some(file) => format!("{name}@{file}"),
                None => name.to_string(),
            };
            return Err(DwarfError::UnknownFunction { name: shown, suggestions });
        }
        Ok(found)
    }

    /// [`DebugInfo::find_functions`] through the symbol table and the units it leads to.
    fn find_functions_lazily(&self, name: &str, matches: &dyn Fn(&&Function) -> bool) -> Vec<&Function> {
        let mut units: Vec<usize> = self.symbol_addresses(name).into_iter().filter_map(|a| self.unit_at(a)).collect();
        units.sort();
        units.dedup();
        let mut found: Vec<&Function> =
            units.iter().flat_map(|&u| self.unit_functions(u)).filter(|f| matches(f)).collect();
        let mut files: Vec<&str> = found.iter().map(|f| f.file.as_str()).collect();
        files.sort();
        files.dedup();
        for file in files.into_iter().filter(|f| !f.is_empty()) {
            for u in self.units_naming(file) {
                if units.binary_search(&u).is_err() {
                    found.extend(self.unit_functions(u).iter().filter(|f| matches(f) && f.file == file));
                }
            }
        }
        found
    }

    /// The addresses of the function symbols named `name`, or GCC's clones of it (for C++
    /// and Rust, by their demangled name without parameters, or its last component).
    fn symbol_addresses(&self, name: &str) -> Vec<u64> {
        let last = name.rsplit("::").next().unwrap_or(name);
        self.symbols
            .iter()
            .filter(|s| {
                // GCC's clones keep the name before a dot (`parse.constprop.0`, `parse.cold`).
                if s.mangled == name || s.mangled.strip_prefix(name).is_some_and(|rest| rest.starts_with('.')) {
                    return true;
                }
                // The mangled name spells each component of the path as it is.
                if !s.mangled.starts_with("_Z") && !s.mangled.starts_with("_R") || !s.mangled.contains(last) {
                    return false;
                }
                let d = crate::demangle::demangle(&s.mangled);
                let short = d.short.unwrap_or(d.name);
                let short = crate::demangle::strip_rust_hash(&short).unwrap_or(&short);
                short == name || short.rsplit("::").next() == Some(name)
            })
            .map(|s| s.value)
            .collect()
    }

    /// The unit whose code contains `addr`: by `.debug_aranges`, and for the units it does
    /// not list, by their root DIEs' ranges.
    pub(crate) fn unit_at(&self, addr: u64) -> Option<usize> {
        let ranges = self.aranges.get_or_init(|| self.read_aranges());
        let i = ranges.partition_point(|r| r.0 <= addr).checked_sub(1)?;
        // Ranges may nest (a unit's whole span listed, then a part): look back a little.
        ranges[..=i].iter().rev().take(8).find(|r| r.0 <= addr && addr < r.1).and_then(|r| self.unit_containing(r.2))
    }

    fn read_aranges(&self) -> Vec<(u64, u64, gimli::DebugInfoOffset)> {
        let mut out = Vec::new();
        let mut listed = std::collections::HashSet::new();
        let mut headers = self.dwarf.debug_aranges.headers();
        while let Ok(Some(header)) = headers.next() {
            listed.insert(header.debug_info_offset());
            let mut entries = header.entries();
            while let Ok(Some(entry)) = entries.next() {
                let range = entry.range();
                if range.begin < range.end && range.begin != 0 {
                    out.push((range.begin, range.end, header.debug_info_offset()));
                }
            }
        }
        for (u, header) in self.headers.iter().enumerate() {
            let Some(offset) = header.debug_info_offset() else { continue };
            if listed.contains(&offset) {
                continue;
            }
            let Some(unit) = self.unit(u) else { continue };
            let Ok(mut ranges) = self.dwarf_for(unit).unit_ranges(unit) else { continue };
            while let Ok(Some(r)) = ranges.next() {
                if r.begin < r.end && r.begin != 0 {
                    out.push((r.begin, r.end, offset));
                }
            }
        }
        out.sort_by_key(|r| (r.0, r.1));
        out
    }

    /// The units whose line tables name the source file `file` (by its name or the end of
    /// its path): their line-program headers are read, not their rows or DIEs.
    pub(crate) fn units_naming(&self, file: &str) -> Vec<usize> {
        (0..self.unit_count())
            .filter(|&u| {
                let Some(unit) = self.unit(u) else { return false };
                let Some(program) = &unit.line_program else { return false };
                let header = program.header();
                // A cheap look at the bare names first: most units do not have the file.
                let base = file.rsplit('/').next().unwrap_or(file);
                let named = header
                    .file_names()
                    .iter()
                    .any(|f| self.line_string(unit, f.path_name()).is_some_and(|n| n.rsplit('/').next() == Some(base)));
                let count = header.file_names().len() as u64 + 1;
                named && (0..count).any(|i| self.file_name(unit, i).is_some_and(|n| file_matches(&n, file)))
            })
            .collect()
    }

    /// The places in the code `point` names: a site at the entry of a function and of each
    /// inlined copy, or at each place a line's code starts.
    pub fn resolve(&self, point: &SourcePoint) -> Result<Vec<SourceSite>, DwarfError> {
        match point {
            SourcePoint::Function { name, file } => {
                let mut sites = Vec::new();
                for f in self.find_functions(name, file.as_deref())? {
                    let site = |addr, inlined, unit| SourceSite {
                        addr,
                        function: f.name.clone(),
                        file: f.file.clone(),
                        line: f.line,
                        inlined,
                        entry: !inlined,
                        note: None,
                        unit,
                    };
                    sites.extend(f.entry().map(|addr| site(addr, false, f.code_unit.unwrap_or(f.unit))));
                    sites.extend(f.inlined.iter().map(|i| site(i.entry, true, i.unit)));
                }
                // Nested copies (a copy inlined into a copy) can start at one address.
                let mut seen = std::collections::HashSet::new();
                sites.retain(|s| seen.insert(s.addr));
                Ok(sites)
            }
            SourcePoint::FunctionLine { name, file, line } => {
                let mut sites = Vec::new();
                let mut last_error = None;
                for f in self.find_functions(name, file.as_deref())? {
                    let wanted = f.line + line;
                    // The line tables to read are those of the units the copies' code is in.
                    let mut units: Vec<usize> =
                        f.code_unit.into_iter().chain(f.inlined.iter().map(|i| i.unit)).collect();
                    units.sort();
                    units.dedup();
                    for u in units {
                        let mut ranges: Vec<((u64, u64), bool)> = Vec::new();
                        if f.code_unit == Some(u) {
                            ranges.extend(f.ranges.iter().map(|&r| (r, false)));
                        }
                        for i in f.inlined.iter().filter(|i| i.unit == u) {
                            ranges.extend(i.ranges.iter().map(|&r| (r, true)));
                        }
                        match self.line_sites(u, &f.file, wanted, Some(&ranges), Some(&f.name), &point.to_string()) {
                            Ok(found) => sites.extend(found.into_iter().map(|mut site| {
                                site.entry = !site.inlined && f.entry() == Some(site.addr);
                                site
                            })),
                            Err(e) => last_error = Some(e),
                        }
                    }
                }
                match (sites.is_empty(), last_error) {
                    (true, Some(e)) => Err(e),
                    _ => Ok(sites),
                }
            }
            SourcePoint::FileLine { file, line } => {
                let units = self.units_naming(file);
                if units.is_empty() {
                    return Err(DwarfError::UnknownFile { name: file.clone() });
                }
                let mut sites = Vec::new();
                let mut last_error = None;
                for u in units {
                    match self.line_sites(u, file, *line, None, None, &point.to_string()) {
                        Ok(found) => sites.extend(found),
                        Err(e) => last_error = Some(e),
                    }
                }
                // A header's line compiled into several units gives the same address once.
                sites.sort_by_key(|s| s.addr);
                sites.dedup_by_key(|s| s.addr);
                match (sites.is_empty(), last_error) {
                    (true, Some(e)) => Err(e),
                    _ => Ok(sites),
                }
            }
        }
    }

    /// The sites of `line` of `file` in unit `u`, within `ranges` when given (each marked
    /// inlined or not): where a run of that line's statements starts. A line without code
    /// resolves to the next line that has some.
    fn line_sites(
        &self,
        u: usize,
        file: &str,
        line: u64,
        ranges: Option<&[((u64, u64), bool)]>,
        function: Option<&str>,
        what: &str,
    ) -> Result<Vec<SourceSite>, DwarfError> {
        let Some(unit) = self.unit(u) else { return Ok(Vec::new()) };
        let rows = self.rows(unit);
        let mut names = std::collections::HashMap::new();
        let mut matches_file = |index: u64| {
            *names.entry(index).or_insert_with(|| self.file_name(unit, index).is_some_and(|n| file_matches(&n, file)))
        };
        let in_ranges = |addr: u64| match ranges {
            None => Some(false),
            Some(ranges) => ranges.iter().find(|((lo, hi), _)| *lo <= addr && addr < *hi).map(|r| r.1),
        };
        // The first line at or after `line` that has a statement here.
        let candidates: Vec<&Row> =
            rows.iter().filter(|r| r.is_stmt && r.line >= line && in_ranges(r.addr).is_some()).collect();
        let chosen = candidates.iter().filter(|r| matches_file(r.file)).map(|r| r.line).min();
        let Some(chosen) = chosen else {
            return Err(DwarfError::NoCode {
                what: what.to_string(),
                reason: format!("no statement of line {line} or after it is in the line table"),
            });
        };
        // Where no function is named, the innermost one at each place, all found in one walk.
        let scopes = match function {
            Some(_) => std::collections::HashMap::new(),
            None => {
                let addrs: Vec<u64> = rows.iter().filter(|r| r.is_stmt && r.line == chosen).map(|r| r.addr).collect();
                self.scopes_at(u, &addrs)
            }
        };
        let mut sites: Vec<SourceSite> = Vec::new();
        let mut previous: Option<&Row> = None;
        for row in &rows {
            let continues = !row.starts_sequence && previous.is_some_and(|p| p.line == row.line && p.file == row.file);
            previous = Some(row);
            if !row.is_stmt || row.line != chosen || continues || !matches_file(row.file) {
                continue;
            }
            let Some(inlined) = in_ranges(row.addr) else { continue };
            if sites.iter().any(|s| s.addr == row.addr) {
                continue;
            }
            // The function the line is in: the one named (whose caller says whether this is
            // its entry), else the innermost there.
            let (function, inlined, entry) = match function {
                Some(name) => (name.to_string(), inlined, false),
                None => match scopes.get(&row.addr) {
                    Some((name, inline, entered)) => (name.clone(), inlined || *inline, *entered && !*inline),
                    None => (String::new(), inlined, false),
                },
            };
            sites.push(SourceSite {
                addr: row.addr,
                function,
                file: self.file_name(unit, row.file).unwrap_or_default(),
                line: chosen,
                inlined,
                entry,
                note: (chosen != line).then(|| format!("line {line} has no code; probed at line {chosen}")),
                unit: u,
            });
        }
        sites.sort_by_key(|s| s.addr);
        Ok(sites)
    }

    /// The innermost function (out-of-line or inlined) of unit `u` whose code is at
    /// `addr`, and whether that is an inlined copy.
    pub fn function_at(&self, u: usize, addr: u64) -> Option<(String, bool)> {
        self.scope_at(u, addr).map(|(name, inlined, _)| (name, inlined))
    }

    /// The innermost function of unit `u` whose code is at `addr`, whether it is an inlined
    /// copy, and whether `addr` is the entry of the (out-of-line) function: found by walking
    /// down the DIEs whose ranges contain it, without indexing the unit.
    fn scope_at(&self, u: usize, addr: u64) -> Option<(String, bool, bool)> {
        self.scopes_at(u, &[addr]).remove(&addr)
    }

    /// [`DebugInfo::scope_at`] for several addresses in one walk (a header's line can be
    /// at thousands of places of one unit).
    fn scopes_at(&self, u: usize, addrs: &[u64]) -> std::collections::HashMap<u64, (String, bool, bool)> {
        let mut out = std::collections::HashMap::new();
        let Some(unit) = self.unit(u) else { return out };
        let Ok(mut tree) = unit.entries_tree(None) else { return out };
        let Ok(root) = tree.root() else { return out };
        // A damaged unit gives what was found before the damage.
        let _ = self.walk_scopes(u, unit, root, addrs, 0, &mut out);
        out
    }

    fn walk_scopes(
        &self,
        u: usize,
        unit: &gimli::Unit<R>,
        node: gimli::EntriesTreeNode<R>,
        addrs: &[u64],
        depth: usize,
        out: &mut std::collections::HashMap<u64, (String, bool, bool)>,
    ) -> gimli::Result<()> {
        let mut children = node.children();
        while let Some(child) = children.next()? {
            let entry = child.entry();
            let tag = entry.tag();
            match tag {
                gimli::DW_TAG_subprogram | gimli::DW_TAG_inlined_subroutine | gimli::DW_TAG_lexical_block => {
                    let address = |at| {
                        entry.attr_value(at).and_then(|v| self.dwarf_for(unit).attr_address(unit, v).ok().flatten())
                    };
                    let ranges = self.ranges(unit, entry);
                    let start = address(gimli::DW_AT_entry_pc)
                        .or_else(|| address(gimli::DW_AT_low_pc))
                        .or_else(|| ranges.first().map(|r| r.0));
                    // An inlined copy merged into its caller's code has only its entry (see
                    // `Inlined::entry`).
                    let inside: Vec<u64> = addrs
                        .iter()
                        .copied()
                        .filter(|&addr| {
                            ranges.iter().any(|(lo, hi)| *lo <= addr && addr < *hi)
                                || (tag == gimli::DW_TAG_inlined_subroutine && start == Some(addr))
                        })
                        .collect();
                    if inside.is_empty() {
                        continue;
                    }
                    if tag != gimli::DW_TAG_lexical_block {
                        let (ou, origin) = self.origin(u, entry);
                        if let Some((name, _, _)) = self.name_of(ou, origin) {
                            let inlined = tag == gimli::DW_TAG_inlined_subroutine;
                            for &addr in &inside {
                                out.insert(addr, (name.clone(), inlined, !inlined && start == Some(addr)));
                            }
                        }
                    }
                    self.walk_scopes(u, unit, child, &inside, depth + 1, out)?;
                }
                gimli::DW_TAG_namespace
                | gimli::DW_TAG_structure_type
                | gimli::DW_TAG_class_type
                | gimli::DW_TAG_union_type
                    if depth < 8 =>
                {
                    // C++ member functions are defined inside these.
                    self.walk_scopes(u, unit, child, addrs, depth + 1, out)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The function whose entry is at `addr`, if any.
    pub(crate) fn function_entered_at(&self, addr: u64) -> Option<&Function> {
        match self.unit_at(addr) {
            Some(u) => self.unit_functions(u).iter().find(|f| f.entry() == Some(addr)),
            None => self.functions().iter().find(|f| f.entry() == Some(addr)),
        }
    }

    /// The lines of `f`'s source file from its declaration to its end, each with whether
    /// it has a statement (a probe can go there), as `perf probe -L` shows them.
    pub fn function_lines(&self, f: &Function) -> Vec<(u64, bool)> {
        let mut ranges: Vec<(u64, u64)> = f.ranges.clone();
        for i in &f.inlined {
            ranges.extend(&i.ranges);
        }
        let mut units: Vec<usize> = f.code_unit.into_iter().chain(f.inlined.iter().map(|i| i.unit)).collect();
        units.sort();
        units.dedup();
        let mut lines: Vec<u64> = Vec::new();
        for u in units {
            let Some(unit) = self.unit(u) else { continue };
            let mut names = std::collections::HashMap::new();
            lines.extend(
                self.rows(unit)
                    .iter()
                    .filter(|r| r.is_stmt && ranges.iter().any(|(lo, hi)| *lo <= r.addr && r.addr < *hi))
                    .filter(|r| {
                        *names
                            .entry(r.file)
                            .or_insert_with(|| self.file_name(unit, r.file).is_some_and(|n| file_matches(&n, &f.file)))
                    })
                    .map(|r| r.line),
            );
        }
        lines.sort();
        lines.dedup();
        let last = lines.last().copied().unwrap_or(f.line).max(f.line);
        (f.line..=last).map(|l| (l, lines.binary_search(&l).is_ok())).collect()
    }
}

/// The offsets of the subprograms and inlined copies of a unit, found by reading only each
/// DIE's abbreviation and skipping its attributes (most of a program's DIEs are types,
/// variables and call sites, whose attributes a full parse would decode for nothing).
fn code_dies(unit: &gimli::Unit<R>, out: &mut Vec<UnitOffset>) -> gimli::Result<()> {
    let mut raw = unit.entries_raw(None)?;
    while !raw.is_empty() {
        let offset = raw.next_offset();
        let Some(abbrev) = raw.read_abbreviation()? else { continue };
        if matches!(abbrev.tag(), gimli::DW_TAG_subprogram | gimli::DW_TAG_inlined_subroutine) {
            out.push(offset);
        }
        raw.skip_attributes(abbrev.attributes())?;
    }
    Ok(())
}

/// Whether a subprogram without code is an abstract one that inlined copies refer to.
fn is_inline_candidate(entry: &gimli::DebuggingInformationEntry<R>) -> bool {
    entry.attr_value(gimli::DW_AT_inline).is_some()
}

/// A path with its `.` and `dir/..` taken out, as written, without looking at the file
/// system: the units of one program name a file from different directories
/// (`./build/../Objects/list.c` and `Objects/list.c` after link-time optimization).
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "." | "" if !parts.is_empty() || part == "." => {}
            ".." if parts.last().is_some_and(|p| !p.is_empty() && *p != "..") => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

/// Whether the path `have` is the file `wanted` names: the same, or ending with `/wanted`.
pub(crate) fn file_matches(have: &str, wanted: &str) -> bool {
    have == wanted || have.ends_with(&format!("/{wanted}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalized_as_written() {
        assert_eq!(normalize("./build-static/../Objects/listobject.c"), "Objects/listobject.c");
        assert_eq!(normalize("/usr/src/./glibc/malloc/../malloc/malloc.c"), "/usr/src/glibc/malloc/malloc.c");
        assert_eq!(normalize("../x/./y.c"), "../x/y.c");
        assert!(file_matches("/src/app/Objects/listobject.c", "listobject.c"));
        assert!(!file_matches("/src/app/Objects/xlistobject.c", "listobject.c"));
    }
}
