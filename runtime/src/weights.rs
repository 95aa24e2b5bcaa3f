//! Weights on the host: loading, deterministic initialisation, sharding and checkpoints.
//!
//! A per-rank program starts from its rank's shard of every parameter. The analyzer graph says
//! where a weight's bytes are ([`WeightData`]: inline, in an external file, or absent for
//! graph-only exports and built-in models) and the plan says how each parameter is laid out
//! over the mesh ([`ShardingSpec`]). This module turns the two into per-rank host buffers, and
//! back: [`unshard`] rebuilds full tensors from every rank's shards so a checkpoint written with
//! [`save_safetensors`] is independent of the plan that trained it.
//!
//! Why these choices:
//! - Absent weights are initialised from a hash of `(seed, name)`, never from the rank or the
//!   load order, so every rank (and every re-run, and every plan) sees the same full tensor and
//!   can cut its own shard from it without communication.
//! - Buffers are `f32` for now: the reference runtime and the tests work in `f32`. Other dtypes
//!   are decoded and widened/narrowed to `f32` (integers above 2^24 lose precision); native
//!   bf16/f16 storage comes with the tch backend, which owns device tensors.
//! - Sharding is exact block slicing (`ShardingSpec` splits dims into contiguous blocks, the
//!   first listed mesh axis major), so `unshard(shard(x)) == x` bit for bit.

use autopar_analyzer::{Tensor, TensorType, WeightData};
use autopar_solver::mesh::Mesh;
use autopar_solver::spec::ShardingSpec;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// A full host tensor with its name: `(name, shape, row-major values)`.
pub type NamedTensor = (String, Vec<usize>, Vec<f32>);

/// Standard deviation of the normal init of absent matrices (GPT-2 / BERT convention).
pub const INIT_STD: f32 = 0.02;

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("weight {name:?}: cannot read external data file {}: {source}", path.display())]
    ExternalIo {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("weight {name:?}: external data file {} has {file_len} bytes, the weight needs bytes {offset}..{end}", path.display())]
    ShortRead {
        name: String,
        path: PathBuf,
        offset: u64,
        end: u64,
        file_len: u64,
    },
    #[error("weight {name:?}: {got} bytes of data, but {ty} needs {expected}")]
    SizeMismatch {
        name: String,
        ty: String,
        got: u64,
        expected: u64,
    },
    #[error("sharding {spec} of shape {shape:?} on mesh {mesh}: {reason}")]
    Sharding {
        spec: String,
        shape: Vec<usize>,
        mesh: String,
        reason: String,
    },
    #[error("safetensors file {}: {reason}", path.display())]
    SafetensorsFile { path: PathBuf, reason: String },
    #[error("safetensors file {}, tensor {tensor:?}: {reason}", path.display())]
    SafetensorsTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
}

/// The full value of weight `name` of type `ty` as `f32`, row-major.
///
/// Inline bytes are decoded as `ty.dtype`; external data is read from `path` (relative to
/// `base_dir`, or absolute) at `offset`, `length` bytes; absent data is initialised by
/// [`init_weight`] from `seed`.
pub fn load_weight(
    name: &str,
    ty: &TensorType,
    data: &WeightData,
    base_dir: &Path,
    seed: u64,
) -> Result<Vec<f32>, WeightError> {
    match data {
        WeightData::Inline(bytes) => decode(name, ty, bytes),
        WeightData::External {
            path,
            offset,
            length,
        } => {
            let path = base_dir.join(path);
            check_len(name, ty, *length)?;
            let bytes = read_external(name, &path, *offset, *length)?;
            decode(name, ty, &bytes)
        }
        WeightData::Absent => Ok(init_weight(name, ty, seed)),
    }
}

fn expected_bytes(ty: &TensorType) -> u64 {
    (ty.shape.iter().product::<usize>() as u64).saturating_mul(ty.dtype.size_bytes() as u64)
}

fn check_len(name: &str, ty: &TensorType, got: u64) -> Result<(), WeightError> {
    let expected = expected_bytes(ty);
    if got != expected {
        return Err(WeightError::SizeMismatch {
            name: name.to_string(),
            ty: ty.to_string(),
            got,
            expected,
        });
    }
    Ok(())
}

fn decode(name: &str, ty: &TensorType, bytes: &[u8]) -> Result<Vec<f32>, WeightError> {
    check_len(name, ty, bytes.len() as u64)?;
    let t = Tensor::from_le_bytes(ty.dtype, ty.shape.clone(), bytes).ok_or_else(|| {
        WeightError::SizeMismatch {
            name: name.to_string(),
            ty: ty.to_string(),
            got: bytes.len() as u64,
            expected: expected_bytes(ty),
        }
    })?;
    Ok(t.data.iter().map(|&v| v as f32).collect())
}

