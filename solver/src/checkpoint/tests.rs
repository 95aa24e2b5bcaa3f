//! Tests of the checkpoint module: hand-computed simulations, an exhaustive search over every
//! schedule of the model (independent of the DP) on small chains, and budget sweeps.

use super::Strategy;
use super::*;
use proptest::prelude::*;
use proptest::strategy::Strategy as _;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// n = 2; x = [10, 20, 5], x̄ = [30, 40], fo = [1, 2], bo = [3, 4], f = [1, 2], b = [3, 4].
fn two_stage() -> Chain {
    Chain::new(
        vec![1.0, 2.0],
        vec![3.0, 4.0],
        vec![10, 20],
        vec![30, 40],
        vec![1, 2],
        vec![3, 4],
        5,
    )
    .unwrap()
}

fn ops(v: &[Op]) -> Schedule {
    Schedule { ops: v.to_vec() }
}

use Op::{Backward as B, ForwardAll as FA, ForwardCheckpoint as FC, ForwardNoSave as FN};

#[test]
fn checkpoint_simulate_none_by_hand() {
    let c = two_stage();
    let s = none(&c).unwrap();
    assert_eq!(s, ops(&[FA(0), FA(1), Op::Loss, B(1), B(0)]));
    // A0=10 | F_all(0): 10+20+30+1=61, held 60 | F_all(1): 60+5+40+2=107, held 105 |
    // Loss: 110, held 105 | B(1): 105+20+4=129, held 60 | B(0): 60+10+3=73, held 10.
    let sim = simulate(&c, &s).unwrap();
    assert_eq!(sim.peak_bytes, 129);
    assert_eq!(sim.time_s, 10.0);
}

#[test]
fn checkpoint_simulate_recompute_by_hand() {
    let c = two_stage();
    let s = ops(&[FC(0), FA(1), Op::Loss, B(1), FA(0), B(0)]);
    // F_ck(0): 10+20+1=31, held 30 | F_all(1): 30+5+40+2=77, held 75 | Loss: 80 |
    // B(1): 75+20+4=99, held 30 (A0, G1) | F_all(0): 30+20+30+1=81, held 80 |
    // B(0): 80+10+3=93 (frees S0, G1, A0 and the recomputed A1), held 10.
    let sim = simulate(&c, &s).unwrap();
    assert_eq!(sim.peak_bytes, 99);
    assert_eq!(sim.time_s, 11.0);
    // ... and that is the least peak any schedule reaches.
    assert_eq!(min_peak_bytes(&c).unwrap(), 99);
    let r = rotor(&c, 99, 99).unwrap();
    assert_eq!(simulate(&c, &r).unwrap(), sim);
    assert_eq!(
        rotor(&c, 98, DEFAULT_SLOTS),
        Err(CheckpointError::BudgetTooSmall {
            budget_bytes: 98,
            minimum_bytes: 99
        })
    );
    let r = rotor(&c, 129, DEFAULT_SLOTS).unwrap();
    assert_eq!(simulate(&c, &r).unwrap().time_s, 10.0);
}

#[test]
fn checkpoint_simulate_no_save_frees_input() {
    // n = 1 with F_n: the input is freed after the forward, so the backward cannot run.
    let c = Chain::new(vec![1.0], vec![1.0], vec![4], vec![2], vec![0], vec![0], 3).unwrap();
    let err = simulate(&c, &ops(&[FN(0), Op::Loss, B(0)])).unwrap_err();
    assert!(
        matches!(&err, CheckpointError::InvalidSchedule { index: 2, reason, .. } if reason.contains("A(0)")),
        "{err}"
    );
    // F_n then F_all is the same stage twice: A(1) is present.
    let err = simulate(&c, &ops(&[FC(0), FA(0)])).unwrap_err();
    assert!(err.to_string().contains("A(1) already in memory"), "{err}");
    // F_ck(0): 4+3=7 peak; Loss: 4+3+3=10; B(0) needs S(0).
    let err = simulate(&c, &ops(&[FC(0), Op::Loss, B(0)])).unwrap_err();
    assert!(err.to_string().contains("S(0) is not in memory"), "{err}");
    // F_all(0): 4+3+2=9; Loss 12; B(0): 9+4=13 (A0 4, S0 2, G1 3, + G0 4). Time 2.
    let sim = simulate(&c, &ops(&[FA(0), Op::Loss, B(0)])).unwrap();
    assert_eq!((sim.peak_bytes, sim.time_s), (13, 2.0));
}

