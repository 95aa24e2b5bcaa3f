//! Sharding specs: how one tensor is laid out over the mesh.
//!
//! Per tensor dim, an ordered list of mesh axes the dim is split over (empty = replicated;
//! `[0, 1]` = split over axis 0, each part split again over axis 1: contiguous blocks, axis 0
//! major). Plus the mesh axes over which the tensor is a *pending partial sum* (each device
//! holds an addend; the true value is the sum over that axis). A mesh axis appears at most
//! once in a spec. Printed in the notation Colossal-Auto and Alpa users know: one letter group
//! per dim, `R` or `S` + axes (`S01R` = dim 0 over axes 0 and 1, dim 1 replicated), and
//! partial sums as `P` + axes after a `+` (`RR+P1`).

use crate::mesh::{Mesh, MeshAxis};
use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShardingSpec {
    /// Per tensor dim, the mesh axes it is split over, major first.
    pub dims: Vec<Vec<MeshAxis>>,
    /// Mesh axes the tensor is a pending partial sum over (sorted).
    pub partial: Vec<MeshAxis>,
}

impl ShardingSpec {
    /// Fully replicated, no partial sum.
    pub fn replicated(rank: usize) -> Self {
        ShardingSpec {
            dims: vec![vec![]; rank],
            partial: vec![],
        }
    }
    pub fn rank(&self) -> usize {
        self.dims.len()
    }
    /// Mesh axes used (by a dim or as partial), in no particular order.
    pub fn used_axes(&self) -> impl Iterator<Item = MeshAxis> + '_ {
        self.dims
            .iter()
            .flatten()
            .copied()
            .chain(self.partial.iter().copied())
    }
    /// The dim split over mesh axis `a`, if any.
    pub fn dim_of_axis(&self, a: MeshAxis) -> Option<usize> {
        self.dims.iter().position(|d| d.contains(&a))
    }
    pub fn is_partial(&self) -> bool {
        !self.partial.is_empty()
    }
    /// The same layout with no pending partial sum.
    pub fn without_partial(&self) -> Self {
        ShardingSpec {
            dims: self.dims.clone(),
            partial: vec![],
        }
    }
    /// Number of parts dim `d` is split into.
    pub fn dim_parts(&self, d: usize, mesh: &Mesh) -> usize {
        self.dims[d].iter().map(|&a| mesh.axis_size(a)).product()
    }
    /// Number of distinct shards (product of the split dims' parts).
    pub fn shard_count(&self, mesh: &Mesh) -> usize {
        (0..self.rank()).map(|d| self.dim_parts(d, mesh)).product()
    }
    /// Valid on `shape` and `mesh`: axes in range, each used once, partial sorted, every split
    /// dim divisible by its number of parts.
    pub fn is_valid(&self, shape: &[usize], mesh: &Mesh) -> bool {
        if self.dims.len() != shape.len() {
            return false;
        }
        let mut seen = vec![false; mesh.ndim()];
        for a in self.used_axes() {
            if a >= mesh.ndim() || seen[a] {
                return false;
            }
            seen[a] = true;
        }
        if self.partial.windows(2).any(|w| w[0] >= w[1]) {
            return false;
        }
        (0..shape.len()).all(|d| shape[d] % self.dim_parts(d, mesh) == 0)
    }
    /// The shape each device holds.
    pub fn local_shape(&self, shape: &[usize], mesh: &Mesh) -> Vec<usize> {
        shape
            .iter()
            .enumerate()
            .map(|(d, &n)| n / self.dim_parts(d, mesh).max(1))
            .collect()
    }
    /// Elements each device holds.
    pub fn local_numel(&self, shape: &[usize], mesh: &Mesh) -> usize {
        self.local_shape(shape, mesh).iter().product()
    }
}

impl fmt::Display for ShardingSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dims.is_empty() {
            f.write_str("scalar")?;
        }
        for axes in &self.dims {
            if axes.is_empty() {
                f.write_str("R")?;
            } else {
                f.write_str("S")?;
                for a in axes {
                    write!(f, "{a}")?;
                }
            }
        }
        if !self.partial.is_empty() {
            f.write_str("+P")?;
            for a in &self.partial {
                write!(f, "{a}")?;
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for ShardingSpec {
    type Err = String;
    /// Parses the printed form (`S01R`, `RS1+P0`, `scalar`); axes are single digits.
    fn from_str(s: &str) -> Result<Self, String> {
        let (body, partial) = match s.split_once("+P") {
            Some((b, p)) => (b, p),
            None => (s, ""),
        };
        let digit = |c: char| {
            c.to_digit(10)
                .map(|d| d as usize)
                .ok_or_else(|| format!("bad spec {s:?}"))
        };
        let mut partial: Vec<MeshAxis> = partial.chars().map(digit).collect::<Result<_, _>>()?;
        partial.sort_unstable();
        let mut dims: Vec<Vec<MeshAxis>> = vec![];
        if body != "scalar" {
            for c in body.chars() {
                match c {
                    'R' => dims.push(vec![]),
                    'S' => dims.push(vec![]),
                    _ => match dims.last_mut() {
                        Some(d) => d.push(digit(c)?),
                        None => return Err(format!("bad spec {s:?}")),
                    },
                }
            }
        }
        Ok(ShardingSpec { dims, partial })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_the_usual_notation() {
        for s in ["S01R", "RS1", "S0S1", "RR+P1", "S1R+P02", "scalar+P0", "R"] {
            let spec: ShardingSpec = s.parse().expect("parses");
            assert_eq!(spec.to_string(), s);
        }
        let spec: ShardingSpec = "S01R".parse().expect("parses");
        assert_eq!(spec.dims, vec![vec![0, 1], vec![]]);
    }

    #[test]
    fn validity_and_local_shapes() {
        let mesh = Mesh {
            shape: vec![2, 4],
            links: vec![],
        };
        let s: ShardingSpec = "S01R".parse().expect("spec");
        assert!(s.is_valid(&[16, 3], &mesh));
        assert!(!s.is_valid(&[12, 3], &mesh), "12 does not split 8 ways");
        assert_eq!(s.local_shape(&[16, 3], &mesh), vec![2, 3]);
        let twice: ShardingSpec = "S0S0".parse().expect("spec");
        assert!(!twice.is_valid(&[4, 4], &mesh));
    }
}
