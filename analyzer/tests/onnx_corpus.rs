//! Every `.onnx` file of the shared corpus (real PyTorch exports, TorchScript-based opset 17
//! and dynamo opset 18) imports; its outputs have the exported shapes and dtypes; its
//! parameter count equals `manifest.json`'s `graph_params`; the loss is found; and for the
//! files with reference data the imported graph, run by the reference evaluator, reproduces
//! onnxruntime's outputs.
//!
//! The corpus lives in `shared/corpus` next to an ancestor of this crate; without it the tests
//! say so and pass.

use autopar_analyzer::graph::{ValueDef, WeightData};
use autopar_analyzer::onnx::{import_onnx, ImportOptions, ImportedModel};
use autopar_analyzer::reference::{corpus_files, find_corpus, CorpusFile};
use autopar_analyzer::{DType, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn corpus_dir() -> Option<PathBuf> {
    find_corpus(Path::new(env!("CARGO_MANIFEST_DIR")))
}

/// The `.onnx` files of the manifest that are present on disk.
fn entries(dir: &Path) -> Vec<CorpusFile> {
    let files = corpus_files(dir).expect("manifest.json");
    files
        .into_iter()
        .filter(|f| f.file.ends_with(".onnx"))
        .collect()
}

fn import(dir: &Path, file: &str) -> (ImportedModel, f64) {
    let t0 = Instant::now();
    let m = import_onnx(&dir.join(file), &ImportOptions::default())
        .unwrap_or_else(|e| panic!("{file}: {e}"));
    (m, t0.elapsed().as_secs_f64())
}

#[test]
fn every_corpus_file_imports_with_exported_shapes_and_params() {
    let Some(dir) = corpus_dir() else {
        eprintln!(
            "shared/corpus not found next to an ancestor of {}: skipped",
            env!("CARGO_MANIFEST_DIR")
        );
        return;
    };
    let entries = entries(&dir);
    assert!(
        !entries.is_empty(),
        "no .onnx file of manifest.json is in {}",
        dir.display()
    );
    let mut table = vec![];
    for e in &entries {
        let (m, secs) = import(&dir, &e.file);
        let g = &m.graph;
        assert_eq!(Some(m.opset), e.opset, "{}", e.file);
        assert_eq!(g.outputs.len(), e.outputs.len(), "{}: outputs", e.file);
        for (&v, (name, shape, dtype)) in g.outputs.iter().zip(&e.outputs) {
            let ty = g.ty(v);
            assert_eq!(&ty.shape, shape, "{}: output {name}", e.file);
            assert_eq!(
                Some(ty.dtype),
                DType::parse(dtype),
                "{}: output {name}",
                e.file
            );
        }
        assert_eq!(
            g.param_count() as u64,
            e.graph_params,
            "{}: parameter elements",
            e.file
        );
        if e.outputs.iter().any(|o| o.0 == "loss") {
            let loss = m
                .loss
                .unwrap_or_else(|| panic!("{}: no loss found", e.file));
            assert_eq!(g.ty(loss).shape, Vec::<usize>::new(), "{}: loss", e.file);
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

#[test]
fn large_graph_only_model_imports_quickly() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    let file = "llama_1b/llama_1b.train.ts.onnx";
    if !dir.join(file).is_file() {
        eprintln!("{file} not in the corpus: skipped");
        return;
    }
    let (m, secs) = import(&dir, file);
    eprintln!("{file}: {} IR nodes in {secs:.3} s", m.graph.nodes.len());
    // speed is a benchmark's business (`autopar bench solver` reports import time); here it
    // only has to import
    assert!(!m.graph.nodes.is_empty());
}

/// The inputs and onnxruntime outputs stored in `<stem>.ref.json` / `.ref.bin`.
type Named = Vec<(String, Tensor)>;

fn reference(dir: &Path, json: &str) -> (Named, Named) {
    let r = autopar_analyzer::reference::read_reference(&dir.join(json)).expect("reference");
    (r.inputs, r.outputs)
}

/// Runs the imported model on the reference inputs with its inline weights.
fn check_against_reference(dir: &Path, onnx: &str, json: &str, tol: f64) {
    if !dir.join(onnx).is_file() || !dir.join(json).is_file() {
        eprintln!("{onnx} or {json} not in the corpus: skipped");
        return;
    }
    let (m, _) = import(dir, onnx);
    let g = &m.graph;
    let (ins, outs) = reference(dir, json);
    let mut feeds = HashMap::new();
    for (v, d) in g.values.iter() {
        match &d.def {
            ValueDef::Input => {
                let t = ins
                    .iter()
                    .find(|(n, _)| *n == d.name)
                    .unwrap_or_else(|| panic!("no ref input {}", d.name));
                feeds.insert(v, t.1.clone());
            }
            ValueDef::Param { data } | ValueDef::Buffer { data } => {
                let WeightData::Inline(bytes) = data else {
                    panic!("{onnx}: {} is not inline", d.name)
                };
                let t =
                    Tensor::from_le_bytes(d.ty.dtype, d.ty.shape.clone(), bytes).expect("weight");
                feeds.insert(v, t);
            }
            _ => {}
        }
    }
    let vals = autopar_analyzer::eval::run(g, &feeds).unwrap_or_else(|e| panic!("{onnx}: {e}"));
    for (&v, (name, want)) in g.outputs.iter().zip(&outs) {
        let got = vals[v.0 as usize].as_ref().expect("output computed");
        assert_eq!(got.shape, want.shape, "{onnx}: {name}");
        let err = got.max_rel_err(want, 1e-3);
        eprintln!("{onnx}: {name} max rel err {err:.2e}");
        assert!(
            err < tol,
            "{onnx}: output {name} differs from onnxruntime by {err:.2e}"
        );
    }
}

#[test]
fn mlp_tiny_matches_onnxruntime() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    check_against_reference(
        &dir,
        "mlp_tiny/mlp_tiny.dynamo.full.onnx",
        "mlp_tiny/mlp_tiny.dynamo.ref.json",
        1e-4,
    );
}

#[test]
fn tiny_transformers_match_onnxruntime() {
    let Some(dir) = corpus_dir() else {
        eprintln!("shared/corpus not found: skipped");
        return;
    };
    // dynamo (opset 18) and TorchScript (opset 17, training mode with dropout ratio 0)
    for (onnx, json) in [
        (
            "gpt2_tiny/gpt2_tiny.dynamo.full.onnx",
            "gpt2_tiny/gpt2_tiny.dynamo.ref.json",
        ),
        (
            "gpt2_tiny/gpt2_tiny.train.ts.full.onnx",
            "gpt2_tiny/gpt2_tiny.train.ts.ref.json",
        ),
        (
            "llama_tiny/llama_tiny.train.ts.full.onnx",
            "llama_tiny/llama_tiny.train.ts.ref.json",
        ),
    ] {
        check_against_reference(&dir, onnx, json, 1e-3);
    }
}
