//! The attention lowering on CUDA (the memory-efficient kernel, and the composed path for f64)
//! against the analyzer's f64 reference: forward output and log-sum-exp, the backward, causal
//! masks, a query block at a sequence offset (two key pieces), realistic head dims. Built with
//! `--features cuda`; on a machine without a GPU (or without PyTorch's libtorch_cuda on the
//! library path) it says so and passes.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)]

use autopar_analyzer::ops::{Attention, AttentionGrad, OpSpec};
use autopar_analyzer::{DType, Op, Tensor as RefTensor, TensorType};
use autopar_runtime::lower::{from_tch, identity_sum, lower, to_tch, LowerCtx, LowerError};
use tch::{Device, Tensor};

/// The GPU, or the CPU when `AUTOPAR_ATTENTION_ON_CPU` is set (to check this test itself, and
/// the CPU flash kernel on realistic shapes).
fn cuda() -> Option<Device> {
    if std::env::var_os("AUTOPAR_ATTENTION_ON_CPU").is_some() {
        return Some(Device::Cpu);
    }
    match autopar_runtime::cuda::load_torch_cuda() {
        Ok(n) if n > 0 => Some(Device::Cuda(0)),
        Ok(_) => {
            eprintln!("no GPU: CUDA attention not checked");
            None
        }
        Err(e) => {
            eprintln!("{e}: CUDA attention not checked");
            None
        }
    }
}

/// Largest error relative to the larger magnitude, with a floor of 1e-2 of the reference's
/// largest magnitude (as runtime/tests/lower.rs measures) in f32 / f64; in bf16 / f16, whose
/// kernels round the probabilities before they average values that cancel, the largest error
/// relative to the reference's largest magnitude.
fn rel_err(got: &RefTensor, want: &RefTensor) -> f64 {
    let scale = want.data.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = if matches!(got.dtype, DType::BF16 | DType::F16) {
        scale
    } else {
        (1e-2 * scale).max(1e-6)
    };
    got.data
        .iter()
        .zip(&want.data)
        .map(|(&a, &b)| (a - b).abs() / a.abs().max(b.abs()).max(floor))
        .fold(0.0, f64::max)
}

/// `op` on `device` over this rank's blocks: inputs in `split` are cut to rows
/// `[start, start + len)` of dim `axis` (the query sequence), the others are whole.
fn run(
    op: &Op,
    inputs: &[RefTensor],
    split: &[usize],
    axis: usize,
    block: (usize, usize),
    device: Device,
) -> Vec<RefTensor> {
    let global: Vec<TensorType> = inputs.iter().map(|t| t.ty()).collect();
    let grefs: Vec<&TensorType> = global.iter().collect();
    let global_out = op.spec().infer(&grefs).unwrap();
    let (start, len) = block;
    let mut offsets = vec![];
    let mut local = vec![];
    for (i, t) in inputs.iter().enumerate() {
        let x = to_tch(t, device).unwrap();
        let mut off = vec![0; t.rank()];
        if split.contains(&i) {
            off[axis] = start;
            local.push(x.narrow(axis as i64, start as i64, len as i64));
        } else {
            local.push(x);
        }
        offsets.push(off);
    }
    let ltys: Vec<TensorType> = local
        .iter()
        .map(|t| autopar_runtime::lower::tensor_type(t).unwrap())
        .collect();
    let lrefs: Vec<&TensorType> = ltys.iter().collect();
    let outputs = op.spec().infer(&lrefs).unwrap();
    let mut sum = identity_sum;
    let mut ctx = LowerCtx {
        outputs: &outputs,
        global_inputs: &global,
        global_outputs: &global_out,
        input_offsets: &offsets,
        group_sum: &mut sum as &mut dyn FnMut(Tensor) -> Result<Tensor, LowerError>,
        rng_step: 0,
        device,
    };
    let refs: Vec<&Tensor> = local.iter().collect();
    let outs = lower(op, &refs, &mut ctx).unwrap_or_else(|e| panic!("{}: {e}", op.name()));
    outs.iter()
        .map(|t| {
            assert_eq!(t.device(), device, "{}: output device", op.name());
            from_tch(t).unwrap()
        })
        .collect()
}

