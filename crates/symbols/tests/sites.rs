//! Compiler-recorded function-entry sites (`__mcount_loc`, `__patchable_function_entries`)
//! of running children: `tests/targets/sites.c` (and the library `sites_lib.c`) built here
//! with each way of recording sites, checked against the bytes in the child's memory.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

use dynprobe_symbols::{SiteKind, SymbolError, SymbolTable};

/// `-mnop-mcount`'s NOP in place of `call __fentry__`.
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// The functions of `sites.c` and of `sites_lib.c`.
const PROGRAM_FUNCTIONS: [&str; 5] = ["compute", "factorial", "main", "square", "twice_square"];
/// The functions of `sites.c` that are not `static`.
const GLOBAL_FUNCTIONS: [&str; 3] = ["compute", "factorial", "main"];
const LIB_FUNCTIONS: [&str; 4] = ["lib_compute", "lib_factorial", "lib_square", "lib_twice_square"];

const MCOUNT: &[&str] = &["-pg", "-mfentry", "-mnop-mcount", "-mrecord-mcount", "-fno-pie", "-no-pie"];
const PATCHABLE_5: &str = "-fpatchable-function-entry=5";
const PIE: &[&str] = &["-fpie", "-pie"];
const NO_PIE: &[&str] = &["-fno-pie", "-no-pie"];
const CET: &str = "-fcf-protection=full";

/// The targets, built once per test run.
struct Targets {
    dir: PathBuf,
    mcount: PathBuf,
    mcount_cet: PathBuf,
    patchable_pie: PathBuf,
    patchable_no_pie: PathBuf,
    patchable_cet: PathBuf,
    /// `-fpatchable-function-entry=5,2`: two of the five NOPs before each function.
    patchable_before: PathBuf,
    /// A program without sites that uses `libsites.so`, built with `-fpatchable-function-entry=5`.
    with_lib: PathBuf,
}

fn targets() -> &'static Targets {
    static TARGETS: OnceLock<Targets> = OnceLock::new();
    TARGETS.get_or_init(|| {
        let dir = common::scratch_dir("symbols-sites");
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/targets");
        let program = sources.join("sites.c");
        let build = |name: &str, flags: &[&[&str]]| {
            let out = dir.join(name);
            compile(&[&program], &out, &flags.concat());
            out
        };
        let lib = dir.join("libsites.so");
        compile(&[&sources.join("sites_lib.c")], &lib, &["-shared", "-fPIC", PATCHABLE_5]);
        let with_lib = dir.join("sites_with_lib");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        compile(&[&program, &lib], &with_lib, &["-DWITH_LIB", &rpath]);
        Targets {
            mcount: build("sites_mcount", &[MCOUNT]),
            mcount_cet: build("sites_mcount_cet", &[MCOUNT, &[CET]]),
            patchable_pie: build("sites_patchable_pie", &[&[PATCHABLE_5], PIE]),
            patchable_no_pie: build("sites_patchable_no_pie", &[&[PATCHABLE_5], NO_PIE]),
            patchable_cet: build("sites_patchable_cet", &[&[PATCHABLE_5, CET], PIE]),
            patchable_before: build("sites_patchable_before", &[&["-fpatchable-function-entry=5,2"], PIE]),
            with_lib,
            dir,
        }
    })
}

fn compile(inputs: &[&Path], output: &Path, flags: &[&str]) {
    let status = Command::new("gcc")
        .arg("-O1")
        .args(flags)
        .args(inputs)
        .arg("-o")
        .arg(output)
        .status()
        .unwrap_or_else(|e| panic!("cannot run gcc (scripts/setup installs it): {e}"));
    assert!(status.success(), "gcc {flags:?} failed building {output:?}");
}

/// A running target, killed on drop.
struct Running {
    child: Child,
}

impl Running {
    /// Starts `exe` and waits until it has printed `ready`, i.e. is loaded and blocked.
    fn start(exe: &Path) -> Running {
        // In the build directory: a `-pg` program that exits normally writes `gmon.out`.
        let spawn =
            || Command::new(exe).current_dir(&targets().dir).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn();
        // A copy this test process just wrote may still be open for writing in a child that
        // another test thread forked and has not exec'd yet: ETXTBSY until it does.
        let mut tries = 0;
        let mut child = loop {
            match spawn() {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other.unwrap_or_else(|e| panic!("cannot start {exe:?}: {e}")),
            }
        };
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.starts_with("ready"), "{exe:?} printed {line:?}");
        Running { child }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `len` bytes of the child's memory at `addr`.
    fn memory(&self, addr: u64, len: usize) -> Vec<u8> {
        common::read_memory(self.pid(), addr, len)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn module_index(table: &SymbolTable, name: &str) -> usize {
    table.modules().iter().position(|m| m.name == name).unwrap_or_else(|| panic!("{name} is not loaded"))
}

/// What the sites of one module must look like.
struct Expected<'a> {
    functions: &'a [&'a str],
    kind: SiteKind,
    /// The functions that start with `endbr64` (the site then follows it). gcc's
    /// `-fcf-protection` gives it to global functions only: a static function whose address
    /// is never taken cannot be the target of an indirect branch.
    endbr: &'a [&'a str],
    /// How many of the NOPs come before the function symbol.
    before: u64,
}

