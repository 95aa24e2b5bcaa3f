//! Built-in model zoo: well-known training models built directly as IR graphs at their real
//! sizes, with the analyzer's [`GraphBuilder`](autopar_analyzer::GraphBuilder).
//!
//! Why built-ins next to the importers: planning a 8B-parameter model should not need an ONNX
//! export (which for LLaMA-8B means gigabytes and minutes), and every size knob (`--layers`,
//! `--seq`, `--batch`, ...) should be one flag away. Graphs hold no weight data
//! ([`WeightData::Absent`](autopar_analyzer::WeightData::Absent)) and no large constants, so
//! building even `llama-8b` at seq 8192 takes milliseconds.
//!
//! Conventions shared by every model:
//! - nodes and parameters are named by module path as in PyTorch / HF (`h.0.attn.c_attn`,
//!   `layers.3.self_attn.q_proj.weight`), and weights keep PyTorch's layouts;
//! - the graph's only output is the scalar training loss ([`BuiltModel::loss`]); language
//!   models take `input_ids` and `labels` (already shifted), vision models `images` and
//!   `labels`, the mlp `x` and `target` (mean squared error); see each module;
//! - dropout (each model's `dropout`) and training-mode BatchNorm follow `training`.
//!
//! | name | parameters | default batch x seq |
//! |---|---|---|
//! | `mlp` | 41,956,352 | 64 |
//! | `gpt2` / `gpt2-medium` / `gpt2-large` / `gpt2-xl` | 124,439,808 / 354,823,168 / 774,030,080 / 1,557,611,200 | 8 x 1024 (gpt2), 4 x 1024 |
//! | `llama-1b` (Llama-3.2-1B) / `llama-8b` (Llama-3-8B) | 1,235,814,400 / 8,030,261,248 | 8 x 2048 |
//! | `bert-base` / `bert-large` (masked LM) | 109,514,298 / 335,174,458 | 8 x 512 |
//! | `vit-b16` | 86,567,656 | 32, 224 x 224 images |
//! | `resnet18` / `resnet50` | 11,689,512 / 25,557,032 | 64, 224 x 224 images |
//!
//! The tests check these counts, and check the tiny GPT-2 and LLaMA logits against PyTorch's
//! (the corpus's `gpt2_tiny` / `llama_tiny` weights and onnxruntime outputs).
//!
//! Names also accept `_` for `-` (`gpt2_medium`) and the corpus's spellings (`gpt2_small`,
//! `bert_base_mlm`, `vit_b_16`). The corpus's `llama_1b` is a different (TinyLlama-like)
//! config: [`corpus_overrides`] gives the overrides that reproduce it and the corpus's tiny
//! models.

mod bert;
pub mod config;
mod feeds;
mod gpt2;
mod llama;
mod mlp;
mod nn;
mod resnet;
mod vit;

pub use config::{Family, ModelConfig, Overrides, RopeScaling, OVERRIDE_KEYS};
pub use feeds::random_feeds;

use autopar_analyzer::{AnalyzerError, Graph, ValueId};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("unknown model {name:?}; built-in models: {known}")]
    UnknownModel { name: String, known: String },
    #[error("{model}: {reason}")]
    InvalidConfig { model: String, reason: String },
    #[error("override {key}={value:?}: {reason}")]
    BadOverride {
        key: String,
        value: String,
        reason: String,
    },
    #[error("{model}: building the graph failed")]
    Build {
        model: String,
        #[source]
        source: AnalyzerError,
    },
}

impl ModelError {
    pub(crate) fn unknown(name: &str) -> Self {
        ModelError::UnknownModel {
            name: name.to_string(),
            known: config::NAMES.join(", "),
        }
    }
}

/// A built model: its graph (output: the loss), the loss value, and the resolved config.
#[derive(Clone, Debug)]
pub struct BuiltModel {
    pub graph: Graph,
    pub loss: ValueId,
    pub config: ModelConfig,
}

/// The built-in model names, canonical spelling.
pub fn builtin_names() -> &'static [&'static str] {
    config::NAMES
}

/// Whether `name` names a built-in model (any accepted spelling).
pub fn is_builtin(name: &str) -> bool {
    config::canonical(name).is_some()
}

/// The canonical spelling of a built-in name (`gpt2_small` -> `gpt2`).
pub fn canonical_name(name: &str) -> Option<&'static str> {
    config::canonical(name)
}

/// Builds built-in `name` with `overrides` applied.
pub fn build(name: &str, overrides: &Overrides) -> Result<BuiltModel, ModelError> {
    let cfg = ModelConfig::resolve(name, overrides)?;
    build_config(&cfg)
}

