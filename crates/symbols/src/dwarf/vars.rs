//! Variables visible at an address, where their values are, and their types.
//!
//! A location is turned into a [`Place`]: a register, or memory at the value of another
//! place plus an offset. That is exactly what a probe's fetch program can read without
//! running a DWARF stack machine at each hit; expressions that compute a value
//! (`DW_OP_stack_value` over arithmetic, implicit values, several pieces) are refused with
//! the reason. `DW_OP_fbreg` is taken relative to the frame base, which GCC and Clang make
//! `DW_OP_call_frame_cfa`: the CFA rule of `.eh_frame` (or `.debug_frame`) at the address
//! gives it as a register plus an offset. See the DWARF 5 standard, sections 2.5 and 2.6.

use gimli::{AttributeValue, Expression, Operation, UnitOffset, UnwindSection};

use super::load::{DebugInfo, R};
use super::source::SourceSite;
use super::{ARGUMENT_REGISTERS, DWARF_REGISTER_NAMES};

/// Where a value is at the probe point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// In a register, by its DWARF number (see [`super::DWARF_REGISTER_NAMES`]; 17..=32 are
    /// `xmm0`..`xmm15`).
    Register(u16),
    /// In memory, at the value of `base` plus `offset`.
    Memory {
        /// The place whose value is the address.
        base: Box<Place>,
        /// Added to it.
        offset: i64,
    },
    /// In pieces (`DW_OP_piece`): a struct whose members are in different places, as Rust
    /// passes a `&str` or a slice in two registers.
    Pieces(Vec<Piece>),
}

/// One part of a value in pieces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// Its first byte in the value.
    pub offset: u64,
    /// Its size in bytes.
    pub size: u64,
    /// Where it is; `None` when it is not available there.
    pub place: Option<Place>,
}

impl Place {
    /// How many memory reads reading the value takes.
    pub fn reads(&self) -> usize {
        match self {
            Place::Register(_) | Place::Pieces(_) => 0,
            Place::Memory { base, .. } => 1 + base.reads(),
        }
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Register(r) => match DWARF_REGISTER_NAMES.get(usize::from(*r)) {
                Some(name) => write!(f, "%{name}"),
                None if (17..=32).contains(r) => write!(f, "%xmm{}", r - 17),
                None => write!(f, "dwarf register {r}"),
            },
            Place::Memory { base, offset } => write!(f, "{offset:+}({base})"),
            Place::Pieces(pieces) => {
                let parts: Vec<String> = pieces
                    .iter()
                    .map(|p| match &p.place {
                        Some(place) => format!("{place}"),
                        None => "?".to_string(),
                    })
                    .collect();
                write!(f, "{{{}}}", parts.join(", "))
            }
        }
    }
}

/// Why a variable's value cannot be read at the probe point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VarError {
    /// No variable of that name is visible there.
    Unknown {
        /// The name.
        name: String,
        /// The names that are visible.
        visible: Vec<String>,
    },
    /// The variable has no location at this address.
    OptimizedOut,
    /// It is a constant the compiler folded (`DW_AT_const_value`).
    Constant(i64),
    /// Its location is of a form that cannot be read by a fetch program.
    Unsupported(String),
    /// A member access or dereference does not fit the type.
    BadAccess(String),
}

impl std::fmt::Display for VarError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VarError::Unknown { name, visible } => {
                write!(f, "no variable `{name}` at this point")?;
                match visible.as_slice() {
                    [] => write!(f, " (none is visible there)"),
                    names => write!(f, " (visible: {})", names.join(", ")),
                }
            }
            VarError::OptimizedOut => f.write_str("(optimized out)"),
            VarError::Constant(v) => write!(f, "a constant ({v}) the compiler folded in"),
            VarError::Unsupported(why) => f.write_str(why),
            VarError::BadAccess(why) => f.write_str(why),
        }
    }
}

/// One step applied to a variable: `.m`, `->m`, `[N]`, and `*` in front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// `.NAME`: a member of a struct or union.
    Field(String),
    /// `->NAME`: a member of the struct a pointer points to.
    Arrow(String),
    /// `[N]`: an element of an array, or of what a pointer points to.
    Index(u64),
    /// `*`: what a pointer points to.
    Deref,
}

/// A type in the DWARF, by its DIE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeRef {
    unit: usize,
    die: UnitOffset,
}

/// A type, one level deep (typedefs and qualifiers taken off, the name kept).
#[derive(Debug, Clone, PartialEq)]
pub struct Type {
    /// As C spells it: `int`, `const char *`, `struct req`, `size_t`.
    pub name: String,
    /// Its size in bytes (0 when unknown, as for `void`).
    pub size: u64,
    /// What it is.
    pub kind: TypeKind,
}