#[test]
fn checkpoint_simulate_errors() {
    let c = two_stage();
    let e = simulate(&c, &ops(&[FA(1)])).unwrap_err();
    assert!(e.to_string().contains("A(1) is not in memory"), "{e}");
    let e = simulate(&c, &ops(&[FA(2)])).unwrap_err();
    assert!(e.to_string().contains("out of range"), "{e}");
    let e = simulate(&c, &ops(&[FA(0), FA(1)])).unwrap_err();
    assert!(matches!(e, CheckpointError::Incomplete(_)), "{e}");
    let e = simulate(&c, &ops(&[FA(0), FA(1), Op::Loss, B(0)])).unwrap_err();
    assert!(e.to_string().contains("G(1) is not in memory"), "{e}");
    let e = simulate(&c, &ops(&[FA(0), FA(1), Op::Loss, Op::Loss])).unwrap_err();
    assert!(e.to_string().contains("A(2) is not in memory"), "{e}");
    // Persistence: A(0) kept by F_ck(0) cannot be dropped by F_n(0) before B(0).
    let e = simulate(&c, &ops(&[FC(0), FN(1), FN(0)])).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::InvalidSchedule { index: 2, reason, .. } if reason.contains("persistent")),
        "{e}"
    );
    // Recomputing A(1), A(2) after B(1): B(0) frees A(1), A(2) is left over.
    let e = simulate(
        &c,
        &ops(&[FA(0), FA(1), Op::Loss, B(1), FC(0), FC(1), B(0)]),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("left in memory at the end: A(2)"),
        "{e}"
    );
}

#[test]
fn checkpoint_chain_validation() {
    let good = two_stage();
    let mut c = good.clone();
    c.bwd_s.pop();
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("bwd_s has 1 entries"));
    let mut c = good.clone();
    c.fwd_s[1] = f64::NAN;
    assert!(c.validate().unwrap_err().to_string().contains("fwd_s[1]"));
    let mut c = good.clone();
    c.bwd_s[0] = -1.0;
    assert!(rotor(&c, 1000, 10)
        .unwrap_err()
        .to_string()
        .contains("bwd_s[0]"));
    let e = Chain::new(vec![], vec![], vec![], vec![], vec![], vec![], 1).unwrap_err();
    assert!(e.to_string().contains("no stage"));
    // serde: round trip, and deserialization validates.
    let json = serde_json::to_string(&good).unwrap();
    assert_eq!(serde_json::from_str::<Chain>(&json).unwrap(), good);
    let bad = json.replace("\"fwd_s\":[1.0,2.0]", "\"fwd_s\":[1.0,-2.0]");
    assert_ne!(bad, json);
    let e = serde_json::from_str::<Chain>(&bad).unwrap_err();
    assert!(e.to_string().contains("fwd_s[1]"), "{e}");
    let bad = json.replace("\"input_bytes\":[10,20]", "\"input_bytes\":[10]");
    assert!(serde_json::from_str::<Chain>(&bad).is_err());
    let bad = json.replace("\"input_bytes\":[10,20]", "\"input_bytes\":[10,-20]");
    assert!(serde_json::from_str::<Chain>(&bad).is_err());
    assert!(rotor(&good, 1000, 0).is_err());
}

