//! Source-level specs (`p:handle:3 total req->path`, `p source.c:31`, `r:count_up`
//! typed by DWARF) lowered to the kernel grammar the agent and the ptrace tracer speak:
//! one `SYMBOL+OFF` spec per place the source location compiled to, each variable a fetch
//! of registers and memory (`+8(%rdi)`), typed from its DWARF type.
//!
//! The fetches run in the probe handler as before, allocation-free; what the kernel's
//! types cannot say — enumerators by name, `bool`, `char`, floating point, a variable
//! optimized out at that place — is put back when the CLI prints the event
//! ([`render_value`], [`extra_fields`]), from a table built here once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use dynprobe::spec::{
    Address, Fetch, FetchArg, FetchType, Format, IntType, ProbeKind, ProbeSpec, Reg, Target, VarExpr, VarStep,
    MAX_DEREF,
};
use dynprobe::Location;

use super::output;
use dynprobe_symbols::dwarf::{
    Access, DebugInfo, Member, Place, SourcePoint, SourceSite, TypeKind, TypeRef, VarError, ARGUMENT_REGISTERS,
    DWARF_REGISTER_NAMES,
};

/// How a printed integer is shown again by its DWARF type.
#[derive(Debug, Clone, PartialEq)]
enum Render {
    Bool,
    Char,
    Enum(Vec<(i64, String)>),
    /// A string cut to the length in the named field (Rust's `&str`, not NUL-terminated).
    CutTo(String),
    /// Element `index` of a Rust `Vec`, shown only when it is below the length in the
    /// named field (the memory past it is the vector's spare capacity), as `inner` shows it.
    Element {
        length: String,
        index: u64,
        inner: Option<Box<Render>>,
    },
    /// The payload of a Rust enum's variant (`Option<u32>`'s `Some`): `Some(7)` when the tag
    /// in the named field selects it, else the name of the variant the tag selects (`None`).
    Variant {
        tag: String,
        payload: (u64, String),
        variants: Vec<(u64, String)>,
        inner: Option<Box<Render>>,
    },
}

/// What the printer adds to events of lowered specs.
#[derive(Debug, Default)]
struct Renderings {
    /// By event and field.
    fields: HashMap<(String, String), Render>,
    /// The events of lowered specs.
    events: std::collections::HashSet<String>,
    /// Fields that have no fetch at some site of an event (optimized out there), and what
    /// to print for them: by event, in field order.
    missing: HashMap<String, Vec<(String, String)>>,
}

static RENDERINGS: OnceLock<Renderings> = OnceLock::new();

/// How a field of a hit is shown.
pub(crate) enum Shown<'a> {
    /// As the agent wrote it.
    Raw(&'a str),
    /// As its DWARF type shows it (an enumerator, `true`, `'x'`, `(optimized out)`).
    Typed(String),
    /// A string cut to its length (Rust's `&str`).
    Str(Vec<u8>),
}

impl Shown<'_> {
    /// The text form of the value, as the event line shows it.
    pub(crate) fn text(&self) -> String {
        match self {
            Shown::Raw(raw) => raw.to_string(),
            Shown::Typed(text) => text.clone(),
            Shown::Str(bytes) => {
                // The agent's escapes (`dynprobe::line`): one event stays one line.
                let mut out = String::from("\"");
                for &b in bytes {
                    match b {
                        b'"' => out.push_str("\\\""),
                        b'\\' => out.push_str("\\\\"),
                        b'\n' => out.push_str("\\n"),
                        b'\t' => out.push_str("\\t"),
                        b' '..=b'~' => out.push(b as char),
                        _ => out.push_str(&format!("\\x{b:02x}")),
                    }
                }
                out.push('"');
                out
            }
        }
    }
}

