//! The measurements behind `autopar profile` (issue 6): how fast this machine's collectives,
//! matmuls, memory copies and kernel launches actually are, so that the planner prices plans
//! with measured rates instead of data-sheet peaks times estimated efficiencies.
//!
//! Why these and how:
//! - Collectives run through the runtime's own [`TensorComm`] (NCCL on GPUs, [`Loopback`] on
//!   the CPU), so the times include what the runtime pays per call, one thread per rank as
//!   `train_cuda` runs them. Each group size a mesh axis can take (2, 4, ... up to the world)
//!   is measured with every disjoint group of that size running at once, as the groups of one
//!   mesh axis do in an SPMD step. Payloads go from 1 KiB to `max_bytes` in powers of 4, in the
//!   convention of the resharding cost formulas (all-gather: the result per device;
//!   reduce-scatter: the input; all-reduce and all-to-all: the buffer), so that the alpha-beta
//!   fit ([`autopar_solver::cluster::fit_alpha_beta`]) plugs straight into the pricing.
//! - A measurement is a few warm-up calls, then [`TRIALS`] timed batches, each started on all
//!   ranks together (a host barrier) and ended when the device is done (synchronised). A
//!   batch's time is the slowest rank's, and a size's time the median batch: robust to one
//!   noisy batch. Batches repeat small payloads more often (their time is mostly latency).
//! - Matmuls (bf16 and fp32, square), a large copy (HBM bandwidth: bytes read plus written)
//!   and a tiny elementwise op (the per-kernel launch and dispatch overhead, which every op of
//!   a step pays however small its shard) run on device 0 alone, before the ranks start.
//! - `--device cpu` does the same on CPU threads over [`Loopback`], with smaller sizes, so that
//!   the whole pipeline is tested without a GPU.
//!
//! [`Loopback`]: crate::comm::Loopback

use crate::collective::{CollectiveError, TensorComm};
use autopar_solver::cluster::CollectiveKind;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Timed batches per (collective, group size, payload); the median counts.
pub const TRIALS: usize = 3;
/// The smallest payload measured, bytes.
pub const MIN_BYTES: usize = 1024;

/// Where the measurements run.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum MeasureDevice {
    /// CPU threads with in-process collectives (for testing the pipeline).
    Cpu,
    /// One thread per GPU, NCCL between them (feature `cuda`).
    Cuda,
}

/// What to measure.
#[derive(Clone, Debug)]
pub struct MeasureOptions {
    pub device: MeasureDevice,
    /// Ranks (GPUs, or CPU threads); collectives are measured for groups of 2, 4, ... and
    /// `ranks` itself. 1 measures compute only.
    pub ranks: usize,
    /// The largest collective payload, bytes (at least `4 * MIN_BYTES`, so that a fit has
    /// two sizes).
    pub max_bytes: usize,
    /// Square matmul size (`n x n` times `n x n`).
    pub matmul_n: usize,
    /// Bytes of the copied buffer for the memory bandwidth.
    pub copy_bytes: usize,
}

impl MeasureOptions {
    /// The sizes `autopar profile` uses: on GPUs 1 GiB payloads, 8192^3 matmuls and a 1 GiB
    /// copy; on the CPU 16 MiB payloads, 512^3 matmuls and a 64 MiB copy.
    pub fn new(device: MeasureDevice, ranks: usize) -> Self {
        match device {
            MeasureDevice::Cuda => MeasureOptions {
                device,
                ranks,
                max_bytes: 1 << 30,
                matmul_n: 8192,
                copy_bytes: 1 << 30,
            },
            MeasureDevice::Cpu => MeasureOptions {
                device,
                ranks,
                max_bytes: 16 << 20,
                matmul_n: 512,
                copy_bytes: 64 << 20,
            },
        }
    }
}

/// The times of one collective kind over groups of one size.
#[derive(Clone, Debug, PartialEq)]
pub struct CollectiveSeries {
    pub op: CollectiveKind,
    pub group_size: usize,
    /// `(payload bytes, seconds)`, smallest payload first.
    pub samples: Vec<(f64, f64)>,
}

