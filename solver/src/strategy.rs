//! Sharding strategies of one op, enumerated generically from its axes (the analyzer's
//! `DimMap`, passed in as plain data so the solver never sees graph types).
//!
//! A strategy assigns each mesh axis to at most one splittable op axis (`Parallel` or
//! `Contracted`; never `Whole`), mesh axes in increasing order within an op axis (`S01`, not
//! `S10`), only where the product of the assigned mesh sizes divides the op axis. From the
//! assignment follow the input specs (each tensor dim takes the mesh axes of its op axis), the
//! output specs, and the work each device does (1 / the product of the assigned sizes).
//!
//! A split `Contracted` axis leaves the outputs that do not carry it as partial sums. Each strategy resolves them
//! itself, by the collective the split implies: all-reduce (the output replicated over that
//! mesh axis) or reduce-scatter onto any output dim that axis can still split. So data
//! parallel, Megatron column / row parallel, sequence parallel (row-parallel + reduce-scatter)
//! and 2-D / 3-D mixes all come out of one enumeration, with no per-op lists.
//!
//! In the backward pass the gradient of input `i` is a partial sum over every mesh axis
//! assigned to an op axis that input `i` does not carry (e.g. a weight's gradient under a
//! batch split: the data-parallel all-reduce; `x`'s gradient under a column-parallel split:
//! Megatron's `f` operator); `input_grad_partial` lists those axes.

use crate::mesh::{Mesh, MeshAxis};
use crate::spec::ShardingSpec;
use serde::{Deserialize, Serialize};

/// How an op axis may be split (mirror of the analyzer's `AxisKind`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AxisKind {
    Parallel,
    Contracted,
    Whole,
    /// Split like `Parallel`; the op then all-reduces its statistics over the split mesh axes.
    Statistics,
}

/// An op's axes: sizes and kinds, and which axis each dim of each operand carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpAxes {
    pub axes: Vec<(usize, AxisKind)>,
    pub inputs: Vec<Vec<Option<usize>>>,
    pub outputs: Vec<Vec<Option<usize>>>,
}

/// One way to run the op on the mesh.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Strategy {
    /// Per mesh axis, the op axis it splits (`None`: the op is replicated over that axis).
    pub assignment: Vec<Option<usize>>,
    /// The spec each input must arrive in (never partial).
    pub inputs: Vec<ShardingSpec>,
    /// The spec of each output after the strategy's own collectives (never partial).
    pub outputs: Vec<ShardingSpec>,
    /// The outputs as computed, before resolving partial sums (partial over the mesh axes
    /// assigned to contracted op axes).
    pub raw_outputs: Vec<ShardingSpec>,
    /// Per input, the mesh axes its gradient is a partial sum over in the backward pass.
    pub input_grad_partial: Vec<Vec<MeshAxis>>,
    /// Number of parts the op's work is split into.
    pub work_divisor: usize,
    /// Mesh axes over which the op all-reduces statistics (split `Statistics` axes).
    pub statistics_axes: Vec<MeshAxis>,
}

impl Strategy {
    /// `S0R = S0R x RR`: outputs `=` inputs joined by `x` (Colossal-Auto's notation).
    pub fn notation(&self) -> String {
        let outs: Vec<String> = self.outputs.iter().map(|s| s.to_string()).collect();
        let ins: Vec<String> = self.inputs.iter().map(|s| s.to_string()).collect();
        format!("{} = {}", outs.join(", "), ins.join(" x "))
    }
}

fn spec_for(dims: &[Option<usize>], assignment: &[Option<usize>]) -> ShardingSpec {
    ShardingSpec {
        dims: dims
            .iter()
            .map(|ax| match ax {
                Some(a) => assignment
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x == Some(*a))
                    .map(|(m, _)| m)
                    .collect(),
                None => vec![],
            })
            .collect(),
        partial: vec![],
    }
}

