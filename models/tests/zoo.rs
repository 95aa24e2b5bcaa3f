#![allow(clippy::unwrap_used)]
//! The zoo's contract: real parameter counts, every model verifies, overrides act and bad ones
//! are rejected with a clear message, tiny configs evaluate to a sensible loss.

use autopar_analyzer::eval;
use autopar_analyzer::verify::verify;
use autopar_models::{
    build, builtin_names, corpus_overrides, is_builtin, random_feeds, tiny, Family, ModelError,
    Overrides,
};
use std::time::Instant;

fn params(name: &str) -> usize {
    build(name, &Overrides::default())
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .graph
        .param_count()
}

#[test]
fn parameter_counts_match_the_reference_models() {
    for (name, count) in [
        ("mlp", 41_956_352),
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("llama-1b", 1_235_814_400),
        ("llama-8b", 8_030_261_248),
        ("bert-base", 109_514_298),
        ("bert-large", 335_174_458),
        ("vit-b16", 86_567_656),
        ("resnet18", 11_689_512),
        ("resnet50", 25_557_032),
    ] {
        assert_eq!(params(name), count, "{name}");
    }
}

#[test]
fn corpus_configs_match_their_manifest_counts() {
    for (corpus, count) in [
        ("mlp_tiny", 164_672),
        ("gpt2_tiny", 655_872),
        ("llama_tiny", 625_280),
        ("llama_1b", 852_559_872),
        ("gpt2_medium", 354_823_168),
        ("bert_base_mlm", 109_514_298),
    ] {
        let (name, ov) = corpus_overrides(corpus).expect(corpus);
        let m = build(name, &ov).unwrap_or_else(|e| panic!("{corpus}: {e}"));
        assert_eq!(m.graph.param_count(), count, "{corpus}");
    }
    assert!(corpus_overrides("t5_small").is_none());
}

#[test]
fn every_builtin_verifies_and_outputs_a_scalar_loss() {
    for &name in builtin_names() {
        let m = build(name, &Overrides::default()).unwrap_or_else(|e| panic!("{name}: {e}"));
        verify(&m.graph).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(m.graph.outputs, vec![m.loss], "{name}");
        assert!(m.graph.ty(m.loss).shape.is_empty(), "{name}");
        assert_eq!(m.config.name, name);
        assert!(is_builtin(name));
    }
}

#[test]
fn names_accept_corpus_spellings_and_unknown_names_list_the_zoo() {
    for (alias, canon) in [
        ("gpt2_medium", "gpt2-medium"),
        ("gpt2_small", "gpt2"),
        ("GPT2-XL", "gpt2-xl"),
        ("llama_1b", "llama-1b"),
        ("bert_base_mlm", "bert-base"),
        ("vit_b_16", "vit-b16"),
    ] {
        assert_eq!(
            autopar_models::canonical_name(alias),
            Some(canon),
            "{alias}"
        );
    }
    assert!(!is_builtin("gpt3"));
    let e = build("gpt3", &Overrides::default()).expect_err("unknown");
    let msg = e.to_string();
    assert!(matches!(e, ModelError::UnknownModel { .. }));
    assert!(
        msg.contains("gpt3") && msg.contains("llama-8b") && msg.contains("resnet50"),
        "{msg}"
    );
}

#[test]
fn parameters_and_nodes_carry_module_paths() {
    let m = build("gpt2", &tiny("gpt2").unwrap()).unwrap();
    let g = &m.graph;
    for p in [
        "wte.weight",
        "wpe.weight",
        "h.0.attn.c_attn.weight",
        "h.1.mlp.c_proj.bias",
        "ln_f.weight",
    ] {
        assert!(g.find_value(p).is_some_and(|v| g.is_param(v)), "{p}");
    }
    assert!(g.nodes.values().any(|n| n.name == "h.0.attn.c_attn"));
    assert!(
        g.find_value("lm_head.weight").is_none(),
        "tied head has no own weight"
    );
    let l = build(
        "llama-8b",
        &Overrides {
            layers: Some(1),
            ..Overrides::default()
        },
    )
    .unwrap();
    for p in [
        "embed_tokens.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.mlp.gate_proj.weight",
        "norm.weight",
        "lm_head.weight",
    ] {
        assert!(l.graph.find_value(p).is_some(), "{p}");
    }
    let r = build("resnet50", &Overrides::default()).unwrap();
    assert!(r.graph.find_value("layer1.0.downsample.0.weight").is_some());
    let rm = r.graph.find_value("bn1.running_mean").unwrap();
    assert!(!r.graph.is_param(rm) && r.graph.buffers().any(|b| b == rm));
}