/// The fields of a hit of `event` as they are shown: values typed by DWARF where the spec
/// was lowered from source, the length field of a cut string left out, and the fields that
/// had no fetch at the site the hit came from (`seen=(optimized out)`) added.
pub(crate) fn shown<'a>(event: &str, args: &[(&'a str, &'a str)]) -> Vec<(String, Shown<'a>)> {
    let raw = || args.iter().map(|(n, v)| (n.to_string(), Shown::Raw(v))).collect();
    let Some(renderings) = RENDERINGS.get() else { return raw() };
    if !renderings.events.contains(event) {
        return raw();
    }
    let value_of = |name: &str| args.iter().find(|(n, _)| *n == name).map(|(_, v)| *v);
    let mut hidden = Vec::new();
    let mut out: Vec<(String, Shown<'a>)> = Vec::new();
    for (name, value) in args {
        let render = renderings.fields.get(&(event.to_string(), name.to_string()));
        let shown = match render {
            Some(Render::Element { length, index, inner }) => {
                let below = value_of(length).and_then(|v| v.parse::<u64>().ok()).is_some_and(|l| *index < l);
                if !below {
                    hidden.push(*name);
                }
                match inner {
                    Some(inner) => render_value(inner, value).map_or(Shown::Raw(value), Shown::Typed),
                    None => Shown::Raw(value),
                }
            }
            Some(Render::Variant { tag, payload, variants, inner }) => {
                hidden.push(tag.as_str());
                let selected = value_of(tag).and_then(|v| v.parse::<u64>().ok());
                let text = match selected {
                    Some(t) if t == payload.0 => {
                        let value = inner.as_ref().and_then(|r| render_value(r, value)).unwrap_or(value.to_string());
                        format!("{}({value})", payload.1)
                    }
                    Some(t) => match variants.iter().find(|(d, _)| *d == t) {
                        Some((_, name)) => name.clone(),
                        None => format!("(tag {t})"),
                    },
                    None => value.to_string(),
                };
                Shown::Typed(text)
            }
            Some(Render::CutTo(length_field)) => {
                hidden.push(length_field.as_str());
                let length = value_of(length_field).and_then(|v| v.parse::<usize>().ok());
                match (output::Value::parse(value), length) {
                    (output::Value::Str(mut bytes), Some(length)) => {
                        bytes.truncate(length);
                        Shown::Str(bytes)
                    }
                    _ => Shown::Raw(value),
                }
            }
            Some(render) => render_value(render, value).map_or(Shown::Raw(value), Shown::Typed),
            None => Shown::Raw(value),
        };
        out.push((name.to_string(), shown));
    }
    out.retain(|(name, _)| !hidden.contains(&name.as_str()));
    if let Some(missing) = renderings.missing.get(event) {
        for (name, text) in missing {
            if !args.iter().any(|(n, _)| n == name) {
                out.push((name.clone(), Shown::Typed(text.clone())));
            }
        }
    }
    out
}

/// `value` as `render` shows it; `None` when it is not a number (a fault).
fn render_value(render: &Render, value: &str) -> Option<String> {
    let number = || -> Option<i128> {
        match value.strip_prefix("0x") {
            Some(hex) => i128::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        }
    };
    Some(match render {
        Render::Bool => (number()? != 0).to_string(),
        Render::Char => {
            let c = number()? as u8;
            match c {
                b' '..=b'~' if c != b'\'' && c != b'\\' => format!("'{}'", c as char),
                _ => format!("'\\x{c:02x}'"),
            }
        }
        Render::Enum(values) => {
            let n = number()? as i64;
            match values.iter().find(|(v, _)| *v == n) {
                Some((_, name)) => name.clone(),
                None => n.to_string(),
            }
        }
        Render::CutTo(_) | Render::Element { .. } | Render::Variant { .. } => return None,
    })
}

/// Whether a spec reads the DWARF: a source location or a source variable.
fn needs_dwarf(spec: &ProbeSpec) -> bool {
    let location = spec.location.code();
    location.is_some_and(|l| dynprobe::spec::source_point(l).is_some())
        || spec.args.iter().any(|a| matches!(a.fetch, Fetch::Var(_)))
}

/// Whether an `r:` spec on a plain function of the program has `$retval` without a type:
/// typed by the DWARF when the program has it.
fn wants_typed_retval(spec: &ProbeSpec) -> bool {
    spec.kind == ProbeKind::Return
        && matches!(spec.location.code(), Some(Location::Symbol(s)) if !s.contains(':'))
        && spec.args.iter().any(|a| a.fetch == Fetch::Retval && a.ty == FetchType::DEFAULT)
}

/// The program a started command runs: its path, or found in `PATH`.
pub(crate) fn program_path(program: &std::ffi::OsStr) -> Option<PathBuf> {
    let path = Path::new(program);
    if program.as_encoded_bytes().contains(&b'/') {
        return Some(path.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?).map(|dir| dir.join(path)).find(|p| p.is_file())
}

/// The specs with their source-level parts lowered for `program` (one line each), and what
/// to tell the user about them (a line moved to the next with code, inlined copies). A spec
/// whose location names a library (`p:libfoo:parse:3`, `p libfoo:parse.c:40`) reads that
/// library's DWARF: the library the program loads (for `-p PID`, has loaded) of that name.
pub(crate) fn lower(specs: Vec<ProbeSpec>, program: Option<&Path>) -> Result<(Vec<ProbeSpec>, Vec<String>), String> {
    if !specs.iter().any(|s| needs_dwarf(s) || wants_typed_retval(s)) {
        return Ok((specs, Vec::new()));
    }
    // The DWARF of the program (`None`) and of each library named, opened once each.
    let module_of = |spec: &ProbeSpec| spec.location.code().and_then(module_point).and_then(|(module, _)| module);
    let mut opened: HashMap<Option<String>, Result<DebugInfo, String>> = HashMap::new();
    for spec in &specs {
        let module = if needs_dwarf(spec) { module_of(spec) } else { None };
        if let std::collections::hash_map::Entry::Vacant(slot) = opened.entry(module) {
            let info = open_module(program, slot.key().as_deref());
            slot.insert(info);
        }
    }
    let debug = |module: Option<String>| &opened[&module];
    let mut renderings = Renderings::default();
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for spec in specs {
        if !needs_dwarf(&spec) {
            // `$retval` typed when the DWARF is there; without it the spec stays as written.
            if wants_typed_retval(&spec) {
                if let Ok(info) = debug(None) {
                    match lower_one(&spec, info, &mut renderings, &mut notes) {
                        Ok(lowered) => {
                            out.extend(lowered);
                            continue;
                        }
                        // `rax` would be garbage: say why instead.
                        Err(e) if e.contains(X87_UNSUPPORTED) => return Err(format!("probe `{}`: {e}", spec.text)),
                        Err(_) => {}
                    }
                }
            }
            out.push(spec);
            continue;
        }
        let info = debug(module_of(&spec)).as_ref().map_err(|e| format!("cannot place probe `{}`: {e}", spec.text))?;
        out.extend(
            lower_one(&spec, info, &mut renderings, &mut notes).map_err(|e| format!("probe `{}`: {e}", spec.text))?,
        );
    }
    let _ = RENDERINGS.set(renderings);
    Ok((out, notes))
}

/// The DWARF of `program`, or of its library `module`.
fn open_module(program: Option<&Path>, module: Option<&str>) -> Result<DebugInfo, String> {
    let program =
        program.ok_or_else(|| "a source-level probe needs the program's path (`-- PROG` or `-p PID`)".to_string())?;
    let path = match module {
        None => program.to_path_buf(),
        Some(module) => module_path(program, module)?,
    };
    DebugInfo::open(&path).map_err(|e| e.to_string())
}

/// The file of the library `module` names (its path, its file name, or a prefix of it that
/// stops at a `.` or `-`: `libc` → `libc.so.6`, as probe specs name modules): among the
/// files a running process (`/proc/PID/exe`) has mapped, else among the libraries the
/// dynamic linker would load for `program` (as `ldd` lists them, see ld.so(8)).
pub(crate) fn module_path(program: &Path, module: &str) -> Result<PathBuf, String> {
    if module.contains('/') {
        return Ok(PathBuf::from(module));
    }
    let pid = program.strip_prefix("/proc").ok().filter(|rest| rest.ends_with("exe")).and_then(|rest| rest.parent());
    let files: Vec<PathBuf> = match pid {
        Some(pid) => {
            let maps = std::fs::read_to_string(Path::new("/proc").join(pid).join("maps"))
                .map_err(|e| format!("cannot read the mappings of process {}: {e}", pid.display()))?;
            maps.lines()
                .filter_map(|l| l.split_whitespace().nth(5))
                .filter(|p| p.starts_with('/'))
                .map(PathBuf::from)
                .collect()
        }
        None => {
            let out = std::process::Command::new("ldd")
                .arg(program)
                .output()
                .map_err(|e| format!("cannot run ldd to find `{module}`: {e}"))?;
            // `\tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x…)`, or a path alone.
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| {
                    let l = l.trim();
                    let path = l.split_once("=> ").map_or(l, |(_, p)| p);
                    path.split(" (").next().filter(|p| p.starts_with('/')).map(PathBuf::from)
                })
                .collect()
        }
    };
    let named = |path: &&PathBuf| {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        name == module || name.strip_prefix(module).is_some_and(|rest| rest.starts_with(['.', '-']))
    };
    match files.iter().find(named) {
        Some(path) => Ok(path.clone()),
        None => Err(format!(
            "`{}` loads no library named `{module}` (give its path, `p:/path/to/{module}.so:FUNC:LINE`, for one it \
             opens with dlopen)",
            program.display()
        )),
    }
}

/// A spec location's source point and the library it names, if any: `libfoo:parse:3` is
/// line 3 of `parse` in `libfoo`, `libfoo:parse` (with variables) its entry.
fn module_point(location: &Location) -> Option<(Option<String>, SourcePoint)> {
    let point = match dynprobe::spec::source_point(location) {
        Some(point) => point,
        None => match location {
            Location::Symbol(name) => SourcePoint::Function { name: name.clone(), file: None },
            _ => return None,
        },
    };
    let split = |text: &str| -> (Option<String>, String) {
        let (module, rest) = dynprobe_symbols::split_module(text);
        (module.map(str::to_string), rest.to_string())
    };
    Some(match point {
        SourcePoint::Function { name, file } => {
            let (module, name) = split(&name);
            (module, SourcePoint::Function { name, file })
        }
        SourcePoint::FunctionLine { name, file, line } => {
            let (module, name) = split(&name);
            (module, SourcePoint::FunctionLine { name, file, line })
        }
        SourcePoint::FileLine { file, line } => {
            let (module, file) = split(&file);
            (module, SourcePoint::FileLine { file, line })
        }
    })
}

/// The sites of a spec's location, in `info` (the DWARF of the module it names).
pub(crate) fn sites(spec: &ProbeSpec, info: &DebugInfo) -> Result<Vec<SourceSite>, String> {
    let location = spec.location.code().ok_or("a marker has no source location")?;
    let (_, point) =
        module_point(location).ok_or("source variables need a function or a source line as the location")?;
    if spec.kind == ProbeKind::Return && !matches!(point, SourcePoint::Function { .. }) {
        return Err("a return probe goes on a function: write `r:FUNC` (or `r:FUNC@FILE`)".into());
    }
    let mut sites = info.resolve(&point).map_err(|e| e.to_string())?;
    if spec.kind == ProbeKind::Return {
        // An inlined copy is never called, so it never returns.
        sites.retain(|s| !s.inlined);
        if sites.is_empty() {
            return Err(format!("`{point}` is only inlined: no call of it returns"));
        }
    }
    Ok(sites)
}

/// One spec lowered: a spec per site.
fn lower_one(
    spec: &ProbeSpec,
    info: &DebugInfo,
    renderings: &mut Renderings,
    notes: &mut Vec<String>,
) -> Result<Vec<ProbeSpec>, String> {
    let sites = sites(spec, info)?;
    let mut out = Vec::new();
    for site in &sites {
        let (symbol, offset) = info
            .symbol_at(site.addr)
            .ok_or_else(|| format!("no symbol of `{}` contains 0x{:x}", info.binary.display(), site.addr))?;
        // In a library, the symbol is named with the library, as the spec named it.
        let symbol = match spec.location.code().and_then(module_point).and_then(|(module, _)| module) {
            Some(module) => format!("{module}:{symbol}"),
            None => symbol.to_string(),
        };
        let location = match (spec.kind, offset) {
            (ProbeKind::Return, _) | (_, 0) => Location::Symbol(symbol.clone()),
            (_, offset) => Location::SymbolOffset(symbol.clone(), offset),
        };
        let mut lowered = ProbeSpec { location: Target::Code(location), args: Vec::new(), ..spec.clone() };
        let event = lowered.full_event_name();
        renderings.events.insert(event.clone());
        for arg in &spec.args {
            for (name, fetch, ty, render) in lower_arg(arg, spec.kind, site, info)? {
                match fetch {
                    Ok(fetch) => {
                        if let Some(render) = render {
                            renderings.fields.insert((event.clone(), name.clone()), render);
                        }
                        lowered.args.push(FetchArg { name, fetch, ty });
                    }
                    Err(text) => {
                        let missing = renderings.missing.entry(event.clone()).or_default();
                        if !missing.iter().any(|(n, _)| *n == name) {
                            missing.push((name, text));
                        }
                    }
                }
            }
        }
        lowered.text = spec_text(&lowered);
        if let Some(note) = &site.note {
            notes.push(format!("`{}`: {note}", spec.text));
        }
        if site.inlined {
            notes.push(format!(
                "`{}`: a site at 0x{:x} ({symbol}+0x{offset:x}) is an inlined copy of {}",
                spec.text, site.addr, site.function
            ));
        }
        out.push(lowered);
    }
    Ok(out)
}

/// A lowered field: its name, its fetch (else what to print: `(optimized out)`), type and
/// rendering.
type LoweredArg = (String, Result<Fetch, String>, FetchType, Option<Render>);

/// The fields one argument becomes (a struct gives one per member).
fn lower_arg(arg: &FetchArg, kind: ProbeKind, site: &SourceSite, info: &DebugInfo) -> Result<Vec<LoweredArg>, String> {
    let (place, ty) = match &arg.fetch {
        Fetch::Var(var) => match info.resolve_variable(site, &var.name, &accesses(var)) {
            Ok(found) => found,
            // Not readable at this site (but maybe at others): the event says so.
            Err(VarError::OptimizedOut) => {
                return Ok(vec![(arg.name.clone(), Err("(optimized out)".into()), arg.ty, None)])
            }
            Err(VarError::Constant(_) | VarError::Unsupported(_)) if site.inlined || !site.entry => {
                return Ok(vec![(arg.name.clone(), Err("(unavailable)".into()), arg.ty, None)])
            }
            Err(e) => return Err(format!("field `{}` (`{var}`): {e}", arg.name)),
        },
        Fetch::Retval if arg.ty == FetchType::DEFAULT => match info.return_type(site) {
            Some(ty) => return typed(&arg.name, Fetch::Retval, Some(ty), info, 0),
            None => return Ok(vec![(arg.name.clone(), Ok(Fetch::Retval), arg.ty, None)]),
        },
        other => return Ok(vec![(arg.name.clone(), Ok(other.clone()), arg.ty, None)]),
    };
    if let Place::Pieces(pieces) = &place {
        // A struct in pieces (Rust's `&str` and slices in two registers): each member from
        // its piece.
        let members = match ty.map(|t| info.type_of(t).kind) {
            Some(TypeKind::Struct(members)) => members,
            _ => return Err(format!("field `{}`: its value is in pieces, which only a struct's can be", arg.name)),
        };
        let fetches = members
            .iter()
            .map(|m| {
                let piece = pieces.iter().find(|p| p.offset == m.offset).and_then(|p| p.place.as_ref());
                let fetch = match piece {
                    Some(place) => place_fetch(place, kind, site),
                    None => Err("(optimized out)".to_string()),
                };
                (m.clone(), fetch)
            })
            .collect();
        return struct_fields(&arg.name, ty, fetches, info);
    }
    let fetch = place_fetch(&place, kind, site).map_err(|e| format!("field `{}`: {e}", arg.name))?;
    if arg.ty != FetchType::DEFAULT {
        return Ok(vec![(arg.name.clone(), Ok(fetch), arg.ty, None)]);
    }
    typed(&arg.name, fetch, ty, info, 0)
}

/// The `Access` steps of a variable: its leading `*`s apply last (`*p->q` is `*(p->q)`).
fn accesses(var: &VarExpr) -> Vec<Access> {
    let mut out: Vec<Access> = var
        .steps
        .iter()
        .map(|s| match s {
            VarStep::Field(m) => Access::Field(m.clone()),
            VarStep::Arrow(m) => Access::Arrow(m.clone()),
            VarStep::Index(i) => Access::Index(*i),
        })
        .collect();
    out.extend(std::iter::repeat_n(Access::Deref, var.derefs));
    out
}

/// The fetch reading a place. In a return probe only the entry's argument registers are
/// known (as `$argN`).
fn place_fetch(place: &Place, kind: ProbeKind, site: &SourceSite) -> Result<Fetch, String> {
    if place.reads() > MAX_DEREF {
        return Err(format!("it takes more than {MAX_DEREF} memory reads"));
    }
    Ok(match place {
        Place::Register(n) if kind == ProbeKind::Return => {
            match ARGUMENT_REGISTERS.iter().position(|r| r == n).filter(|_| site.entry) {
                Some(i) => Fetch::Arg(i as u8 + 1),
                None => return Err(format!("{place} is not known at the return; a return probe has the arguments")),
            }
        }
        // DWARF numbers 17..=32 are xmm0..xmm15 (System V x86-64 ABI, figure 3.36).
        Place::Register(n @ 17..=32) => Fetch::Reg(Reg::XMM[usize::from(*n) - 17]),
        Place::Register(n) => {
            let name = DWARF_REGISTER_NAMES
                .get(usize::from(*n))
                .ok_or_else(|| format!("it is in {place}, which cannot be fetched"))?;
            Fetch::Reg(Reg::from_name(name).ok_or_else(|| format!("register {name} cannot be fetched"))?)
        }
        Place::Memory { base, offset } => {
            Fetch::Deref { offset: *offset, base: Box::new(place_fetch(base, kind, site)?) }
        }
        Place::Pieces(_) => return Err("its value is in pieces; name a member".into()),
    })
}

/// Why a `long double` cannot be shown (the end of the message that says so).
const X87_UNSUPPORTED: &str = "x87 extended precision) is not supported; float and double are";

/// The fields a value of DWARF type `ty` read by `fetch` prints as: one for a scalar, one
/// per scalar member for a struct (`req_len`), shallowly.
fn typed(
    name: &str,
    fetch: Fetch,
    ty: Option<TypeRef>,
    info: &DebugInfo,
    depth: usize,
) -> Result<Vec<LoweredArg>, String> {
    let Some(struct_ty) = ty else { return Ok(vec![(name.to_string(), Ok(fetch), FetchType::DEFAULT, None)]) };
    let ty = info.type_of(struct_ty);
    let int = |format, bytes: u64| {
        let bits = (bytes.clamp(1, 8) * 8).next_power_of_two().min(64) as u8;
        FetchType::Int(IntType { format, bits })
    };
    let signed = |signed: bool| if signed { Format::Signed } else { Format::Unsigned };
    let one = |ty: FetchType, render| Ok(vec![(name.to_string(), Ok(fetch.clone()), ty, render)]);
    match ty.kind {
        TypeKind::Signed => one(int(Format::Signed, ty.size), None),
        TypeKind::Unsigned => one(int(Format::Unsigned, ty.size), None),
        TypeKind::Bool => one(int(Format::Unsigned, ty.size), Some(Render::Bool)),
        TypeKind::Char { signed: s } => one(int(signed(s), ty.size), Some(Render::Char)),
        TypeKind::Enum(values) => {
            let negative = values.iter().any(|(v, _)| *v < 0);
            one(int(signed(negative), ty.size), Some(Render::Enum(values)))
        }
        // `long double` is 80 bits in x87 format, in memory or in st0 (a return value): not
        // a vector register's low bits.
        TypeKind::Float if ty.size > 8 => {
            Err(format!("field `{name}`: `{}` ({} bytes, {X87_UNSUPPORTED}", ty.name, ty.size))
        }
        TypeKind::Float => {
            let float =
                |fetch: Fetch| Ok(vec![(name.to_string(), Ok(fetch), FetchType::Float(ty.size as u8 * 8), None)]);
            match fetch {
                Fetch::Deref { .. } => float(fetch),
                Fetch::Reg(reg) if reg.xmm().is_some() => float(fetch),
                // The SysV ABI returns a `float` or `double` in xmm0 (its §3.2.3).
                Fetch::Retval => float(Fetch::Reg(Reg::Xmm0)),
                _ => Err(format!("field `{name}`: a floating-point value in a general register cannot be shown")),
            }
        }
        TypeKind::Pointer(target) => {
            let to_char = target.is_some_and(|t| matches!(info.type_of(t).kind, TypeKind::Char { .. }));
            match to_char && fetch_depth(&fetch) < MAX_DEREF {
                // `char *`: the string it points to.
                true => one_string(name, fetch),
                false => one(FetchType::Int(IntType { format: Format::Hex, bits: 64 }), None),
            }
        }
        TypeKind::Struct(members) if depth == 0 => {
            let Fetch::Deref { offset, base } = fetch else {
                return Err(format!("field `{name}`: the struct is in a register here; name its members"));
            };
            if let Some(fields) = rust_value(name, struct_ty, &members, offset, &base, info)? {
                return Ok(fields);
            }
            let fetches = members
                .into_iter()
                .map(|m| {
                    let fetch = Fetch::Deref { offset: offset + m.offset as i64, base: base.clone() };
                    (m, Ok(fetch))
                })
                .collect();
            struct_fields(name, Some(struct_ty), fetches, info)
        }
        TypeKind::Array { .. } => {
            Err(format!("field `{name}`: `{}` is an array; name an element (`{name}[0]`)", ty.name))
        }
        _ => Err(format!("field `{name}`: a value of type `{}` cannot be printed; give a :TYPE", ty.name)),
    }
}

/// A struct's fields, shallowly, from each member's fetch (or why it has none): one field
/// per scalar member (`req_len`); Rust's `&str` as its string (cut to its length when
/// printed), a slice (`&[T]`) as its length and first element.
fn struct_fields(
    name: &str,
    ty: Option<TypeRef>,
    members: Vec<(Member, Result<Fetch, String>)>,
    info: &DebugInfo,
) -> Result<Vec<LoweredArg>, String> {
    let type_name = ty.map(|t| info.type_of(t).name).unwrap_or_default();
    let member = |wanted: &str| members.iter().find(|(m, _)| m.name == wanted);
    if let (Some((ptr, Ok(data))), Some((_, Ok(length)))) = (member("data_ptr"), member("length")) {
        let length_field = format!("{name}_len");
        let length = (length_field.clone(), Ok(length.clone()), FetchType::Int(IntType::U64), None);
        let TypeKind::Pointer(element) = info.type_of(ptr.ty).kind else {
            return Err(format!("field `{name}`: `{type_name}` has no pointer"));
        };
        if type_name == "&str" || type_name == "&mut str" {
            let string = Fetch::Deref { offset: 0, base: Box::new(data.clone()) };
            let render = Render::CutTo(length_field);
            return Ok(vec![(name.to_string(), Ok(string), FetchType::String, Some(render)), length]);
        }
        let mut out = vec![length];
        if fetch_depth(data) < MAX_DEREF {
            let first = Fetch::Deref { offset: 0, base: Box::new(data.clone()) };
            out.extend(typed(&format!("{name}_0"), first, element, info, 1)?);
        }
        return Ok(out);
    }
    let mut out = Vec::new();
    for (m, fetch) in members {
        let inner = info.type_of(m.ty);
        if matches!(inner.kind, TypeKind::Struct(_) | TypeKind::Array { .. } | TypeKind::Other) {
            continue;
        }
        let field = format!("{name}_{}", m.name);
        match fetch {
            Ok(fetch) => out.extend(typed(&field, fetch, Some(m.ty), info, 1)?),
            Err(text) => out.push((field, Err(text), FetchType::DEFAULT, None)),
        }
    }
    Ok(out)
}

/// The values `-A FUNC@FIELDS` (`-R FUNC@FETCH` when `retval`) gives in place of the DWARF's:
/// fields as a probe spec writes them (`line=+0($arg1):string len=$arg2:s32`), each shown
/// by its type; `Err` says what is wrong with the text.
pub(crate) fn override_values(text: &str, retval: bool) -> Result<Vec<CallValue>, String> {
    let spec = match retval {
        true => ProbeSpec::parse(&format!("r:a f retval={text}")),
        false => ProbeSpec::parse(&format!("p:a f {text}")),
    }
    .map_err(|e| format!("bad {} `{text}`: {e}", if retval { "return value" } else { "arguments" }))?;
    spec.args
        .iter()
        .map(|arg| {
            let mut named = false;
            arg.fetch.walk(&mut |f| named |= matches!(f, Fetch::Var(_)));
            if named {
                return Err(format!(
                    "`{text}`: name registers, `$argN` or `$stackN` (a source variable needs a probe point)"
                ));
            }
            let source = format!("{}:{}", fetch_text(&arg.fetch), arg.ty);
            Ok(CallValue { name: arg.name.clone(), shown: shown_type(arg.ty, None), source })
        })
        .collect()
}

/// One value `record -a` records with a call: its name, how it is shown (see
/// `crate::trace::values`) and where the agent reads it (a fetch as the grammar writes it,
/// `xmmN`, or `-` when it cannot be read at the entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CallValue {
    pub(crate) name: String,
    pub(crate) shown: String,
    pub(crate) source: String,
}