fn read_external(
    name: &str,
    path: &Path,
    offset: u64,
    length: u64,
) -> Result<Vec<u8>, WeightError> {
    let io = |source| WeightError::ExternalIo {
        name: name.to_string(),
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let end = offset.saturating_add(length);
    let short = || WeightError::ShortRead {
        name: name.to_string(),
        path: path.to_path_buf(),
        offset,
        end,
        file_len,
    };
    if file_len < end {
        return Err(short());
    }
    let len = usize::try_from(length).map_err(|_| short())?;
    f.seek(SeekFrom::Start(offset)).map_err(io)?;
    let mut bytes = vec![0u8; len];
    f.read_exact(&mut bytes).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => short(),
        _ => io(e),
    })?;
    Ok(bytes)
}

/// Deterministic initial value of an absent weight: a function of `(seed, name, ty)` only.
///
/// The rule (simple on purpose, matching what common models start from):
/// - non-float dtypes (counters such as BatchNorm's `num_batches_tracked`): zeros;
/// - rank 0 or 1: zeros if the name ends in `bias` or `mean` (biases, BatchNorm running
///   means), ones otherwise (norm scales, running variances);
/// - rank >= 2: normal with mean 0 and std [`INIT_STD`], drawn by Box-Muller from a
///   splitmix64 stream seeded by a hash of `(seed, name)`.
pub fn init_weight(name: &str, ty: &TensorType, seed: u64) -> Vec<f32> {
    let n: usize = ty.shape.iter().product();
    if !ty.dtype.is_float() {
        return vec![0.0; n];
    }
    if ty.shape.len() <= 1 {
        let v = if name.ends_with("bias") || name.ends_with("mean") {
            0.0
        } else {
            1.0
        };
        return vec![v; n];
    }
    let mut rng = SplitMix64::new(name_seed(seed, name));
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // u1 in (0, 1] so the log is finite; u2 in [0, 1)
        let u1 = 1.0 - rng.next_f64();
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * u2;
        out.push((r * th.cos()) as f32 * INIT_STD);
        if out.len() < n {
            out.push((r * th.sin()) as f32 * INIT_STD);
        }
    }
    out
}

/// FNV-1a of the name, mixed with the seed through splitmix64's finaliser.
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    SplitMix64::new(seed ^ h.rotate_left(17)).next_u64() ^ h
}

struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

fn sharding_err(spec: &ShardingSpec, shape: &[usize], mesh: &Mesh, reason: String) -> WeightError {
    WeightError::Sharding {
        spec: spec.to_string(),
        shape: shape.to_vec(),
        mesh: mesh.name(),
        reason,
    }
}

/// Checks that `spec` can lay out `shape` on `mesh` as stored shards.
fn check_layout(shape: &[usize], spec: &ShardingSpec, mesh: &Mesh) -> Result<(), WeightError> {
    let err = |r: &str| Err(sharding_err(spec, shape, mesh, r.to_string()));
    if spec.rank() != shape.len() {
        return err("the spec's rank differs from the tensor's");
    }
    if spec.is_partial() {
        return err("a pending partial sum is not a stored layout");
    }
    if !spec.is_valid(shape, mesh) {
        return err("invalid spec (axis out of range or repeated, or a dim not divisible)");
    }
    Ok(())
}

/// Per dim, the index of `rank`'s block (the first listed mesh axis major).
fn block_index(spec: &ShardingSpec, mesh: &Mesh, rank: usize) -> Vec<usize> {
    let c = mesh.coords(rank);
    spec.dims
        .iter()
        .map(|axes| axes.iter().fold(0, |i, &a| i * mesh.axis_size(a) + c[a]))
        .collect()
}