#[test]
fn checkpoint_strategy_parse() {
    assert_eq!("rotor".parse::<Strategy>().unwrap(), Strategy::Rotor);
    assert_eq!("chen".parse::<Strategy>().unwrap(), Strategy::Chen);
    assert_eq!("none".parse::<Strategy>().unwrap(), Strategy::None);
    assert!(matches!(
        "revolve".parse::<Strategy>(),
        Err(CheckpointError::UnknownStrategy(_))
    ));
    for s in [Strategy::Rotor, Strategy::Chen, Strategy::None] {
        assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
    }
    let c = two_stage();
    let e = Strategy::None.solve(&c, 100, DEFAULT_SLOTS).unwrap_err();
    assert_eq!(
        e,
        CheckpointError::OverBudget {
            strategy: Strategy::None,
            peak_bytes: 129,
            budget_bytes: 100
        }
    );
}

#[test]
fn checkpoint_chen_segments() {
    // n = 4: segments [0, 2) and [2, 4).
    let c = Chain::new(
        vec![1.0; 4],
        vec![2.0; 4],
        vec![10; 4],
        vec![20; 4],
        vec![0; 4],
        vec![0; 4],
        10,
    )
    .unwrap();
    let s = chen(&c, u64::MAX).unwrap();
    assert_eq!(
        s,
        ops(&[
            FC(0),
            FN(1),
            FA(2),
            FA(3),
            Op::Loss,
            B(3),
            B(2),
            FA(0),
            FA(1),
            B(1),
            B(0)
        ])
    );
    let sim = simulate(&c, &s).unwrap();
    // 4 forwards + 2 recomputed, 4 backwards.
    assert_eq!(sim.time_s, 6.0 + 8.0);
    // Peak: B(3) with A0, A2, S2, A3, S3, G4 (10+10+20+10+20+10=80) + G3 10 = 90.
    assert_eq!(sim.peak_bytes, 90);
    let e = chen(&c, 89).unwrap_err();
    assert_eq!(
        e,
        CheckpointError::OverBudget {
            strategy: Strategy::Chen,
            peak_bytes: 90,
            budget_bytes: 89
        }
    );
    // n = 1 and n = 2 (segment length 1 and 2) are valid too.
    for n in [1, 2, 3, 5, 10] {
        let c = Chain::new(
            vec![1.0; n],
            vec![1.0; n],
            vec![1; n],
            vec![1; n],
            vec![0; n],
            vec![0; n],
            1,
        )
        .unwrap();
        simulate(&c, &chen(&c, u64::MAX).unwrap()).unwrap();
    }
}

/// Exhaustive search over every schedule of the model (its own bitmask implementation of the
/// op semantics, not the DP's recurrence): Dijkstra over sets of tensors in memory.
struct Brute {
    n: usize,
    x: Vec<u64>,
    xb: Vec<u64>,
    fo: Vec<u64>,
    bo: Vec<u64>,
    f: Vec<u64>,
    b: Vec<u64>,
}