/// The values `record -a` records for a call of the function entered at `site`: its
/// parameters at the entry and its return value (`None` for `void`).
///
/// At the entry the DWARF locations of an unoptimized build describe the stack slots the
/// prologue has not written yet, so the places come from the SysV x86-64 calling convention
/// (its §3.2.3 "Parameter Passing"), as uftrace's `-a` takes them: integer classes in
/// `rdi rsi rdx rcx r8 r9`, floating point in xmm0–7, the rest on the stack above the
/// return address, a struct of more than 16 bytes on the stack, one of up to 16 bytes in
/// registers by its eightbytes' classes (shown `(unknown)`). Where the classification is
/// not sure (a nested aggregate, `long double`, `__int128`), that parameter and every one
/// after it is `(unknown)`: never a value read from the wrong place. The types lower as
/// the `probe` command's do ([`typed`]).
///
/// A struct returned in memory takes a hidden pointer in `rdi` first. `c_abi` false (a C++
/// or Rust function) trusts the convention for scalars only: C++ passes a class that is not
/// trivially copyable by invisible reference, and Rust's own ABI is unspecified for
/// aggregates — a by-value aggregate there makes it and every parameter after it
/// `(unknown)`, and an aggregate return value all of them.
pub(crate) fn call_values(info: &DebugInfo, site: &SourceSite, c_abi: bool) -> (Vec<CallValue>, Option<CallValue>) {
    let unknown = |name: &str| CallValue { name: name.to_string(), shown: "?".into(), source: "-".into() };
    let lowered = |name: &str, fetch: Fetch, ty: Option<TypeRef>| -> Vec<CallValue> {
        match typed(name, fetch, ty, info, 0) {
            Ok(fields) => fields
                .into_iter()
                .map(|(name, fetch, ty, render)| match fetch {
                    Ok(fetch) => CallValue {
                        shown: shown_type(ty, render.as_ref()),
                        source: format!("{}:{ty}", fetch_text(&fetch)),
                        name,
                    },
                    Err(_) => unknown(&name),
                })
                .collect(),
            Err(_) => vec![unknown(name)],
        }
    };
    let class_of = |ty: &dynprobe_symbols::dwarf::Type| match abi_class(ty, info) {
        Some(Class::Integer | Class::Sse) | None => abi_class(ty, info),
        Some(_) if c_abi => abi_class(ty, info),
        Some(_) => None,
    };
    let returned = info.return_type(site).map(|t| info.type_of(t));
    // The integer registers the hidden pointer of a struct returned in memory takes; `None`
    // when that is not sure.
    let hidden = match &returned {
        None => Some(0),
        Some(ty) => match class_of(ty) {
            Some(Class::Memory(_)) => Some(1),
            Some(_) => Some(0),
            None if c_abi && ty.size > 16 => Some(1),
            None => None,
        },
    };
    let mut args = Vec::new();
    let (mut ints, mut vectors, mut slots) = (hidden.unwrap_or(0), 0usize, 0i64);
    let mut sure = hidden.is_some();
    for var in info.variables(site).into_iter().filter(|v| v.parameter) {
        let ty = var.ty.map(|t| info.type_of(t));
        let class = match (&ty, sure) {
            (Some(ty), true) => class_of(ty),
            _ => None,
        };
        let Some(class) = class else {
            sure = false;
            args.push(unknown(&var.name));
            continue;
        };
        match class {
            Class::Integer if ints < 6 => {
                ints += 1;
                args.extend(lowered(&var.name, Fetch::Arg(ints as u8), var.ty));
            }
            Class::Sse if vectors < 8 => {
                let bits = ty.as_ref().map_or(8, |t| t.size) * 8;
                args.push(CallValue { name: var.name, shown: format!("f{bits}"), source: format!("xmm{vectors}") });
                vectors += 1;
            }
            Class::Integer | Class::Sse => {
                slots += 1;
                match class {
                    Class::Sse => {
                        let bits = ty.as_ref().map_or(8, |t| t.size) * 8;
                        let fetch = Fetch::Stack(slots as u32);
                        let source = format!("{}:x{bits}", fetch_text(&fetch));
                        args.push(CallValue { name: var.name, shown: format!("f{bits}"), source });
                    }
                    _ => args.extend(lowered(&var.name, Fetch::Stack(slots as u32), var.ty)),
                }
            }
            Class::Registers { ints: n, vectors: m } if ints + n <= 6 && vectors + m <= 8 => {
                ints += n;
                vectors += m;
                args.push(unknown(&var.name));
            }
            Class::Registers { .. } | Class::Memory(_) => {
                let words = match class {
                    Class::Memory(words) => words,
                    _ => ty.as_ref().map_or(1, |t| t.size.div_ceil(8) as i64),
                };
                let fetch = Fetch::Deref { offset: 8 * (slots + 1), base: Box::new(Fetch::StackPointer) };
                slots += words;
                args.extend(lowered(&var.name, fetch, var.ty));
            }
        }
    }
    let retval = info.return_type(site).map(|ty| {
        let kind = info.type_of(ty);
        match abi_class(&kind, info) {
            Some(Class::Integer) => {
                lowered("retval", Fetch::Retval, Some(ty)).into_iter().next().unwrap_or_else(|| unknown("retval"))
            }
            Some(Class::Sse) => {
                CallValue { name: "retval".into(), shown: format!("f{}", kind.size * 8), source: "xmm0".into() }
            }
            _ => unknown("retval"),
        }
    });
    (args, retval)
}