/// Starts `exe`, reads the sites of module `module`, and checks them against `expected` and
/// the child's memory.
fn check(exe: &Path, module: &str, expected: Expected) {
    let child = Running::start(exe);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    let module = module_index(&table, module);
    let sites = table.compiler_sites(module).unwrap();

    let mut names: Vec<&str> = sites
        .iter()
        .map(|s| {
            let f = s.function.unwrap_or_else(|| panic!("site {:#x} has no function", s.addr));
            table.symbols()[f].name.as_str()
        })
        .collect();
    names.sort_unstable();
    assert_eq!(names, expected.functions, "one site per function of {exe:?}");
    assert!(sites.windows(2).all(|w| w[0].addr < w[1].addr), "sorted and unique: {sites:?}");

    for site in &sites {
        let f = &table.symbols()[site.function.unwrap()];
        assert_eq!(f.module, module);
        let endbr = expected.endbr.contains(&f.name.as_str());
        assert_eq!(child.memory(f.addr, 4) == ENDBR64, endbr, "endbr64 at {}", f.name);
        let entry = if endbr { f.addr + 4 } else { f.addr };
        assert_eq!(site.addr, entry - expected.before, "site of {}", f.name);
        assert_eq!(site.kind, expected.kind, "kind of {}", f.name);
        // The bytes the child executes are what the kind says, and no more NOPs follow.
        match site.kind {
            SiteKind::Mcount => assert_eq!(child.memory(site.addr, 5), NOP5, "{}", f.name),
            SiteKind::Patchable { nops } => {
                let bytes = child.memory(site.addr, usize::from(nops) + 1);
                assert_eq!(bytes[..5], [0x90; 5], "{}", f.name);
                assert!(bytes[..usize::from(nops)].iter().all(|&b| b == 0x90) && bytes[usize::from(nops)] != 0x90);
            }
        }
    }
}

#[test]
fn mcount_nops_of_a_non_pie() {
    let expected = Expected { functions: &PROGRAM_FUNCTIONS, kind: SiteKind::Mcount, endbr: &[], before: 0 };
    check(&targets().mcount, "sites_mcount", expected);
}

#[test]
fn mcount_nops_after_endbr64() {
    let expected =
        Expected { functions: &PROGRAM_FUNCTIONS, kind: SiteKind::Mcount, endbr: &GLOBAL_FUNCTIONS, before: 0 };
    check(&targets().mcount_cet, "sites_mcount_cet", expected);
}

const PATCHABLE: SiteKind = SiteKind::Patchable { nops: 5 };

#[test]
fn patchable_entries_of_a_pie_come_from_relocations() {
    let expected = Expected { functions: &PROGRAM_FUNCTIONS, kind: PATCHABLE, endbr: &[], before: 0 };
    check(&targets().patchable_pie, "sites_patchable_pie", expected);
}

#[test]
fn patchable_entries_of_a_non_pie() {
    let expected = Expected { functions: &PROGRAM_FUNCTIONS, kind: PATCHABLE, endbr: &[], before: 0 };
    check(&targets().patchable_no_pie, "sites_patchable_no_pie", expected);
}

#[test]
fn patchable_entries_after_endbr64() {
    let expected = Expected { functions: &PROGRAM_FUNCTIONS, kind: PATCHABLE, endbr: &GLOBAL_FUNCTIONS, before: 0 };
    check(&targets().patchable_cet, "sites_patchable_cet", expected);
}

#[test]
fn patchable_entries_with_nops_before_the_function() {
    let expected = Expected { functions: &PROGRAM_FUNCTIONS, kind: PATCHABLE, endbr: &[], before: 2 };
    check(&targets().patchable_before, "sites_patchable_before", expected);
}

#[test]
fn patchable_entries_of_a_shared_library() {
    let targets = targets();
    let expected = Expected { functions: &LIB_FUNCTIONS, kind: PATCHABLE, endbr: &[], before: 0 };
    check(&targets.with_lib, "libsites.so", expected);

    // The program itself was built without the flag.
    let child = Running::start(&targets.with_lib);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    assert_eq!(table.compiler_sites(module_index(&table, "sites_with_lib")).unwrap(), []);
}

