//! Symbol tables of other processes: small C and C++ programs compiled here (PIE, non-PIE,
//! with a shared library), run as children that print the addresses of their own functions
//! and then wait on stdin.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;

use dynprobe_symbols::{SymbolError, SymbolTable};

const C_PROGRAM: &str = r#"
#include <stdio.h>
#include <unistd.h>
__attribute__((noinline)) int work(int x) { return x * 3 + 1; }
static __attribute__((noinline)) int helper(int x) { return work(x) - 1; }
#ifdef WITH_LIB
int lib_fn(int x);
#define LIB_FN ((void *)lib_fn)
#else
#define LIB_FN ((void *)0)
#endif
int main(void) {
    printf("%p %p %p\n", (void *)work, (void *)helper, LIB_FN);
    fflush(stdout);
    char c;
    (void)read(0, &c, 1); /* until the parent closes our stdin */
    return helper(2) == 6 ? 0 : 1;
}
"#;

const C_LIBRARY: &str = "int lib_fn(int x) { return x * 7; }\n";

const CPP_PROGRAM: &str = r#"
#include <cstdio>
#include <iostream>
#include <unistd.h>
namespace ns {
__attribute__((noinline)) int work(int x) { return x + 1; }
__attribute__((noinline)) int work(double x) { return (int)x; }
}
template <typename T> __attribute__((noinline)) T add(T a, T b) { return a + b; }
int main() {
    std::ios_base::sync_with_stdio(true); /* a call into libstdc++, so it is loaded */
    std::printf("%p %p %p\n", (void *)(int (*)(int))ns::work,
                (void *)(int (*)(double))ns::work, (void *)add<int>);
    std::fflush(stdout);
    char c;
    (void)read(0, &c, 1);
    return ns::work(1) + ns::work(2.0) + add(1, 2) == 7 ? 0 : 1;
}
"#;

/// The compiled programs, built once per test run.
struct Programs {
    no_pie: PathBuf,
    /// `no_pie` stripped, its symbols in `demo_stripped.debug` named by `.gnu_debuglink`.
    stripped: PathBuf,
    pie_with_lib: PathBuf,
    cpp: PathBuf,
}

fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Programs> = OnceLock::new();
    PROGRAMS.get_or_init(|| {
        let dir = common::scratch_dir("symbols-child-process");
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path
        };
        let c = write("demo.c", C_PROGRAM);
        let lib_c = write("lib.c", C_LIBRARY);
        let cpp = write("demo.cpp", CPP_PROGRAM);

        let lib = dir.join("libdemo-1.2.so");
        compile("gcc", &[&lib_c], &lib, &["-O1", "-shared", "-fPIC"]);
        let no_pie = dir.join("demo_nopie");
        compile("gcc", &[&c], &no_pie, &["-O1", "-fno-pie", "-no-pie"]);
        let pie_with_lib = dir.join("demo_pie");
        let rpath = format!("-Wl,-rpath,{}", dir.display());
        compile("gcc", &[&c, &lib], &pie_with_lib, &["-O1", "-fpie", "-pie", "-DWITH_LIB", &rpath]);
        let stripped = dir.join("demo_stripped");
        let debug = dir.join("demo_stripped.debug");
        run("objcopy", &[Path::new("--only-keep-debug"), &no_pie, &debug]);
        run("objcopy", &[Path::new("--strip-all"), &no_pie, &stripped]);
        let link = format!("--add-gnu-debuglink={}", debug.display());
        run("objcopy", &[Path::new(&link), &stripped]);
        let cpp_exe = dir.join("demo_cpp");
        compile("g++", &[&cpp], &cpp_exe, &["-O1"]);
        Programs { no_pie, stripped, pie_with_lib, cpp: cpp_exe }
    })
}

fn compile(compiler: &str, inputs: &[&Path], output: &Path, flags: &[&str]) {
    let status = Command::new(compiler)
        .args(flags)
        .args(inputs)
        .arg("-o")
        .arg(output)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {compiler}: {e}"));
    assert!(status.success(), "{compiler} failed building {output:?}");
}

fn run(tool: &str, args: &[&Path]) {
    let status = Command::new(tool).args(args).status().unwrap();
    assert!(status.success(), "{tool} {args:?} failed");
}

/// A running child; closing its stdin (on drop) lets it exit.
struct Running {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The addresses the child printed.
    printed: Vec<u64>,
}