/// How the SysV x86-64 ABI passes a value (§3.2.3), as far as [`call_values`] reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// In the next integer register (or stack slot).
    Integer,
    /// In the next vector register (or stack slot): `float`, `double`.
    Sse,
    /// A struct of up to 16 bytes in this many integer and vector registers (on the stack
    /// when they do not all fit).
    Registers { ints: usize, vectors: usize },
    /// On the stack, in this many eightbytes.
    Memory(i64),
}

/// The class of a value of type `ty`; `None` when it is not sure.
fn abi_class(ty: &dynprobe_symbols::dwarf::Type, info: &DebugInfo) -> Option<Class> {
    let scalar = |ty: &dynprobe_symbols::dwarf::Type| match ty.kind {
        _ if ty.is_integer_scalar() && ty.size > 0 => Some(Class::Integer),
        TypeKind::Float if ty.size == 4 || ty.size == 8 => Some(Class::Sse),
        _ => None,
    };
    match &ty.kind {
        TypeKind::Struct(_) if ty.size > 16 => Some(Class::Memory(ty.size.div_ceil(8) as i64)),
        TypeKind::Struct(members) if ty.size > 0 => {
            // Each eightbyte is INTEGER when any member in it is, else SSE.
            let mut integer = [false; 2];
            let mut used = [false; 2];
            for m in members {
                let class = scalar(&info.type_of(m.ty))?;
                let word = (m.offset / 8) as usize;
                *used.get_mut(word)? = true;
                integer[word] |= class == Class::Integer;
            }
            let words = ty.size.div_ceil(8) as usize;
            if used[..words].iter().any(|u| !u) {
                return None;
            }
            let ints = integer[..words].iter().filter(|i| **i).count();
            Some(Class::Registers { ints, vectors: words - ints })
        }
        _ => scalar(ty),
    }
}

