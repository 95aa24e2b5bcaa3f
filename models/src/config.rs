//! Model configurations: the defaults of every built-in model, the user's overrides, and the
//! resolved, validated [`ModelConfig`] a graph is built from.
//!
//! Why one flat struct for every family: the CLI, plans and reports want one serialisable record
//! of "what was built" (`--layers 2 --seq 128` must show up in a plan file), and most knobs
//! (batch, layers, hidden, heads, ...) mean the same thing across families. A knob a family does
//! not have is `0` (sizes) or its neutral value in the resolved config, and overriding it is an
//! error naming the knob and the model, never silently ignored.

use crate::ModelError;
use autopar_analyzer::DType;
use serde::{Deserialize, Serialize};

/// The model families of the zoo; each has one builder module.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Mlp,
    Gpt2,
    Llama,
    Bert,
    Vit,
    Resnet,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Mlp => "mlp",
            Family::Gpt2 => "gpt2",
            Family::Llama => "llama",
            Family::Bert => "bert",
            Family::Vit => "vit",
            Family::Resnet => "resnet",
        }
    }
}

/// Llama-3.1/3.2 RoPE frequency scaling (`rope_type: "llama3"` in HF configs): low frequencies
/// are divided by `factor`, high ones kept, a smooth blend in between.
#[derive(Copy, Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_positions: usize,
}

impl RopeScaling {
    /// Llama-3.2-1B's values with the given factor (32 in the release).
    pub fn llama3(factor: f64) -> Self {
        RopeScaling {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 8192,
        }
    }
}

/// A resolved, validated configuration: exactly what [`crate::build`] built.
///
/// Fields a family does not use are 0 (sizes), `false` or `None`; see each field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Canonical built-in name (`gpt2-medium`), whatever spelling was asked for.
    pub name: String,
    pub family: Family,
    /// Element type of weights and activations.
    pub dtype: DType,
    /// Training mode: dropout active (when `dropout > 0`), BatchNorm on batch statistics.
    pub training: bool,
    pub batch: usize,
    /// Tokens per sample (text models; ViT: patches + class token, derived). 0: mlp, resnet.
    pub seq: usize,
    /// Transformer blocks; mlp: Linear layers; resnet: depth (18, 34, 50, 101, 152).
    pub layers: usize,
    /// Model width; mlp: hidden Linear width; resnet: stem width (64).
    pub hidden: usize,
    /// Attention (query) heads. 0: mlp, resnet.
    pub heads: usize,
    /// Key/value heads (grouped-query attention); equals `heads` where attention is plain MHA.
    pub kv_heads: usize,
    /// Feed-forward inner width (GPT-2 `n_inner`, BERT `intermediate_size`, ViT `mlp_dim`).
    pub ffn: usize,
    /// Vocabulary size (text models).
    pub vocab: usize,
    /// Learned position table rows (GPT-2, BERT); for LLaMA the longest `seq` accepted.
    pub max_positions: usize,
    /// BERT token-type vocabulary (segments).
    pub type_vocab: usize,
    /// Output projection shares the token embedding (one parameter).
    pub tie_embeddings: bool,
    /// Dropout probability of every dropout site (embedding, attention probabilities,
    /// residual branches); active only when `training`.
    pub dropout: f64,
    /// Epsilon of the model's normalisation layers.
    pub norm_eps: f64,
    /// RoPE base (LLaMA).
    pub rope_theta: f64,
    /// RoPE frequency scaling (Llama-3.2); `None`: plain RoPE.
    pub rope_scaling: Option<RopeScaling>,
    /// mlp: width of the input and of the output.
    pub in_features: usize,
    /// Vision: input images are `[batch, channels, image_size, image_size]`.
    pub image_size: usize,
    pub channels: usize,
    /// ViT patch size.
    pub patch: usize,
    /// Vision: classifier outputs.
    pub num_classes: usize,
    /// Base of the dropout masks' seeds (each dropout site gets its own seed from it).
    pub seed: u64,
}

/// User changes to a built-in model's defaults; `None` keeps the default.
///
/// Knobs the model does not have are rejected by [`crate::build`]. When `hidden` is changed and
/// `ffn` is not, `ffn` keeps the model's ffn/hidden ratio.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Overrides {
    pub batch: Option<usize>,
    pub seq: Option<usize>,
    pub layers: Option<usize>,
    pub hidden: Option<usize>,
    pub heads: Option<usize>,
    pub kv_heads: Option<usize>,
    pub ffn: Option<usize>,
    pub vocab: Option<usize>,
    pub max_positions: Option<usize>,
    pub type_vocab: Option<usize>,
    pub tie_embeddings: Option<bool>,
    pub dropout: Option<f64>,
    pub norm_eps: Option<f64>,
    pub rope_theta: Option<f64>,
    /// Llama-3 RoPE scaling factor; 1.0 turns scaling off (it is the identity).
    pub rope_scaling_factor: Option<f64>,
    pub in_features: Option<usize>,
    pub image_size: Option<usize>,
    pub channels: Option<usize>,
    pub patch: Option<usize>,
    pub num_classes: Option<usize>,
    pub dtype: Option<DType>,
    pub training: Option<bool>,
    pub seed: Option<u64>,
}

