#![allow(clippy::unwrap_used)]
//! The built-in GPT-2 and LLaMA against PyTorch: the corpus's tiny exports carry their weights
//! and onnxruntime's logits for fixed inputs. Building the same config here, loading those
//! weights by parameter name and evaluating must reproduce the logits: this pins every detail
//! a parameter count cannot (GELU flavour, norm epsilons, attention scale, RoPE form and
//! frequencies, GQA head order, the tied head).
//!
//! To stay fast in debug builds only a prefix of the first sequence is evaluated: the models
//! are causal, so logits of positions `< n` depend only on the first `n` tokens.

use autopar_analyzer::eval;
use autopar_analyzer::onnx::{import_onnx, ImportOptions};
use autopar_analyzer::{DType, Graph, Tensor, ValueDef, ValueId, WeightData};
use autopar_models::{build, corpus_overrides};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus")
}

/// A tensor of the reference `.ref.json` / `.ref.bin` pair.
fn ref_tensor(json: &str, bin: &[u8], name: &str) -> (Vec<usize>, Vec<f64>) {
    let j: serde_json::Value = serde_json::from_str(json).unwrap();
    let t = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap();
    let shape: Vec<usize> = t["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .collect();
    let (off, n) = (
        t["offset"].as_u64().unwrap() as usize,
        t["nbytes"].as_u64().unwrap() as usize,
    );
    let dtype = match t["dtype"].as_str().unwrap() {
        "int64" => DType::I64,
        "float32" => DType::F32,
        other => panic!("dtype {other}"),
    };
    let t = Tensor::from_le_bytes(dtype, shape.clone(), &bin[off..off + n]).unwrap();
    (shape, t.data)
}

/// Adjusts the built graph to the export (`ours`, `imported`) before evaluating.
type Fixup = fn(&mut Graph, &Graph);

fn check(
    corpus_name: &str,
    onnx_file: &str,
    ref_stem: &str,
    prefixes: &[&str],
    tied: &[(&str, &str)],
    fixup: Option<Fixup>,
) {
    let dir = corpus().join(corpus_name);
    let onnx = dir.join(onnx_file);
    if !onnx.exists() {
        eprintln!("skipped: {} not found", onnx.display());
        return;
    }
    let json = std::fs::read_to_string(dir.join(format!("{ref_stem}.ref.json"))).unwrap();
    let bin = std::fs::read(dir.join(format!("{ref_stem}.ref.bin"))).unwrap();
    let (ishape, ids) = ref_tensor(&json, &bin, "input_ids");
    let (_, mask) = ref_tensor(&json, &bin, "attention_mask");
    let (lshape, ref_logits) = ref_tensor(&json, &bin, "logits");
    let (s_full, v) = (ishape[1], lshape[2]);
    let n = 12; // prefix of sequence 0
    assert!(
        mask[..n].iter().all(|&m| m == 1.0),
        "reference uses padding"
    );

    let (name, mut ov) = corpus_overrides(corpus_name).unwrap();
    ov.batch = Some(1);
    ov.seq = Some(n);
    ov.dropout = Some(0.0);
    ov.training = Some(false);
    let mut m = build(name, &ov).unwrap();
    let imported = import_onnx(&onnx, &ImportOptions::default()).unwrap().graph;
    if let Some(f) = fixup {
        f(&mut m.graph, &imported);
    }
    let g = &m.graph;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    for d in imported.values.values() {
        if let ValueDef::Param {
            data: WeightData::Inline(bytes),
        } = &d.def
        {
            let t = Tensor::from_le_bytes(d.ty.dtype, d.ty.shape.clone(), bytes).unwrap();
            let mut key = d.name.clone();
            for (from, to) in tied {
                if key == *from {
                    key = to.to_string();
                }
            }
            for p in prefixes {
                if let Some(rest) = key.strip_prefix(p) {
                    key = rest.to_string();
                    break;
                }
            }
            weights.insert(key, t);
        }
    }
    let mut feeds: HashMap<ValueId, Tensor> = HashMap::new();
    for p in g.params() {
        let name = &g.value(p).name;
        let t = weights
            .get(name)
            .unwrap_or_else(|| panic!("no weight for {name}"));
        assert_eq!(t.shape, g.ty(p).shape, "{name}");
        feeds.insert(p, t.clone());
    }
    let tokens: Vec<i64> = ids[..n].iter().map(|&x| x as i64).collect();
    feeds.insert(
        g.find_value("input_ids").unwrap(),
        Tensor::from_i64(vec![1, n], &tokens),
    );
    feeds.insert(
        g.find_value("labels").unwrap(),
        Tensor::from_i64(vec![1, n], &tokens),
    );

    let logits = g
        .nodes
        .values()
        .find(|nd| nd.name == "lm_head")
        .unwrap()
        .outputs[0];
    let vals = eval::run(g, &feeds).unwrap();
    let ours = vals[logits.0 as usize].as_ref().unwrap();
    assert_eq!(ours.shape, vec![1, n, v]);
    let theirs = &ref_logits[..n * v];
    assert!(s_full >= n);
    let max_diff = ours
        .data
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    let scale = theirs.iter().map(|x| x.abs()).fold(0.0, f64::max);
    eprintln!("{corpus_name}: max |logit diff| {max_diff:.2e} (max |logit| {scale:.2})");
    assert!(
        max_diff < 1e-4 * scale.max(1.0),
        "{corpus_name}: logits differ by {max_diff}"
    );
    let loss = vals[m.loss.0 as usize].as_ref().unwrap().data[0];
    assert!(loss.is_finite());
}

#[test]
fn gpt2_tiny_matches_pytorch_logits() {
    check(
        "gpt2_tiny",
        "gpt2_tiny.dynamo.full.onnx",
        "gpt2_tiny.dynamo",
        &["model.transformer."],
        &[("model.lm_head.weight", "wte.weight")],
        None,
    );
}

#[test]
fn llama_tiny_matches_pytorch_logits() {
    check(
        "llama_tiny",
        "llama_tiny.train.ts.full.onnx",
        "llama_tiny.train.ts",
        &["model.model.", "model."],
        &[],
        Some(corpus_inv_freq),
    );
}

/// The corpus randomised every float buffer, the rotary `inv_freq` included (x (1 + 0.01 N),
/// MANIFEST.md), so its RoPE frequencies are not `theta^(-2i/d)`. The export holds the folded
/// cos / sin tables `[1, 1, S, d]`; the angle at position 1 is the frequency, which replaces our
/// `rope.inv_freq` constant (everything downstream of it is still our graph).
fn corpus_inv_freq(ours: &mut Graph, imported: &Graph) {
    let v = ours
        .find_value("rope.inv_freq")
        .expect("rope.inv_freq constant");
    let ty = ours.ty(v).clone();
    let hd = 2 * ty.numel();
    let tables: Vec<&Arc<Tensor>> = imported
        .values
        .values()
        .filter_map(|val| match &val.def {
            ValueDef::Const(t) if t.rank() == 4 && t.shape[..2] == [1, 1] && t.shape[3] == hd => {
                Some(t)
            }
            _ => None,
        })
        .collect();
    let [cos, sin] = tables[..] else {
        panic!("expected the cos and sin tables, found {}", tables.len())
    };
    assert_eq!(cos.data[0], 1.0, "first table is cos");
    let freqs: Vec<f64> = (0..hd / 2)
        .map(|i| sin.data[hd + i].atan2(cos.data[hd + i]))
        .collect();
    ours.values[v].def = ValueDef::Const(Arc::new(Tensor::new(ty.dtype, ty.shape, freqs)));
}
