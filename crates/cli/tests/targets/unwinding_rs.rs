//! `targets/unwinding.cpp` in Rust: a panic on its way when dynprobe attaches. A thread
//! panics in `ex_throw`, under `ex_middle`, and the panic is caught by `catch_unwind` in
//! `ex_catch`; on the way the drop of `ex_middle`'s local value prints "unwinding" and
//! waits until told to go on. Same protocol: "ready <pid>", then `throw`, `resume` (prints
//! "caught <n>" or "lost"), `quit`.
use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixStream;

struct Pause(UnixStream);

impl Drop for Pause {
    fn drop(&mut self) {
        println!("unwinding");
        let mut byte = [0u8];
        let _ = self.0.read_exact(&mut byte);
    }
}

#[inline(never)]
fn ex_throw(n: u64) -> u64 {
    if n > 0 {
        std::panic::panic_any(n * 6);
    }
    n
}

#[inline(never)]
fn ex_middle(n: u64, gate: UnixStream) -> u64 {
    let _pause = Pause(gate);
    ex_throw(std::hint::black_box(n)) + 1
}

#[inline(never)]
fn ex_catch(n: u64, gate: UnixStream) -> u64 {
    match std::panic::catch_unwind(move || ex_middle(n, gate)) {
        Ok(value) => value,
        Err(payload) => payload.downcast::<u64>().map_or(0, |value| *value),
    }
}

fn main() {
    std::panic::set_hook(Box::new(|_| {}));
    println!("ready {}", std::process::id());
    let mut thread = None;
    let mut opener = None;
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        match line.trim() {
            "quit" => break,
            "throw" if thread.is_none() => {
                let (mine, theirs) = UnixStream::pair().unwrap();
                opener = Some(mine);
                thread = Some(std::thread::spawn(move || ex_catch(7, theirs)));
            }
            "resume" if thread.is_some() => {
                opener.take().unwrap().write_all(b"g").unwrap();
                match thread.take().unwrap().join() {
                    Ok(42) => println!("caught 42"),
                    _ => println!("lost"),
                }
            }
            _ => {}
        }
    }
}
