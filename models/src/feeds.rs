//! Seeded random inputs and weights for running a built model through the reference evaluator
//! (`autopar_analyzer::eval::run`) or the runtime in tests.
//!
//! Why here: only the zoo knows which integer inputs index what (token ids below the vocab,
//! token types below `type_vocab`, class labels below `num_classes`), and random ids outside
//! those ranges would make a gather fail rather than test anything. Weights follow the corpus's
//! `randomize_weights()` recipe so magnitudes are realistic: N(0, 0.02) for weights, 1 + N(0,
//! 0.02) for normalisation scales, BatchNorm running mean N(0, 0.1) and running variance
//! U(0.5, 1.5). Roles are read off the graph (which input of which norm a weight feeds), so
//! the function works on any graph with these input names.

use crate::config::{Family, ModelConfig};
use autopar_analyzer::graph::{Graph, ValueDef, ValueId};
use autopar_analyzer::ops::Op;
use autopar_analyzer::Tensor;
use std::collections::HashMap;

/// splitmix64: small, seedable, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
    fn below(&mut self, n: usize) -> f64 {
        if n == 0 {
            0.0
        } else {
            (self.next_u64() % n as u64) as f64
        }
    }
}

#[derive(Copy, Clone, PartialEq)]
enum Role {
    Weight,
    NormScale,
    RunningMean,
    RunningVar,
}

fn roles(graph: &Graph) -> HashMap<ValueId, Role> {
    let mut r = HashMap::new();
    for node in graph.nodes.values() {
        let ins = &node.inputs;
        match &node.op {
            Op::LayerNorm(_) | Op::RmsNorm(_) => {
                if let Some(&s) = ins.get(1) {
                    r.insert(s, Role::NormScale);
                }
            }
            Op::BatchNorm(_) => {
                for (i, role) in [
                    (1, Role::NormScale),
                    (3, Role::RunningMean),
                    (4, Role::RunningVar),
                ] {
                    if let Some(&v) = ins.get(i) {
                        r.insert(v, role);
                    }
                }
            }
            _ => {}
        }
    }
    r
}

/// Values for every input, parameter and buffer of `graph` (a model built from `cfg`), drawn
/// from `seed`. Integer inputs: `token_type_ids` below `type_vocab`; `labels` below the vocab
/// (text) or `num_classes` (vision); other integer inputs (`input_ids`) below the vocab. Float
/// inputs: N(0, 1).
pub fn random_feeds(graph: &Graph, cfg: &ModelConfig, seed: u64) -> HashMap<ValueId, Tensor> {
    let mut rng = Rng(seed ^ 0xA076_1D64_78BD_642F);
    let roles = roles(graph);
    let mut feeds = HashMap::new();
    for (v, d) in graph.values.iter() {
        let ty = &d.ty;
        let n = ty.numel();
        let data: Vec<f64> = match &d.def {
            ValueDef::Input if ty.dtype.is_float() => (0..n).map(|_| rng.normal()).collect(),
            ValueDef::Input => {
                let bound = match (d.name.as_str(), cfg.family) {
                    ("token_type_ids", _) => cfg.type_vocab,
                    ("labels", Family::Vit | Family::Resnet) => cfg.num_classes,
                    _ => cfg.vocab.max(1),
                };
                (0..n).map(|_| rng.below(bound)).collect()
            }
            ValueDef::Param { .. } | ValueDef::Buffer { .. } => {
                let role = roles.get(&v).copied().unwrap_or(Role::Weight);
                (0..n)
                    .map(|_| match role {
                        Role::Weight => 0.02 * rng.normal(),
                        Role::NormScale => 1.0 + 0.02 * rng.normal(),
                        Role::RunningMean => 0.1 * rng.normal(),
                        Role::RunningVar => 0.5 + rng.uniform(),
                    })
                    .collect()
            }
            ValueDef::Const(_) | ValueDef::Node { .. } => continue,
        };
        feeds.insert(v, Tensor::new(ty.dtype, ty.shape.clone(), data));
    }
    feeds
}
