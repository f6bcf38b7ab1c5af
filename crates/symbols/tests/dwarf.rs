//! Source-level facts from DWARF, on `targets/source.c` built as distributions and users
//! build programs: `-O0` and `-O2`, DWARF 4 and 5, compressed debug sections, and the
//! debugging information split off into a `.gnu_debuglink` file or a build-id directory.

#[allow(dead_code)] // this test uses only part of it
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use dynprobe_symbols::dwarf::{Access, DebugInfo, DwarfError, Place, SourcePoint, TypeKind, VarError};

/// `targets/source.c` built with gcc and `flags` into `name` in this test's scratch
/// directory.
fn build(name: &str, flags: &[&str]) -> PathBuf {
    build_with(name, flags, &[])
}

/// [`build`], with more source files linked in.
fn build_with(name: &str, flags: &[&str], more: &[PathBuf]) -> PathBuf {
    let out = common::scratch_dir("dwarf").join(name);
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/targets/source.c");
    let status = Command::new("gcc")
        .args(["-Wall", "-Werror", "-fcf-protection=none"])
        .args(flags)
        .arg(&source)
        .args(more)
        .arg("-o")
        .arg(&out)
        .status()
        .expect("run gcc (scripts/setup installs it)");
    assert!(status.success(), "gcc {flags:?} failed");
    out
}

fn objcopy(args: &[&std::ffi::OsStr]) {
    let status = Command::new("objcopy").args(args).status().expect("run objcopy (binutils)");
    assert!(status.success(), "objcopy {args:?} failed");
}

fn line(point: &str) -> SourcePoint {
    let (name, line) = point.split_once(':').unwrap();
    SourcePoint::FunctionLine { name: name.into(), file: None, line: line.parse().unwrap() }
}

/// What every build must give: the functions, the line `handle:3` (`if (req->urgent)`),
/// the blank `handle:2` moved to it, its variables and their types.
fn check(info: &DebugInfo, optimized: bool) {
    let handle = &info.find_functions("handle", None).unwrap()[0];
    assert!(handle.file.ends_with("tests/targets/source.c"), "{}", handle.file);
    assert_eq!(handle.line, 28);
    let sites = info.resolve(&line("handle:3")).unwrap();
    assert_eq!(sites.len(), 1, "{sites:?}");
    assert_eq!((sites[0].line, sites[0].function.as_str(), sites[0].inlined), (31, "handle", false));
    assert_eq!(info.symbol_at(sites[0].addr).map(|s| s.0), Some("handle"));
    let blank = info.resolve(&line("handle:2")).unwrap();
    assert_eq!(blank[0].addr, sites[0].addr);
    assert_eq!(blank[0].note.as_deref(), Some("line 30 has no code; probed at line 31"));

    let names: Vec<String> = info.variables(&sites[0]).iter().map(|v| v.name.clone()).collect();
    assert_eq!(names, ["req", "round", "total"]);
    let (place, ty) = info.resolve_variable(&sites[0], "req", &[Access::Arrow("path".into())]).unwrap();
    assert_eq!(info.type_of(ty.unwrap()).name, "const char *");
    assert!(matches!(place, Place::Memory { offset: 0, .. }), "{place}");
    let (_, ty) = info.resolve_variable(&sites[0], "req", &[Access::Arrow("color".into())]).unwrap();
    let color = info.type_of(ty.unwrap());
    assert_eq!(color.kind, TypeKind::Enum(vec![(0, "RED".into()), (5, "GREEN".into()), (6, "BLUE".into())]));
    let limits = [Access::Arrow("limits".into()), Access::Index(2), Access::Field("hard".into())];
    let (place, _) = info.resolve_variable(&sites[0], "req", &limits).unwrap();
    // `limits` is at 20 in `struct request`, element 2 at 20 + 2 * 8, `hard` 4 further.
    assert!(matches!(place, Place::Memory { offset: 40, .. }), "{place}");
    let err = info.resolve_variable(&sites[0], "req", &[Access::Arrow("size".into())]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "`struct request *` has no member `size` (members: path, len, color, urgent, tag, limits)"
    );
    let err = info.resolve_variable(&sites[0], "nope", &[]).unwrap_err();
    assert_eq!(err.to_string(), "no variable `nope` at this point (visible: req, round, total)");

    // At the entry, parameters are in the ABI's registers whatever the optimization.
    let entry = info.resolve(&SourcePoint::Function { name: "count_up".into(), file: None }).unwrap();
    assert_eq!(entry.len(), 1);
    assert!(entry[0].entry);
    let (place, ty) = info.resolve_variable(&entry[0], "step", &[]).unwrap();
    assert_eq!((place, info.type_of(ty.unwrap()).name), (Place::Register(4), "short int".to_string()));

    // `scale` is inlined (always_inline) into handle, count_up and main.
    let scale = info.resolve(&SourcePoint::Function { name: "scale".into(), file: None }).unwrap();
    assert!(scale.iter().all(|s| s.inlined), "{scale:?}");
    assert!(scale.len() >= 2, "{scale:?}");
    if optimized {
        let seen = info.resolve(&line("count_up:2")).unwrap();
        let vars = info.variables(&seen[0]);
        let seen_var = vars.iter().find(|v| v.name == "seen").unwrap();
        assert!(matches!(seen_var.place, Err(VarError::OptimizedOut) | Ok(_)));
    }
}