#[test]
fn overrides_change_the_graph() {
    let base = build("gpt2", &Overrides::default()).unwrap();
    let small = build(
        "gpt2",
        &Overrides {
            layers: Some(2),
            batch: Some(3),
            seq: Some(128),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert!(small.graph.nodes.len() < base.graph.nodes.len());
    assert!(small.graph.param_count() < base.graph.param_count());
    let ids = small.graph.inputs[0];
    assert_eq!(small.graph.ty(ids).shape, vec![3, 128]);
    assert_eq!(small.config.layers, 2);

    // hidden without ffn keeps the ffn/hidden ratio
    let wide = build(
        "llama-8b",
        &Overrides {
            layers: Some(1),
            hidden: Some(2048),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(wide.config.ffn, 7168);

    // tie_embeddings adds or removes the head's own weight
    let untied = build(
        "gpt2",
        &Overrides {
            tie_embeddings: Some(false),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(untied.graph.param_count(), 124_439_808 + 50257 * 768);
    let tied8 = build(
        "llama-8b",
        &Overrides {
            tie_embeddings: Some(true),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(tied8.graph.param_count(), 8_030_261_248 - 128256 * 4096);

    // dropout sites follow the config and the training flag
    let count = |m: &autopar_models::BuiltModel| {
        m.graph
            .nodes
            .values()
            .filter(|n| n.op.name() == "dropout")
            .count()
    };
    assert_eq!(count(&base), 1 + 3 * 12);
    assert_eq!(
        count(
            &build(
                "gpt2",
                &Overrides {
                    training: Some(false),
                    ..Overrides::default()
                }
            )
            .unwrap()
        ),
        0
    );
    assert_eq!(
        count(
            &build(
                "gpt2",
                &Overrides {
                    dropout: Some(0.0),
                    ..Overrides::default()
                }
            )
            .unwrap()
        ),
        0
    );

    // resnet depth
    assert_eq!(
        build(
            "resnet18",
            &Overrides {
                layers: Some(34),
                ..Overrides::default()
            }
        )
        .unwrap()
        .graph
        .param_count(),
        21_797_672
    );

    // vit token count follows image and patch size
    let v = build(
        "vit-b16",
        &Overrides {
            image_size: Some(384),
            ..Overrides::default()
        },
    )
    .unwrap();
    assert_eq!(v.config.seq, 24 * 24 + 1);

    // text set() as the CLI uses it
    let mut o = Overrides::new();
    o.set("--kv-heads", "4").unwrap();
    o.set("heads", "16").unwrap();
    o.set("dtype", "bf16").unwrap();
    let l = build(
        "llama-1b",
        &Overrides {
            layers: Some(1),
            ..o
        },
    )
    .unwrap();
    assert_eq!((l.config.heads, l.config.kv_heads), (16, 4));
    verify(&l.graph).unwrap();
}

#[test]
fn bad_overrides_are_rejected_with_a_reason() {
    let cases: Vec<(&str, Overrides, &str)> = vec![
        (
            "gpt2",
            Overrides {
                heads: Some(5),
                ..Overrides::default()
            },
            "heads 5 does not divide hidden 768",
        ),
        (
            "llama-8b",
            Overrides {
                kv_heads: Some(5),
                ..Overrides::default()
            },
            "kv_heads 5 does not divide heads 32",
        ),
        (
            "gpt2",
            Overrides {
                layers: Some(0),
                ..Overrides::default()
            },
            "`layers` must be at least 1",
        ),
        (
            "bert-base",
            Overrides {
                batch: Some(0),
                ..Overrides::default()
            },
            "`batch` must be at least 1",
        ),
        (
            "gpt2",
            Overrides {
                seq: Some(2048),
                ..Overrides::default()
            },
            "exceeds max_positions 1024",
        ),
        (
            "gpt2",
            Overrides {
                kv_heads: Some(4),
                ..Overrides::default()
            },
            "`kv_heads` does not apply",
        ),
        (
            "resnet18",
            Overrides {
                heads: Some(4),
                ..Overrides::default()
            },
            "`heads` does not apply",
        ),
        (
            "resnet18",
            Overrides {
                layers: Some(20),
                ..Overrides::default()
            },
            "18, 34, 50",
        ),
        (
            "vit-b16",
            Overrides {
                patch: Some(15),
                ..Overrides::default()
            },
            "patch 15 does not divide image_size 224",
        ),
        (
            "gpt2",
            Overrides {
                dropout: Some(1.0),
                ..Overrides::default()
            },
            "dropout 1",
        ),
        (
            "llama-1b",
            Overrides {
                hidden: Some(96),
                heads: Some(32),
                kv_heads: Some(8),
                ..Overrides::default()
            },
            "even",
        ),
    ];
    for (name, ov, want) in cases {
        let e = build(name, &ov).expect_err(want);
        let msg = e.to_string();
        assert!(matches!(e, ModelError::InvalidConfig { .. }), "{msg}");
        assert!(msg.contains(want) && msg.contains(name), "{name}: {msg}");
    }
    let mut o = Overrides::new();
    assert!(o
        .set("heads", "x")
        .unwrap_err()
        .to_string()
        .contains("heads"));
    assert!(o
        .set("colour", "1")
        .unwrap_err()
        .to_string()
        .contains("known keys"));
    assert!(o.set("dtype", "i64").is_ok());
    let e = build("gpt2", &o).expect_err("int dtype");
    assert!(e.to_string().contains("floating-point"), "{e}");
    assert!(tiny("nope").is_err());
}

#[test]
fn llama_8b_builds_fast_without_big_constants() {
    let t = Instant::now();
    let m = build(
        "llama-8b",
        &Overrides {
            seq: Some(8192),
            ..Overrides::default()
        },
    )
    .unwrap();
    let dt = t.elapsed();
    eprintln!(
        "llama-8b seq 8192: built {} nodes in {dt:?}",
        m.graph.nodes.len()
    );
    let biggest_const = m
        .graph
        .values
        .values()
        .filter_map(|d| match &d.def {
            autopar_analyzer::ValueDef::Const(t) => Some(t.numel()),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    assert!(
        biggest_const <= 8192,
        "constant of {biggest_const} elements"
    );
    // generous for debug builds on a slow machine; release builds take milliseconds
    assert!(dt.as_secs_f64() < 5.0, "{dt:?}");
}

fn tiny_loss(name: &str) -> f64 {
    let m = build(name, &tiny(name).unwrap()).unwrap_or_else(|e| panic!("{name}: {e}"));
    verify(&m.graph).unwrap();
    let feeds = random_feeds(&m.graph, &m.config, 7);
    let vals = eval::run(&m.graph, &feeds).unwrap_or_else(|e| panic!("{name}: {e}"));
    let loss = vals[m.loss.0 as usize].as_ref().expect("loss computed");
    assert!(loss.shape.is_empty());
    loss.data[0]
}

#[test]
fn tiny_language_models_evaluate_to_about_ln_vocab() {
    let ln_v = (128f64).ln();
    for name in ["gpt2", "llama-1b", "llama-8b", "bert-base"] {
        let loss = tiny_loss(name);
        assert!(
            loss.is_finite() && (loss - ln_v).abs() < 0.3,
            "{name}: loss {loss}, ln V {ln_v}"
        );
    }
}

#[test]
fn tiny_vision_and_mlp_models_evaluate() {
    let mlp = tiny_loss("mlp");
    assert!(mlp.is_finite() && mlp > 0.5 && mlp < 2.0, "mlp mse {mlp}");
    for name in ["vit-b16", "resnet18"] {
        let loss = tiny_loss(name);
        assert!(
            loss.is_finite() && (loss - 10f64.ln()).abs() < 1.5,
            "{name}: {loss}"
        );
    }
    assert_eq!(
        build("resnet50", &tiny("resnet").unwrap())
            .unwrap()
            .config
            .family,
        Family::Resnet
    );
}

/// Changing the last token must leave the logits of every earlier position unchanged (the
/// causal mask points the right way) and change the last position's.
#[test]
fn tiny_decoders_are_causal() {
    for name in ["gpt2", "llama-8b"] {
        let m = build(name, &tiny(name).unwrap()).unwrap();
        let g = &m.graph;
        let logits = g
            .nodes
            .values()
            .find(|n| n.name == "lm_head")
            .map(|n| n.outputs[0])
            .expect("lm_head node");
        let ids = g.find_value("input_ids").unwrap();
        let mut feeds = random_feeds(g, &m.config, 3);
        let run = |feeds: &std::collections::HashMap<_, _>| {
            eval::run(g, feeds).unwrap()[logits.0 as usize]
                .clone()
                .unwrap()
        };
        let a = run(&feeds);
        let t = feeds.get_mut(&ids).unwrap();
        let s = m.config.seq;
        t.data[s - 1] = ((t.data[s - 1] as usize + 1) % m.config.vocab) as f64;
        let b = run(&feeds);
        let v = m.config.vocab;
        let row = |x: &autopar_analyzer::Tensor, p: usize| x.data[p * v..(p + 1) * v].to_vec();
        for p in 0..s - 1 {
            assert_eq!(
                row(&a, p),
                row(&b, p),
                "{name}: position {p} saw the future"
            );
        }
        assert_ne!(
            row(&a, s - 1),
            row(&b, s - 1),
            "{name}: last position unchanged"
        );
    }
}