impl Type {
    /// Whether the System V x86-64 ABI (3.2.3) passes a value of this type in an integer
    /// register: a scalar of the INTEGER class (an integer, `bool`, a character, an enum, a
    /// pointer) of at most 8 bytes.
    pub fn is_integer_scalar(&self) -> bool {
        let integer = matches!(
            self.kind,
            TypeKind::Signed
                | TypeKind::Unsigned
                | TypeKind::Bool
                | TypeKind::Char { .. }
                | TypeKind::Enum(_)
                | TypeKind::Pointer(_)
        );
        integer && self.size <= 8
    }
}

/// The kinds of type values are printed by.
#[derive(Debug, Clone, PartialEq)]
pub enum TypeKind {
    /// A signed integer.
    Signed,
    /// An unsigned integer.
    Unsigned,
    /// `bool` / `_Bool`.
    Bool,
    /// A character type.
    Char {
        /// `signed char` (or plain `char` where it is signed).
        signed: bool,
    },
    /// Floating point.
    Float,
    /// An enumeration: its enumerators' values and names.
    Enum(Vec<(i64, String)>),
    /// A pointer, to `None` for `void *`.
    Pointer(Option<TypeRef>),
    /// A struct or union: its members.
    Struct(Vec<Member>),
    /// An array of `count` elements (`None`: unknown bound).
    Array {
        /// The element type.
        element: TypeRef,
        /// The number of elements.
        count: Option<u64>,
    },
    /// `void`, functions, and what is not printed.
    Other,
}

/// A member of a struct or union.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// Its name.
    pub name: String,
    /// Bytes from the start of the struct.
    pub offset: u64,
    /// Its type.
    pub ty: TypeRef,
}

/// A Rust enum's tag and variants (`DW_TAG_variant_part`, DWARF 5 section 5.7.10), as rustc
/// describes `Option<u32>`: a discriminant member, then one `DW_TAG_variant` per variant
/// with the tag value that selects it and a member whose struct holds its fields.
#[derive(Debug, Clone, PartialEq)]
pub struct Variants {
    /// Bytes from the start of the value to the tag.
    pub tag_offset: u64,
    /// The tag's size in bytes.
    pub tag_size: u64,
    /// Each variant.
    pub variants: Vec<Variant>,
}

/// One variant of a Rust enum.
#[derive(Debug, Clone, PartialEq)]
pub struct Variant {
    /// Its name (`Some`).
    pub name: String,
    /// The tag value that selects it; `None` for the default variant.
    pub discr: Option<u64>,
    /// Its fields (`__0`), offsets from the start of the whole value.
    pub fields: Vec<Member>,
}

/// A variable or parameter visible at a site.
#[derive(Debug, Clone)]
pub struct Variable {
    /// Its name.
    pub name: String,
    /// Whether it is a parameter of the function.
    pub parameter: bool,
    /// Its type.
    pub ty: Option<TypeRef>,
    /// Where its value is at the site.
    pub place: Result<Place, VarError>,
    /// The address ranges where it has a location, when that is a location list (to say
    /// where an optimized-out variable can be read).
    pub available: Vec<(u64, u64)>,
}

/// A scope that contains the address, with what is needed to read its variables.
struct Scope {
    frame_base: Option<Expression<R>>,
}

impl DebugInfo {
    /// The variables and parameters visible at `site`, innermost scope last; a name
    /// declared again in an inner scope hides the outer one.
    pub fn variables(&self, site: &SourceSite) -> Vec<Variable> {
        let Some(unit) = self.unit(site.unit) else { return Vec::new() };
        let mut out: Vec<Variable> = Vec::new();
        if let Ok(mut tree) = unit.entries_tree(None) {
            if let Ok(root) = tree.root() {
                let _ = self.walk(site, root, None, false, 0, &mut out);
            }
        }
        // Inner declarations come later: keep the last of each name.
        let mut seen = std::collections::HashSet::new();
        let mut kept: Vec<Variable> = out.into_iter().rev().filter(|v| seen.insert(v.name.clone())).collect();
        kept.reverse();
        if site.entry {
            self.parameters_at_entry(&mut kept);
        }
        kept
    }