/// Builds the graph of a resolved config (validated again here).
pub fn build_config(cfg: &ModelConfig) -> Result<BuiltModel, ModelError> {
    cfg.validate()?;
    let mut net = nn::Net::new(cfg);
    let loss = match cfg.family {
        Family::Mlp => mlp::build(&mut net),
        Family::Gpt2 => gpt2::build(&mut net),
        Family::Llama => llama::build(&mut net),
        Family::Bert => bert::build(&mut net),
        Family::Vit => vit::build(&mut net),
        Family::Resnet => resnet::build(&mut net),
    }
    .map_err(|source| ModelError::Build {
        model: cfg.name.clone(),
        source,
    })?;
    net.b.output(loss);
    Ok(BuiltModel {
        graph: net.b.finish(),
        loss,
        config: cfg.clone(),
    })
}

/// Overrides that shrink a model to a size the f64 reference evaluator runs in well under a
/// second, for numerical tests: 2 layers, hidden 64, 4 heads, vocab 128, seq 16, batch 2, no
/// dropout (LLaMA: 2 kv heads, so grouped-query attention stays exercised). `name` is a built-in
/// name or a family name (`mlp`, `gpt2`, `llama`, `bert`, `vit`, `resnet`); build the result
/// with any model of that family.
pub fn tiny(name: &str) -> Result<Overrides, ModelError> {
    let family = match name.trim().to_ascii_lowercase().as_str() {
        "llama" => Family::Llama,
        "bert" => Family::Bert,
        "vit" => Family::Vit,
        "resnet" => Family::Resnet,
        other => {
            let canon = config::canonical(other).ok_or_else(|| ModelError::unknown(name))?;
            config::defaults(canon)
                .ok_or_else(|| ModelError::unknown(name))?
                .family
        }
    };
    let text = Overrides {
        batch: Some(2),
        seq: Some(16),
        layers: Some(2),
        hidden: Some(64),
        heads: Some(4),
        ffn: Some(128),
        vocab: Some(128),
        max_positions: Some(32),
        dropout: Some(0.0),
        ..Overrides::default()
    };
    Ok(match family {
        Family::Mlp => Overrides {
            batch: Some(4),
            layers: Some(3),
            hidden: Some(32),
            in_features: Some(16),
            ..Overrides::default()
        },
        Family::Gpt2 => text,
        Family::Llama => Overrides {
            kv_heads: Some(2),
            ..text
        },
        Family::Bert => text,
        Family::Vit => Overrides {
            batch: Some(2),
            layers: Some(2),
            hidden: Some(64),
            heads: Some(4),
            ffn: Some(128),
            image_size: Some(16),
            patch: Some(4),
            num_classes: Some(10),
            dropout: Some(0.0),
            ..Overrides::default()
        },
        Family::Resnet => Overrides {
            batch: Some(2),
            layers: Some(18),
            hidden: Some(4),
            image_size: Some(32),
            num_classes: Some(10),
            ..Overrides::default()
        },
    })
}

/// The built-in model and overrides that reproduce a corpus model's config (see the corpus
/// MANIFEST.md), e.g. `llama_1b` -> (`llama-1b`, heads 16, kv_heads 4, ffn 5632, vocab 32000,
/// untied, rope_theta 10000, no RoPE scaling, batch 2). `None` for corpus models with no
/// built-in family (t5, mixtral).
pub fn corpus_overrides(corpus_name: &str) -> Option<(&'static str, Overrides)> {
    let o = Overrides::default;
    Some(match corpus_name {
        "mlp" => ("mlp", o()),
        "mlp_tiny" => (
            "mlp",
            Overrides {
                batch: Some(8),
                hidden: Some(256),
                in_features: Some(64),
                ..o()
            },
        ),
        "gpt2_small" => ("gpt2", o()),
        "gpt2_medium" => ("gpt2-medium", o()),
        "gpt2_tiny" => (
            "gpt2",
            Overrides {
                batch: Some(2),
                seq: Some(64),
                layers: Some(2),
                hidden: Some(128),
                heads: Some(4),
                vocab: Some(1000),
                ..o()
            },
        ),
        "llama_1b" => (
            "llama-1b",
            Overrides {
                batch: Some(2),
                heads: Some(16),
                kv_heads: Some(4),
                ffn: Some(5632),
                vocab: Some(32000),
                tie_embeddings: Some(false),
                rope_theta: Some(10000.0),
                rope_scaling_factor: Some(1.0),
                max_positions: Some(2048),
                norm_eps: Some(1e-6),
                ..o()
            },
        ),
        "llama_tiny" => (
            "llama-1b",
            Overrides {
                batch: Some(2),
                seq: Some(64),
                layers: Some(2),
                hidden: Some(128),
                heads: Some(4),
                kv_heads: Some(2),
                ffn: Some(352),
                vocab: Some(1000),
                tie_embeddings: Some(false),
                rope_theta: Some(10000.0),
                rope_scaling_factor: Some(1.0),
                norm_eps: Some(1e-6),
                ..o()
            },
        ),
        "bert_base_mlm" => ("bert-base", o()),
        "vit_b_16" => ("vit-b16", o()),
        "resnet18" => ("resnet18", o()),
        "resnet50" | "resnet50_train" => ("resnet50", o()),
        _ => return None,
    })
}