/// Every ways to resolve the partial axes of `raw` (all-reduce, or reduce-scatter onto a dim
/// of `shape` the axis can still split, appended as the dim's innermost split).
fn resolutions(raw: &ShardingSpec, shape: &[usize], mesh: &Mesh) -> Vec<ShardingSpec> {
    let mut out = vec![raw.without_partial()];
    for &a in &raw.partial {
        let mut next = vec![];
        for s in &out {
            next.push(s.clone()); // all-reduce: replicated over a
            for d in 0..shape.len() {
                let mut t = s.clone();
                t.dims[d].push(a);
                if t.is_valid(shape, mesh) {
                    next.push(t);
                }
            }
        }
        out = next;
    }
    out
}

/// Enumerates the strategies of an op with `axes` whose outputs have `output_shapes`, on
/// `mesh`. Always contains the fully replicated strategy first.
pub fn enumerate(op: &OpAxes, output_shapes: &[Vec<usize>], mesh: &Mesh) -> Vec<Strategy> {
    let splittable: Vec<usize> = (0..op.axes.len())
        .filter(|&a| op.axes[a].1 != AxisKind::Whole && op.axes[a].0 > 1)
        .collect();
    let mut assignments: Vec<Vec<Option<usize>>> = vec![vec![]];
    for m in 0..mesh.ndim() {
        let mut next = vec![];
        for asg in &assignments {
            let mut none = asg.clone();
            none.push(None);
            next.push(none);
            if mesh.axis_size(m) == 1 {
                continue;
            }
            for &a in &splittable {
                let parts: usize = asg
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x == Some(a))
                    .map(|(mm, _)| mesh.axis_size(mm))
                    .product::<usize>()
                    * mesh.axis_size(m);
                if op.axes[a].0 % parts == 0 {
                    let mut s = asg.clone();
                    s.push(Some(a));
                    next.push(s);
                }
            }
        }
        assignments = next;
    }
    let mut out = vec![];
    for asg in assignments {
        let inputs: Vec<ShardingSpec> = op.inputs.iter().map(|d| spec_for(d, &asg)).collect();
        // an output is a partial sum over the contracted axes it does not carry (an output
        // may keep an axis another output sums away, e.g. cross entropy's log-probabilities)
        let raw_outputs: Vec<ShardingSpec> = op
            .outputs
            .iter()
            .map(|d| {
                let mut s = spec_for(d, &asg);
                s.partial = (0..asg.len())
                    .filter(|&m| {
                        asg[m].is_some_and(|a| {
                            op.axes[a].1 == AxisKind::Contracted && !d.contains(&Some(a))
                        })
                    })
                    .collect();
                s
            })
            .collect();
        let input_grad_partial: Vec<Vec<MeshAxis>> = op
            .inputs
            .iter()
            .map(|dims| {
                (0..asg.len())
                    .filter(|&m| asg[m].is_some_and(|a| !dims.contains(&Some(a))))
                    .collect()
            })
            .collect();
        let statistics_axes: Vec<MeshAxis> = (0..asg.len())
            .filter(|&m| asg[m].is_some_and(|a| op.axes[a].1 == AxisKind::Statistics))
            .collect();
        let work_divisor = asg
            .iter()
            .enumerate()
            .filter(|(_, a)| a.is_some())
            .map(|(m, _)| mesh.axis_size(m))
            .product();
        // resolve each output's partial sums; outputs resolve independently
        let per_output: Vec<Vec<ShardingSpec>> = raw_outputs
            .iter()
            .zip(output_shapes)
            .map(|(r, shape)| resolutions(r, shape, mesh))
            .collect();
        let mut combos: Vec<Vec<ShardingSpec>> = vec![vec![]];
        for options in &per_output {
            combos = combos
                .iter()
                .flat_map(|c| {
                    options
                        .iter()
                        .map(move |o| [c.clone(), vec![o.clone()]].concat())
                })
                .collect();
        }
        for outputs in combos {
            out.push(Strategy {
                assignment: asg.clone(),
                inputs: inputs.clone(),
                outputs,
                raw_outputs: raw_outputs.clone(),
                input_grad_partial: input_grad_partial.clone(),
                work_divisor,
                statistics_axes: statistics_axes.clone(),
            });
        }
    }
    out
}