/// Rows `[start, start + len)` of dim `axis`.
fn rows(t: &RefTensor, axis: usize, start: usize, len: usize) -> RefTensor {
    let x = to_tch(t, Device::Cpu).unwrap();
    from_tch(&x.narrow(axis as i64, start as i64, len as i64)).unwrap()
}

/// The log-sum-exp's dtype: f32, f64 for f64 inputs.
fn lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn rnd(shape: &[usize], seed: u64, dtype: DType) -> RefTensor {
    // round through libtorch so the reference sees exactly the half values the kernel does
    let t = RefTensor::pseudo_random(shape, seed).cast(dtype);
    from_tch(&to_tch(&t, Device::Cpu).unwrap()).unwrap()
}

#[test]
fn cuda_attention_matches_the_reference() {
    let Some(dev) = cuda() else { return };
    tch::manual_seed(0);
    // (seq_axis, dim_axis, q shape, k/v shape): the built-ins' [B, S, H, D], TorchScript's
    // [B, H, S, D] with more keys than queries, and head dims of real models
    let layouts: [(usize, usize, [usize; 4], [usize; 4]); 4] = [
        (1, 3, [2, 16, 2, 8], [2, 16, 2, 8]),
        (2, 3, [2, 2, 12, 8], [2, 2, 20, 8]),
        (1, 3, [1, 128, 2, 64], [1, 128, 2, 64]),
        (2, 3, [1, 2, 96, 128], [1, 2, 96, 128]),
    ];
    let mut worst = vec![];
    for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
        for (li, &(s, d, qs, ks)) in layouts.iter().enumerate() {
            for causal in [false, true] {
                let seed = 10 * li as u64 + 1;
                let q = rnd(&qs, seed, dtype);
                let k = rnd(&ks, seed + 1, dtype);
                let v = rnd(&ks, seed + 2, dtype);
                let fwd = Attention {
                    seq_axis: s,
                    dim_axis: d,
                    causal,
                    scale: 1.0 / (qs[d] as f64).sqrt(),
                };
                let grad = AttentionGrad {
                    seq_axis: s,
                    dim_axis: d,
                    causal,
                    scale: fwd.scale,
                };
                let f64s = |t: &RefTensor| t.cast(DType::F64);
                let want = fwd.eval(&[&f64s(&q), &f64s(&k), &f64s(&v)]).unwrap();
                let dout = rnd(&want[0].shape, seed + 3, dtype);
                let gwant = grad
                    .eval(&[
                        &f64s(&q),
                        &f64s(&k),
                        &f64s(&v),
                        &want[0],
                        &want[1],
                        &f64s(&dout),
                    ])
                    .unwrap();
                let tol = match dtype {
                    DType::F64 => 1e-10,
                    DType::F32 => 1e-4,
                    DType::F16 => 5e-3,
                    _ => 3e-2,
                };
                let lq = qs[s];
                // the whole sequence, then the second half of the queries alone (sequence
                // parallel: keys before the block, a causal square, hidden keys after)
                for (start, len) in [(0, lq), (lq / 2, lq - lq / 2)] {
                    let ins = vec![q.clone(), k.clone(), v.clone()];
                    let got = run(&fwd.clone().into(), &ins, &[0], s, (start, len), dev);
                    let out_want = rows(&want[0], s, start, len);
                    let lse_axis = if d < s { s - 1 } else { s };
                    let lse_want = rows(&want[1], lse_axis, start, len);
                    let what = format!("{dtype} layout {li} causal {causal} rows {start}+{len}");
                    let e0 = rel_err(&got[0], &out_want.cast(dtype));
                    let e1 = rel_err(&got[1], &lse_want);
                    assert!(e0 <= tol, "{what}: out off by {e0:e}");
                    assert!(e1 <= 1e-3_f64.max(tol / 10.0), "{what}: lse off by {e1:e}");
                    // the backward from the reference's output and log-sum-exp
                    let gins = vec![
                        q.clone(),
                        k.clone(),
                        v.clone(),
                        want[0].cast(dtype),
                        want[1].cast(lse_dtype(dtype)),
                        dout.clone(),
                    ];
                    let g = run(
                        &grad.clone().into(),
                        &gins,
                        &[0, 3, 4, 5],
                        s,
                        (start, len),
                        dev,
                    );
                    let dq_want = rows(&gwant[0], s, start, len);
                    let eq = rel_err(&g[0], &dq_want.cast(dtype));
                    assert!(eq <= tol, "{what}: dq off by {eq:e}");
                    if start == 0 && len == lq {
                        let ek = rel_err(&g[1], &gwant[1].cast(dtype));
                        let ev = rel_err(&g[2], &gwant[2].cast(dtype));
                        assert!(ek <= tol, "{what}: dk off by {ek:e}");
                        assert!(ev <= tol, "{what}: dv off by {ev:e}");
                        worst.push(format!(
                            "{what}: out {e0:.1e} dq {eq:.1e} dk {ek:.1e} dv {ev:.1e}"
                        ));
                    }
                }
            }
        }
    }
    for w in worst {
        eprintln!("{w}");
    }
}

