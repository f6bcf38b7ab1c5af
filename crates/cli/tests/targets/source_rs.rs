//! A Rust program for source-level probes: a `&str`, an integer and a slice passed to a
//! function that is not inlined, then a `String`, a `Vec` and an `Option` to another; each
//! prints what a probe on its first lines must fetch.

#[inline(never)]
fn weigh(name: &str, count: u32, list: &[i32]) -> u64 {
    let total = count as u64 + list.len() as u64 + name.len() as u64;
    println!("weigh name={name} count={count} len={} first={} total={total}", list.len(), list[0]);
    total
}

#[inline(never)]
fn pack(label: String, sizes: Vec<u16>, limit: Option<u32>) -> usize {
    let n = label.len() + sizes.len() + limit.unwrap_or(0) as usize;
    println!("pack label={label} sizes={sizes:?} limit={limit:?} n={n}");
    n
}

fn main() {
    let rounds: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let names = ["apple", "kiwi", "banana"];
    let mut list = vec![7i32];
    for i in 0..rounds {
        std::hint::black_box(weigh(names[i as usize % 3], i, &list));
        list.push(i as i32 * 10);
        let sizes = (0..=i as u16).map(|k| k * 3).collect();
        std::hint::black_box(pack(format!("box{i}"), sizes, (i % 2 == 1).then_some(i * 7)));
    }
}
