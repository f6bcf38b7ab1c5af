//! A Rust program `dynprobe record` traces at its functions' plain entries (stable Rust
//! records no NOP sites): recursion, and a panic unwinding through traced frames into
//! `catch_unwind`.

#[inline(never)]
fn fib(n: u64) -> u64 {
    if n < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

#[inline(never)]
fn explode(n: u64) -> u64 {
    if n > 0 {
        panic!("boom {}", n);
    }
    n
}

#[inline(never)]
fn guarded(n: u64) -> u64 {
    std::panic::catch_unwind(|| explode(std::hint::black_box(n))).unwrap_or(99)
}

fn main() {
    std::panic::set_hook(Box::new(|_| {}));
    let n = std::hint::black_box(4);
    println!("fib = {}", fib(n));
    println!("guarded = {}", guarded(n));
}