#[test]
fn cuda_attention_sequence_blocks_sum_to_the_whole() {
    // dk and dv of the query blocks are partial sums: both blocks together give the whole
    let Some(dev) = cuda() else { return };
    let (s, d) = (1, 3);
    let qs = [2, 64, 2, 32];
    for dtype in [DType::F32, DType::BF16] {
        let q = rnd(&qs, 71, dtype);
        let k = rnd(&qs, 72, dtype);
        let v = rnd(&qs, 73, dtype);
        let grad = AttentionGrad {
            seq_axis: s,
            dim_axis: d,
            causal: true,
            scale: 0.2,
        };
        let fwd = Attention {
            seq_axis: s,
            dim_axis: d,
            causal: true,
            scale: 0.2,
        };
        let f64s = |t: &RefTensor| t.cast(DType::F64);
        let want = fwd.eval(&[&f64s(&q), &f64s(&k), &f64s(&v)]).unwrap();
        let dout = rnd(&qs, 74, dtype);
        let gwant = grad
            .eval(&[
                &f64s(&q),
                &f64s(&k),
                &f64s(&v),
                &want[0],
                &want[1],
                &f64s(&dout),
            ])
            .unwrap();
        let gins = vec![
            q,
            k,
            v,
            want[0].cast(dtype),
            want[1].cast(lse_dtype(dtype)),
            dout,
        ];
        let mut dk = vec![0.0; gwant[1].numel()];
        let mut dv = vec![0.0; gwant[2].numel()];
        for block in [(0, 16), (16, 16), (32, 32)] {
            let g = run(&grad.clone().into(), &gins, &[0, 3, 4, 5], s, block, dev);
            dk.iter_mut().zip(&g[1].data).for_each(|(a, b)| *a += b);
            dv.iter_mut().zip(&g[2].data).for_each(|(a, b)| *a += b);
        }
        let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
        let dk = RefTensor::new(dtype, gwant[1].shape.clone(), dk);
        let dv = RefTensor::new(dtype, gwant[2].shape.clone(), dv);
        let (ek, ev) = (rel_err(&dk, &gwant[1]), rel_err(&dv, &gwant[2]));
        eprintln!("{dtype} blocks: dk {ek:.1e} dv {ev:.1e}");
        assert!(ek <= tol && ev <= tol, "{dtype}: dk {ek:e} dv {ev:e}");
    }
}