/// Everything one profile run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct Measurements {
    /// The device's name (`NVIDIA H100 80GB HBM3`, or `cpu`).
    pub device_name: String,
    /// Devices on this machine (GPUs libtorch sees; on the CPU, the ranks).
    pub devices: usize,
    pub collectives: Vec<CollectiveSeries>,
    /// Achieved matmul rates, FLOP/s.
    pub matmul_flops_bf16: f64,
    pub matmul_flops_fp32: f64,
    /// Achieved copy bandwidth, bytes read plus written per second.
    pub copy_bandwidth: f64,
    /// Seconds per tiny elementwise op (launch and dispatch).
    pub launch_s: f64,
    /// Wall-clock seconds of the whole measurement.
    pub seconds: f64,
}

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    #[error("bad profile options: {0}")]
    Options(String),
    #[error("libtorch failed while measuring {what}: {source}")]
    Torch {
        what: String,
        #[source]
        source: tch::TchError,
    },
    #[error("{0}")]
    Ranks(String),
    #[error("--device cuda: this autopar was built without the CUDA runtime (cargo build --features cuda)")]
    NoCuda,
}

fn torch(what: &str) -> impl Fn(tch::TchError) -> MeasureError + '_ {
    move |source| MeasureError::Torch {
        what: what.to_string(),
        source,
    }
}

/// Payload sizes: `MIN_BYTES` times powers of 4 up to `max_bytes`, and `max_bytes` itself.
pub fn payload_sizes(max_bytes: usize) -> Vec<usize> {
    let mut sizes = vec![];
    let mut b = Some(MIN_BYTES);
    while let Some(x) = b.filter(|&x| x <= max_bytes) {
        sizes.push(x);
        b = x.checked_mul(4);
    }
    if sizes.last().is_some_and(|&l| l < max_bytes) {
        sizes.push(max_bytes);
    }
    sizes
}

/// Group sizes a mesh axis can take on `ranks` devices that are measured: powers of 2 up to
/// `ranks`, and `ranks` itself.
pub fn group_sizes(ranks: usize) -> Vec<usize> {
    let mut sizes = vec![];
    let mut n = 2;
    while n <= ranks {
        sizes.push(n);
        n *= 2;
    }
    if ranks >= 2 && sizes.last() != Some(&ranks) {
        sizes.push(ranks);
    }
    sizes
}

/// Timed repetitions per batch: many for small payloads (latency-bound, microseconds each),
/// a few for large ones.
fn reps(bytes: usize) -> usize {
    ((256usize << 20) / bytes.max(1)).clamp(5, 100)
}