impl Brute {
    fn new(c: &Chain) -> Self {
        let n = c.len();
        let mut x = c.input_bytes.clone();
        x.push(c.output_bytes);
        Brute {
            n,
            x,
            xb: c.saved_bytes.clone(),
            fo: c.fwd_overhead_bytes.clone(),
            bo: c.bwd_overhead_bytes.clone(),
            f: c.fwd_s.iter().map(|&t| t as u64).collect(),
            b: c.bwd_s.iter().map(|&t| t as u64).collect(),
        }
    }
    fn a(&self, i: usize) -> u64 {
        1 << i
    }
    fn s(&self, i: usize) -> u64 {
        1 << (self.n + 1 + i)
    }
    fn g(&self, i: usize) -> u64 {
        1 << (2 * self.n + 1 + i)
    }
    /// A(i) kept (pinned) by F_ck(i) / F_all(i) until B(i).
    fn k(&self, i: usize) -> u64 {
        1 << (3 * self.n + 2 + i)
    }
    fn mem(&self, st: u64) -> u64 {
        let mut m = 0;
        for i in 0..=self.n {
            if st & self.a(i) != 0 {
                m += self.x[i];
            }
            if st & self.g(i) != 0 {
                m += self.x[i];
            }
            if i < self.n && st & self.s(i) != 0 {
                m += self.xb[i];
            }
        }
        m
    }
    /// (op, next state, peak during the op, time).
    fn moves(&self, st: u64) -> Vec<(Op, u64, u64, u64)> {
        let n = self.n;
        let cur = self.mem(st);
        let has = |b: u64| st & b != 0;
        let mut v = Vec::new();
        for i in 0..n {
            if has(self.a(i)) && !has(self.a(i + 1)) {
                let out = st | self.a(i + 1);
                let p = cur + self.x[i + 1] + self.fo[i];
                v.push((FC(i), out | self.k(i), p, self.f[i]));
                if !has(self.k(i)) {
                    v.push((FN(i), out & !self.a(i), p, self.f[i]));
                }
                if !has(self.s(i)) {
                    v.push((
                        FA(i),
                        out | self.s(i) | self.k(i),
                        p + self.xb[i],
                        self.f[i],
                    ));
                }
            }
            if has(self.a(i)) && has(self.s(i)) && has(self.g(i + 1)) && !has(self.g(i)) {
                let gone = self.a(i) | self.s(i) | self.g(i + 1) | self.a(i + 1) | self.k(i);
                let next = (st | self.g(i)) & !gone;
                v.push((B(i), next, cur + self.x[i] + self.bo[i], self.b[i]));
            }
        }
        if has(self.a(n)) && !has(self.g(n)) {
            v.push((Op::Loss, (st | self.g(n)) & !self.a(n), cur + self.x[n], 0));
        }
        v
    }
    /// Least time of a schedule whose peak stays within `budget`, with one such schedule.
    fn best_time(&self, budget: u64) -> Option<(u64, Schedule)> {
        self.search(
            0,
            |key, p, dt| {
                if p > budget {
                    None
                } else {
                    Some(key + dt)
                }
            },
        )
        .filter(|_| self.x[0] <= budget)
    }
    /// Least peak over all schedules.
    fn min_peak(&self) -> u64 {
        self.search(self.x[0], |key, p, _| Some(key.max(p)))
            .unwrap()
            .0
    }
    /// Dijkstra from {A(0)} to {G(0)} with a monotone path key.
    fn search(
        &self,
        start_key: u64,
        step: impl Fn(u64, u64, u64) -> Option<u64>,
    ) -> Option<(u64, Schedule)> {
        let start = self.a(0);
        let goal = self.g(0);
        let mut best: HashMap<u64, (u64, Option<(u64, Op)>)> = HashMap::new();
        let mut heap = BinaryHeap::new();
        best.insert(start, (start_key, None));
        heap.push(Reverse((start_key, start)));
        while let Some(Reverse((key, st))) = heap.pop() {
            if best[&st].0 < key {
                continue;
            }
            if st == goal {
                let mut ops = Vec::new();
                let mut cur = st;
                while let Some((prev, op)) = best[&cur].1 {
                    ops.push(op);
                    cur = prev;
                }
                ops.reverse();
                return Some((key, Schedule { ops }));
            }
            for (op, next, p, dt) in self.moves(st) {
                let Some(k) = step(key, p, dt) else { continue };
                if best.get(&next).is_none_or(|e| k < e.0) {
                    best.insert(next, (k, Some((st, op))));
                    heap.push(Reverse((k, next)));
                }
            }
        }
        None
    }
}

