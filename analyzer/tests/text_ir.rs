//! The text form prints and parses back to the same graph; malformed text and graphs that do
//! not verify give errors that say where.

use autopar_analyzer::text::{parse, print};
use autopar_analyzer::verify::verify;
use autopar_analyzer::{DType, GraphBuilder, Phase, Tensor, TensorType, WeightData};

fn sample() -> autopar_analyzer::Graph {
    let mut b = GraphBuilder::new();
    let x = b.input("x", TensorType::new(DType::F32, [2, 3, 4]));
    let w = b.param_with(
        "layer.w",
        TensorType::new(DType::F32, [4, 5]),
        WeightData::External {
            path: "w.bin".into(),
            offset: 16,
            length: 80,
        },
    );
    let k = b.constant(Tensor::new(DType::F32, vec![2], vec![0.5, -1.25]));
    let _ = k;
    b.push_scope("layer");
    let y = b.matmul(x, w).expect("matmul");
    b.pop_scope();
    b.phase = Phase::Backward;
    b.origin = Some(autopar_analyzer::NodeId(0));
    let z = b.einsum("bmn->n", &[y]).expect("sum");
    b.output(y);
    b.output(z);
    b.finish()
}

#[test]
fn prints_the_documented_form() {
    let text = print(&sample());
    expect_test::expect![[r#"
        graph {
          input v0 "x": f32[2,3,4]
          param v1 "layer.w": f32[4,5] external("w.bin", 16, 80)
          const v2: f32[2] = [0.5, -1.25]
          n0 "layer" = einsum(v0, v1) {"equation":"aby,yz->abz"} -> v3 "layer": f32[2,3,5]
          n1 backward(n0) = einsum(v3) {"equation":"bmn->n"} -> v4: f32[5]
          output v3, v4
        }
    "#]]
    .assert_eq(&text);
}

#[test]
fn round_trips() {
    let g = sample();
    let text = print(&g);
    let back = parse(&text).expect("parses");
    assert_eq!(print(&back), text);
    assert_eq!(back, {
        // inline bytes are not carried; this sample has none, so the graphs are equal
        g
    });
}

#[test]
fn parse_errors_name_the_line() {
    let cases = [
        (
            "graph {\n  input v0: f99[2]\n}\n",
            "line 2",
            "unknown dtype",
        ),
        (
            "graph {\n  input v0: f32[2]\n  n0 = frobnicate(v0) -> v1: f32[2]\n}\n",
            "line 3",
            "unknown op",
        ),
        ("graph {\n  input v0: f32[2]\n", "", "missing closing brace"),
        (
            "graph {\n  input v0: f32[2]\n  input v0: f32[2]\n}\n",
            "line 3",
            "declared twice",
        ),
        (
            "graph {\n  input v1: f32[2]\n}\n",
            "",
            "v0 is never declared",
        ),
        (
            "graph {\n  const v0: f32[2] = [1.0]\n}\n",
            "line 2",
            "needs 2",
        ),
    ];
    for (text, at, what) in cases {
        let e = parse(text).expect_err(text).to_string();
        assert!(e.contains(at) && e.contains(what), "{text:?}: got {e}");
    }
}

#[test]
fn verifier_rejects_mistyped_and_unordered_graphs() {
    // output type disagrees with what the op infers
    let bad_type = "graph {\n  input v0: f32[2,3]\n  input v1: f32[3,4]\n  n0 = einsum(v0, v1) {\"equation\":\"ab,bc->ac\"} -> v2: f32[2,5]\n}\n";
    let e = parse(bad_type).expect_err("mistyped").to_string();
    assert!(e.contains("n0") && e.contains("f32[2,4]"), "{e}");
    // a node reading a value defined by a later node
    let unordered = "graph {\n  input v0: f32[2]\n  n0 = einsum(v2) {\"equation\":\"a->a\"} -> v1: f32[2]\n  n1 = einsum(v0) {\"equation\":\"a->a\"} -> v2: f32[2]\n}\n";
    let e = parse(unordered).expect_err("unordered").to_string();
    assert!(e.contains("before it is defined"), "{e}");
    // an op whose inputs do not fit names the node and op
    let bad_op = "graph {\n  input v0: f32[2]\n  n0 \"proj\" = einsum(v0) {\"equation\":\"ab->a\"} -> v1: f32[2]\n}\n";
    let e = parse(bad_op).expect_err("bad op").to_string();
    assert!(
        e.contains("n0 \"proj\"") && e.contains("einsum") && e.contains("rank 1"),
        "{e}"
    );
    verify(&sample()).expect("sample verifies");
}
