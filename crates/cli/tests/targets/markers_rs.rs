//! A Rust program with `dynprobe::marker!` sites in a loop: integers, a pointer and a string.
//! `markers_rs ROUNDS [--wait]` runs ROUNDS rounds (with --wait, only after a line on stdin,
//! so a tracer can attach first) and prints what it computed, which must not depend on
//! whether anything is attached. Built by the tests against the `dynprobe` library.

const NAMES: [&str; 3] = ["alpha", "beta", "gamma"];

#[inline(never)]
fn run(rounds: u64) -> u64 {
    let cell = 42u64;
    let mut sum = 0u64;
    for i in 0..rounds {
        let name = NAMES[i as usize % NAMES.len()];
        dynprobe::marker!(rmarkers, tick, i as u32, -(i as i64), &cell as *const u64, name);
        sum = sum.wrapping_mul(31).wrapping_add(i ^ name.len() as u64);
    }
    dynprobe::marker!(rmarkers, done, sum);
    sum
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds = args.next().map_or(1000, |r| r.parse().expect("ROUNDS is a number"));
    if args.next().as_deref() == Some("--wait") {
        std::io::stdin().read_line(&mut String::new()).expect("a line on stdin");
    }
    println!("rounds {rounds} sum {}", run(std::hint::black_box(rounds)));
}