/// How `record -a` shows a value of fetch type `ty` rendered as `render` (read by
/// `crate::trace::values`): `s32`, `u8`, `x64` (a pointer), `bool`, `char`, `str`, `f32`,
/// `f64`, `enum:0=RED,1=GREEN`.
fn shown_type(ty: FetchType, render: Option<&Render>) -> String {
    match (ty, render) {
        (FetchType::String | FetchType::UString, _) | (_, Some(Render::CutTo(_))) => "str".into(),
        (_, Some(Render::Bool)) => "bool".into(),
        (_, Some(Render::Char)) => "char".into(),
        (FetchType::Float(bits), _) => format!("f{bits}"),
        (_, Some(Render::Enum(values))) => {
            let values: Vec<String> = values.iter().map(|(v, name)| format!("{v}={name}")).collect();
            format!("enum:{}", values.join(","))
        }
        (FetchType::Int(int), None) => int.to_string(),
        // A Rust `Vec`'s elements and `Option`s need the values beside them: record -a
        // passes Rust aggregates as unknown, so these are never its own.
        (FetchType::Int(_), Some(Render::Element { .. } | Render::Variant { .. })) => "?".into(),
    }
}

/// How many elements of a Rust `Vec` a value shows (those below its length).
const VEC_ELEMENTS: u64 = 3;

