//! Loading a library into a running process with its own `dlopen`, and the errors: a
//! static program (no loader), a missing entry, a file that is no library, an entry that
//! never returns, a library the target cannot see (another mount namespace), no process.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{compile, scratch, wait_in_syscall, worker_program, Target};
use dynprobe_remote::{inject_library, inject_library_timeout, AttachError, CallError, InjectError};

fn test_library() -> PathBuf {
    compile("inject_lib.c", "libinject_test.so", &["-shared", "-fPIC"])
}

/// `worker.c` with its main thread in `read` and sleeper in `nanosleep`; the constructor
/// of the test library will write `ctor_file`.
fn blocked_target(ctor_file: &Path) -> Target {
    let target = Target::start(&worker_program(), &[("DYNPROBE_TEST_CTOR_FILE", ctor_file)]);
    let pid = target.pid();
    wait_in_syscall(pid, pid, libc::SYS_read);
    wait_in_syscall(pid, target.number(1) as i32, libc::SYS_clock_nanosleep);
    target
}

fn fresh_file(name: &str) -> PathBuf {
    let path = scratch().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn injects_a_library_and_calls_its_entry() {
    let expected = common::undisturbed_worker_output();
    let ctor_file = fresh_file("ctor");
    let marker = fresh_file("entry");
    let target = blocked_target(&ctor_file);
    let pid = target.pid();
    let sleeper = target.number(1) as i32;

    let injected = inject_library(pid, &test_library(), "test_entry", marker.to_str().unwrap()).unwrap();
    assert_eq!(injected.entry_return, 7);
    assert_eq!(injected.loader, "dlopen");
    assert_ne!(injected.handle, 0);
    // A thread blocked in a non-futex system call was chosen.
    assert!(injected.tid == pid || injected.tid == sleeper, "{injected:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), format!("entered {}\n", marker.display()));
    assert_eq!(std::fs::read_to_string(&ctor_file).unwrap(), format!("constructor ran in {pid}\n"));
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    assert!(maps.contains("libinject_test.so"));

    // Again: the same handle, the entry runs again, the constructor does not.
    std::fs::remove_file(&marker).unwrap();
    std::fs::remove_file(&ctor_file).unwrap();
    let again = inject_library(pid, &test_library(), "test_entry", marker.to_str().unwrap()).unwrap();
    assert_eq!((again.handle, again.entry_return), (injected.handle, 7));
    assert!(marker.exists() && !ctor_file.exists());

    // The program carried on as if nothing happened (read and nanosleep restarted).
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn dlopen_and_dlsym_failures_carry_dlerror() {
    let target = blocked_target(&fresh_file("ctor-errors"));
    let pid = target.pid();

    let err = inject_library(pid, &test_library(), "no_such_entry", "").unwrap_err();
    match &err {
        InjectError::NoEntry { symbol, message } => {
            assert_eq!(symbol, "no_such_entry");
            assert!(message.contains("undefined symbol: no_such_entry"), "{message}");
        }
        other => panic!("{other:?}"),
    }

    // A file that is no ELF library.
    let not_elf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/targets/worker.c");
    let err = inject_library(pid, &not_elf, "test_entry", "").unwrap_err();
    match &err {
        InjectError::DlopenFailed { message, .. } => assert!(message.contains("invalid ELF header"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().starts_with(&format!("dlopen of {} failed: ", not_elf.display())), "{err}");

    let err = inject_library(pid, Path::new("/nonexistent/lib.so"), "test_entry", "").unwrap_err();
    assert!(matches!(err, InjectError::LibraryNotFound { .. }), "{err:?}");
    target.finish("hi\n");
}

#[test]
fn an_entry_slower_than_the_timeout_says_where_it_was_and_is_left_to_finish() {
    let expected = common::undisturbed_worker_output();
    let target = blocked_target(&fresh_file("ctor-slow"));
    let pid = target.pid();
    let marker = fresh_file("slow-entry");
    let arg = marker.to_str().unwrap();
    let err = inject_library_timeout(pid, &test_library(), "slow_entry", arg, Duration::from_millis(500)).unwrap_err();
    match &err {
        InjectError::Call { function, location: Some(location), error: CallError::Timeout { .. }, .. } => {
            assert_eq!(function, "slow_entry");
            // Sleeping in nanosleep, called by slow_entry.
            assert!(location.contains("libc.so.6") || location.contains("slow_entry"), "{location}");
        }
        other => panic!("{other:?}"),
    }
    let text = err.to_string();
    assert!(text.contains("calling slow_entry in the target (thread") && text.contains("did not return within 0.5 s"));
    // Stopping it there would have kept whatever it held: it is left to finish, and
    // returns a second later, through the stub, to the read it was taken from.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !marker.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), format!("entered {arg}\n"), "the entry never finished");
    assert_eq!(target.finish("hi\n"), expected);
}

#[test]
fn a_static_program_has_no_loader() {
    let program = compile("static_target.c", "static_target", &["-static"]);
    let target = Target::start(&program, &[]);
    let err = inject_library(target.pid(), &test_library(), "test_entry", "").unwrap_err();
    assert!(matches!(err, InjectError::NoLoader { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot load a library: no shared library is mapped"), "{err}");
    target.finish("x");
}

#[test]
fn a_library_invisible_in_the_target_mount_namespace() {
    // The target runs in its own mount namespace where the library's directory is hidden
    // under an empty tmpfs.
    let dir = scratch().join(format!("hidden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let library = dir.join("libinject_test.so");
    std::fs::copy(test_library(), &library).unwrap();
    let script = format!("mount -t tmpfs tmpfs '{}' && exec '{}'", dir.display(), worker_program().display());
    let mut unshare = Command::new("unshare");
    unshare.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    let target = Target::start_command(unshare);
    let pid = target.pid();
    let err = inject_library(pid, &library, "test_entry", "").unwrap_err();
    match &err {
        InjectError::NotVisible { why, .. } => assert!(why.contains("does not exist for it"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("its mount namespace is mnt:["), "{err}");
    target.finish("hi\n");
}

#[test]
fn no_such_process() {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    child.wait().unwrap();
    let err = inject_library(pid, &test_library(), "test_entry", "").unwrap_err();
    assert!(matches!(err, InjectError::Attach(AttachError::NoSuchProcess { .. })), "{err:?}");
    assert_eq!(err.to_string(), format!("no such process: {pid}"));
}
