//! Criterion bench of Rotor's checkpointing DP (issue 5 targets, release, 2-core machine):
//! a 100-stage chain within 1 s and a 300-stage chain within 10 s, at 500 memory slots.
//! The chains are heterogeneous (deterministic pseudo-random sizes and times), the budget a
//! third of the way from the least feasible peak to the no-checkpoint peak.

use autopar_solver::checkpoint::{min_peak_bytes, none, rotor, simulate, Chain, DEFAULT_SLOTS};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::Duration;

fn chain(n: usize) -> Chain {
    let mut st = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move |lo: u64, hi: u64| {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        lo + st % (hi - lo + 1)
    };
    let mb = 1u64 << 20;
    let (mut f, mut b, mut x, mut xb, mut fo, mut bo) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..n {
        let t = next(1, 100) as f64 * 1e-4;
        f.push(t);
        b.push(t * next(15, 30) as f64 / 10.0);
        x.push(next(16, 64) * mb);
        xb.push(next(32, 256) * mb);
        fo.push(next(0, 32) * mb);
        bo.push(next(0, 64) * mb);
    }
    Chain::new(f, b, x, xb, fo, bo, 8 * mb).expect("valid chain")
}

fn case(c: &mut Criterion, n: usize) {
    let ch = chain(n);
    let min = min_peak_bytes(&ch).expect("min peak");
    let top = simulate(&ch, &none(&ch).expect("none"))
        .expect("simulate")
        .peak_bytes;
    let budget = min + (top - min) / 3;
    c.bench_function(&format!("rotor_{n}_stages_{DEFAULT_SLOTS}_slots"), |bch| {
        bch.iter(|| rotor(black_box(&ch), budget, DEFAULT_SLOTS).expect("rotor"))
    });
}

fn benches(c: &mut Criterion) {
    case(c, 100);
    case(c, 300);
}

criterion_group! {
    name = rotor_benches;
    config = Criterion::default().sample_size(10).measurement_time(Duration::from_secs(5));
    targets = benches
}
criterion_main!(rotor_benches);