/// The fields of a Rust `String`, `Vec<T>` or enum with a tag (`Option<u32>`) in memory at
/// `offset` from `base`'s value: a `String` as its text cut to its length, a `Vec` as its
/// length and first elements, an `Option` of a scalar as `Some(v)` or `None` (other enums
/// as their variant's name). `None` for any other struct.
fn rust_value(
    name: &str,
    ty: TypeRef,
    members: &[Member],
    offset: i64,
    base: &Fetch,
    info: &DebugInfo,
) -> Result<Option<Vec<LoweredArg>>, String> {
    let at = |off: u64| Fetch::Deref { offset: offset + off as i64, base: Box::new(base.clone()) };
    let unsigned = |bytes: u64| {
        let bits = (bytes.clamp(1, 8) * 8).next_power_of_two().min(64) as u8;
        FetchType::Int(IntType { format: Format::Unsigned, bits })
    };
    if let Some(variants) = info.variants(ty) {
        let tag_field = format!("{name}_tag");
        let tag_fetch = at(variants.tag_offset);
        let names: Vec<(u64, String)> =
            variants.variants.iter().filter_map(|v| Some((v.discr?, v.name.clone()))).collect();
        let with_payload: Vec<_> = variants.variants.iter().filter(|v| !v.fields.is_empty()).collect();
        if let [variant] = with_payload.as_slice() {
            if let (Some(discr), [field]) = (variant.discr, variant.fields.as_slice()) {
                let payload = typed(name, at(field.offset), Some(field.ty), info, 1)?;
                if let [(_, Ok(fetch), fetch_ty, inner)] = payload.as_slice() {
                    let render = Render::Variant {
                        tag: tag_field.clone(),
                        payload: (discr, variant.name.clone()),
                        variants: names,
                        inner: inner.clone().map(Box::new),
                    };
                    let tag = (tag_field, Ok(tag_fetch), unsigned(variants.tag_size), None);
                    return Ok(Some(vec![(name.to_string(), Ok(fetch.clone()), *fetch_ty, Some(render)), tag]));
                }
            }
        }
        // Any other enum: the name of its variant.
        let names = names.into_iter().map(|(d, n)| (d as i64, n)).collect();
        return Ok(Some(vec![(
            name.to_string(),
            Ok(tag_fetch),
            unsigned(variants.tag_size),
            Some(Render::Enum(names)),
        )]));
    }
    let member = |name: &str| members.iter().find(|m| m.name == name);
    // `String { vec: Vec<u8> }`: its bytes, cut to its length when printed.
    if let (Some(vec), 1) = (member("vec"), members.len()) {
        let TypeKind::Struct(inner) = info.type_of(vec.ty).kind else { return Ok(None) };
        let Some((data, length)) = vec_layout(&inner, info) else { return Ok(None) };
        let length_field = format!("{name}_len");
        let text = Fetch::Deref { offset: 0, base: Box::new(at(vec.offset + data)) };
        let length = (length_field.clone(), Ok(at(vec.offset + length)), FetchType::Int(IntType::U64), None);
        return Ok(Some(vec![
            (name.to_string(), Ok(text), FetchType::String, Some(Render::CutTo(length_field))),
            length,
        ]));
    }
    // `Vec<T> { buf, len }`: its length and first elements (the element type from `T`).
    let Some((data, length)) = vec_layout(members, info) else { return Ok(None) };
    let Some((_, element)) = info.type_parameters(ty).into_iter().find(|(n, _)| n == "T") else { return Ok(None) };
    let size = info.type_of(element).size.max(1);
    let length_field = format!("{name}_len");
    let mut out = vec![(length_field.clone(), Ok(at(length)), FetchType::Int(IntType::U64), None)];
    if fetch_depth(&at(data)) < MAX_DEREF {
        for index in 0..VEC_ELEMENTS {
            let fetch = Fetch::Deref { offset: (index * size) as i64, base: Box::new(at(data)) };
            for (field, fetch, fetch_ty, inner) in typed(&format!("{name}_{index}"), fetch, Some(element), info, 1)? {
                let render = Render::Element { length: length_field.clone(), index, inner: inner.map(Box::new) };
                out.push((field, fetch, fetch_ty, Some(render)));
            }
        }
    }
    Ok(Some(out))
}