#[test]
fn dwarf5_and_dwarf4_at_o0_and_o2_and_with_lto() {
    for (name, flags, optimized) in [
        ("src-o0", &["-O0", "-g"][..], false),
        ("src-o2", &["-O2", "-g"][..], true),
        ("src-o0-dwarf4", &["-O0", "-gdwarf-4"][..], false),
        ("src-o2-dwarf4", &["-O2", "-gdwarf-4"][..], true),
        // Link-time optimization: the code's units refer to the compiler's early ones
        // (DW_FORM_ref_addr), as in Debian's python3.11.
        ("src-lto", &["-O2", "-g", "-flto"][..], true),
    ] {
        let info = DebugInfo::open(&build(name, flags)).unwrap();
        check(&info, optimized);
    }
}

#[test]
fn compressed_sections_zlib_and_zstd() {
    let zlib = build("src-zlib", &["-O2", "-g", "-gz=zlib"]);
    check(&DebugInfo::open(&zlib).unwrap(), true);
    let zstd = build("src-zstd", &["-O2", "-g"]);
    objcopy(&["--compress-debug-sections=zstd".as_ref(), zstd.as_os_str()]);
    let header = Command::new("readelf").arg("-S").arg("-W").arg(&zstd).output().unwrap();
    let sections = String::from_utf8_lossy(&header.stdout);
    let info_line = sections.lines().find(|l| l.contains(".debug_info")).unwrap();
    assert!(info_line.contains(" C "), "objcopy did not compress: {info_line}");
    check(&DebugInfo::open(&zstd).unwrap(), true);
}

/// `objcopy --only-keep-debug` + `--strip-debug` + `--add-gnu-debuglink`, as Debian's
/// dh_strip does: the stripped binary names its debug file.
fn split(name: &str) -> (PathBuf, PathBuf) {
    let binary = build(name, &["-O2", "-g", "-Wl,--build-id"]);
    let debug = binary.with_extension("debug");
    objcopy(&["--only-keep-debug".as_ref(), binary.as_os_str(), debug.as_os_str()]);
    objcopy(&["--strip-debug".as_ref(), binary.as_os_str()]);
    let link = format!("--add-gnu-debuglink={}", debug.display());
    objcopy(&[link.as_ref(), binary.as_os_str()]);
    (binary, debug)
}

#[test]
fn a_debuglink_file_beside_the_binary() {
    let (binary, debug) = split("src-linked");
    let info = DebugInfo::open_in(&binary, &[]).unwrap();
    assert_eq!(info.debug_file, debug);
    check(&info, true);
}

