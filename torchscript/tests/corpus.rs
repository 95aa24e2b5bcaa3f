//! Every TorchScript archive of the shared corpus (`*.jit.pt` with emptied weight records,
//! `*.jit.full.pt` with real weights) imports; its outputs have the traced shapes; its
//! parameter count equals `manifest.json`'s `graph_params`; the loss is found; and the tiny
//! models with real weights, run by the analyzer's f64 reference evaluator, reproduce
//! PyTorch's outputs (the corpus reference data of the same model, eval mode).
//!
//! The corpus lives in `shared/corpus` next to an ancestor of this crate; without it the tests
//! say so and pass.

use autopar_analyzer::graph::{ValueDef, WeightData};
use autopar_analyzer::onnx::{ImportOptions, InputOverride};
use autopar_analyzer::reference::{corpus_files, find_corpus, CorpusFile};
use autopar_analyzer::{AnalyzerError, DType, Tensor};
use autopar_torchscript::{import_torchscript, TorchScriptModel};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn corpus_dir() -> Option<PathBuf> {
    find_corpus(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// The `.pt` files of the manifest that are present on disk.
fn jit_entries(dir: &Path) -> Vec<CorpusFile> {
    let files = corpus_files(dir).expect("manifest.json");
    files
        .into_iter()
        .filter(|f| f.file.ends_with(".pt"))
        .collect()
}

fn import(dir: &Path, file: &str) -> (TorchScriptModel, f64) {
    let t0 = Instant::now();
    let m = import_torchscript(&dir.join(file), &ImportOptions::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    (m, t0.elapsed().as_secs_f64())
}

#[test]
fn every_corpus_archive_imports_with_manifest_params() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    let entries = jit_entries(&dir);
    assert!(
        !entries.is_empty(),
        "no .pt file of manifest.json is on disk"
    );
    let mut table = vec![];
    for e in &entries {
        let (m, secs) = import(&dir, &e.file);
        let g = &m.graph;
        assert_eq!(g.outputs.len(), e.outputs.len(), "{}: outputs", e.file);
        for (&v, (_, shape, dtype)) in g.outputs.iter().zip(&e.outputs) {
            let ty = g.ty(v);
            assert_eq!(&ty.shape, shape, "{}: output {}", e.file, g.value_label(v));
            let want = match dtype.as_str() {
                "Float" => DType::F32,
                "Long" => DType::I64,
                other => panic!("dtype {other}"),
            };
            assert_eq!(ty.dtype, want, "{}: output {}", e.file, g.value_label(v));
        }
        assert_eq!(
            g.param_count() as u64,
            e.graph_params,
            "{}: parameter elements",
            e.file
        );
        // stripped archives: the big weights are absent; full ones carry every weight
        let absent = g
            .params()
            .filter(|&p| {
                matches!(
                    g.value(p).def,
                    ValueDef::Param {
                        data: WeightData::Absent
                    }
                )
            })
            .count();
        if e.file.ends_with(".jit.full.pt") {
            assert_eq!(absent, 0, "{}: weights not imported", e.file);
        } else {
            assert!(absent > 0, "{}: stripped weights not absent", e.file);
        }
        if e.outputs.len() == 2 && e.outputs[0].1.is_empty() {
            let loss = m
                .loss
                .unwrap_or_else(|| panic!("{}: no loss found", e.file));
            assert_eq!(g.outputs[0], loss, "{}: the loss is output 0", e.file);
            assert_eq!(g.value(loss).name, "loss");
        }
        table.push(format!(
            "| {} | {} | {} | {} | {:.3} |",
            e.file,
            g.nodes.len(),
            g.params().count(),
            g.param_count(),
            secs
        ));
    }
    eprintln!("| file | IR nodes | params | param elements (= graph_params) | import s |");
    eprintln!("|---|---|---|---|---|");
    for row in table {
        eprintln!("{row}");
    }
}

type Named = Vec<(String, Tensor)>;

/// The inputs and outputs stored in `<stem>.ref.json` / `.ref.bin`.
fn reference(dir: &Path, json: &str) -> (Named, Named) {
    let r = autopar_analyzer::reference::read_reference(&dir.join(json)).expect("reference");
    (r.inputs, r.outputs)
}

/// Runs the imported archive on the reference inputs (fed in signature order) with its
/// weights and compares every output.
fn check_against_reference(dir: &Path, pt: &str, json: &str, tol: f64) {
    if !dir.join(pt).is_file() || !dir.join(json).is_file() {
        eprintln!("{pt} or {json} not in the corpus: skipped");
        return;
    }
    let (m, _) = import(dir, pt);
    let g = &m.graph;
    let (ins, outs) = reference(dir, json);
    assert_eq!(g.inputs.len(), ins.len(), "{pt}: inputs");
    let mut feeds = HashMap::new();
    for (&v, (_, t)) in g.inputs.iter().zip(&ins) {
        feeds.insert(v, t.clone());
    }
    for (v, d) in g.values.iter() {
        if let ValueDef::Param { data } | ValueDef::Buffer { data } = &d.def {
            let WeightData::Inline(bytes) = data else {
                panic!("{pt}: {} is not inline", d.name)
            };
            let t = Tensor::from_le_bytes(d.ty.dtype, d.ty.shape.clone(), bytes).expect("weight");
            feeds.insert(v, t);
        }
    }
    let vals = autopar_analyzer::eval::run(g, &feeds).unwrap_or_else(|e| panic!("{pt}: {e}"));
    assert_eq!(g.outputs.len(), outs.len(), "{pt}: outputs");
    for (&v, (name, want)) in g.outputs.iter().zip(&outs) {
        let got = vals[v.0 as usize].as_ref().expect("output computed");
        assert_eq!(got.shape, want.shape, "{pt}: {name}");
        let err = got.max_rel_err(want, 1e-3);
        eprintln!("{pt}: {name} max rel err {err:.2e}");
        assert!(
            err < tol,
            "{pt}: output {name} differs from PyTorch by {err:.2e}"
        );
    }
}

#[test]
fn mlp_tiny_matches_pytorch() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    check_against_reference(
        &dir,
        "mlp_tiny/mlp_tiny.jit.full.pt",
        "mlp_tiny/mlp_tiny.dynamo.ref.json",
        1e-4,
    );
}

#[test]
fn gpt2_tiny_matches_pytorch() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    check_against_reference(
        &dir,
        "gpt2_tiny/gpt2_tiny.jit.full.pt",
        "gpt2_tiny/gpt2_tiny.dynamo.ref.json",
        1e-3,
    );
}