impl Running {
    fn start(exe: &Path) -> Running {
        let mut child = Command::new(exe).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let stdin = child.stdin.take();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let printed = line
            .split_whitespace()
            .map(|p| match p {
                "(nil)" => 0,
                p => u64::from_str_radix(p.trim_start_matches("0x"), 16).unwrap(),
            })
            .collect();
        Running { child, stdin, printed }
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
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// `name`'s link-time address according to binutils' `nm`.
fn nm_address(file: &Path, name: &str) -> u64 {
    let out = Command::new("nm").arg("--defined-only").arg(file).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .find_map(|l| {
            let mut cols = l.split_whitespace();
            let (addr, _kind, sym) = (cols.next()?, cols.next()?, cols.next()?);
            (sym == name).then(|| u64::from_str_radix(addr, 16).unwrap())
        })
        .unwrap_or_else(|| panic!("nm does not list {name} in {file:?}"))
}

/// Reads `len` bytes at `offset` of `path`.
fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0; len];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// The checks every C variant must pass.
fn check_c_program(exe: &Path) -> (Running, SymbolTable) {
    let child = Running::start(exe);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    let (work, helper) = (child.printed[0], child.printed[1]);

    let sym = table.lookup("work").unwrap();
    assert_eq!(sym.addr, work);
    let main = &table.modules()[sym.module];
    assert!(main.is_main);
    assert_eq!(main.path, exe);
    // A static function is found too, by name and by the executable's name.
    let exe_name = exe.file_name().unwrap().to_str().unwrap();
    assert_eq!(table.lookup(&format!("{exe_name}:helper")).unwrap().addr, helper);

    // The bias agrees with nm's link-time address.
    assert_eq!(nm_address(exe, "work") + main.bias, work);

    let (s, off) = table.resolve(work + 3).unwrap();
    assert_eq!((s.name.as_str(), off), ("work", 3));
    let (start, end) = table.function_bounds(work + 3).unwrap();
    assert!(start == work && end > work + 3);
    assert_eq!(table.format_addr(work + 3), format!("work+0x3 [{exe_name}]"));

    // The file offset holds the bytes the child executes.
    let (path, offset) = table.file_offset(work).unwrap();
    assert_eq!(path, exe);
    let len = (end - start) as usize;
    assert_eq!(file_bytes(&path, offset, len), child.memory(work, len));
    (child, table)
}

#[test]
fn non_pie_executable_has_zero_bias() {
    let (_child, table) = check_c_program(&programs().no_pie);
    let main = table.modules().iter().find(|m| m.is_main).unwrap();
    assert_eq!(main.bias, 0);
    // libc of the child resolves too.
    assert!(table.lookup("libc:printf").is_ok());
}

#[test]
fn stripped_executable_uses_its_debug_file() {
    let child = Running::start(&programs().stripped);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    // Neither function is in `.dynsym` of a non-PIE executable: only the debug file's
    // `.symtab` can name them.
    assert_eq!(table.lookup("work").unwrap().addr, child.printed[0]);
    assert_eq!(table.lookup("helper").unwrap().addr, child.printed[1]);
    let (start, end) = table.function_bounds(child.printed[0]).unwrap();
    assert!(start == child.printed[0] && end > start);
}

#[test]
fn pie_executable_and_hyphenated_library() {
    let programs = programs();
    let (child, table) = check_c_program(&programs.pie_with_lib);
    let main = table.modules().iter().find(|m| m.is_main).unwrap();
    assert_ne!(main.bias, 0, "a PIE is relocated");

    let lib_fn = child.printed[2];
    let sym = table.lookup("libdemo:lib_fn").unwrap();
    assert_eq!(sym.addr, lib_fn);
    let lib = &table.modules()[sym.module];
    assert_eq!(lib.name, "libdemo-1.2.so");
    assert_eq!(table.lookup("lib_fn").unwrap().addr, lib_fn);
    assert_eq!(nm_address(&lib.path, "lib_fn") + lib.bias, lib_fn);
    // Load order: the executable, then what it needs, in DT_NEEDED order.
    let names: Vec<_> = table.modules().iter().map(|m| m.name.as_str()).collect();
    assert_eq!(&names[..3], ["demo_pie", "libdemo-1.2.so", "libc.so.6"]);

    let (path, offset) = table.file_offset(lib_fn).unwrap();
    assert_eq!(file_bytes(&path, offset, 8), child.memory(lib_fn, 8));
}

#[test]
fn cpp_names_demangle_and_overloads_are_ambiguous() {
    let child = Running::start(&programs().cpp);
    let table = SymbolTable::for_pid(child.pid()).unwrap();
    let (work_int, work_double, add_int) = (child.printed[0], child.printed[1], child.printed[2]);

    let sym = table.lookup("ns::work(int)").unwrap();
    assert_eq!((sym.addr, sym.mangled.as_str()), (work_int, "_ZN2ns4workEi"));
    assert_eq!(table.lookup("ns::work(double)").unwrap().addr, work_double);
    assert_eq!(table.lookup("_ZN2ns4workEd").unwrap().addr, work_double);
    assert_eq!(table.lookup("add<int>").unwrap().addr, add_int);
    assert_eq!(table.lookup("int add<int>(int, int)").unwrap().addr, add_int);
    assert_eq!(table.format_addr(work_int + 1), "ns::work(int)+0x1 [demo_cpp]");

    // Without parameters, `ns::work` is an overload set of two functions.
    match table.lookup("ns::work").unwrap_err() {
        SymbolError::Ambiguous { name, candidates } => {
            assert_eq!(name, "ns::work");
            assert_eq!(candidates.len(), 2, "{candidates:?}");
            assert!(candidates.iter().any(|c| c.starts_with("ns::work(int) at ")));
        }
        other => panic!("{other:?}"),
    }
    // libstdc++ is loaded and demangled as well.
    assert!(table
        .symbols()
        .iter()
        .any(|s| table.modules()[s.module].name.starts_with("libstdc++") && s.name.starts_with("std::")));
}