#[test]
fn a_build_id_directory_and_the_message_when_nothing_is_found() {
    let (binary, debug) = split("src-buildid");
    let root = common::scratch_dir("dwarf/debug-root");
    let out = Command::new("readelf").arg("-n").arg(&binary).output().unwrap();
    let notes = String::from_utf8_lossy(&out.stdout);
    let id = notes.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).unwrap().trim().to_string();
    let in_root = root.join(format!(".build-id/{}/{}.debug", &id[..2], &id[2..]));
    std::fs::create_dir_all(in_root.parent().unwrap()).unwrap();
    std::fs::rename(&debug, &in_root).unwrap();
    let info = DebugInfo::open_in(&binary, std::slice::from_ref(&root)).unwrap();
    assert_eq!(info.debug_file, in_root);
    check(&info, true);

    // Without the root, nothing is found, and the message says where it looked.
    let err = DebugInfo::open_in(&binary, &[]).unwrap_err();
    let DwarfError::NoDebugInfo { searched, package: None, minidebuginfo: false, .. } = &err else { panic!("{err}") };
    assert_eq!(searched[0], binary.with_extension("debug"));
    assert!(err.to_string().ends_with("; rebuild it with `-g` (or install its separate debug file)"), "{err}");
}

#[test]
fn minidebuginfo_is_looked_into_and_named_when_it_has_no_dwarf() {
    // As Fedora's find-debuginfo.sh makes it: the symbol table alone, xz-compressed, in
    // `.gnu_debugdata` of the stripped binary.
    let binary = build("src-mini", &["-O2", "-g"]);
    let dir = binary.parent().unwrap();
    let symbols = dir.join("src-mini.symbols");
    objcopy(&["--only-keep-debug".as_ref(), "--strip-debug".as_ref(), binary.as_os_str(), symbols.as_os_str()]);
    let status = Command::new("xz").arg("-f").arg("-k").arg(&symbols).status().expect("run xz (xz-utils)");
    assert!(status.success());
    let xz = dir.join("src-mini.symbols.xz");
    objcopy(&["--strip-all".as_ref(), binary.as_os_str()]);
    let section = format!(".gnu_debugdata={}", xz.display());
    objcopy(&["--add-section".as_ref(), section.as_ref(), binary.as_os_str()]);
    let err = DebugInfo::open_in(&binary, &[]).unwrap_err();
    assert!(matches!(err, DwarfError::NoDebugInfo { minidebuginfo: true, .. }), "{err:?}");
    assert!(
        err.to_string().contains("(its .gnu_debugdata, MiniDebugInfo, has symbols but no lines or variables)"),
        "{err}"
    );
}

/// `source.c` with three more units, none of which has `handle`'s code or names its file:
/// `other{i}.c`, with `other{i}` and a static `twice{i}` each.
fn program_of_four_units() -> PathBuf {
    let dir = common::scratch_dir("dwarf");
    let more: Vec<PathBuf> = (0..3)
        .map(|i| {
            let file = dir.join(format!("other{i}.c"));
            // `twice` is only out of line as GCC's clone for k = 2, `twice.constprop.0`.
            let text = format!(
                "struct other{i} {{ int a; long b; }};\n\
                 static __attribute__((noinline)) long twice{i}(long v, int k) {{ return v * k + {i}; }}\n\
                 long other{i}(struct other{i} *o) {{ return twice{i}(o->a, 2) + twice{i}(o->b, 2); }}\n"
            );
            std::fs::write(&file, text).unwrap();
            file
        })
        .collect();
    build_with("src-units", &["-O2", "-g"], &more)
}

#[test]
fn a_lookup_reads_only_the_units_that_hold_the_function() {
    let info = DebugInfo::open(&program_of_four_units()).unwrap();
    assert!(info.unit_count() >= 4, "{} units", info.unit_count());
    let sites = info.resolve(&line("handle:3")).unwrap();
    info.resolve_variable(&sites[0], "req", &[Access::Arrow("path".into())]).unwrap();
    assert_eq!(info.units_indexed(), 1, "of {} units", info.unit_count());
    // A file's line reads the line tables of the units that name it, and finds its function
    // by walking down to it, indexing none.
    let sites = info.resolve(&SourcePoint::FileLine { file: "other1.c".into(), line: 3 }).unwrap();
    assert_eq!(sites.iter().map(|s| (s.function.as_str(), s.entry)).collect::<Vec<_>>(), [("other1", true)]);
    assert_eq!(info.units_indexed(), 1);
    // A function whose only code is a clone is found through the clone's symbol.
    let twice = info.find_functions("twice2", None).unwrap();
    assert!(twice.iter().any(|f| f.entry().is_some()), "{twice:?}");
    assert_eq!(info.units_indexed(), 2);
    // `--funcs` lists every function: that alone reads all of them.
    assert!(info.functions().iter().any(|f| f.name == "other2"));
}