#[test]
fn mixtral_tiny_batched_matches_pytorch_when_present() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    // mixtral_tiny_batched.jit.full.pt is listed in the manifest but not kept in every corpus
    check_against_reference(
        &dir,
        "mixtral_tiny_batched/mixtral_tiny_batched.jit.full.pt",
        "mixtral_tiny_batched/mixtral_tiny_batched.dynamo.ref.json",
        1e-3,
    );
}

#[test]
fn input_overrides_reshape_the_graph() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    let path = dir.join("gpt2_tiny/gpt2_tiny.jit.pt");
    let mut opts = ImportOptions::default();
    for name in ["input_ids", "attention_mask", "labels"] {
        opts.input_overrides
            .push(InputOverride::new(name, [4, 32], None));
    }
    let m = import_torchscript(&path, &opts).expect("imports at another shape");
    let g = &m.graph;
    assert_eq!(g.ty(g.outputs[1]).shape, vec![4, 32, 1000]);
    assert_eq!(g.ty(g.inputs[0]).dtype, DType::I64);
    let opts = ImportOptions {
        input_overrides: vec![InputOverride::new("tokens", [4, 32], None)],
    };
    let e = import_torchscript(&path, &opts).expect_err("unknown input");
    assert!(
        e.to_string()
            .contains("inputs: input_ids, attention_mask, labels"),
        "{e}"
    );
}