#[test]
fn libc_and_vdso_give_what_they_have_without_error() {
    let child = Running::start(&targets().patchable_no_pie);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    let libc = module_index(&table, "libc.so.6");
    let sites = table.compiler_sites(libc).unwrap();
    let libc_path = &table.modules()[libc].path;
    let has_tables = ["__mcount_loc", "__patchable_function_entries"].iter().any(|s| section(libc_path, s).is_some());
    assert_eq!(!sites.is_empty(), has_tables, "{libc_path:?} has site tables: {has_tables}");
    assert!(sites.iter().all(|s| table.modules()[libc].contains(s.addr)));

    let vdso = module_index(&table, "[vdso]");
    assert_eq!(table.compiler_sites(vdso).unwrap(), []);
}

/// A copy of `exe` in the build directory, changed by `edit(file, section)` where `section`
/// is `name`'s header as `readelf` reports it.
fn edited_copy(exe: &Path, copy: &str, name: &str, edit: impl FnOnce(&File, &Section)) -> PathBuf {
    let path = targets().dir.join(copy);
    std::fs::copy(exe, &path).unwrap();
    let section = section(&path, name).unwrap_or_else(|| panic!("{exe:?} has no {name}"));
    edit(&File::options().write(true).open(&path).unwrap(), &section);
    path
}

#[test]
fn relocation_addends_count_when_the_file_holds_zeros() {
    // What lld writes (no `--apply-dynamic-relocs`): the dynamic linker still puts each
    // address in place from the R_X86_64_RELATIVE addend, and so must we.
    let zeroed =
        edited_copy(&targets().patchable_pie, "sites_zeroed", "__patchable_function_entries", |file, section| {
            file.write_all_at(&vec![0; section.size as usize], section.offset).unwrap();
        });
    let expected = Expected { functions: &PROGRAM_FUNCTIONS, kind: PATCHABLE, endbr: &[], before: 0 };
    check(&zeroed, "sites_zeroed", expected);
}

/// Runs `exe` (its section headers do not matter to the loader) and returns the error
/// [`SymbolTable::compiler_sites`] gives for it.
fn sites_error(exe: &Path) -> (PathBuf, String) {
    let child = Running::start(exe);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    let main = table.modules().iter().position(|m| m.is_main).unwrap();
    match table.compiler_sites(main) {
        Err(e @ SymbolError::Parse { .. }) => {
            let message = e.to_string();
            let SymbolError::Parse { path, reason } = e else { unreachable!() };
            assert!(message.contains(&path.display().to_string()), "{message}");
            (path, reason)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_table_of_odd_size_is_an_error_naming_the_module() {
    let exe =
        edited_copy(&targets().patchable_no_pie, "sites_odd_size", "__patchable_function_entries", |file, section| {
            // sh_size is at byte 32 of a 64-byte section header.
            let at = section_headers_offset(&targets().patchable_no_pie) + 64 * section.index + 32;
            file.write_all_at(&(section.size + 4).to_le_bytes(), at).unwrap();
        });
    let (path, reason) = sites_error(&exe);
    assert_eq!(path, exe);
    assert!(reason.contains("__patchable_function_entries") && reason.contains("8-byte"), "{reason}");
}

#[test]
fn an_entry_outside_the_file_is_an_error_naming_the_module() {
    let exe = edited_copy(&targets().mcount, "sites_outside", "__mcount_loc", |file, section| {
        file.write_all_at(&0x1234u64.to_le_bytes(), section.offset).unwrap();
    });
    let (path, reason) = sites_error(&exe);
    assert_eq!(path, exe);
    assert!(reason.contains("__mcount_loc") && reason.contains("0x1234"), "{reason}");
}

/// A section header as `readelf -S -W` shows it.
struct Section {
    index: u64,
    offset: u64,
    size: u64,
}

fn readelf(args: &[&str], file: &Path) -> String {
    let out = Command::new("readelf").args(args).arg(file).output().expect("cannot run readelf");
    assert!(out.status.success(), "readelf {args:?} {file:?} failed");
    String::from_utf8(out.stdout).unwrap()
}

fn section(file: &Path, name: &str) -> Option<Section> {
    // `  [26] __patchable_function_entries PROGBITS  0000000000004028 003028 000018 00 WAL 15 0 8`
    readelf(&["-S", "-W"], file).lines().find_map(|line| {
        let (index, rest) = line.trim_start().strip_prefix('[')?.split_once(']')?;
        let cols: Vec<&str> = rest.split_whitespace().collect();
        let hex = |s: &str| u64::from_str_radix(s, 16).unwrap();
        (cols.first() == Some(&name)).then(|| Section {
            index: index.trim().parse().unwrap(),
            offset: hex(cols[3]),
            size: hex(cols[4]),
        })
    })
}

fn section_headers_offset(file: &Path) -> u64 {
    // `  Start of section headers:          14200 (bytes into file)`
    let header = readelf(&["-h"], file);
    let line = header.lines().find(|l| l.contains("Start of section headers:")).unwrap();
    line.split(':').nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()
}
