//! Loopback communicator: exact results of every collective on groups along the axes of a 2x2
//! mesh, ordering under interleaved groups, and failures that end every rank quickly.

use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use autopar_runtime::comm::{
    run_ranks, Collective, CommError, Communicator, Loopback, LoopbackComm, RankFailure,
};

/// Groups of `rank` on a 2x2 mesh (rank = 2 * i + j): along axis 1 (same row i) and axis 0
/// (same column j).
fn row(rank: usize) -> Vec<usize> {
    let i = rank / 2;
    vec![2 * i, 2 * i + 1]
}

fn col(rank: usize) -> Vec<usize> {
    let j = rank % 2;
    vec![j, j + 2]
}

const WORLD: [usize; 4] = [0, 1, 2, 3];

fn err(e: CommError) -> String {
    e.to_string()
}

#[test]
fn collectives_on_mesh_axes_are_exact() {
    let results = run_ranks(4, |mut c: LoopbackComm| {
        let r = c.rank();
        let rf = r as f32;
        let mut out = Vec::new();

        let mut a = vec![rf, 10.0 * rf];
        c.all_reduce_sum(&row(r), &mut a).map_err(err)?;
        out.push(a);
        let mut b = vec![rf, 10.0 * rf];
        c.all_reduce_sum(&col(r), &mut b).map_err(err)?;
        out.push(b);
        let mut w = vec![rf];
        c.all_reduce_sum(&WORLD, &mut w).map_err(err)?;
        out.push(w);

        out.push(c.all_gather(&row(r), &[rf, rf + 0.5]).map_err(err)?);
        out.push(c.all_gather(&col(r), &[rf]).map_err(err)?);

        let rs = [rf, 2.0 * rf, 3.0 * rf, 4.0 * rf];
        out.push(c.reduce_scatter_sum(&row(r), &rs).map_err(err)?);
        out.push(c.reduce_scatter_sum(&col(r), &rs).map_err(err)?);

        let a2a = [100.0 * rf, 100.0 * rf + 1.0];
        out.push(c.all_to_all(&row(r), &a2a).map_err(err)?);
        out.push(c.all_to_all(&col(r), &a2a).map_err(err)?);
        let a2a_world: Vec<f32> = (0..8).map(|k| 100.0 * rf + k as f32).collect();
        out.push(c.all_to_all(&WORLD, &a2a_world).map_err(err)?);

        c.barrier(&row(r)).map_err(err)?;
        c.barrier(&col(r)).map_err(err)?;
        c.barrier(&WORLD).map_err(err)?;
        Ok(out)
    })
    .unwrap();

    let expected: [Vec<Vec<f32>>; 4] = [
        vec![
            vec![1.0, 10.0],                                          // row {0,1}
            vec![2.0, 20.0],                                          // col {0,2}
            vec![6.0],                                                // world
            vec![0.0, 0.5, 1.0, 1.5],                                 // gather row
            vec![0.0, 2.0],                                           // gather col
            vec![1.0, 2.0],   // scatter row {0,1}: sum [1,2,3,4]
            vec![2.0, 4.0],   // scatter col {0,2}: sum [2,4,6,8]
            vec![0.0, 100.0], // a2a row: chunk 0 of 0, of 1
            vec![0.0, 200.0], // a2a col: chunk 0 of 0, of 2
            vec![0.0, 1.0, 100.0, 101.0, 200.0, 201.0, 300.0, 301.0], // a2a world
        ],
        vec![
            vec![1.0, 10.0],
            vec![4.0, 40.0], // col {1,3}
            vec![6.0],
            vec![0.0, 0.5, 1.0, 1.5],
            vec![1.0, 3.0],
            vec![3.0, 4.0],
            vec![4.0, 8.0], // col {1,3}: sum [4,8,12,16], first chunk
            vec![1.0, 101.0],
            vec![100.0, 300.0],
            vec![2.0, 3.0, 102.0, 103.0, 202.0, 203.0, 302.0, 303.0],
        ],
        vec![
            vec![5.0, 50.0],
            vec![2.0, 20.0],
            vec![6.0],
            vec![2.0, 2.5, 3.0, 3.5],
            vec![0.0, 2.0],
            vec![5.0, 10.0], // row {2,3}: sum [5,10,15,20]
            vec![6.0, 8.0],
            vec![200.0, 300.0],
            vec![1.0, 201.0],
            vec![4.0, 5.0, 104.0, 105.0, 204.0, 205.0, 304.0, 305.0],
        ],
        vec![
            vec![5.0, 50.0],
            vec![4.0, 40.0],
            vec![6.0],
            vec![2.0, 2.5, 3.0, 3.5],
            vec![1.0, 3.0],
            vec![15.0, 20.0],
            vec![12.0, 16.0],
            vec![201.0, 301.0],
            vec![101.0, 301.0],
            vec![6.0, 7.0, 106.0, 107.0, 206.0, 207.0, 306.0, 307.0],
        ],
    ];
    for (rank, (got, want)) in results.iter().zip(&expected).enumerate() {
        assert_eq!(got, want, "rank {rank}");
    }
}

