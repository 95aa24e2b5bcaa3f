//! Collectives on tensors: the moves of the solver's resharding function executed between
//! ranks, on top of a [`TensorComm`] (flat tensors in, flat tensors out).
//!
//! Two kinds of backends: any host [`Communicator`] (the `f32` words of [`Loopback`]: a float
//! tensor as is, 64-bit types as two words per element, other integer and boolean types
//! widened to 64 bits first; sums on float tensors only; bf16 and f16 travel as f32), and NCCL on device tensors (feature
//! `cuda`). [`run_move`] turns each move (all-gather along a dim, reduce-scatter onto a dim,
//! all-to-all between dims, local slice) into flat collectives with chunk / concatenate, the
//! same for every backend.
//!
//! [`Loopback`]: crate::comm::Loopback

use crate::comm::{CommError, Communicator};
use autopar_solver::reshard::Collective;
use tch::{Device, Kind, Tensor};

/// Why a collective failed.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    #[error(transparent)]
    Comm(#[from] CommError),
    #[error("libtorch failed: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Other(String),
}

/// Collectives of one rank on flat (1-D, contiguous) tensors; `group` is the sorted list of
/// participating world ranks, containing the caller, the same on every member.
pub trait TensorComm {
    fn rank(&self) -> usize;
    /// Element-wise sum over the group.
    fn all_reduce_sum(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// The members' tensors concatenated in group order.
    fn all_gather(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// The sum over members of the group-size chunk at the caller's position.
    fn reduce_scatter_sum(
        &mut self,
        group: &[usize],
        t: &Tensor,
    ) -> Result<Tensor, CollectiveError>;
    /// Chunk `j` of `t` goes to member `j`; the received chunks concatenated in group order.
    fn all_to_all(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError>;
}

impl<C: Communicator + ?Sized> TensorComm for C {
    fn rank(&self) -> usize {
        Communicator::rank(self)
    }
    fn all_reduce_sum(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        need_float(t, "all-reduce")?;
        let mut w = words(t)?;
        Communicator::all_reduce_sum(self, group, &mut w)?;
        from_words(&w, &t.size(), t.kind(), t.device())
    }
    fn all_gather(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let all = Communicator::all_gather(self, group, &words(t)?)?;
        from_words(
            &all,
            &[t.numel() as i64 * group.len() as i64],
            t.kind(),
            t.device(),
        )
    }
    fn reduce_scatter_sum(
        &mut self,
        group: &[usize],
        t: &Tensor,
    ) -> Result<Tensor, CollectiveError> {
        need_float(t, "reduce-scatter")?;
        let mine = Communicator::reduce_scatter_sum(self, group, &words(t)?)?;
        from_words(&mine, &[mine.len() as i64], t.kind(), t.device())
    }
    fn all_to_all(&mut self, group: &[usize], t: &Tensor) -> Result<Tensor, CollectiveError> {
        let got = Communicator::all_to_all(self, group, &words(t)?)?;
        from_words(&got, &[t.numel() as i64], t.kind(), t.device())
    }
}

/// A tensor as `f32` words (module doc) and back.
fn words(t: &Tensor) -> Result<Vec<f32>, CollectiveError> {
    let flat = t.f_contiguous()?.f_flatten(0, -1)?;
    match t.kind() {
        Kind::Float => Ok(Vec::<f32>::try_from(&flat)?),
        // half-precision floats travel (and sum) as f32: exact for every value they hold
        Kind::BFloat16 | Kind::Half => Ok(Vec::<f32>::try_from(&flat.f_to_kind(Kind::Float)?)?),
        Kind::Double => Ok(Vec::<f64>::try_from(&flat)?
            .into_iter()
            .flat_map(|x| split64(x.to_bits()))
            .collect()),
        _ => Ok(Vec::<i64>::try_from(&flat.f_to_kind(Kind::Int64)?)?
            .into_iter()
            .flat_map(|x| split64(x as u64))
            .collect()),
    }
}

fn split64(x: u64) -> [f32; 2] {
    [f32::from_bits(x as u32), f32::from_bits((x >> 32) as u32)]
}

fn join64(w: &[f32]) -> u64 {
    (w[0].to_bits() as u64) | ((w[1].to_bits() as u64) << 32)
}

fn from_words(
    w: &[f32],
    shape: &[i64],
    kind: Kind,
    device: Device,
) -> Result<Tensor, CollectiveError> {
    let t = match kind {
        Kind::Float => Tensor::from_slice(w),
        Kind::BFloat16 | Kind::Half => Tensor::from_slice(w).f_to_kind(kind)?,
        Kind::Double => {
            let v: Vec<f64> = w.chunks(2).map(|c| f64::from_bits(join64(c))).collect();
            Tensor::from_slice(&v)
        }
        _ => {
            let v: Vec<i64> = w.chunks(2).map(|c| join64(c) as i64).collect();
            Tensor::from_slice(&v).f_to_kind(kind)?
        }
    };
    Ok(t.f_reshape(shape)?.f_to(device)?)
}

fn need_float(t: &Tensor, what: &str) -> Result<(), CollectiveError> {
    if matches!(t.kind(), Kind::Float | Kind::BFloat16 | Kind::Half) {
        Ok(())
    } else {
        Err(CollectiveError::Other(format!(
            "{what} of a {:?} tensor: sums run on f32 tensors only",
            t.kind()
        )))
    }
}

/// Sums `t` (any shape) over `group`, in f32 (f64 statistics are summed in f32).
pub fn sum_over(
    comm: &mut dyn TensorComm,
    group: &[usize],
    t: &Tensor,
) -> Result<Tensor, CollectiveError> {
    let flat = t.f_to_kind(Kind::Float)?.f_contiguous()?.f_flatten(0, -1)?;
    let sum = comm.all_reduce_sum(group, &flat)?;
    Ok(sum.f_reshape(t.size())?.f_to_kind(t.kind())?)
}

fn flat(t: &Tensor) -> Result<Tensor, CollectiveError> {
    Ok(t.f_contiguous()?.f_flatten(0, -1)?)
}

/// One resharding step on this rank (see `autopar_solver::reshard` for the moves); `coord` is
/// the rank's coordinate on the move's mesh axis.
pub fn run_move(
    comm: &mut dyn TensorComm,
    op: &Collective,
    group: &[usize],
    coord: usize,
    x: &Tensor,
) -> Result<Tensor, CollectiveError> {
    let n = group.len() as i64;
    if n == 1 {
        return Ok(x.shallow_clone());
    }
    match *op {
        Collective::AllReduce { .. } => {
            Ok(comm.all_reduce_sum(group, &flat(x)?)?.f_reshape(x.size())?)
        }
        Collective::AllGather { dim, .. } => {
            let all = comm.all_gather(group, &flat(x)?)?;
            let mut shape = vec![n];
            shape.extend(x.size());
            // [n, ...local] -> blocks concatenated along `dim`
            let parts = all.f_reshape(&shape)?.f_unbind(0)?;
            Ok(Tensor::f_cat(&parts, dim as i64)?)
        }
        Collective::ReduceScatter { dim, .. } => {
            let chunks = x.f_chunk(n, dim as i64)?;
            let shape = chunks[0].size();
            let flat_chunks: Vec<Tensor> = chunks.iter().map(flat).collect::<Result<_, _>>()?;
            let mine = comm.reduce_scatter_sum(group, &Tensor::f_cat(&flat_chunks, 0)?)?;
            Ok(mine.f_reshape(&shape)?)
        }
        Collective::AllToAll {
            from_dim, to_dim, ..
        } => {
            let chunks = x.f_chunk(n, to_dim as i64)?;
            let mut shape = vec![n];
            shape.extend(chunks[0].size());
            let flat_chunks: Vec<Tensor> = chunks.iter().map(flat).collect::<Result<_, _>>()?;
            let got = comm.all_to_all(group, &Tensor::f_cat(&flat_chunks, 0)?)?;
            let parts = got.f_reshape(&shape)?.f_unbind(0)?;
            Ok(Tensor::f_cat(&parts, from_dim as i64)?)
        }
        Collective::Slice { dim, .. } => {
            let chunks = x.f_chunk(n, dim as i64)?;
            let c = chunks.get(coord).ok_or_else(|| {
                CollectiveError::Other(format!("no block {coord} of {n} along dim {dim}"))
            })?;
            Ok(c.f_contiguous()?)
        }
    }
}