/// `probe --funcs GLOB` indexes only the units holding the code of the symbols the glob
/// matches (a static function by its clone's symbol, `twice1.constprop.0`), and lists what
/// the whole index would.
#[test]
fn functions_by_a_glob_read_only_the_units_of_the_symbols_it_matches() {
    let info = DebugInfo::open(&program_of_four_units()).unwrap();
    let names = |functions: Vec<&dynprobe_symbols::dwarf::Function>| {
        let mut names: Vec<String> = functions.iter().map(|f| f.qualified_name.clone()).collect();
        names.sort();
        names.dedup();
        names
    };
    // As `twice1*`, `*1` and `other*` match.
    assert_eq!(names(info.functions_matching(&|n| n.starts_with("twice1"))), ["twice1"]);
    assert_eq!(info.units_indexed(), 1, "of {} units", info.unit_count());
    assert_eq!(names(info.functions_matching(&|n| n.ends_with('1'))), ["other1", "twice1"]);
    assert_eq!(info.units_indexed(), 1);
    let lazily = names(info.functions_matching(&|n| n.starts_with("other")));
    assert_eq!(info.units_indexed(), 3);
    // What the whole index says.
    let all: Vec<&str> =
        info.functions().iter().filter(|f| f.name.starts_with("other")).map(|f| f.name.as_str()).collect();
    assert_eq!(lazily, all);
    // No symbol matches: every unit is read, for a function that exists only inlined.
    let fresh = DebugInfo::open(&program_of_four_units()).unwrap();
    assert!(fresh.functions_matching(&|n| n.starts_with("nothing")).is_empty());
    assert_eq!(fresh.units_indexed(), fresh.unit_count());
}

#[test]
fn debians_compressed_debug_file_is_inflated_once_into_the_cache() {
    // python3.11-dbg's build-id file (scripts/setup installs it): zlib-compressed sections, as
    // Debian's dh_strip writes them, and link-time optimized units.
    let cache = common::scratch_dir("dwarf/cache");
    let _ = std::fs::remove_dir_all(&cache);
    // No other test of this file opens a debug file with sections large enough to be cached.
    std::env::set_var(dynprobe_symbols::dwarf::CACHE_DIR_ENV, &cache);
    let python = Path::new("/usr/bin/python3.11");
    let resolve = || {
        let info = DebugInfo::open(python).unwrap();
        let sites = info.resolve(&line("PyList_Append:1")).unwrap();
        let (place, _) = info.resolve_variable(&sites[0], "op", &[Access::Arrow("ob_type".into())]).unwrap();
        // Its out-of-line copy and the copies inlined into other units, found without
        // reading every unit.
        assert!(sites.len() > 1, "{sites:?}");
        assert!(info.units_indexed() < info.unit_count(), "{} of {}", info.units_indexed(), info.unit_count());
        (sites, place.to_string(), info.debug_file.clone())
    };
    let first = resolve();
    assert!(first.2.starts_with("/usr/lib/debug/.build-id/"), "{}", first.2.display());
    let inflated: Vec<_> = std::fs::read_dir(cache.join("dwarf")).unwrap().flatten().collect();
    assert_eq!(inflated.len(), 1, "one directory for the one debug file");
    let info_section = inflated[0].path().join(".debug_info");
    let size = std::fs::metadata(&info_section).unwrap().len();
    let compressed = Command::new("readelf").arg("-SW").arg(&first.2).output().unwrap();
    let header = String::from_utf8_lossy(&compressed.stdout);
    let line = header.lines().find(|l| l.contains(".debug_info")).unwrap();
    // Flags `C`: compressed on disk, and smaller than the inflated copy.
    assert!(line.contains(" C "), "{line}");
    // `NAME TYPE ADDRESS OFFSET SIZE`: the size four after the name.
    let fields: Vec<&str> = line.split_whitespace().skip_while(|f| *f != ".debug_info").collect();
    let on_disk = u64::from_str_radix(fields[4], 16).unwrap();
    assert!(size > on_disk, "{size} inflated vs {on_disk} on disk");
    // The second opening maps the cached copy and finds the same.
    assert_eq!(resolve(), first);
    std::env::remove_var(dynprobe_symbols::dwarf::CACHE_DIR_ENV);
}