#[test]
fn consecutive_collectives_on_interleaved_groups() {
    // Ranks issue collectives on row, column and world groups in rank-dependent orders (the
    // per-group sequences still agree), so messages of later collectives often arrive first.
    let steps = 200;
    let sums = run_ranks(4, |mut c: LoopbackComm| {
        let r = c.rank();
        let mut checked = 0usize;
        for step in 0..steps {
            let v = (step * 4 + r) as f32;
            let (first, second) = if (r + step) % 2 == 0 {
                (row(r), col(r))
            } else {
                (col(r), row(r))
            };
            for g in [first, second] {
                let mut x = vec![v, 1.0];
                c.all_reduce_sum(&g, &mut x).map_err(err)?;
                let want: f32 = g.iter().map(|&m| (step * 4 + m) as f32).sum();
                if x != [want, 2.0] {
                    return Err(format!("step {step} group {g:?}: got {x:?}, want {want}"));
                }
                let gathered = c.all_gather(&g, &[v]).map_err(err)?;
                let want: Vec<f32> = g.iter().map(|&m| (step * 4 + m) as f32).collect();
                if gathered != want {
                    return Err(format!("step {step} gather {g:?}: {gathered:?}"));
                }
                checked += 2;
            }
            if step % 7 == 0 {
                let total = c.all_gather(&WORLD, &[v]).map_err(err)?;
                let want: Vec<f32> = (0..4).map(|m| (step * 4 + m) as f32).collect();
                if total != want {
                    return Err(format!("step {step} world gather: {total:?}"));
                }
                checked += 1;
            }
        }
        Ok(checked)
    })
    .unwrap();
    assert_eq!(sums, vec![4 * steps + steps.div_ceil(7); 4]);
}

/// The run's result, the other ranks' errors by rank, and the elapsed time.
type FailingRun = (
    Result<Vec<()>, RankFailure>,
    Vec<(usize, CommError)>,
    Duration,
);

/// Runs a world of 4 where `fail` makes rank 2 fail at step 3.
fn run_with_failing_rank(fail: impl Fn() -> Result<(), String> + Sync) -> FailingRun {
    let errors = Mutex::new(Vec::new());
    let start = Instant::now();
    let result = run_ranks(4, |mut c: LoopbackComm| {
        c.set_timeout(Duration::from_secs(30));
        let r = c.rank();
        for step in 0..1000 {
            if r == 2 && step == 3 {
                fail()?;
            }
            let mut x = [1.0f32];
            let outcome = c
                .all_reduce_sum(&row(r), &mut x)
                .and_then(|()| c.barrier(&WORLD))
                .and_then(|()| c.all_gather(&col(r), &[1.0]).map(|_| ()));
            if let Err(e) = outcome {
                errors
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((r, e.clone()));
                return Err(e.to_string());
            }
        }
        Ok(())
    });
    let elapsed = start.elapsed();
    let mut errors = errors.into_inner().unwrap_or_else(|e| e.into_inner());
    errors.sort_by_key(|(r, _)| *r);
    (result, errors, elapsed)
}