fn small_chain() -> impl proptest::strategy::Strategy<Value = Chain> {
    (1usize..=7).prop_flat_map(|n| {
        (
            prop::collection::vec(1u64..=5, n),
            prop::collection::vec(1u64..=8, n),
            prop::collection::vec(1u64..=8, n),
            prop::collection::vec(0u64..=10, n),
            prop::collection::vec(0u64..=4, n),
            prop::collection::vec(0u64..=4, n),
            1u64..=8,
        )
            .prop_map(|(f, b, x, xb, fo, bo, out)| {
                Chain::new(
                    f.iter().map(|&v| v as f64).collect(),
                    b.iter().map(|&v| v as f64).collect(),
                    x,
                    xb,
                    fo,
                    bo,
                    out,
                )
                .unwrap()
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// With one slot per byte the discretization is exact, so Rotor must match the best of
    /// all schedules of the model; the minimum peak must match the exhaustive one.
    #[test]
    fn checkpoint_rotor_matches_brute_force(c in small_chain(), frac in 0.0f64..=1.0) {
        let brute = Brute::new(&c);
        let min = min_peak_bytes(&c).unwrap();
        prop_assert_eq!(min, brute.min_peak());
        let peak_none = simulate(&c, &none(&c).unwrap()).unwrap().peak_bytes;
        let budget = min + ((peak_none - min) as f64 * frac) as u64;
        let (best, witness) = brute.best_time(budget).unwrap();
        let w = simulate(&c, &witness).unwrap();
        prop_assert_eq!(w.time_s, best as f64);
        prop_assert!(w.peak_bytes <= budget);
        let s = rotor(&c, budget, budget as usize).unwrap();
        let sim = simulate(&c, &s).unwrap();
        prop_assert!(sim.peak_bytes <= budget, "peak {} > budget {}", sim.peak_bytes, budget);
        prop_assert_eq!(sim.time_s, best as f64, "rotor {} vs brute {}: {}", s, witness, budget);
        // The DP alone (not only the candidates rotor adds) is optimal.
        let dp = rotor_dp_schedule(&c, budget, budget as usize).unwrap().unwrap();
        prop_assert_eq!(simulate(&c, &dp).unwrap(), sim);
        // Coarser slots: still within budget and never better than the optimum.
        let s = rotor(&c, budget, 7).unwrap();
        let sim = simulate(&c, &s).unwrap();
        prop_assert!(sim.peak_bytes <= budget);
        prop_assert!(sim.time_s >= best as f64);
        // Below the minimum: the error states it.
        if min > 0 {
            prop_assert_eq!(
                rotor(&c, min - 1, DEFAULT_SLOTS),
                Err(CheckpointError::BudgetTooSmall { budget_bytes: min - 1, minimum_bytes: min })
            );
        }
        // Chen's schedule is in Rotor's space: at Chen's peak Rotor is no slower.
        let ch = simulate(&c, &chen(&c, u64::MAX).unwrap()).unwrap();
        let r = simulate(&c, &rotor(&c, ch.peak_bytes, ch.peak_bytes as usize).unwrap()).unwrap();
        prop_assert!(r.time_s <= ch.time_s);
    }
}

/// Deterministic heterogeneous chain with MB-scale sizes (xorshift).
fn big_chain(n: usize, seed: u64) -> Chain {
    let mut st = seed | 1;
    let mut next = move |lo: u64, hi: u64| {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        lo + st % (hi - lo + 1)
    };
    let mb = 1 << 20;
    let mut f = Vec::new();
    let mut b = Vec::new();
    let mut x = Vec::new();
    let mut xb = Vec::new();
    let mut fo = Vec::new();
    let mut bo = Vec::new();
    for _ in 0..n {
        let t = next(1, 100) as f64 * 1e-4;
        f.push(t);
        b.push(t * next(15, 30) as f64 / 10.0);
        x.push(next(4, 64) * mb + next(0, mb));
        xb.push(next(0, 200) * mb + next(0, mb));
        fo.push(next(0, 16) * mb);
        bo.push(next(0, 32) * mb);
    }
    Chain::new(f, b, x, xb, fo, bo, next(1, 8) * mb).unwrap()
}

fn sweep(c: &Chain, slots: usize, steps: u64) {
    let min = min_peak_bytes(c).unwrap();
    let nn = simulate(c, &none(c).unwrap()).unwrap();
    let top = nn.peak_bytes + nn.peak_bytes / 10;
    let mut prev = f64::INFINITY;
    let mut budgets: Vec<u64> = (0..=steps)
        .map(|k| min + 1 + (top - min - 1) * k / steps)
        .collect();
    budgets.push(nn.peak_bytes);
    budgets.sort_unstable();
    for budget in budgets {
        let s = rotor(c, budget, slots).unwrap();
        let sim = simulate(c, &s).unwrap();
        assert!(
            sim.peak_bytes <= budget,
            "peak {} > {budget}",
            sim.peak_bytes
        );
        assert!(
            sim.time_s <= prev * (1.0 + 1e-12),
            "time {} after {prev} at budget {budget}",
            sim.time_s
        );
        prev = sim.time_s;
        if budget >= nn.peak_bytes {
            assert!((sim.time_s - nn.time_s).abs() <= 1e-12 * nn.time_s);
        }
    }
    // The tightest budget really costs recomputation on these chains.
    let tight = simulate(c, &rotor(c, min, slots).unwrap()).unwrap();
    assert!(tight.time_s > nn.time_s);
}

#[test]
fn checkpoint_rotor_budget_sweep() {
    sweep(&big_chain(12, 7), DEFAULT_SLOTS, 40);
    sweep(&big_chain(30, 11), 100, 25);
    sweep(&big_chain(5, 3), 20, 30);
}

/// Small-integer chain (exact f64 times) for the exhaustive search.
fn int_chain(n: usize, seed: u64) -> Chain {
    let mut st = seed | 1;
    let mut next = move |lo: u64, hi: u64| {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        lo + st % (hi - lo + 1)
    };
    let mut v = vec![Vec::new(); 6];
    for _ in 0..n {
        for (k, (lo, hi)) in [(1, 5), (1, 8), (1, 8), (0, 10), (0, 4), (0, 4)]
            .into_iter()
            .enumerate()
        {
            v[k].push(next(lo, hi));
        }
    }
    let t = |v: &Vec<u64>| v.iter().map(|&a| a as f64).collect();
    Chain::new(
        t(&v[0]),
        t(&v[1]),
        v[2].clone(),
        v[3].clone(),
        v[4].clone(),
        v[5].clone(),
        next(1, 8),
    )
    .unwrap()
}

/// Eight stages, the exhaustive search at three budgets.
#[test]
fn checkpoint_rotor_matches_brute_force_8_stages() {
    for seed in [5, 9] {
        let c = int_chain(8, seed);
        let brute = Brute::new(&c);
        let min = min_peak_bytes(&c).unwrap();
        assert_eq!(min, brute.min_peak());
        let top = simulate(&c, &none(&c).unwrap()).unwrap().peak_bytes;
        for budget in [min, (min + top) / 2, top] {
            let (best, _) = brute.best_time(budget).unwrap();
            let dp = rotor_dp_schedule(&c, budget, budget as usize)
                .unwrap()
                .unwrap();
            let sim = simulate(&c, &dp).unwrap();
            assert!(sim.peak_bytes <= budget);
            assert_eq!(sim.time_s, best as f64, "seed {seed} budget {budget}");
        }
    }
}

/// A non-persistent schedule the exhaustive search found before persistence was enforced:
/// it drops A(1) (kept by F_all(1)) by re-running stage 1 and rebuilds it later, peaking at
/// 28 where every persistent schedule needs 29. The checker rejects it.
#[test]
fn checkpoint_non_persistent_rejected() {
    let c = Chain::new(
        vec![1.0; 3],
        vec![1.0; 3],
        vec![1, 7, 1],
        vec![4, 8, 5],
        vec![4, 2, 4],
        vec![3, 4, 4],
        4,
    )
    .unwrap();
    let s = ops(&[
        FC(0),
        FA(1),
        FN(2),
        FN(1),
        Op::Loss,
        FA(2),
        B(2),
        FC(0),
        B(1),
        FA(0),
        B(0),
    ]);
    let e = simulate(&c, &s).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::InvalidSchedule { index: 3, reason, .. } if reason.contains("persistent")),
        "{e}"
    );
    assert_eq!(min_peak_bytes(&c).unwrap(), 29);
    assert_eq!(Brute::new(&c).min_peak(), 29);
    let r = rotor(&c, 29, DEFAULT_SLOTS).unwrap();
    assert_eq!(simulate(&c, &r).unwrap().peak_bytes, 29);
}