/// Where a Rust `Vec`'s data pointer and length are in it: `len`, and the first pointer
/// inside `buf` (`RawVec` → `RawVecInner` → `Unique` → `NonNull` → the pointer, in the
/// standard library of the time; searched for rather than spelled out).
fn vec_layout(members: &[Member], info: &DebugInfo) -> Option<(u64, u64)> {
    let buf = members.iter().find(|m| m.name == "buf")?;
    let len = members.iter().find(|m| m.name == "len")?;
    Some((buf.offset + first_pointer(buf.ty, info, 0)?, len.offset))
}

/// The offset of the first pointer inside a value of type `ty`, looking into structs.
fn first_pointer(ty: TypeRef, info: &DebugInfo, depth: usize) -> Option<u64> {
    match info.type_of(ty).kind {
        TypeKind::Pointer(_) => Some(0),
        TypeKind::Struct(members) if depth < 8 => {
            members.iter().find_map(|m| Some(m.offset + first_pointer(m.ty, info, depth + 1)?))
        }
        _ => None,
    }
}

fn one_string(name: &str, fetch: Fetch) -> Result<Vec<LoweredArg>, String> {
    // `+0(V):string` is the string at the address V holds (the kernel's rule for a memory
    // fetch with `:string`).
    Ok(vec![(name.to_string(), Ok(Fetch::Deref { offset: 0, base: Box::new(fetch) }), FetchType::String, None)])
}

fn fetch_depth(fetch: &Fetch) -> usize {
    let mut n = 0;
    fetch.walk(&mut |f| n += usize::from(matches!(f, Fetch::Deref { .. })));
    n
}

/// A lowered spec as the grammar writes it, for the agent to parse again.
fn spec_text(spec: &ProbeSpec) -> String {
    let mut text = String::new();
    text.push(spec.kind.letter());
    if let Some(n) = spec.maxactive {
        text.push_str(&n.to_string());
    }
    text.push(':');
    text.push_str(&spec.full_event_name());
    text.push(' ');
    match &spec.location {
        Target::Code(Location::Symbol(s)) => text.push_str(s),
        Target::Code(Location::SymbolOffset(s, off)) => text.push_str(&format!("{s}+0x{off:x}")),
        Target::Code(Location::Address(a)) => text.push_str(&format!("0x{a:x}")),
        Target::Marker(m) => text.push_str(m),
    }
    for arg in &spec.args {
        text.push_str(&format!(" {}={}:{}", arg.name, fetch_text(&arg.fetch), arg.ty));
    }
    text
}

/// A fetch as the grammar writes it.
pub(crate) fn fetch_text(fetch: &Fetch) -> String {
    match fetch {
        Fetch::Reg(r) => format!("%{}", format!("{r:?}").to_lowercase()),
        Fetch::Arg(n) => format!("$arg{n}"),
        Fetch::Retval => "$retval".into(),
        Fetch::Stack(n) => format!("$stack{n}"),
        Fetch::StackPointer => "$stack".into(),
        Fetch::Comm => "$comm".into(),
        Fetch::Duration => "$duration".into(),
        Fetch::Memory(Address::Absolute(a)) => format!("@0x{a:x}"),
        Fetch::Memory(Address::Symbol { symbol, offset }) => format!("@{symbol}{offset:+}"),
        Fetch::Var(var) => var.to_string(),
        Fetch::Deref { offset, base } => match *offset < 0 {
            true => format!("-{}({})", offset.unsigned_abs(), fetch_text(base)),
            false => format!("+{offset}({})", fetch_text(base)),
        },
    }
}

