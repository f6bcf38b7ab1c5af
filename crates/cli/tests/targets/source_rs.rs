//! A Rust program for source-level probes: a `&str`, an integer and a slice passed to a
//! function that is not inlined; it prints what a probe on its first line must fetch.

#[inline(never)]
fn weigh(name: &str, count: u32, list: &[i32]) -> u64 {
    let total = count as u64 + list.len() as u64 + name.len() as u64;
    println!("weigh name={name} count={count} len={} first={} total={total}", list.len(), list[0]);
    total
}

fn main() {
    let rounds: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let names = ["apple", "kiwi", "banana"];
    let mut list = vec![7i32];
    for i in 0..rounds {
        std::hint::black_box(weigh(names[i as usize % 3], i, &list));
        list.push(i as i32 * 10);
    }
}