/// Measures collectives, matmuls, copy bandwidth and launch overhead (module doc).
pub fn measure(opts: &MeasureOptions) -> Result<Measurements, MeasureError> {
    let t0 = Instant::now();
    if opts.ranks == 0 {
        return Err(MeasureError::Options("--gpus must be at least 1".into()));
    }
    if opts.ranks >= 2 && opts.max_bytes < 4 * MIN_BYTES {
        return Err(MeasureError::Options(format!(
            "--max-bytes {} is below {} B: an alpha-beta fit needs at least two payload sizes \
             ({MIN_BYTES} B and 4x that)",
            opts.max_bytes,
            4 * MIN_BYTES
        )));
    }
    if opts.matmul_n == 0 || opts.copy_bytes < 4 {
        return Err(MeasureError::Options(
            "the matmul size and the copy buffer must not be empty".into(),
        ));
    }
    let (device, device_name, devices) = match opts.device {
        MeasureDevice::Cpu => (Device::Cpu, "cpu".to_string(), opts.ranks),
        MeasureDevice::Cuda => cuda_device(opts.ranks)?,
    };
    let compute = measure_compute(device, opts)?;
    let collectives = if opts.ranks >= 2 {
        let raw = match opts.device {
            MeasureDevice::Cpu => cpu_collectives(opts)?,
            MeasureDevice::Cuda => cuda_collectives(opts)?,
        };
        combine(opts, &raw)
    } else {
        vec![]
    };
    Ok(Measurements {
        device_name,
        devices,
        collectives,
        matmul_flops_bf16: compute.0,
        matmul_flops_fp32: compute.1,
        copy_bandwidth: compute.2,
        launch_s: compute.3,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Seconds per call of `f`, `reps` calls after `warmup`, synchronised at both ends.
fn time_per_call(
    device: Device,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<(), tch::TchError>,
) -> Result<f64, tch::TchError> {
    for _ in 0..warmup {
        f()?;
    }
    sync(device);
    let t0 = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    sync(device);
    Ok(t0.elapsed().as_secs_f64() / reps as f64)
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// (bf16 matmul FLOP/s, fp32 matmul FLOP/s, copy bytes/s, launch seconds) on `device`.
fn measure_compute(
    device: Device,
    opts: &MeasureOptions,
) -> Result<(f64, f64, f64, f64), MeasureError> {
    let _guard = tch::no_grad_guard();
    // launch overhead: a one-element in-place add, the smallest kernel an op can be
    let mut x =
        Tensor::f_zeros([1], (Kind::Float, device)).map_err(torch("the launch overhead"))?;
    let launch_s = time_per_call(device, 200, 2000, || x.f_add_scalar_(1.0).map(|_| ()))
        .map_err(torch("the launch overhead"))?;
    let n = opts.matmul_n as i64;
    let mut rates = [0.0; 2];
    for (rate, kind) in rates.iter_mut().zip([Kind::BFloat16, Kind::Float]) {
        let what = format!("a {kind:?} {n}^3 matmul");
        let a = Tensor::f_randn([n, n], (kind, device)).map_err(torch(&what))?;
        let b = Tensor::f_randn([n, n], (kind, device)).map_err(torch(&what))?;
        // about 1 s of work at most on either device: ~20 ms per fp32 8192^3 on an H100
        let reps = match device {
            Device::Cpu => 3,
            _ => 10,
        };
        let s = time_per_call(device, 2, reps, || a.f_mm(&b).map(|_| ())).map_err(torch(&what))?;
        *rate = 2.0 * (n as f64).powi(3) / s;
    }
    let elems = (opts.copy_bytes / 4) as i64;
    let what = format!("a {} B copy", elems * 4);
    let src = Tensor::f_ones([elems], (Kind::Float, device)).map_err(torch(&what))?;
    let mut dst = Tensor::f_empty([elems], (Kind::Float, device)).map_err(torch(&what))?;
    let reps = match device {
        Device::Cpu => 5,
        _ => 20,
    };
    let s = time_per_call(device, 2, reps, || dst.f_copy_(&src)).map_err(torch(&what))?;
    let copy = 2.0 * (elems * 4) as f64 / s;
    Ok((rates[0], rates[1], copy, launch_s))
}

/// One rank's view of the measurement: its collectives, its device, and a barrier over all
/// ranks.
trait Rank {
    fn rank(&self) -> usize;
    fn comm(&mut self) -> &mut dyn TensorComm;
    fn device(&self) -> Device;
    fn barrier(&mut self) -> Result<(), String>;
}

/// One timed batch on one rank: (group size, collective, payload index, trial, seconds).
type Raw = (usize, CollectiveKind, usize, usize, f64);

/// The groups of `n` consecutive ranks among `ranks` (the rest sit out).
fn groups_of(n: usize, ranks: usize) -> Vec<Vec<usize>> {
    (0..ranks / n)
        .map(|g| (g * n..(g + 1) * n).collect())
        .collect()
}

/// Every group any measurement uses, in the order ranks join them.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn all_groups(ranks: usize) -> Vec<Vec<usize>> {
    group_sizes(ranks)
        .into_iter()
        .flat_map(|n| groups_of(n, ranks))
        .collect()
}

/// The input tensor of `op` for a payload of `bytes` over `n` devices (f32 elements), and the
/// payload it actually carries (rounded down to whole elements per member).
fn payload(
    op: CollectiveKind,
    n: usize,
    bytes: usize,
    device: Device,
) -> Result<Tensor, CollectiveError> {
    let per = per_member(n, bytes);
    let elems = match op {
        // the payload is the gathered result: each member contributes 1/n of it
        CollectiveKind::AllGather => per,
        // the input splits into n equal chunks
        _ => per * n,
    };
    Ok(Tensor::f_ones([elems as i64], (Kind::Float, device))?)
}

/// f32 elements per member of a group of `n` for a payload of about `bytes`: the payload
/// actually measured is `per_member * n * 4` bytes.
fn per_member(n: usize, bytes: usize) -> usize {
    (bytes / 4 / n).max(1)
}

fn run_op(
    comm: &mut dyn TensorComm,
    op: CollectiveKind,
    group: &[usize],
    x: &Tensor,
) -> Result<Tensor, CollectiveError> {
    match op {
        CollectiveKind::AllReduce => comm.all_reduce_sum(group, x),
        CollectiveKind::AllGather => comm.all_gather(group, x),
        CollectiveKind::ReduceScatter => comm.reduce_scatter_sum(group, x),
        CollectiveKind::AllToAll => comm.all_to_all(group, x),
    }
}

/// The collectives measured on one rank: every rank walks the same sequence, so the barriers
/// and the collectives of each group line up.
fn rank_collectives(r: &mut dyn Rank, opts: &MeasureOptions) -> Result<Vec<Raw>, String> {
    let rank = r.rank();
    let device = r.device();
    let sizes = payload_sizes(opts.max_bytes);
    let mut out = vec![];
    let _guard = tch::no_grad_guard();
    for n in group_sizes(opts.ranks) {
        let group = groups_of(n, opts.ranks)
            .into_iter()
            .find(|g| g.contains(&rank));
        for op in CollectiveKind::ALL {
            for (k, &bytes) in sizes.iter().enumerate() {
                let fail =
                    |e: CollectiveError| format!("rank {rank}: {op} of {bytes} B over {n}: {e}");
                let input = match &group {
                    Some(_) => Some(payload(op, n, bytes, device).map_err(fail)?),
                    None => None,
                };
                let reps = reps(bytes);
                // warm-up: connections, buffers, the allocator's cache
                r.barrier()?;
                if let (Some(g), Some(x)) = (&group, &input) {
                    for _ in 0..2 {
                        let _out = run_op(r.comm(), op, g, x).map_err(fail)?;
                    }
                    sync(device);
                }
                for trial in 0..TRIALS {
                    r.barrier()?;
                    let t0 = Instant::now();
                    if let (Some(g), Some(x)) = (&group, &input) {
                        for _ in 0..reps {
                            let _out = run_op(r.comm(), op, g, x).map_err(fail)?;
                        }
                        sync(device);
                        out.push((n, op, k, trial, t0.elapsed().as_secs_f64() / reps as f64));
                    }
                }
            }
        }
    }
    r.barrier()?;
    Ok(out)
}

/// Per (collective, group size, payload): the slowest rank of each batch, the median batch.
fn combine(opts: &MeasureOptions, raw: &[Raw]) -> Vec<CollectiveSeries> {
    let sizes = payload_sizes(opts.max_bytes);
    let mut series = vec![];
    for n in group_sizes(opts.ranks) {
        for op in CollectiveKind::ALL {
            let mut samples = vec![];
            for (k, &bytes) in sizes.iter().enumerate() {
                let mut trials: Vec<f64> = (0..TRIALS)
                    .filter_map(|trial| {
                        raw.iter()
                            .filter(|x| (x.0, x.1, x.2, x.3) == (n, op, k, trial))
                            .map(|x| x.4)
                            .reduce(f64::max)
                    })
                    .collect();
                if trials.is_empty() {
                    continue;
                }
                trials.sort_by(f64::total_cmp);
                let actual = per_member(n, bytes) * n * 4;
                samples.push((actual as f64, trials[trials.len() / 2]));
            }
            series.push(CollectiveSeries {
                op,
                group_size: n,
                samples,
            });
        }
    }
    series
}

struct CpuRank {
    comm: crate::comm::LoopbackComm,
    world: Vec<usize>,
}

impl Rank for CpuRank {
    fn rank(&self) -> usize {
        crate::comm::Communicator::rank(&self.comm)
    }
    fn comm(&mut self) -> &mut dyn TensorComm {
        &mut self.comm
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn barrier(&mut self) -> Result<(), String> {
        crate::comm::Communicator::barrier(&mut self.comm, &self.world).map_err(|e| e.to_string())
    }
}

fn cpu_collectives(opts: &MeasureOptions) -> Result<Vec<Raw>, MeasureError> {
    let world: Vec<usize> = (0..opts.ranks).collect();
    let per_rank = crate::comm::run_ranks(opts.ranks, |comm| {
        let mut r = CpuRank {
            comm,
            world: world.clone(),
        };
        rank_collectives(&mut r, opts)
    })
    .map_err(|e| MeasureError::Ranks(e.to_string()))?;
    Ok(per_rank.into_iter().flatten().collect())
}

/// GPUs libtorch sees (loading the CUDA runtime first); an error without the `cuda` feature
/// or without a GPU.
pub fn cuda_devices() -> Result<usize, MeasureError> {
    #[cfg(feature = "cuda")]
    {
        crate::cuda::load_torch_cuda().map_err(MeasureError::Ranks)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(MeasureError::NoCuda)
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_ranks: usize) -> Result<(Device, String, usize), MeasureError> {
    Err(MeasureError::NoCuda)
}

#[cfg(not(feature = "cuda"))]
fn cuda_collectives(_opts: &MeasureOptions) -> Result<Vec<Raw>, MeasureError> {
    Err(MeasureError::NoCuda)
}

#[cfg(feature = "cuda")]
fn cuda_device(ranks: usize) -> Result<(Device, String, usize), MeasureError> {
    let gpus = crate::cuda::load_torch_cuda().map_err(MeasureError::Ranks)?;
    if ranks > gpus {
        return Err(MeasureError::Options(format!(
            "--gpus {ranks}: libtorch sees {gpus} GPUs"
        )));
    }
    let name = cudarc::driver::CudaContext::new(0)
        .and_then(|c| c.name())
        .map_err(|e| MeasureError::Ranks(format!("CUDA device 0: {e:?}")))?;
    Ok((Device::Cuda(0), name, gpus))
}

#[cfg(feature = "cuda")]
use crate::cuda::FailBarrier;

#[cfg(feature = "cuda")]
struct CudaRank<'a> {
    rank: usize,
    comm: crate::cuda::NcclComm,
    barrier: &'a FailBarrier,
}

#[cfg(feature = "cuda")]
impl Rank for CudaRank<'_> {
    fn rank(&self) -> usize {
        self.rank
    }
    fn comm(&mut self) -> &mut dyn TensorComm {
        &mut self.comm
    }
    fn device(&self) -> Device {
        Device::Cuda(self.rank)
    }
    fn barrier(&mut self) -> Result<(), String> {
        self.barrier.wait()
    }
}

#[cfg(feature = "cuda")]
fn cuda_collectives(opts: &MeasureOptions) -> Result<Vec<Raw>, MeasureError> {
    let ids = crate::cuda::NcclIds::new(&all_groups(opts.ranks)).map_err(MeasureError::Ranks)?;
    let barrier = FailBarrier::new(opts.ranks);
    let results: Vec<Result<Vec<Raw>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..opts.ranks)
            .map(|rank| {
                let (ids, barrier) = (&ids, &barrier);
                s.spawn(move || {
                    let r = crate::cuda::NcclComm::new(rank, ids).and_then(|comm| {
                        let mut r = CudaRank {
                            rank,
                            comm,
                            barrier,
                        };
                        let out = rank_collectives(&mut r, opts);
                        if out.is_err() {
                            r.comm.abort();
                        }
                        out
                    });
                    if let Err(e) = &r {
                        barrier.fail(e);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(rank, h)| {
                h.join()
                    .unwrap_or_else(|_| Err(format!("rank {rank} panicked")))
            })
            .collect()
    });
    let mut all = vec![];
    for r in results {
        all.extend(r.map_err(MeasureError::Ranks)?);
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_groups() {
        assert_eq!(payload_sizes(64 << 10), vec![1024, 4096, 16384, 65536]);
        assert_eq!(
            payload_sizes(100 << 10),
            vec![1024, 4096, 16384, 65536, 102400]
        );
        assert_eq!(payload_sizes(1 << 30).len(), 11);
        assert_eq!(payload_sizes(usize::MAX).last(), Some(&usize::MAX));
        assert_eq!(group_sizes(1), Vec::<usize>::new());
        assert_eq!(group_sizes(4), vec![2, 4]);
        assert_eq!(group_sizes(6), vec![2, 4, 6]);
        assert_eq!(groups_of(2, 5), vec![vec![0, 1], vec![2, 3]]);
        assert_eq!(all_groups(4).len(), 3);
        assert_eq!((reps(1024), reps(1 << 30)), (100, 5));
    }

    #[test]
    fn measures_on_cpu_threads() {
        let mut o = MeasureOptions::new(MeasureDevice::Cpu, 2);
        o.max_bytes = 16 << 10;
        o.matmul_n = 64;
        o.copy_bytes = 1 << 20;
        let m = measure(&o).expect("measure");
        assert_eq!(m.collectives.len(), 4);
        for s in &m.collectives {
            assert_eq!(s.group_size, 2);
            let bytes: Vec<f64> = s.samples.iter().map(|p| p.0).collect();
            assert_eq!(bytes, vec![1024.0, 4096.0, 16384.0], "{:?}", s.op);
            assert!(s.samples.iter().all(|p| p.1 > 0.0 && p.1.is_finite()));
        }
        for r in [
            m.matmul_flops_bf16,
            m.matmul_flops_fp32,
            m.copy_bandwidth,
            m.launch_s,
        ] {
            assert!(r > 0.0 && r.is_finite(), "{m:?}");
        }
        o.max_bytes = 2048;
        let e = measure(&o).expect_err("one size");
        assert!(e.to_string().contains("--max-bytes 2048"), "{e}");
    }
}