/// `perf probe -F/-L/-V`-like discovery, and `--dry-run`.
#[derive(clap::Args, Debug, Default)]
pub(crate) struct DiscoveryArgs {
    /// List the program's functions (from its DWARF; those matching GLOB), and exit.
    #[arg(long, value_name = "GLOB", num_args = 0..=1, default_missing_value = "*")]
    funcs: Option<String>,
    /// Print FUNC's source with the lines a probe can go on numbered from its first line
    /// (as `FUNC:RELLINE` takes them), and exit.
    #[arg(long, value_name = "FUNC")]
    lines: Option<String>,
    /// List the variables available at each site of a source location (`FUNC:RELLINE`,
    /// `FILE:LINE`, `FUNC`), with their types and where they are, and exit.
    #[arg(long, value_name = "LOCATION")]
    vars: Option<String>,
    /// Resolve the specs and print what would be placed (sites, registers, fetches)
    /// without running anything.
    #[arg(long)]
    dry_run: bool,
    /// The program to inspect for --funcs, --lines, --vars and --dry-run (else the one
    /// after `--`, or that of `-p PID`).
    #[arg(short = 'x', long = "exec", value_name = "PROG")]
    exec: Option<PathBuf>,
}

/// Runs the discovery `args` ask for, if any: the text to print, or the error.
pub(crate) fn discover(
    args: &DiscoveryArgs,
    specs: &[String],
    pid: Option<i32>,
    command: &[std::ffi::OsString],
) -> Option<Result<String, String>> {
    if args.funcs.is_none() && args.lines.is_none() && args.vars.is_none() && !args.dry_run {
        return None;
    }
    let program = match (&args.exec, pid, command.first()) {
        (Some(path), _, _) => Some(path.clone()),
        (None, Some(pid), _) => Some(PathBuf::from(format!("/proc/{pid}/exe"))),
        (None, None, Some(program)) => program_path(program),
        (None, None, None) => None,
    };
    let Some(program) = program else {
        return Some(Err("name the program to inspect: `-x PROG`, `-p PID` or `-- PROG`".into()));
    };
    Some(run_discovery(args, specs, &program))
}

fn run_discovery(args: &DiscoveryArgs, specs: &[String], program: &Path) -> Result<String, String> {
    if args.dry_run {
        let parsed = specs
            .iter()
            .map(|text| ProbeSpec::parse(text))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("bad probe spec: {e}\n{}", e.caret()))?;
        let (lowered, notes) = lower(parsed, Some(program))?;
        let mut out = String::new();
        for note in notes {
            out.push_str(&format!("# {note}\n"));
        }
        for spec in lowered {
            out.push_str(&spec_text(&spec));
            out.push('\n');
        }
        return Ok(out);
    }
    // `--vars` of a location in a library reads the library's DWARF (not the program's,
    // which may have none).
    let vars_module = match (&args.funcs, &args.lines, &args.vars) {
        (None, None, Some(location)) => ProbeSpec::parse(&format!("p {location}"))
            .ok()
            .and_then(|spec| spec.location.code().and_then(module_point))
            .and_then(|(module, _)| module),
        _ => None,
    };
    let info = open_module(Some(program), vars_module.as_deref())?;
    if let Some(glob) = &args.funcs {
        // By the name a spec takes: with its namespaces and classes (`shop::Basket::weigh`),
        // matched by that or by the bare name.
        let glob_match = |name: &str| dynprobe_ftrace::filter::glob_match(glob.as_bytes(), name.as_bytes());
        // Only the units that name a function the glob matches are indexed.
        let mut names: Vec<&str> =
            info.functions_matching(&glob_match).iter().map(|f| f.qualified_name.as_str()).collect();
        names.sort();
        names.dedup();
        return Ok(names.iter().map(|n| format!("{n}\n")).collect());
    }
    if let Some(name) = &args.lines {
        let (name, file) = match name.split_once('@') {
            Some((name, file)) => (name, Some(file)),
            None => (name.as_str(), None),
        };
        let mut out = String::new();
        let found = info.find_functions(name, file).map_err(|e| e.to_string())?;
        // One function may come as several entries, its out-of-line copy in one unit and its
        // inlined copies in others: shown once, with the lines any of them has code for.
        let mut shown: Vec<(&str, u64)> = Vec::new();
        for f in &found {
            if shown.contains(&(f.file.as_str(), f.line)) {
                continue;
            }
            shown.push((f.file.as_str(), f.line));
            out.push_str(&format!("<{}@{}:0>\n", f.name, f.file));
            let source = std::fs::read_to_string(&f.file).ok();
            let text: Vec<&str> = source.as_deref().map_or(Vec::new(), |s| s.lines().collect());
            let mut lines: Vec<(u64, bool)> = Vec::new();
            for same in found.iter().filter(|g| g.file == f.file && g.line == f.line) {
                for (line, has_code) in info.function_lines(same) {
                    match lines.iter_mut().find(|(l, _)| *l == line) {
                        Some(known) => known.1 |= has_code,
                        None => lines.push((line, has_code)),
                    }
                }
            }
            lines.sort();
            for (line, has_code) in lines {
                let body = text.get(line as usize - 1).copied().unwrap_or("");
                match has_code {
                    true => out.push_str(&format!("{:>7}  {body}\n", line - f.line)),
                    false => out.push_str(&format!("         {body}\n")),
                }
            }
            if source.is_none() {
                out.push_str(&format!("(the source file `{}` cannot be read: only line numbers are shown)\n", f.file));
            }
        }
        return Ok(out);
    }
    let location = args.vars.as_deref().unwrap_or_default();
    let spec = ProbeSpec::parse(&format!("p {location}")).map_err(|e| format!("bad location `{location}`: {e}"))?;
    let mut out = String::new();
    for site in sites(&spec, &info)? {
        let (symbol, offset) = info.symbol_at(site.addr).unwrap_or(("?", 0));
        let inlined = if site.inlined { format!(", inlined copy of {}", site.function) } else { String::new() };
        out.push_str(&format!(
            "Available variables at {location} ({symbol}+0x{offset:x}, line {}{inlined})\n",
            site.line
        ));
        for var in info.variables(&site) {
            let ty = var.ty.map_or("?".to_string(), |t| info.type_of(t).name);
            let place = match &var.place {
                Ok(place) => place.to_string(),
                Err(VarError::OptimizedOut) if !var.available.is_empty() => {
                    let ranges: Vec<String> =
                        var.available.iter().map(|(lo, hi)| format!("0x{lo:x}-0x{hi:x}")).collect();
                    format!("(optimized out; available at {})", ranges.join(", "))
                }
                Err(e) => e.to_string(),
            };
            out.push_str(&format!("        {ty} {}\t{place}\n", var.name));
        }
    }
    Ok(out)
}