/// Every override key, as [`Overrides::set`] accepts it (`-` may replace `_`).
pub const OVERRIDE_KEYS: &[&str] = &[
    "batch",
    "seq",
    "layers",
    "hidden",
    "heads",
    "kv_heads",
    "ffn",
    "vocab",
    "max_positions",
    "type_vocab",
    "tie_embeddings",
    "dropout",
    "norm_eps",
    "rope_theta",
    "rope_scaling_factor",
    "in_features",
    "image_size",
    "channels",
    "patch",
    "num_classes",
    "dtype",
    "training",
    "seed",
];

impl Overrides {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets one override from text, as a CLI flag gives it: `set("kv-heads", "4")`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ModelError> {
        let key_norm = key.trim_start_matches('-').replace('-', "_");
        let bad = |reason: String| ModelError::BadOverride {
            key: key.to_string(),
            value: value.to_string(),
            reason,
        };
        let size = || -> Result<usize, ModelError> {
            value
                .trim()
                .replace('_', "")
                .parse::<usize>()
                .map_err(|e| bad(format!("expected a non-negative integer ({e})")))
        };
        let float = || -> Result<f64, ModelError> {
            value
                .trim()
                .parse::<f64>()
                .map_err(|e| bad(format!("expected a number ({e})")))
        };
        let boolean = || -> Result<bool, ModelError> {
            match value.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(bad("expected true or false".into())),
            }
        };
        match key_norm.as_str() {
            "batch" => self.batch = Some(size()?),
            "seq" => self.seq = Some(size()?),
            "layers" => self.layers = Some(size()?),
            "hidden" => self.hidden = Some(size()?),
            "heads" => self.heads = Some(size()?),
            "kv_heads" => self.kv_heads = Some(size()?),
            "ffn" => self.ffn = Some(size()?),
            "vocab" => self.vocab = Some(size()?),
            "max_positions" => self.max_positions = Some(size()?),
            "type_vocab" => self.type_vocab = Some(size()?),
            "tie_embeddings" => self.tie_embeddings = Some(boolean()?),
            "dropout" => self.dropout = Some(float()?),
            "norm_eps" => self.norm_eps = Some(float()?),
            "rope_theta" => self.rope_theta = Some(float()?),
            "rope_scaling_factor" => self.rope_scaling_factor = Some(float()?),
            "in_features" => self.in_features = Some(size()?),
            "image_size" => self.image_size = Some(size()?),
            "channels" => self.channels = Some(size()?),
            "patch" => self.patch = Some(size()?),
            "num_classes" => self.num_classes = Some(size()?),
            "dtype" => {
                self.dtype = Some(
                    DType::parse(value.trim())
                        .ok_or_else(|| bad("expected a dtype (f32, bf16, f16, f64)".into()))?,
                )
            }
            "training" => self.training = Some(boolean()?),
            "seed" => {
                self.seed = Some(
                    value
                        .trim()
                        .parse::<u64>()
                        .map_err(|e| bad(format!("expected a non-negative integer ({e})")))?,
                )
            }
            _ => {
                return Err(bad(format!(
                    "unknown key; known keys: {}",
                    OVERRIDE_KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// The keys that are set, in [`OVERRIDE_KEYS`] order.
    pub fn set_keys(&self) -> Vec<&'static str> {
        let s = self;
        let flags = [
            s.batch.is_some(),
            s.seq.is_some(),
            s.layers.is_some(),
            s.hidden.is_some(),
            s.heads.is_some(),
            s.kv_heads.is_some(),
            s.ffn.is_some(),
            s.vocab.is_some(),
            s.max_positions.is_some(),
            s.type_vocab.is_some(),
            s.tie_embeddings.is_some(),
            s.dropout.is_some(),
            s.norm_eps.is_some(),
            s.rope_theta.is_some(),
            s.rope_scaling_factor.is_some(),
            s.in_features.is_some(),
            s.image_size.is_some(),
            s.channels.is_some(),
            s.patch.is_some(),
            s.num_classes.is_some(),
            s.dtype.is_some(),
            s.training.is_some(),
            s.seed.is_some(),
        ];
        OVERRIDE_KEYS
            .iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .map(|(k, _)| *k)
            .collect()
    }
}

/// Built-in names, canonical spelling.
pub(crate) const NAMES: &[&str] = &[
    "mlp",
    "gpt2",
    "gpt2-medium",
    "gpt2-large",
    "gpt2-xl",
    "llama-1b",
    "llama-8b",
    "bert-base",
    "bert-large",
    "vit-b16",
    "resnet18",
    "resnet50",
];

/// Other spellings (after lower-casing and `_` -> `-`): the corpus's and common ones.
const ALIASES: &[(&str, &str)] = &[
    ("gpt2-small", "gpt2"),
    ("bert-base-mlm", "bert-base"),
    ("bert-large-mlm", "bert-large"),
    ("vit-b-16", "vit-b16"),
    ("resnet-18", "resnet18"),
    ("resnet-50", "resnet50"),
];

/// The canonical name of a built-in model, accepting `_` for `-` and the aliases.
pub(crate) fn canonical(name: &str) -> Option<&'static str> {
    let n = name.trim().to_ascii_lowercase().replace('_', "-");
    NAMES
        .iter()
        .copied()
        .find(|&c| c == n)
        .or_else(|| ALIASES.iter().find(|(a, _)| *a == n).map(|(_, c)| *c))
}

fn blank(name: &str, family: Family) -> ModelConfig {
    ModelConfig {
        name: name.to_string(),
        family,
        dtype: DType::F32,
        training: true,
        batch: 1,
        seq: 0,
        layers: 0,
        hidden: 0,
        heads: 0,
        kv_heads: 0,
        ffn: 0,
        vocab: 0,
        max_positions: 0,
        type_vocab: 0,
        tie_embeddings: false,
        dropout: 0.0,
        norm_eps: 0.0,
        rope_theta: 0.0,
        rope_scaling: None,
        in_features: 0,
        image_size: 0,
        channels: 0,
        patch: 0,
        num_classes: 0,
        seed: 0,
    }
}

#[allow(clippy::too_many_arguments)]
fn gpt2(name: &str, batch: usize, layers: usize, hidden: usize, heads: usize) -> ModelConfig {
    ModelConfig {
        batch,
        seq: 1024,
        layers,
        hidden,
        heads,
        kv_heads: heads,
        ffn: 4 * hidden,
        vocab: 50257,
        max_positions: 1024,
        tie_embeddings: true,
        dropout: 0.1,
        norm_eps: 1e-5,
        ..blank(name, Family::Gpt2)
    }
}

fn bert(name: &str, layers: usize, hidden: usize, heads: usize) -> ModelConfig {
    ModelConfig {
        batch: 8,
        seq: 512,
        layers,
        hidden,
        heads,
        kv_heads: heads,
        ffn: 4 * hidden,
        vocab: 30522,
        max_positions: 512,
        type_vocab: 2,
        tie_embeddings: true,
        dropout: 0.1,
        norm_eps: 1e-12,
        ..blank(name, Family::Bert)
    }
}

/// The defaults of a canonical built-in name.
pub(crate) fn defaults(name: &'static str) -> Option<ModelConfig> {
    Some(match name {
        // The corpus's `mlp`: 4 Linear 1024-4096-4096-4096-1024, GELU between, batch 64.
        "mlp" => ModelConfig {
            batch: 64,
            layers: 4,
            hidden: 4096,
            in_features: 1024,
            ..blank(name, Family::Mlp)
        },
        "gpt2" => gpt2(name, 8, 12, 768, 12),
        "gpt2-medium" => gpt2(name, 4, 24, 1024, 16),
        "gpt2-large" => gpt2(name, 4, 36, 1280, 20),
        "gpt2-xl" => gpt2(name, 4, 48, 1600, 25),
        // Llama-3.2-1B.
        "llama-1b" => ModelConfig {
            batch: 8,
            seq: 2048,
            layers: 16,
            hidden: 2048,
            heads: 32,
            kv_heads: 8,
            ffn: 8192,
            vocab: 128256,
            max_positions: 131072,
            tie_embeddings: true,
            norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: Some(RopeScaling::llama3(32.0)),
            ..blank(name, Family::Llama)
        },
        // Meta-Llama-3-8B.
        "llama-8b" => ModelConfig {
            batch: 8,
            seq: 2048,
            layers: 32,
            hidden: 4096,
            heads: 32,
            kv_heads: 8,
            ffn: 14336,
            vocab: 128256,
            max_positions: 8192,
            tie_embeddings: false,
            norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            ..blank(name, Family::Llama)
        },
        "bert-base" => bert(name, 12, 768, 12),
        "bert-large" => bert(name, 24, 1024, 16),
        // torchvision vit_b_16 (dropout and attention_dropout 0.0 by default).
        "vit-b16" => ModelConfig {
            batch: 32,
            layers: 12,
            hidden: 768,
            heads: 12,
            kv_heads: 12,
            ffn: 3072,
            norm_eps: 1e-6,
            image_size: 224,
            channels: 3,
            patch: 16,
            num_classes: 1000,
            ..blank(name, Family::Vit)
        },
        "resnet18" | "resnet50" => ModelConfig {
            batch: 64,
            layers: if name == "resnet18" { 18 } else { 50 },
            hidden: 64,
            norm_eps: 1e-5,
            image_size: 224,
            channels: 3,
            num_classes: 1000,
            ..blank(name, Family::Resnet)
        },
        _ => return None,
    })
}

/// Which override keys each family has.
fn applies(family: Family, key: &str) -> bool {
    if matches!(key, "batch" | "dtype" | "training" | "seed") {
        return true;
    }
    let keys: &[&str] = match family {
        Family::Mlp => &["layers", "hidden", "in_features"],
        Family::Gpt2 => &[
            "seq",
            "layers",
            "hidden",
            "heads",
            "ffn",
            "vocab",
            "max_positions",
            "tie_embeddings",
            "dropout",
            "norm_eps",
        ],
        Family::Llama => &[
            "seq",
            "layers",
            "hidden",
            "heads",
            "kv_heads",
            "ffn",
            "vocab",
            "max_positions",
            "tie_embeddings",
            "dropout",
            "norm_eps",
            "rope_theta",
            "rope_scaling_factor",
        ],
        Family::Bert => &[
            "seq",
            "layers",
            "hidden",
            "heads",
            "ffn",
            "vocab",
            "max_positions",
            "type_vocab",
            "tie_embeddings",
            "dropout",
            "norm_eps",
        ],
        Family::Vit => &[
            "layers",
            "hidden",
            "heads",
            "ffn",
            "dropout",
            "norm_eps",
            "image_size",
            "channels",
            "patch",
            "num_classes",
        ],
        Family::Resnet => &[
            "layers",
            "hidden",
            "norm_eps",
            "image_size",
            "channels",
            "num_classes",
        ],
    };
    keys.contains(&key)
}

/// Why a key does not apply, for the error message.
fn why_not(family: Family, key: &str) -> &'static str {
    match (family, key) {
        (Family::Gpt2 | Family::Bert | Family::Vit, "kv_heads") => {
            " (multi-head attention: kv_heads = heads)"
        }
        (Family::Vit, "seq") => " (the token count follows from image_size and patch)",
        (Family::Resnet, "seq") | (Family::Mlp, "seq") => " (no sequence dim)",
        _ => "",
    }
}

/// ResNet depths and their (block kind, blocks per stage).
pub(crate) fn resnet_stages(depth: usize) -> Option<(bool, [usize; 4])> {
    match depth {
        18 => Some((false, [2, 2, 2, 2])),
        34 => Some((false, [3, 4, 6, 3])),
        50 => Some((true, [3, 4, 6, 3])),
        101 => Some((true, [3, 4, 23, 3])),
        152 => Some((true, [3, 8, 36, 3])),
        _ => None,
    }
}

impl ModelConfig {
    /// Defaults of built-in `name` with `ov` applied, validated.
    pub fn resolve(name: &str, ov: &Overrides) -> Result<ModelConfig, ModelError> {
        let canon = canonical(name).ok_or_else(|| ModelError::unknown(name))?;
        let mut c = defaults(canon).ok_or_else(|| ModelError::unknown(name))?;
        let invalid = |reason: String| ModelError::InvalidConfig {
            model: canon.to_string(),
            reason,
        };
        for key in ov.set_keys() {
            if !applies(c.family, key) {
                return Err(invalid(format!(
                    "override `{key}` does not apply to a {} model{}",
                    c.family.name(),
                    why_not(c.family, key)
                )));
            }
        }
        let (hidden0, ffn0) = (c.hidden, c.ffn);
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = ov.$f { c.$f = v; } )* };
        }
        take!(
            batch,
            seq,
            layers,
            hidden,
            heads,
            kv_heads,
            ffn,
            vocab,
            max_positions,
            type_vocab,
            tie_embeddings,
            dropout,
            norm_eps,
            rope_theta,
            in_features,
            image_size,
            channels,
            patch,
            num_classes,
            dtype,
            training,
            seed
        );
        if ov.hidden.is_some() && ov.ffn.is_none() && ffn0 > 0 && hidden0 > 0 {
            c.ffn = (ffn0 as u128 * c.hidden as u128 / hidden0 as u128) as usize;
        }
        if let Some(f) = ov.rope_scaling_factor {
            c.rope_scaling = if f == 1.0 {
                None
            } else {
                Some(RopeScaling::llama3(f))
            };
        }
        if matches!(c.family, Family::Gpt2 | Family::Bert | Family::Vit) {
            c.kv_heads = c.heads;
        }
        if c.family == Family::Vit && c.patch > 0 {
            let g = c.image_size / c.patch;
            c.seq = g * g + 1;
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks sizes and divisibility; errors name the model and the offending knob.
    pub fn validate(&self) -> Result<(), ModelError> {
        let invalid = |reason: String| {
            Err(ModelError::InvalidConfig {
                model: self.name.clone(),
                reason,
            })
        };
        let f = self.family;
        let mut positive: Vec<(&str, usize)> = vec![("batch", self.batch)];
        match f {
            Family::Mlp => positive.extend([
                ("layers", self.layers),
                ("hidden", self.hidden),
                ("in_features", self.in_features),
            ]),
            Family::Gpt2 | Family::Llama | Family::Bert => positive.extend([
                ("seq", self.seq),
                ("layers", self.layers),
                ("hidden", self.hidden),
                ("heads", self.heads),
                ("kv_heads", self.kv_heads),
                ("ffn", self.ffn),
                ("vocab", self.vocab),
                ("max_positions", self.max_positions),
            ]),
            Family::Vit => positive.extend([
                ("layers", self.layers),
                ("hidden", self.hidden),
                ("heads", self.heads),
                ("ffn", self.ffn),
                ("image_size", self.image_size),
                ("channels", self.channels),
                ("patch", self.patch),
                ("num_classes", self.num_classes),
            ]),
            Family::Resnet => positive.extend([
                ("hidden", self.hidden),
                ("image_size", self.image_size),
                ("channels", self.channels),
                ("num_classes", self.num_classes),
            ]),
        }
        if f == Family::Bert {
            positive.push(("type_vocab", self.type_vocab));
        }
        for (k, v) in positive {
            if v == 0 {
                return invalid(format!("`{k}` must be at least 1"));
            }
        }
        if !self.dtype.is_float() {
            return invalid(format!("dtype {} is not a floating-point type", self.dtype));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return invalid(format!("dropout {} is not in [0, 1)", self.dropout));
        }
        if matches!(f, Family::Gpt2 | Family::Llama | Family::Bert | Family::Vit) {
            if self.hidden % self.heads != 0 {
                return invalid(format!(
                    "heads {} does not divide hidden {}",
                    self.heads, self.hidden
                ));
            }
            if self.heads % self.kv_heads != 0 {
                return invalid(format!(
                    "kv_heads {} does not divide heads {}",
                    self.kv_heads, self.heads
                ));
            }
        }
        if f != Family::Mlp && !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return invalid(format!("norm_eps {} must be positive", self.norm_eps));
        }
        if matches!(f, Family::Gpt2 | Family::Llama | Family::Bert) && self.seq > self.max_positions
        {
            return invalid(format!(
                "seq {} exceeds max_positions {} (override max_positions too)",
                self.seq, self.max_positions
            ));
        }
        if f == Family::Llama {
            if (self.hidden / self.heads) % 2 != 0 {
                return invalid(format!(
                    "head dim {} (hidden / heads) must be even for RoPE",
                    self.hidden / self.heads
                ));
            }
            if !(self.rope_theta > 1.0 && self.rope_theta.is_finite()) {
                return invalid(format!("rope_theta {} must be above 1", self.rope_theta));
            }
            if let Some(s) = self.rope_scaling {
                if !(s.factor > 0.0 && s.factor.is_finite()) {
                    return invalid(format!("rope scaling factor {} must be positive", s.factor));
                }
            }
        }
        if f == Family::Vit && self.image_size % self.patch != 0 {
            return invalid(format!(
                "patch {} does not divide image_size {}",
                self.patch, self.image_size
            ));
        }
        if f == Family::Resnet && resnet_stages(self.layers).is_none() {
            return invalid(format!(
                "resnet depth (layers) {} is not one of 18, 34, 50, 101, 152",
                self.layers
            ));
        }
        Ok(())
    }

    /// Attention head width.
    pub fn head_dim(&self) -> usize {
        self.hidden.checked_div(self.heads).unwrap_or(0)
    }
}