#[test]
fn bad_files_are_clear_errors() {
    let tmp = std::env::temp_dir().join(format!("autopar-ts-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("tmp dir");
    let not_zip = tmp.join("model.pt");
    std::fs::write(&not_zip, b"definitely not a zip archive").expect("write");
    let e = import_torchscript(&not_zip, &ImportOptions::default()).expect_err("not a zip");
    assert!(matches!(e, AnalyzerError::File { .. }), "{e:?}");
    assert!(e.to_string().contains("not a TorchScript archive"), "{e}");

    // a zip header with garbage after it: libtorch's reader rejects it, without a backtrace
    let broken = tmp.join("broken.pt");
    let mut bytes = b"PK\x03\x04".to_vec();
    bytes.extend(std::iter::repeat_n(7u8, 200));
    std::fs::write(&broken, &bytes).expect("write");
    let e = import_torchscript(&broken, &ImportOptions::default()).expect_err("broken zip");
    let msg = e.to_string();
    assert!(
        msg.contains("could not load it as a TorchScript archive"),
        "{msg}"
    );
    assert!(!msg.contains("frame #"), "{msg}");

    let missing = tmp.join("missing.pt");
    let e = import_torchscript(&missing, &ImportOptions::default()).expect_err("missing");
    assert!(e.to_string().contains("cannot read"), "{e}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Seeded weights (small, so activations stay tame; BatchNorm variances positive), rounded to
/// each weight's dtype so libtorch and the reference evaluator see the same values.
fn seeded_weight(name: &str, ty: &autopar_analyzer::dtype::TensorType, seed: u64) -> Tensor {
    let r = Tensor::pseudo_random(&ty.shape, seed);
    let data = r
        .data
        .iter()
        .map(|&x| {
            if name.ends_with("running_var") {
                0.5 + x.abs()
            } else {
                0.2 * x
            }
        })
        .collect();
    let mut t = Tensor::new(ty.dtype, ty.shape.clone(), data);
    t.round_to_dtype();
    t
}

/// Language-model inputs: token ids, an attention mask with right padding on the last row,
/// labels with ignored positions.
fn lm_inputs(g: &autopar_analyzer::Graph, vocab: usize) -> Vec<Tensor> {
    g.inputs
        .iter()
        .map(|&v| {
            let d = g.value(v);
            let shape = d.ty.shape.clone();
            let n: usize = shape.iter().product();
            let cols = *shape.last().expect("rank >= 1");
            let r = Tensor::pseudo_random(&shape, 7 + v.0 as u64);
            let data: Vec<f64> = match d.name.as_str() {
                "attention_mask" => (0..n)
                    .map(|i| if i >= n - cols / 4 { 0.0 } else { 1.0 })
                    .collect(),
                "labels" => r
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, x)| {
                        if i % 7 == 3 {
                            -100.0
                        } else {
                            ((x + 1.0) / 2.0 * vocab as f64)
                                .floor()
                                .min(vocab as f64 - 1.0)
                        }
                    })
                    .collect(),
                _ => r
                    .data
                    .iter()
                    .map(|x| {
                        ((x + 1.0) / 2.0 * vocab as f64)
                            .floor()
                            .min(vocab as f64 - 1.0)
                    })
                    .collect(),
            };
            Tensor::new(d.ty.dtype, shape, data)
        })
        .collect()
}

/// Imports `file` (weights may be stripped), gives libtorch's module and the imported graph
/// the same seeded weights, and compares libtorch's forward with the reference evaluator.
fn check_against_libtorch(
    dir: &Path,
    file: &str,
    opts: &ImportOptions,
    inputs: impl Fn(&autopar_analyzer::Graph) -> Vec<Tensor>,
    tol: f64,
) {
    let path = dir.join(file);
    if !path.is_file() {
        eprintln!("{file} not in the corpus: skipped");
        return;
    }
    let m = import_torchscript(&path, opts).unwrap_or_else(|e| panic!("{file}: {e}"));
    let g = &m.graph;
    let mut lt = autopar_torchscript::LibtorchModule::load(&path).expect("libtorch loads it");
    let mut feeds = HashMap::new();
    for (v, d) in g.values.iter() {
        let (ValueDef::Param { data } | ValueDef::Buffer { data }) = &d.def else {
            continue;
        };
        let t = if d.ty.dtype.is_float() {
            seeded_weight(&d.name, &d.ty, 1000 + v.0 as u64)
        } else {
            let WeightData::Inline(bytes) = data else {
                panic!("{file}: non-float weight {} has no data", d.name)
            };
            Tensor::from_le_bytes(d.ty.dtype, d.ty.shape.clone(), bytes).expect("bytes")
        };
        lt.set_weight(&d.name, &t)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        feeds.insert(v, t);
    }
    let ins = inputs(g);
    for (&v, t) in g.inputs.iter().zip(&ins) {
        feeds.insert(v, t.clone());
    }
    let want = lt.forward(&ins).unwrap_or_else(|e| panic!("{file}: {e}"));
    let vals = autopar_analyzer::eval::run(g, &feeds).unwrap_or_else(|e| panic!("{file}: {e}"));
    assert_eq!(g.outputs.len(), want.len(), "{file}: outputs");
    for (&v, want) in g.outputs.iter().zip(&want) {
        let got = vals[v.0 as usize].as_ref().expect("output computed");
        assert_eq!(got.shape, want.shape, "{file}: {}", g.value_label(v));
        let err = got.max_rel_err(want, 1e-3);
        eprintln!(
            "{file}: {} max rel err vs libtorch {err:.2e}",
            g.value_label(v)
        );
        assert!(
            err < tol,
            "{file}: output {} differs from libtorch by {err:.2e}",
            g.value_label(v)
        );
    }
}

#[test]
fn stripped_language_models_match_libtorch_on_seeded_weights() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    for file in [
        "gpt2_tiny/gpt2_tiny.jit.pt",
        "llama_tiny/llama_tiny.jit.pt",
        "mixtral_tiny_batched/mixtral_tiny_batched.jit.pt",
    ] {
        check_against_libtorch(
            &dir,
            file,
            &ImportOptions::default(),
            |g| lm_inputs(g, 1000),
            1e-3,
        );
    }
}

#[test]
fn stripped_resnet18_matches_libtorch_on_seeded_weights() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    // a small image keeps the f64 reference convolutions quick
    let opts = ImportOptions {
        input_overrides: vec![InputOverride::new("x", [1, 3, 32, 32], None)],
    };
    check_against_libtorch(
        &dir,
        "resnet18/resnet18.jit.pt",
        &opts,
        |g| {
            g.inputs
                .iter()
                .map(|&v| Tensor::pseudo_random(&g.ty(v).shape, 3).cast(DType::F32))
                .collect()
        },
        1e-3,
    );
}