/// Visits the block of `local` shape at `start` in a row-major tensor of `shape`: calls
/// `f(full_offset, local_offset, run_len)` for each contiguous run along the last dim.
fn for_each_run(
    shape: &[usize],
    start: &[usize],
    local: &[usize],
    mut f: impl FnMut(usize, usize, usize),
) {
    let r = shape.len();
    if local.contains(&0) {
        return;
    }
    if r == 0 {
        f(0, 0, 1);
        return;
    }
    let strides = Tensor::strides_of(shape);
    let run = local[r - 1];
    let mut idx = vec![0usize; r - 1];
    let mut local_off = 0;
    loop {
        let full_off: usize = (0..r)
            .map(|d| (start[d] + if d < r - 1 { idx[d] } else { 0 }) * strides[d])
            .sum();
        f(full_off, local_off, run);
        local_off += run;
        // next index over the leading dims
        let mut d = r - 1;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < local[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The shard of the full tensor `full` (of `shape`) that `rank` holds under `spec` on `mesh`.
pub fn shard(
    full: &[f32],
    shape: &[usize],
    spec: &ShardingSpec,
    mesh: &Mesh,
    rank: usize,
) -> Result<Vec<f32>, WeightError> {
    check_layout(shape, spec, mesh)?;
    let n: usize = shape.iter().product();
    if full.len() != n {
        return Err(sharding_err(
            spec,
            shape,
            mesh,
            format!(
                "the tensor has {} elements, the shape needs {n}",
                full.len()
            ),
        ));
    }
    if rank >= mesh.num_devices() {
        return Err(sharding_err(
            spec,
            shape,
            mesh,
            format!("rank {rank} is not on the mesh"),
        ));
    }
    let local = spec.local_shape(shape, mesh);
    let start: Vec<usize> = block_index(spec, mesh, rank)
        .iter()
        .zip(&local)
        .map(|(b, l)| b * l)
        .collect();
    let mut out = vec![0.0f32; local.iter().product()];
    for_each_run(shape, &start, &local, |fo, lo, len| {
        out[lo..lo + len].copy_from_slice(&full[fo..fo + len]);
    });
    Ok(out)
}

/// The full tensor of `shape` from every rank's shard (`shards[rank]`) under `spec` on `mesh`.
///
/// A block held by several ranks (mesh axes the spec does not use) is taken from the rank
/// whose coordinates on those axes are all 0; the other copies are not compared.
pub fn unshard(
    shards: &[Vec<f32>],
    shape: &[usize],
    spec: &ShardingSpec,
    mesh: &Mesh,
) -> Result<Vec<f32>, WeightError> {
    check_layout(shape, spec, mesh)?;
    if shards.len() != mesh.num_devices() {
        return Err(sharding_err(
            spec,
            shape,
            mesh,
            format!(
                "{} shards given, the mesh has {} ranks",
                shards.len(),
                mesh.num_devices()
            ),
        ));
    }
    let local = spec.local_shape(shape, mesh);
    let local_n: usize = local.iter().product();
    let used: BTreeSet<usize> = spec.used_axes().collect();
    let mut full = vec![0.0f32; shape.iter().product()];
    for (rank, s) in shards.iter().enumerate() {
        if s.len() != local_n {
            return Err(sharding_err(
                spec,
                shape,
                mesh,
                format!(
                    "rank {rank}'s shard has {} elements, the local shape {local:?} needs {local_n}",
                    s.len()
                ),
            ));
        }
        let c = mesh.coords(rank);
        if (0..mesh.ndim()).any(|a| !used.contains(&a) && c[a] != 0) {
            continue;
        }
        let start: Vec<usize> = block_index(spec, mesh, rank)
            .iter()
            .zip(&local)
            .map(|(b, l)| b * l)
            .collect();
        for_each_run(shape, &start, &local, |fo, lo, len| {
            full[fo..fo + len].copy_from_slice(&s[lo..lo + len]);
        });
    }
    Ok(full)
}

/// The largest relative error between paired tensors (`max |a - b| / max |b|`, per tensor) and
/// the name of the tensor where it is: how the runtime's results are compared with a
/// reference run (`autopar run --verify`, the N-ranks-equal-one-device tests).
pub fn max_rel_err(a: &[NamedTensor], b: &[NamedTensor]) -> (f64, String) {
    let mut worst = (0.0, String::new());
    for ((name, _, x), (_, _, y)) in a.iter().zip(b) {
        let scale = y
            .iter()
            .fold(0.0f64, |m, &v| m.max(v.abs() as f64))
            .max(1e-12);
        let diff = x
            .iter()
            .zip(y)
            .fold(0.0f64, |m, (&p, &q)| m.max((p as f64 - q as f64).abs()));
        if diff / scale > worst.0 || worst.1.is_empty() {
            worst = (diff / scale, name.clone());
        }
    }
    worst
}

/// Writes `(name, shape, values)` tensors as an F32 safetensors file.
pub fn save_safetensors(path: &Path, tensors: &[NamedTensor]) -> Result<(), WeightError> {
    let tensor_err = |tensor: &str, reason: String| WeightError::SafetensorsTensor {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        reason,
    };
    let mut seen = BTreeSet::new();
    let mut bytes = Vec::with_capacity(tensors.len());
    for (name, shape, values) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(tensor_err(name, "name given twice".to_string()));
        }
        let n: usize = shape.iter().product();
        if values.len() != n {
            return Err(tensor_err(
                name,
                format!("{} values, shape {shape:?} needs {n}", values.len()),
            ));
        }
        bytes.push(
            values
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>(),
        );
    }
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, shape.clone(), b)
            .map_err(|e| tensor_err(name, e.to_string()))?;
        views.push((name.as_str(), view));
    }
    let file_err = |reason: String| WeightError::SafetensorsFile {
        path: path.to_path_buf(),
        reason,
    };
    let out = safetensors::serialize(views, None).map_err(|e| file_err(e.to_string()))?;
    std::fs::write(path, out).map_err(|e| file_err(format!("cannot write: {e}")))
}

/// Reads every tensor of an F32 safetensors file as `(name, shape, values)`, sorted by name.
pub fn load_safetensors(path: &Path) -> Result<Vec<NamedTensor>, WeightError> {
    let file_err = |reason: String| WeightError::SafetensorsFile {
        path: path.to_path_buf(),
        reason,
    };
    let buf = std::fs::read(path).map_err(|e| file_err(format!("cannot read: {e}")))?;
    let st = SafeTensors::deserialize(&buf)
        .map_err(|e| file_err(format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(WeightError::SafetensorsTensor {
                path: path.to_path_buf(),
                tensor: name,
                reason: format!("dtype {:?}, only F32 is supported", view.dtype()),
            });
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        out.push((name, view.shape().to_vec(), values));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}