#[test]
fn split_dwarf_in_dwo_files_and_in_a_dwp_package() {
    for (name, version) in [("src-split", "-gdwarf-5"), ("src-split-dwarf4", "-gdwarf-4")] {
        // The binary keeps skeleton units and the line table; the DIEs are in a .dwo file
        // beside it, named in the skeleton.
        let binary = build(name, &["-O2", version, "-gsplit-dwarf"]);
        let dir = binary.parent().unwrap();
        // gcc names it after the output and the source when it compiles and links at once.
        let dwo = dir.join(format!("{name}-source.dwo"));
        assert!(dwo.is_file(), "no {}", dwo.display());
        check(&DebugInfo::open_in(&binary, &[]).unwrap(), true);

        // Packaged (`llvm-dwp`, as a distribution would ship it), the .dwo gone.
        let package = PathBuf::from(format!("{}.dwp", binary.display()));
        let status = Command::new("llvm-dwp-14")
            .arg("-e")
            .arg(&binary)
            .arg("-o")
            .arg(&package)
            .status()
            .expect("run llvm-dwp-14 (scripts/setup installs llvm-14; GNU dwp cannot read DWARF 5)");
        assert!(status.success(), "llvm-dwp failed");
        std::fs::remove_file(&dwo).unwrap();
        check(&DebugInfo::open_in(&binary, &[]).unwrap(), true);

        // Neither: the skeleton alone has lines but no functions.
        std::fs::remove_file(&package).unwrap();
        let err = DebugInfo::open_in(&binary, &[]).unwrap().find_functions("handle", None).unwrap_err();
        assert!(matches!(err, DwarfError::UnknownFunction { .. }), "{err}");
    }
}

#[test]
fn code_the_linker_discarded_has_no_sites() {
    // `twice` (an inline function of a header, not inlined at -O0) is compiled into both
    // units; `unused` is garbage-collected (`--gc-sections`), its line-table sequence left
    // at address 0 by GNU ld. A line of the one is its kept copy, once; of the other, none.
    let dir = common::scratch_dir("dwarf/discarded");
    std::fs::write(dir.join("twice.h"), "inline int twice(int v) {\n    return v * 2;\n}\n").unwrap();
    std::fs::write(
        dir.join("a.cc"),
        "#include \"twice.h\"\nint from_a(int v) { return twice(v) + 1; }\nint unused(int v) {\n    return v * 3;\n}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("b.cc"),
        "#include \"twice.h\"\nint from_a(int);\nint main(int argc, char **) { return twice(argc) + from_a(argc); }\n",
    )
    .unwrap();
    let binary = dir.join("discarded");
    let status = Command::new("g++")
        .args(["-O0", "-g", "-ffunction-sections", "-Wl,--gc-sections"])
        .arg(dir.join("a.cc"))
        .arg(dir.join("b.cc"))
        .arg("-o")
        .arg(&binary)
        .status()
        .expect("run g++");
    assert!(status.success());
    let info = DebugInfo::open_in(&binary, &[]).unwrap();
    let sites = info.resolve(&SourcePoint::FileLine { file: "twice.h".into(), line: 2 }).unwrap();
    assert_eq!(sites.len(), 1, "{sites:?}");
    assert_eq!(info.symbol_at(sites[0].addr).map(|(name, _)| name), Some("_Z5twicei"), "{sites:?}");
    assert_eq!(sites[0].function, "twice");
    let err = info.resolve(&SourcePoint::FileLine { file: "a.cc".into(), line: 4 }).unwrap_err();
    assert!(matches!(err, DwarfError::NoCode { .. }), "{err}");
}