    fn walk(
        &self,
        site: &SourceSite,
        node: gimli::EntriesTreeNode<R>,
        scope: Option<&Scope>,
        entered: bool,
        depth: usize,
        out: &mut Vec<Variable>,
    ) -> gimli::Result<()> {
        let Some(unit) = self.unit(site.unit) else { return Ok(()) };
        let mut children = node.children();
        while let Some(child) = children.next()? {
            let entry = child.entry();
            match entry.tag() {
                gimli::DW_TAG_variable | gimli::DW_TAG_formal_parameter => {
                    if let Some(scope) = scope {
                        out.extend(self.variable(site, entry, scope));
                    }
                }
                gimli::DW_TAG_subprogram | gimli::DW_TAG_lexical_block | gimli::DW_TAG_inlined_subroutine => {
                    let ranges = self.ranges(unit, entry);
                    // An inlined copy whose code merged into its caller's has only an entry
                    // address (see `Function::inlined`): a site there is in it.
                    let at_entry = || {
                        let address = |at| {
                            entry.attr_value(at).and_then(|v| self.dwarf_for(unit).attr_address(unit, v).ok().flatten())
                        };
                        entry.tag() == gimli::DW_TAG_inlined_subroutine
                            && address(gimli::DW_AT_entry_pc).or_else(|| address(gimli::DW_AT_low_pc))
                                == Some(site.addr)
                    };
                    if !ranges.iter().any(|(lo, hi)| *lo <= site.addr && site.addr < *hi) && !at_entry() {
                        continue;
                    }
                    let frame_base = match entry.attr_value(gimli::DW_AT_frame_base) {
                        Some(AttributeValue::Exprloc(e)) => Some(e),
                        _ => scope.and_then(|s| s.frame_base.clone()),
                    };
                    // Once inside the site's function, a copy of another function inlined
                    // there is not the line's scope: its parameters would hide the
                    // function's own (`op` of an inlined `Py_INCREF(op)`).
                    let name = match entry.tag() {
                        gimli::DW_TAG_lexical_block => None,
                        _ => {
                            let (ou, origin) = self.origin(site.unit, entry);
                            let origin_unit = self.unit(ou);
                            origin_unit
                                .and_then(|unit| unit.entry(origin).ok())
                                .and_then(|e| e.attr_value(gimli::DW_AT_name))
                                .and_then(|v| self.string(origin_unit?, v))
                        }
                    };
                    let is_function = name.as_deref() == Some(site.function.as_str());
                    if entered && entry.tag() == gimli::DW_TAG_inlined_subroutine && !is_function {
                        continue;
                    }
                    let inner = Scope { frame_base };
                    self.walk(site, child, Some(&inner), entered || is_function, depth + 1, out)?;
                }
                gimli::DW_TAG_namespace | gimli::DW_TAG_structure_type | gimli::DW_TAG_class_type if depth < 8 => {
                    // C++ member functions are defined inside these.
                    self.walk(site, child, scope, entered, depth + 1, out)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The variable of `entry`, if it has a name.
    fn variable(
        &self,
        site: &SourceSite,
        entry: &gimli::DebuggingInformationEntry<R>,
        scope: &Scope,
    ) -> Option<Variable> {
        let unit = self.unit(site.unit)?;
        let (name, ty) = self.name_and_type(site.unit, entry)?;
        let mut available = Vec::new();
        let place = match entry.attr_value(gimli::DW_AT_location) {
            Some(AttributeValue::Exprloc(expr)) => self.place(site, expr, scope),
            Some(value) => match self.dwarf_for(unit).attr_locations(unit, value) {
                Ok(Some(mut list)) => {
                    let mut found = None;
                    while let Ok(Some(e)) = list.next() {
                        // A value known only at the entry (`DW_OP_entry_value`) cannot be read
                        // in the range it is given for, past the entry.
                        let entry_only = matches!(
                            e.data.clone().operations(unit.encoding()).next(),
                            Ok(Some(Operation::EntryValue { .. }))
                        );
                        if !entry_only {
                            available.push((e.range.begin, e.range.end));
                        }
                        if e.range.begin <= site.addr && site.addr < e.range.end && found.is_none() {
                            found = Some(e.data);
                        }
                    }
                    match found {
                        Some(expr) => self.place(site, expr, scope),
                        None => Err(VarError::OptimizedOut),
                    }
                }
                _ => Err(VarError::OptimizedOut),
            },
            None => match entry.attr_value(gimli::DW_AT_const_value) {
                Some(v) => match v.sdata_value().or_else(|| v.udata_value().map(|u| u as i64)) {
                    Some(v) => Err(VarError::Constant(v)),
                    None => Err(VarError::Unsupported("a constant of a form that cannot be shown".into())),
                },
                None => Err(VarError::OptimizedOut),
            },
        };
        Some(Variable { name, parameter: entry.tag() == gimli::DW_TAG_formal_parameter, ty, place, available })
    }

    /// A DIE's name and type, following `DW_AT_abstract_origin` (an inlined copy's
    /// parameters name their abstract ones).
    fn name_and_type(
        &self,
        u: usize,
        entry: &gimli::DebuggingInformationEntry<R>,
    ) -> Option<(String, Option<TypeRef>)> {
        let unit = self.unit(u)?;
        let mut name = entry.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v));
        let mut ty = self.type_attr(u, entry);
        if let Some((ou, origin)) = entry.attr_value(gimli::DW_AT_abstract_origin).and_then(|v| self.reference(u, v)) {
            if let Some((origin_unit, Ok(origin))) = self.unit(ou).map(|unit| (unit, unit.entry(origin))) {
                name = name.or_else(|| origin.attr_value(gimli::DW_AT_name).and_then(|v| self.string(origin_unit, v)));
                ty = ty.or_else(|| self.type_attr(ou, &origin));
            }
        }
        Some((name?, ty))
    }

    /// The place a location expression describes at `site`.
    fn place(&self, site: &SourceSite, expr: Expression<R>, scope: &Scope) -> Result<Place, VarError> {
        let unit = self.unit(site.unit).ok_or(VarError::OptimizedOut)?;
        let mut ops = Vec::new();
        let mut iter = expr.operations(unit.encoding());
        loop {
            match iter.next() {
                Ok(Some(op)) => ops.push(op),
                Ok(None) => break,
                Err(e) => return Err(VarError::Unsupported(format!("a location gimli cannot read: {e}"))),
            }
        }
        // Pieces: each part of the value where it is (a part is none of the forms below, or
        // has no location, is unavailable).
        let pieces = ops.iter().filter(|op| matches!(op, Operation::Piece { .. })).count();
        if pieces > 1 || (pieces == 1 && !matches!(ops.last(), Some(Operation::Piece { .. }))) {
            let mut out = Vec::new();
            let mut offset = 0;
            for part in ops.split_inclusive(|op| matches!(op, Operation::Piece { .. })) {
                let (Operation::Piece { size_in_bits, bit_offset: None }, body) = part.split_last().unwrap() else {
                    return Err(VarError::Unsupported("a piece of it is a bit field".into()));
                };
                let size = size_in_bits / 8;
                out.push(Piece { offset, size, place: self.single(site, body, scope).ok() });
                offset += size;
            }
            return Ok(Place::Pieces(out));
        }
        if pieces == 1 {
            ops.truncate(ops.len() - 1);
        }
        self.single(site, &ops, scope)
    }

    /// The place of a location expression that is not in pieces.
    fn single(&self, site: &SourceSite, ops: &[Operation<R>], scope: &Scope) -> Result<Place, VarError> {
        let unit = self.unit(site.unit).ok_or(VarError::OptimizedOut)?;
        match ops {
            [Operation::Register { register }] => Ok(Place::Register(register.0)),
            [Operation::RegisterOffset { register, offset, .. }] => {
                Ok(Place::Memory { base: Box::new(Place::Register(register.0)), offset: *offset })
            }
            [Operation::RegisterOffset { register, offset: 0, .. }, Operation::StackValue] => {
                Ok(Place::Register(register.0))
            }
            [Operation::FrameOffset { offset }] => {
                let (base, base_offset) = self.frame_base(site, scope)?;
                Ok(Place::Memory { base: Box::new(base), offset: base_offset + offset })
            }
            [Operation::EntryValue { expression }, Operation::StackValue] => {
                let inner = Expression(expression.clone());
                let mut inner_ops = inner.operations(unit.encoding());
                match (inner_ops.next(), site.entry) {
                    (Ok(Some(Operation::Register { register })), true) => Ok(Place::Register(register.0)),
                    // Past the entry the register has been reused: the value is only in the
                    // caller's frame (its DW_TAG_call_site_parameter), which depends on which
                    // caller it was — not something a probe here can read. Optimized out
                    // here, then, and `--vars` lists where it can still be read.
                    _ => Err(VarError::OptimizedOut),
                }
            }
            [Operation::Address { address }] => {
                Err(VarError::Unsupported(format!("a static variable at 0x{address:x}; read it with @SYMBOL")))
            }
            [Operation::ImplicitValue { .. }] | [.., Operation::StackValue] => {
                Err(VarError::Unsupported("its value is computed, not stored (DW_OP_stack_value)".into()))
            }
            [Operation::ImplicitPointer { .. }] => {
                Err(VarError::Unsupported("a pointer to a value that is not in memory (implicit pointer)".into()))
            }
            [] => Err(VarError::OptimizedOut),
            _ => Err(VarError::Unsupported("its location is an expression a fetch cannot evaluate".into())),
        }
    }

    /// The frame base at `site` as a register and an offset.
    fn frame_base(&self, site: &SourceSite, scope: &Scope) -> Result<(Place, i64), VarError> {
        let unit = self.unit(site.unit).ok_or(VarError::OptimizedOut)?;
        let Some(expr) = scope.frame_base.clone() else {
            return Err(VarError::Unsupported("its function has no frame base".into()));
        };
        let ops: Vec<Operation<R>> = {
            let mut iter = expr.operations(unit.encoding());
            let mut ops = Vec::new();
            while let Ok(Some(op)) = iter.next() {
                ops.push(op);
            }
            ops
        };
        match ops.as_slice() {
            [Operation::CallFrameCFA] => self.cfa(site.addr),
            // A frame base in `rsp` (rustc's) holds once the prologue has made the frame, not
            // at the entry.
            [Operation::Register { register }] | [Operation::RegisterOffset { register, .. }]
                if site.entry && register.0 == 7 =>
            {
                Err(VarError::Unsupported(
                    "its frame is not made yet at the function's entry; probe a line of the function (FUNC:1)".into(),
                ))
            }
            [Operation::Register { register }] => Ok((Place::Register(register.0), 0)),
            [Operation::RegisterOffset { register, offset, .. }] => Ok((Place::Register(register.0), *offset)),
            _ => Err(VarError::Unsupported("its function's frame base is an expression not read here".into())),
        }
    }

    /// The CFA at `addr` as a register and an offset, from `.eh_frame` or `.debug_frame`.
    fn cfa(&self, addr: u64) -> Result<(Place, i64), VarError> {
        let unsupported = || VarError::Unsupported(format!("no call-frame information gives the CFA at 0x{addr:x}"));
        let mut ctx = Box::new(gimli::UnwindContext::new());
        let rule = if let Some((data, at)) = &self.eh_frame {
            let mut eh = gimli::EhFrame::new(&data[..], gimli::LittleEndian);
            eh.set_address_size(8);
            let bases = gimli::BaseAddresses::default().set_eh_frame(*at);
            eh.unwind_info_for_address(&bases, &mut ctx, addr, gimli::EhFrame::cie_from_offset)
                .ok()
                .map(|row| row.cfa().clone())
        } else {
            None
        };
        let rule = match (rule, &self.debug_frame) {
            (Some(rule), _) => rule,
            (None, Some(data)) => {
                let mut df = gimli::DebugFrame::new(&data[..], gimli::LittleEndian);
                df.set_address_size(8);
                let bases = gimli::BaseAddresses::default();
                df.unwind_info_for_address(&bases, &mut ctx, addr, gimli::DebugFrame::cie_from_offset)
                    .map_err(|_| unsupported())?
                    .cfa()
                    .clone()
            }
            (None, None) => return Err(unsupported()),
        };
        match rule {
            gimli::CfaRule::RegisterAndOffset { register, offset } => Ok((Place::Register(register.0), offset)),
            gimli::CfaRule::Expression(_) => Err(unsupported()),
        }
    }

    /// At a function's entry its parameters are where the ABI passes them, whatever the
    /// DWARF says of the body (at `-O0` it places them in stack slots the prologue has yet
    /// to fill): integer and pointer parameters in `rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`,
    /// floating point ones in `xmm0`..`xmm7` (System V x86-64 ABI, 3.2.3). After the first
    /// parameter of another class (a struct), the DWARF locations stand.
    fn parameters_at_entry(&self, vars: &mut [Variable]) {
        let (mut ints, mut floats) = (0, 0);
        for v in vars.iter_mut().filter(|v| v.parameter) {
            let Some(ty) = v.ty.map(|t| self.type_of(t)) else { return };
            match ty.kind {
                _ if ty.is_integer_scalar() && ints < ARGUMENT_REGISTERS.len() => {
                    v.place = Ok(Place::Register(ARGUMENT_REGISTERS[ints]));
                    ints += 1;
                }
                TypeKind::Float if ty.size <= 8 && floats < 8 => {
                    v.place = Ok(Place::Register(17 + floats));
                    floats += 1;
                }
                _ => return,
            }
        }
    }

    /// The variable `name` at `site` with `accesses` applied: where its value is and its
    /// type.
    pub fn resolve_variable(
        &self,
        site: &SourceSite,
        name: &str,
        accesses: &[Access],
    ) -> Result<(Place, Option<TypeRef>), VarError> {
        let vars = self.variables(site);
        let Some(var) = vars.iter().find(|v| v.name == name) else {
            return Err(VarError::Unknown {
                name: name.to_string(),
                visible: vars.iter().map(|v| v.name.clone()).collect(),
            });
        };
        let mut place = var.place.clone()?;
        let mut ty = var.ty;
        for access in accesses {
            let current = ty.map(|t| self.type_of(t));
            let what = current.as_ref().map_or("an unknown type".to_string(), |t| format!("`{}`", t.name));
            (place, ty) = match (access, current.map(|t| t.kind)) {
                (Access::Field(m), Some(TypeKind::Struct(members))) => {
                    let member = find_member(&members, m, &what)?;
                    match place {
                        Place::Memory { base, offset } => {
                            (Place::Memory { base, offset: offset + member.offset as i64 }, Some(member.ty))
                        }
                        Place::Pieces(pieces) => {
                            let piece = pieces.iter().find(|p| p.offset == member.offset).ok_or_else(|| {
                                VarError::Unsupported(format!("`.{m}` is not one of the pieces the value is in"))
                            })?;
                            (piece.place.clone().ok_or(VarError::OptimizedOut)?, Some(member.ty))
                        }
                        Place::Register(_) => {
                            return Err(VarError::Unsupported(format!(
                                "`.{m}`: the struct is in a register here, not in memory"
                            )))
                        }
                    }
                }
                (Access::Arrow(m), Some(TypeKind::Pointer(Some(target)))) => {
                    let TypeKind::Struct(members) = self.type_of(target).kind else {
                        return Err(VarError::BadAccess(format!("`->{m}` on {what}, not a pointer to a struct")));
                    };
                    let member = find_member(&members, m, &what)?;
                    (Place::Memory { base: Box::new(place), offset: member.offset as i64 }, Some(member.ty))
                }
                (Access::Index(i), Some(TypeKind::Array { element, .. })) => {
                    let size = self.type_of(element).size as i64;
                    match place {
                        Place::Memory { base, offset } => {
                            (Place::Memory { base, offset: offset + size * *i as i64 }, Some(element))
                        }
                        Place::Register(_) | Place::Pieces(_) => {
                            return Err(VarError::Unsupported("the array is in a register here, not in memory".into()))
                        }
                    }
                }
                (Access::Index(i), Some(TypeKind::Pointer(Some(target)))) => {
                    let size = self.type_of(target).size as i64;
                    (Place::Memory { base: Box::new(place), offset: size * *i as i64 }, Some(target))
                }
                (Access::Deref, Some(TypeKind::Pointer(Some(target)))) => {
                    (Place::Memory { base: Box::new(place), offset: 0 }, Some(target))
                }
                (Access::Field(m), _) => return Err(VarError::BadAccess(format!("`.{m}` on {what}, not a struct"))),
                (Access::Arrow(m), _) => {
                    return Err(VarError::BadAccess(format!("`->{m}` on {what}, not a pointer to a struct")))
                }
                (Access::Index(_), _) => {
                    return Err(VarError::BadAccess(format!("`[N]` on {what}, not an array or a pointer")))
                }
                (Access::Deref, _) => return Err(VarError::BadAccess(format!("`*` on {what}, not a typed pointer"))),
            };
        }
        Ok((place, ty))
    }

    /// The type `ty` is, typedefs and qualifiers taken off (the outermost name kept).
    pub fn type_of(&self, ty: TypeRef) -> Type {
        let name = self.type_name(ty, 0);
        let mut ty = ty;
        for _ in 0..16 {
            let die = ty.die;
            let Some(Ok(entry)) = self.unit(ty.unit).map(|unit| unit.entry(die)) else { break };
            let size = entry.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value()).unwrap_or(0);
            let kind = match entry.tag() {
                gimli::DW_TAG_typedef
                | gimli::DW_TAG_const_type
                | gimli::DW_TAG_volatile_type
                | gimli::DW_TAG_restrict_type
                | gimli::DW_TAG_atomic_type => match self.type_attr(ty.unit, &entry) {
                    Some(next) => {
                        ty = next;
                        continue;
                    }
                    None => TypeKind::Other,
                },
                gimli::DW_TAG_base_type => {
                    let encoding = match entry.attr_value(gimli::DW_AT_encoding) {
                        Some(AttributeValue::Encoding(e)) => e,
                        _ => gimli::DW_ATE_unsigned,
                    };
                    match encoding {
                        gimli::DW_ATE_boolean => TypeKind::Bool,
                        gimli::DW_ATE_float => TypeKind::Float,
                        gimli::DW_ATE_signed_char => TypeKind::Char { signed: true },
                        gimli::DW_ATE_unsigned_char => TypeKind::Char { signed: false },
                        gimli::DW_ATE_signed => TypeKind::Signed,
                        _ => TypeKind::Unsigned,
                    }
                }
                gimli::DW_TAG_enumeration_type => TypeKind::Enum(self.enumerators(ty.unit, die)),
                gimli::DW_TAG_pointer_type | gimli::DW_TAG_reference_type | gimli::DW_TAG_rvalue_reference_type => {
                    return Type { name, size: 8, kind: TypeKind::Pointer(self.type_attr(ty.unit, &entry)) }
                }
                gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type | gimli::DW_TAG_class_type => {
                    TypeKind::Struct(self.members(ty.unit, die))
                }
                gimli::DW_TAG_array_type => {
                    let Some(element) = self.type_attr(ty.unit, &entry) else { break };
                    let count = self.array_count(ty.unit, die);
                    let element_size = self.type_of(element).size;
                    return Type {
                        name,
                        size: count.map_or(0, |c| c * element_size),
                        kind: TypeKind::Array { element, count },
                    };
                }
                _ => TypeKind::Other,
            };
            return Type { name, size, kind };
        }
        Type { name, size: 0, kind: TypeKind::Other }
    }

    /// The C spelling of a type.
    fn type_name(&self, ty: TypeRef, depth: usize) -> String {
        let Some(unit) = self.unit(ty.unit) else { return "?".into() };
        let Ok(entry) = unit.entry(ty.die) else { return "?".into() };
        let name = entry.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v));
        let inner = |prefix: &str, suffix: &str| match (self.type_attr(ty.unit, &entry), depth < 8) {
            (Some(next), true) => format!("{prefix}{}{suffix}", self.type_name(next, depth + 1)),
            _ => format!("{prefix}void{suffix}"),
        };
        match entry.tag() {
            gimli::DW_TAG_pointer_type => inner("", " *").replace("* *", "**"),
            gimli::DW_TAG_reference_type => inner("", " &"),
            // GCC qualifies both an array and its elements: say `const` once.
            gimli::DW_TAG_const_type => {
                let name = inner("const ", "");
                name.strip_prefix("const const ").map_or(name.clone(), |rest| format!("const {rest}"))
            }
            gimli::DW_TAG_volatile_type => inner("volatile ", ""),
            // Rust's structs (`&str`, `Vec<u8>`, `Option<u8>`) go by their own names.
            gimli::DW_TAG_structure_type => match name {
                Some(name) if name.starts_with('&') || name.contains(['<', ':']) => name,
                name => format!("struct {}", name.unwrap_or_else(|| "(anonymous)".into())),
            },
            gimli::DW_TAG_union_type => format!("union {}", name.unwrap_or_else(|| "(anonymous)".into())),
            gimli::DW_TAG_enumeration_type => format!("enum {}", name.unwrap_or_else(|| "(anonymous)".into())),
            gimli::DW_TAG_array_type => {
                let count = self.array_count(ty.unit, ty.die).map_or(String::new(), |c| c.to_string());
                inner("", &format!("[{count}]"))
            }
            _ => name.unwrap_or_else(|| "?".into()),
        }
    }

    fn children(&self, u: usize, die: UnitOffset, mut each: impl FnMut(&gimli::DebuggingInformationEntry<R>)) {
        let Some(unit) = self.unit(u) else { return };
        let Ok(mut tree) = unit.entries_tree(Some(die)) else { return };
        let Ok(root) = tree.root() else { return };
        let mut children = root.children();
        while let Ok(Some(child)) = children.next() {
            each(child.entry());
        }
    }

    /// The tag and variants of a Rust enum type with an explicit tag (`Option<u32>`); `None`
    /// for any other type, and for enums whose tag is folded into a field's unused values
    /// (`Option<&T>`, which has no discriminant member).
    pub fn variants(&self, ty: TypeRef) -> Option<Variants> {
        let unit = self.unit(ty.unit)?;
        let mut tree = unit.entries_tree(Some(ty.die)).ok()?;
        let root = tree.root().ok()?;
        let mut children = root.children();
        while let Ok(Some(part)) = children.next() {
            if part.entry().tag() != gimli::DW_TAG_variant_part {
                continue;
            }
            let discr = match part.entry().attr_value(gimli::DW_AT_discr)? {
                AttributeValue::UnitRef(offset) => offset,
                _ => return None,
            };
            let mut out = Variants { tag_offset: 0, tag_size: 0, variants: Vec::new() };
            let mut found_tag = false;
            let mut inner = part.children();
            while let Ok(Some(node)) = inner.next() {
                let entry = node.entry().clone();
                match entry.tag() {
                    gimli::DW_TAG_member if entry.offset() == discr => {
                        out.tag_offset = member_offset(&entry);
                        out.tag_size = self.type_attr(ty.unit, &entry).map_or(0, |t| self.type_of(t).size);
                        found_tag = true;
                    }
                    gimli::DW_TAG_variant => {
                        let value = entry.attr_value(gimli::DW_AT_discr_value).and_then(|v| v.udata_value());
                        let mut members = node.children();
                        while let Ok(Some(member)) = members.next() {
                            let member = member.entry();
                            if member.tag() != gimli::DW_TAG_member {
                                continue;
                            }
                            let name = member.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v));
                            let Some(variant) = self.type_attr(ty.unit, member) else { continue };
                            let base = member_offset(member);
                            let fields = self
                                .members(variant.unit, variant.die)
                                .into_iter()
                                .map(|m| Member { offset: base + m.offset, ..m })
                                .collect();
                            out.variants.push(Variant { name: name.unwrap_or_default(), discr: value, fields });
                        }
                    }
                    _ => {}
                }
            }
            return found_tag.then_some(out);
        }
        None
    }

    /// The types of a generic type's parameters (`DW_TAG_template_type_param`), by name:
    /// `T` of a Rust `Vec<T>`.
    pub fn type_parameters(&self, ty: TypeRef) -> Vec<(String, TypeRef)> {
        let Some(unit) = self.unit(ty.unit) else { return Vec::new() };
        let mut out = Vec::new();
        self.children(ty.unit, ty.die, |e| {
            if e.tag() == gimli::DW_TAG_template_type_parameter {
                let name = e.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v)).unwrap_or_default();
                if let Some(t) = self.type_attr(ty.unit, e) {
                    out.push((name, t));
                }
            }
        });
        out
    }

    fn enumerators(&self, u: usize, die: UnitOffset) -> Vec<(i64, String)> {
        let Some(unit) = self.unit(u) else { return Vec::new() };
        let mut out = Vec::new();
        self.children(u, die, |e| {
            if e.tag() == gimli::DW_TAG_enumerator {
                let name = e.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v));
                let value = e
                    .attr_value(gimli::DW_AT_const_value)
                    .and_then(|v| v.sdata_value().or_else(|| v.udata_value().map(|u| u as i64)));
                if let (Some(name), Some(value)) = (name, value) {
                    out.push((value, name));
                }
            }
        });
        out
    }

    fn members(&self, u: usize, die: UnitOffset) -> Vec<Member> {
        let Some(unit) = self.unit(u) else { return Vec::new() };
        let mut out = Vec::new();
        self.children(u, die, |e| {
            if e.tag() != gimli::DW_TAG_member {
                return;
            }
            let Some(ty) = self.type_attr(u, e) else { return };
            let name = e.attr_value(gimli::DW_AT_name).and_then(|v| self.string(unit, v)).unwrap_or_default();
            let offset = e.attr_value(gimli::DW_AT_data_member_location).and_then(|v| v.udata_value()).unwrap_or(0);
            out.push(Member { name, offset, ty });
        });
        out
    }

    fn array_count(&self, u: usize, die: UnitOffset) -> Option<u64> {
        let mut count = None;
        self.children(u, die, |e| {
            if e.tag() == gimli::DW_TAG_subrange_type && count.is_none() {
                count = e
                    .attr_value(gimli::DW_AT_count)
                    .and_then(|v| v.udata_value())
                    .or_else(|| e.attr_value(gimli::DW_AT_upper_bound).and_then(|v| v.udata_value()).map(|u| u + 1));
            }
        });
        count
    }

    /// The `DW_AT_type` of a DIE of unit `u`, wherever it is.
    fn type_attr(&self, u: usize, entry: &gimli::DebuggingInformationEntry<R>) -> Option<TypeRef> {
        let (unit, die) = self.reference(u, entry.attr_value(gimli::DW_AT_type)?)?;
        Some(TypeRef { unit, die })
    }

    /// The return type of the function `site` is the entry of.
    pub fn return_type(&self, site: &SourceSite) -> Option<TypeRef> {
        let f = self.function_entered_at(site.addr)?;
        let unit = self.unit(f.unit)?;
        let entry = unit.entry(f.die).ok()?;
        self.type_attr(f.unit, &entry)
    }
}

/// A member's `DW_AT_data_member_location` as a constant (0 when absent).
fn member_offset(entry: &gimli::DebuggingInformationEntry<R>) -> u64 {
    entry.attr_value(gimli::DW_AT_data_member_location).and_then(|v| v.udata_value()).unwrap_or(0)
}

fn find_member<'m>(members: &'m [Member], name: &str, what: &str) -> Result<&'m Member, VarError> {
    members.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<&str> = members.iter().map(|m| m.name.as_str()).collect();
        VarError::BadAccess(format!("{what} has no member `{name}` (members: {})", names.join(", ")))
    })
}