/// Storage layouts a tensor may be kept in (parameters, data inputs): replicated, or each mesh
/// axis assigned to at most one dim (mesh axes in increasing order within a dim), divisible.
pub fn storage_specs(shape: &[usize], mesh: &Mesh) -> Vec<ShardingSpec> {
    let mut specs = vec![ShardingSpec::replicated(shape.len())];
    for m in 0..mesh.ndim() {
        if mesh.axis_size(m) == 1 {
            continue;
        }
        let mut next = vec![];
        for s in &specs {
            next.push(s.clone());
            for d in 0..shape.len() {
                let mut t = s.clone();
                t.dims[d].push(m);
                if t.is_valid(shape, mesh) {
                    next.push(t);
                }
            }
        }
        specs = next;
    }
    specs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mesh(shape: &[usize]) -> Mesh {
        Mesh {
            shape: shape.to_vec(),
            links: vec![],
        }
    }

    /// `bmk,kn->bmn` with b=8, m=4, k=6, n=12.
    fn matmul() -> OpAxes {
        use AxisKind::*;
        OpAxes {
            axes: vec![
                (8, Parallel),
                (4, Parallel),
                (6, Contracted),
                (12, Parallel),
            ],
            inputs: vec![vec![Some(0), Some(1), Some(2)], vec![Some(2), Some(3)]],
            outputs: vec![vec![Some(0), Some(1), Some(3)]],
        }
    }

    #[test]
    fn matmul_on_a_line_gives_dp_column_and_row_parallel() {
        let s = enumerate(&matmul(), &[vec![8, 4, 12]], &mesh(&[2]));
        let notes: Vec<String> = s.iter().map(|s| s.notation()).collect();
        expect_test::expect![[r#"
            [
                "RRR = RRR x RR",
                "S0RR = S0RR x RR",
                "RS0R = RS0R x RR",
                "RRR = RRS0 x S0R",
                "S0RR = RRS0 x S0R",
                "RS0R = RRS0 x S0R",
                "RRS0 = RRS0 x S0R",
                "RRS0 = RRR x RS0",
            ]
        "#]]
        .assert_debug_eq(&notes);
        // row parallel: x's gradient is not partial, the weight's gradient is not partial either
        let row = &s[3];
        assert_eq!(row.input_grad_partial, vec![Vec::<usize>::new(), vec![]]);
        // data parallel: the weight's gradient is partial over the batch axis
        assert_eq!(s[1].input_grad_partial, vec![vec![], vec![0]]);
        // column parallel: x's gradient is partial (Megatron's f)
        assert_eq!(s[7].input_grad_partial, vec![vec![0], vec![]]);
    }

    #[test]
    fn divisibility_is_respected() {
        // 12 heads do not split 8 ways: on 2x4 no strategy puts both axes on the 12-axis
        use AxisKind::*;
        let op = OpAxes {
            axes: vec![(12, Parallel)],
            inputs: vec![vec![Some(0)]],
            outputs: vec![vec![Some(0)]],
        };
        let s = enumerate(&op, &[vec![12]], &mesh(&[2, 4]));
        let notes: Vec<String> = s.iter().map(|s| s.notation()).collect();
        assert_eq!(notes, vec!["R = R", "S1 = S1", "S0 = S0"]);
    }

    #[test]
    fn storage_layouts() {
        let specs: Vec<String> = storage_specs(&[4, 6], &mesh(&[2, 2]))
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            specs,
            vec!["RR", "S1R", "RS1", "S0R", "S01R", "S0S1", "RS0", "S1S0"]
        );
    }
}