#[test]
fn a_failing_rank_ends_every_other_rank_with_its_name() {
    let (result, errors, elapsed) = run_with_failing_rank(|| Err("boom".to_string()));
    assert_eq!(
        result,
        Err(RankFailure {
            rank: 2,
            message: "boom".into()
        })
    );
    let ranks: Vec<usize> = errors.iter().map(|(r, _)| *r).collect();
    assert_eq!(ranks, vec![0, 1, 3]);
    for (r, e) in &errors {
        assert_eq!(
            e,
            &CommError::Aborted {
                rank: 2,
                reason: "boom".into()
            },
            "rank {r}"
        );
    }
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn a_panicking_rank_ends_every_other_rank_with_its_name() {
    let (result, errors, elapsed) = run_with_failing_rank(|| panic!("kaboom at step 3"));
    let failure = result.unwrap_err();
    assert_eq!(failure.rank, 2);
    assert!(failure.message.contains("kaboom at step 3"), "{failure}");
    assert_eq!(errors.len(), 3);
    for (r, e) in &errors {
        match e {
            CommError::Aborted { rank: 2, reason } => {
                assert!(reason.contains("kaboom"), "rank {r}: {reason}")
            }
            other => panic!("rank {r}: unexpected {other}"),
        }
    }
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[test]
fn endpoints_dropped_outside_run_ranks_do_not_hang_their_peers() {
    // A rank thread that panics: its endpoint's Drop aborts; one that just drops its endpoint:
    // peers waiting for its data get PeerLeft.
    for panics in [true, false] {
        let mut comms = Loopback::new(2);
        let c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        c0.set_timeout(Duration::from_secs(30));
        let start = Instant::now();
        let e = thread::scope(|s| {
            let h = s.spawn(move || {
                let _c1 = c1;
                if panics {
                    panic!("rank 1 died");
                }
            });
            let e = c0.barrier(&[0, 1]).unwrap_err();
            assert_eq!(h.join().is_err(), panics);
            e
        });
        assert!(start.elapsed() < Duration::from_secs(10));
        if panics {
            assert!(
                matches!(&e, CommError::Aborted { rank: 1, reason } if reason.contains("panicked")),
                "{e}"
            );
        } else {
            assert_eq!(
                e,
                CommError::PeerLeft {
                    rank: 1,
                    op: Collective::Barrier,
                    group: vec![0, 1]
                }
            );
        }
        // Poisoned: later collectives report the same error.
        assert_eq!(c0.barrier(&[0]), Err(e));
    }
}

#[test]
fn mismatched_lengths_give_the_size_error() {
    let comms = Loopback::new(2);
    let errors: Vec<CommError> = thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    let mut data = vec![1.0f32; 3 + c.rank()];
                    c.all_reduce_sum(&[0, 1], &mut data).unwrap_err()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let size = |rank, peer, expected, got| CommError::SizeMismatch {
        rank,
        peer,
        op: Collective::AllReduceSum,
        group: vec![0, 1],
        expected,
        got,
    };
    assert_eq!(errors, vec![size(0, 1, 3, 4), size(1, 0, 4, 3)]);

    // Through run_ranks, for all_gather.
    let failure = run_ranks(2, |mut c: LoopbackComm| {
        let local = vec![0.0f32; 1 + c.rank()];
        c.all_gather(&[0, 1], &local).map_err(err)
    })
    .unwrap_err();
    assert!(
        failure.message.contains("all_gather on group [0, 1]")
            && failure.message.contains("elements from rank"),
        "{failure}"
    );
}

#[test]
fn mismatched_collectives_and_indivisible_buffers_are_errors() {
    let comms = Loopback::new(2);
    let errors: Vec<CommError> = thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|mut c| {
                s.spawn(move || {
                    if c.rank() == 0 {
                        c.all_gather(&[0, 1], &[1.0]).map(|_| ()).unwrap_err()
                    } else {
                        c.all_reduce_sum(&[0, 1], &mut [1.0]).unwrap_err()
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(
        matches!(
            errors[0],
            CommError::CollectiveMismatch {
                rank: 0,
                peer: 1,
                op: Collective::AllGather,
                peer_op: Collective::AllReduceSum,
                ..
            }
        ),
        "{}",
        errors[0]
    );

    let mut comms = Loopback::new(2);
    let e = comms[0].reduce_scatter_sum(&[0, 1], &[1.0; 3]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "reduce_scatter_sum on group [0, 1]: rank 0 has 3 elements, not divisible by the group size 2"
    );
    // The local error was broadcast: rank 1 fails at once instead of waiting.
    assert_eq!(
        comms[1].barrier(&[0, 1]),
        Err(CommError::Aborted {
            rank: 0,
            reason: e.to_string()
        })
    );
}

#[test]
fn bad_groups_and_timeouts_are_reported() {
    for (group, reason) in [
        (vec![1usize, 2], "the caller is not a member"),
        (vec![0, 5], "rank 5 is out of range"),
        (vec![2, 0], "ranks must be sorted and distinct"),
        (vec![0, 0], "ranks must be sorted and distinct"),
        (vec![], "the group is empty"),
    ] {
        let mut comms = Loopback::new(3);
        let e = comms[0].barrier(&group).unwrap_err();
        assert_eq!(
            e,
            CommError::BadGroup {
                rank: 0,
                world_size: 3,
                op: Collective::Barrier,
                group: group.clone(),
                reason: reason.into()
            }
        );
    }

    let mut comms = Loopback::new(2);
    comms[0].set_timeout(Duration::from_millis(50));
    let e = comms[0].all_reduce_sum(&[0, 1], &mut [1.0]).unwrap_err();
    assert_eq!(
        e,
        CommError::Timeout {
            rank: 0,
            op: Collective::AllReduceSum,
            group: vec![0, 1],
            timeout: Duration::from_millis(50),
            waiting_for: vec![1]
        }
    );
}

#[test]
fn explicit_abort_reaches_peers() {
    let mut comms = Loopback::new(3);
    comms[1].abort("out of memory");
    let want = CommError::Aborted {
        rank: 1,
        reason: "out of memory".into(),
    };
    assert_eq!(comms[0].barrier(&[0, 2]), Err(want.clone()));
    assert_eq!(comms[1].barrier(&[1]), Err(want.clone()));
    assert_eq!(comms[2].all_gather(&[2], &[1.0]), Err(want));
}

#[test]
fn world_of_one_collectives_are_identities() {
    let out = run_ranks(1, |mut c: LoopbackComm| {
        let mut x = vec![1.0, 2.0, 3.0];
        c.all_reduce_sum(&[0], &mut x).map_err(err)?;
        let g = c.all_gather(&[0], &x).map_err(err)?;
        let rs = c.reduce_scatter_sum(&[0], &x).map_err(err)?;
        let a = c.all_to_all(&[0], &x).map_err(err)?;
        c.barrier(&[0]).map_err(err)?;
        Ok((c.world_size(), x, g, rs, a))
    })
    .unwrap();
    let x = vec![1.0, 2.0, 3.0];
    assert_eq!(out, vec![(1, x.clone(), x.clone(), x.clone(), x)]);
}

#[test]
fn ranks_that_finish_do_not_disturb_the_others() {
    // Ranks 0 and 1 finish after one world barrier; ranks 2 and 3 keep working on their row.
    let out = run_ranks(4, |mut c: LoopbackComm| {
        let r = c.rank();
        c.barrier(&WORLD).map_err(err)?;
        if r < 2 {
            return Ok(0.0);
        }
        let mut acc = 0.0;
        for _ in 0..20 {
            let mut x = [r as f32];
            c.all_reduce_sum(&[2, 3], &mut x).map_err(err)?;
            acc += x[0];
        }
        Ok(acc)
    })
    .unwrap();
    assert_eq!(out, vec![0.0, 0.0, 100.0, 100.0]);
}
