//! The ONNX importer on small hand-built models: folding of the exporters' shape arithmetic
//! (golden text IR), the semantics of the lowerings that rewrite ONNX ops (MatMul broadcast,
//! Gemm, Slice clamping, Split, Einsum), external data, and the error messages for malformed
//! input.

use autopar_analyzer::graph::{ValueDef, WeightData};
use autopar_analyzer::onnx::proto::{
    attribute_type, data_type, tensor_shape_proto, type_proto, AttributeProto, GraphProto,
    ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, DATA_LOCATION_EXTERNAL,
};
use autopar_analyzer::onnx::{
    import_onnx, import_onnx_bytes, ImportOptions, ImportedModel, InputOverride,
};
use autopar_analyzer::{text, AnalyzerError, DType, Tensor};
use expect_test::expect;
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

// ---- model building -------------------------------------------------------------------------

/// A dim of a declared shape: a size or a symbolic name.
enum Dim {
    N(i64),
    Sym(&'static str),
}

fn vi(name: &str, elem: i32, dims: &[Dim]) -> ValueInfoProto {
    use tensor_shape_proto::{dimension::Value, Dimension};
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::N(n) => Value::DimValue(*n),
                Dim::Sym(s) => Value::DimParam(s.to_string()),
            }),
            denotation: String::new(),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(TensorShapeProto { dim }),
            })),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

fn f32_vi(name: &str, dims: &[i64]) -> ValueInfoProto {
    let d: Vec<Dim> = dims.iter().map(|&n| Dim::N(n)).collect();
    vi(name, data_type::FLOAT, &d)
}

fn node(
    op: &str,
    name: &str,
    inputs: &[&str],
    outputs: &[&str],
    attrs: Vec<AttributeProto>,
) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name: name.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn attr_i(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INT,
        i,
        ..Default::default()
    }
}

fn attr_f(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::FLOAT,
        f,
        ..Default::default()
    }
}

fn attr_s(name: &str, s: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::STRING,
        s: s.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: attribute_type::INTS,
        ints: ints.to_vec(),
        ..Default::default()
    }
}

fn i64_tensor(name: &str, dims: &[i64], vals: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::INT64,
        int64_data: vals.to_vec(),
        ..Default::default()
    }
}

/// A float tensor stored as raw little-endian bytes (as the exporters write weights).
fn f32_tensor(name: &str, dims: &[i64], vals: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

/// `n` distinct small floats.
fn ramp(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect()
}

fn model_bytes(opset: i64, graph: GraphProto) -> Vec<u8> {
    ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "test".into(),
        producer_version: "1".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

fn graph(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
) -> GraphProto {
    GraphProto {
        node: nodes,
        initializer: inits,
        input: inputs,
        output: outputs,
        name: "g".into(),
        ..Default::default()
    }
}

fn import(bytes: &[u8]) -> Result<ImportedModel, AnalyzerError> {
    import_onnx_bytes(bytes, Path::new(""), &ImportOptions::default())
}

fn import_ok(bytes: &[u8]) -> ImportedModel {
    match import(bytes) {
        Ok(m) => m,
        Err(e) => panic!("import failed: {e}"),
    }
}

fn import_err(bytes: &[u8]) -> String {
    match import(bytes) {
        Ok(m) => panic!("import succeeded:\n{}", text::print(&m.graph)),
        Err(e) => e.to_string(),
    }
}

/// Runs the imported graph on `feeds` (by input name) with its inline weights; the outputs.
fn run(m: &ImportedModel, feeds: &[(&str, Tensor)]) -> Vec<Tensor> {
    let g = &m.graph;
    let mut map = HashMap::new();
    for (v, d) in g.values.iter() {
        match &d.def {
            ValueDef::Input => {
                let t = feeds
                    .iter()
                    .find(|(n, _)| *n == d.name)
                    .map(|(_, t)| t.clone());
                map.insert(v, t.unwrap_or_else(|| panic!("no feed for {}", d.name)));
            }
            ValueDef::Param { data } | ValueDef::Buffer { data } => {
                let WeightData::Inline(bytes) = data else {
                    panic!("{} has no inline data", d.name)
                };
                let t = Tensor::from_le_bytes(d.ty.dtype, d.ty.shape.clone(), bytes)
                    .expect("weight bytes");
                map.insert(v, t);
            }
            _ => {}
        }
    }
    let vals = autopar_analyzer::eval::run(g, &map).expect("eval");
    g.outputs
        .iter()
        .map(|v| vals[v.0 as usize].clone().expect("output computed"))
        .collect()
}

fn tensor_f32(shape: &[usize], data: &[f32]) -> Tensor {
    Tensor::new(
        DType::F32,
        shape.to_vec(),
        data.iter().map(|&v| v as f64).collect(),
    )
}

/// Naive numpy-style batched matmul for the reference values.
fn ref_matmul(a: &Tensor, b: &Tensor) -> Tensor {
    let (ra, rb) = (a.rank(), b.rank());
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let n = b.shape[rb - 1];
    let batch = autopar_analyzer::dtype::broadcast_shapes(&a.shape[..ra - 2], &b.shape[..rb - 2])
        .expect("broadcast");
    let nb = batch.len();
    let mut out_shape = batch.clone();
    out_shape.extend([m, n]);
    let mut data = vec![];
    autopar_analyzer::tensor::for_each_index(&out_shape, |idx| {
        let mut s = 0.0;
        for kk in 0..k {
            let mut ia: Vec<usize> = idx[nb - (ra - 2)..nb].to_vec();
            ia.extend([idx[nb], kk]);
            let mut ib: Vec<usize> = idx[nb - (rb - 2)..nb].to_vec();
            ib.extend([kk, idx[nb + 1]]);
            s += a.data[index_of(&a.shape, &ia)] * b.data[index_of(&b.shape, &ib)];
        }
        data.push(s);
    });
    Tensor::new(DType::F32, out_shape, data)
}

/// Flat index of `idx` in `shape`, broadcasting size-1 dims.
fn index_of(shape: &[usize], idx: &[usize]) -> usize {
    let st = Tensor::strides_of(shape);
    idx.iter()
        .zip(shape)
        .zip(&st)
        .map(|((&i, &n), &s)| if n == 1 { 0 } else { i * s })
        .sum()
}

// ---- folding (golden) -----------------------------------------------------------------------

#[test]
fn shape_arithmetic_folds_into_one_reshape() {
    // x -> Shape -> Gather([0]) -> Concat([-1]) -> Reshape(x, .) -> MatMul(w)
    let g = graph(
        vec![
            node("Shape", "shape", &["x"], &["s"], vec![]),
            node(
                "Gather",
                "batch",
                &["s", "zero"],
                &["b"],
                vec![attr_i("axis", 0)],
            ),
            node(
                "Concat",
                "target",
                &["b", "minus_one"],
                &["t"],
                vec![attr_i("axis", 0)],
            ),
            node("Reshape", "flatten", &["x", "t"], &["flat"], vec![]),
            node("MatMul", "proj", &["flat", "w"], &["y"], vec![]),
        ],
        vec![
            i64_tensor("zero", &[1], &[0]),
            i64_tensor("minus_one", &[1], &[-1]),
            f32_tensor("w", &[12, 5], &ramp(60)),
        ],
        vec![f32_vi("x", &[2, 3, 4])],
        vec![f32_vi("y", &[2, 5])],
    );
    let m = import_ok(&model_bytes(17, g));
    expect![[r#"
        graph {
          param v0 "w": f32[12,5] inline
          input v1 "x": f32[2,3,4]
          n0 "flatten" = reshape(v1) {"shape":[2,12]} -> v2 "flat": f32[2,12]
          n1 "proj" = einsum(v2, v0) {"equation":"mk,kn->mn"} -> v3 "y": f32[2,5]
          output v3
        }
    "#]]
    .assert_eq(&text::print(&m.graph));
    assert_eq!(m.graph.param_count(), 60);
    assert_eq!(m.opset, 17);
    assert_eq!(m.producer, "test 1");
    assert_eq!(m.loss, None);
}

#[test]
fn exporter_decompositions_import_as_torchscript_ops() {
    // GELU as the TorchScript-based exporter writes it (opset 17 has no Gelu), then a tied
    // weight's Transpose into MatMul: one gelu, and the transpose in the einsum's subscripts
    let g = graph(
        vec![
            node("Div", "/1/Div", &["x", "sqrt2"], &["d"], vec![]),
            node("Erf", "/1/Erf", &["d"], &["e"], vec![]),
            node("Add", "/1/Add", &["e", "one"], &["a"], vec![]),
            node("Mul", "/1/Mul", &["x", "a"], &["m"], vec![]),
            node("Mul", "/1/Mul_1", &["m", "half"], &["h"], vec![]),
            node(
                "Transpose",
                "/2/T",
                &["w"],
                &["wt"],
                vec![attr_ints("perm", &[1, 0])],
            ),
            node("MatMul", "/2/MatMul", &["h", "wt"], &["y"], vec![]),
        ],
        vec![
            f32_tensor("sqrt2", &[], &[std::f32::consts::SQRT_2]),
            f32_tensor("one", &[], &[1.0]),
            f32_tensor("half", &[], &[0.5]),
            f32_tensor("w", &[5, 4], &ramp(20)),
        ],
        vec![f32_vi("x", &[3, 4])],
        vec![f32_vi("y", &[3, 5])],
    );
    let m = import_ok(&model_bytes(17, g));
    expect![[r#"
        graph {
          param v0 "w": f32[5,4] inline
          input v1 "x": f32[3,4]
          n0 "/1/Mul_1" = unary(v1) {"kind":"gelu"} -> v2 "h": f32[3,4]
          n1 "/2/MatMul" = einsum(v2, v0) {"equation":"mk,nk->mn"} -> v3 "y": f32[3,5]
          output v3
        }
    "#]]
    .assert_eq(&text::print(&m.graph));
    let x = tensor_f32(&[3, 4], &ramp(12));
    let y = run(&m, &[("x", x.clone())]);
    let gelu = |v: f64| {
        // erf by its series (|v| <= 2 here)
        let z = v / std::f64::consts::SQRT_2;
        let mut erf = 0.0;
        let mut term = z;
        for n in 0..40 {
            erf += term / (2 * n + 1) as f64;
            term *= -z * z / (n + 1) as f64;
        }
        0.5 * v * (1.0 + 2.0 / std::f64::consts::PI.sqrt() * erf)
    };
    let w = tensor_f32(&[5, 4], &ramp(20));
    for i in 0..3 {
        for j in 0..5 {
            let want: f64 = (0..4)
                .map(|k| gelu(x.data[i * 4 + k]) * w.data[j * 4 + k])
                .sum();
            let got = y[0].data[i * 5 + j];
            assert!((got - want).abs() < 1e-5, "y[{i},{j}] = {got}, want {want}");
        }
    }
}

#[test]
fn ts_style_constant_chain_folds() {
    // TorchScript exports build shapes from Constant / Unsqueeze / Size / Div / Concat /
    // ConstantOfShape / Range / Equal / Where; all of it must fold, leaving the data path.
    let cst = |name: &str, t: TensorProto| {
        let value = AttributeProto {
            name: "value".into(),
            r#type: attribute_type::TENSOR,
            t: Some(t),
            ..Default::default()
        };
        node("Constant", name, &[], &[name], vec![value])
    };
    let one = AttributeProto {
        name: "value".into(),
        r#type: attribute_type::TENSOR,
        t: Some(i64_tensor("", &[1], &[1])),
        ..Default::default()
    };
    let g = graph(
        vec![
            cst("two", i64_tensor("", &[], &[2])),
            cst("ax0", i64_tensor("", &[1], &[0])),
            node("Unsqueeze", "u2", &["two", "ax0"], &["two1"], vec![]),
            node("Size", "size", &["x"], &["n"], vec![]),
            node("Div", "div", &["n", "two"], &["three"], vec![]),
            node("Unsqueeze", "u3", &["three", "ax0"], &["three1"], vec![]),
            node(
                "Concat",
                "target",
                &["two1", "three1"],
                &["shape"],
                vec![attr_i("axis", 0)],
            ),
            node("ConstantOfShape", "ones", &["shape"], &["o"], vec![one]),
            cst("zero", i64_tensor("", &[], &[0])),
            cst("delta", i64_tensor("", &[], &[1])),
            node("Range", "r", &["zero", "n", "delta"], &["rng"], vec![]),
            node("Reshape", "rr", &["rng", "shape"], &["grid"], vec![]),
            node("Equal", "eq", &["o", "delta"], &["all1"], vec![]),
            node("Where", "w", &["all1", "grid", "o"], &["sel"], vec![]),
            node(
                "Cast",
                "cast",
                &["sel"],
                &["self"],
                vec![attr_i("to", data_type::FLOAT as i64)],
            ),
            node("Reshape", "rx", &["x", "shape"], &["x2"], vec![]),
            node("Add", "add", &["x2", "self"], &["y"], vec![]),
        ],
        vec![],
        vec![f32_vi("x", &[6])],
        vec![f32_vi("y", &[2, 3])],
    );
    let m = import_ok(&model_bytes(17, g));
    expect![[r#"
        graph {
          input v0 "x": f32[6]
          const v1 "self": f32[2,3] = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
          n0 "rx" = reshape(v0) {"shape":[2,3]} -> v2 "x2": f32[2,3]
          n1 "add" = binary(v2, v1) {"kind":"add"} -> v3 "y": f32[2,3]
          output v3
        }
    "#]]
    .assert_eq(&text::print(&m.graph));
}

#[test]
fn folded_constants_feed_reshape_slice_and_expand() {
    // A realistic chain: (Shape(x)[-2:] -> Concat with [1] -> Expand(bias, .))
    let g = graph(
        vec![
            node("Shape", "s", &["x"], &["sx"], vec![]),
            node("Slice", "last2", &["sx", "neg2", "big"], &["hw"], vec![]),
            node(
                "Concat",
                "c",
                &["one", "hw"],
                &["target"],
                vec![attr_i("axis", 0)],
            ),
            node("Expand", "e", &["bias", "target"], &["bx"], vec![]),
            node("Mul", "m", &["x", "bx"], &["y"], vec![]),
        ],
        vec![
            i64_tensor("neg2", &[1], &[-2]),
            i64_tensor("big", &[1], &[i64::MAX]),
            i64_tensor("one", &[1], &[1]),
            f32_tensor("bias", &[4], &ramp(4)),
        ],
        vec![f32_vi("x", &[2, 3, 4])],
        vec![f32_vi("y", &[2, 3, 4])],
    );
    let m = import_ok(&model_bytes(18, g));
    expect![[r#"
        graph {
          param v0 "bias": f32[4] inline
          input v1 "x": f32[2,3,4]
          n0 "e" = expand(v0) {"shape":[1,3,4]} -> v2 "bx": f32[1,3,4]
          n1 "m" = binary(v1, v2) {"kind":"mul"} -> v3 "y": f32[2,3,4]
          output v3
        }
    "#]]
    .assert_eq(&text::print(&m.graph));
}

// ---- lowering semantics ---------------------------------------------------------------------

#[test]
fn matmul_broadcasts_batch_dims() {
    // a [2,1,3,4] x b [5,4,2]: a's batch dim of 1 faces 5, b lacks the leading 2.
    let g = graph(
        vec![node("MatMul", "mm", &["a", "b"], &["y"], vec![])],
        vec![f32_tensor("b", &[5, 4, 2], &ramp(40))],
        vec![f32_vi("a", &[2, 1, 3, 4])],
        vec![f32_vi("y", &[2, 5, 3, 2])],
    );
    let m = import_ok(&model_bytes(17, g));
    // a's size-1 batch dim is reshaped away; b has no leading batch dim
    expect![[r#"
        graph {
          param v0 "b": f32[5,4,2] inline
          input v1 "a": f32[2,1,3,4]
          n0 "mm" = reshape(v1) {"shape":[2,3,4]} -> v2 "mm": f32[2,3,4]
          n1 "mm" = einsum(v2, v0) {"equation":"amk,bkn->abmn"} -> v3 "y": f32[2,5,3,2]
          output v3
        }
    "#]]
    .assert_eq(&text::print(&m.graph));
    let a = tensor_f32(&[2, 1, 3, 4], &ramp(24));
    let b = tensor_f32(&[5, 4, 2], &ramp(40));
    let y = run(&m, &[("a", a.clone())]);
    let want = ref_matmul(&a, &b);
    assert_eq!(y[0].shape, vec![2, 5, 3, 2]);
    assert!(y[0].max_rel_err(&want, 1e-6) < 1e-5);
}

#[test]
fn matmul_vector_operands() {
    let g = graph(
        vec![
            node("MatMul", "mv", &["a", "v"], &["y1"], vec![]),
            node("MatMul", "vm", &["v2", "a"], &["y2"], vec![]),
        ],
        vec![
            f32_tensor("v", &[4], &ramp(4)),
            f32_tensor("v2", &[3], &ramp(3)),
        ],
        vec![f32_vi("a", &[3, 4])],
        vec![f32_vi("y1", &[3]), f32_vi("y2", &[4])],
    );
    let m = import_ok(&model_bytes(17, g));
    let a = tensor_f32(&[3, 4], &ramp(12));
    let y = run(&m, &[("a", a.clone())]);
    let v = ramp(4);
    let v2 = ramp(3);
    let y1: Vec<f64> = (0..3)
        .map(|i| (0..4).map(|k| a.data[i * 4 + k] * v[k] as f64).sum())
        .collect();
    let y2: Vec<f64> = (0..4)
        .map(|j| (0..3).map(|i| v2[i] as f64 * a.data[i * 4 + j]).sum())
        .collect();
    assert!(y[0].max_rel_err(&Tensor::new(DType::F32, vec![3], y1), 1e-6) < 1e-5);
    assert!(y[1].max_rel_err(&Tensor::new(DType::F32, vec![4], y2), 1e-6) < 1e-5);
}

#[test]
fn gemm_transposes_and_scales() {
    let g = graph(
        vec![node(
            "Gemm",
            "fc",
            &["a", "w", "c"],
            &["y"],
            vec![
                attr_i("transB", 1),
                attr_f("alpha", 2.0),
                attr_f("beta", 0.5),
            ],
        )],
        vec![
            f32_tensor("w", &[5, 4], &ramp(20)),
            f32_tensor("c", &[5], &ramp(5)),
        ],
        vec![f32_vi("a", &[3, 4])],
        vec![f32_vi("y", &[3, 5])],
    );
    let m = import_ok(&model_bytes(17, g));
    let a = tensor_f32(&[3, 4], &ramp(12));
    let y = run(&m, &[("a", a.clone())]);
    let w = ramp(20);
    let c = ramp(5);
    let mut want = vec![];
    for i in 0..3 {
        for j in 0..5 {
            let dot: f64 = (0..4)
                .map(|k| a.data[i * 4 + k] * w[j * 4 + k] as f64)
                .sum();
            want.push(2.0 * dot + 0.5 * c[j] as f64);
        }
    }
    assert!(y[0].max_rel_err(&Tensor::new(DType::F32, vec![3, 5], want), 1e-6) < 1e-5);
}

#[test]
fn slice_clamps_bounds_and_split_slices() {
    let g = graph(
        vec![
            // x[:, -3:INT64_MAX] and x[-100:1, ::2]
            node("Slice", "tail", &["x", "st", "en", "ax"], &["t"], vec![]),
            node(
                "Slice",
                "head",
                &["x", "st2", "en2", "ax2", "step2"],
                &["h"],
                vec![],
            ),
            node(
                "Split",
                "sp",
                &["x", "sizes"],
                &["p0", "p1"],
                vec![attr_i("axis", 1)],
            ),
        ],
        vec![
            i64_tensor("st", &[1], &[-3]),
            i64_tensor("en", &[1], &[i64::MAX]),
            i64_tensor("ax", &[1], &[-1]),
            i64_tensor("st2", &[2], &[-100, 0]),
            i64_tensor("en2", &[2], &[1, 1000]),
            i64_tensor("ax2", &[2], &[0, 1]),
            i64_tensor("step2", &[2], &[1, 2]),
            i64_tensor("sizes", &[2], &[2, 3]),
        ],
        vec![f32_vi("x", &[2, 5])],
        vec![
            f32_vi("t", &[2, 3]),
            f32_vi("h", &[1, 3]),
            f32_vi("p0", &[2, 2]),
            f32_vi("p1", &[2, 3]),
        ],
    );
    let m = import_ok(&model_bytes(13, g));
    let x = tensor_f32(&[2, 5], &[0., 1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let y = run(&m, &[("x", x)]);
    assert_eq!(y[0].data, vec![2., 3., 4., 7., 8., 9.]);
    assert_eq!(y[1].data, vec![0., 2., 4.]);
    assert_eq!(y[2].data, vec![0., 1., 5., 6.]);
    assert_eq!(y[3].data, vec![2., 3., 4., 7., 8., 9.]);
}

#[test]
fn einsum_with_ellipsis_and_implicit_output() {
    let g = graph(
        vec![
            node(
                "Einsum",
                "e1",
                &["a", "b"],
                &["y1"],
                vec![attr_s("equation", "...ij,...jk->...ik")],
            ),
            node(
                "Einsum",
                "e2",
                &["a"],
                &["y2"],
                vec![attr_s("equation", "bIj")],
            ),
        ],
        vec![f32_tensor("b", &[1, 4, 2], &ramp(8))],
        vec![f32_vi("a", &[3, 2, 4])],
        vec![f32_vi("y1", &[3, 2, 2]), f32_vi("y2", &[2, 3, 4])],
    );
    let m = import_ok(&model_bytes(17, g));
    let a = tensor_f32(&[3, 2, 4], &ramp(24));
    let y = run(&m, &[("a", a.clone())]);
    let b = tensor_f32(&[1, 4, 2], &ramp(8));
    assert!(y[0].max_rel_err(&ref_matmul(&a, &b), 1e-6) < 1e-5);
    // implicit output: letters in alphabetical order, upper case first: "Ibj"
    assert_eq!(y[1].shape, vec![2, 3, 4]);
    let (i, b, j) = (1, 2, 3); // y2[I][b][j] = a[b][I][j]
    assert_eq!(y[1].data[i * 12 + b * 4 + j], a.data[b * 8 + i * 4 + j]);
}

#[test]
fn dropout_forms() {
    let g = graph(
        vec![
            node(
                "Dropout",
                "eval_form",
                &["x", "ratio"],
                &["y0", "mask0"],
                vec![],
            ),
            node(
                "Dropout",
                "train_form",
                &["x", "ratio", "train"],
                &["y1", "mask1"],
                vec![],
            ),
        ],
        vec![
            f32_tensor("ratio", &[], &[0.1]),
            TensorProto {
                name: "train".into(),
                data_type: data_type::BOOL,
                raw_data: vec![1],
                ..Default::default()
            },
        ],
        vec![f32_vi("x", &[2, 3])],
        vec![f32_vi("y0", &[2, 3]), f32_vi("y1", &[2, 3])],
    );
    let m = import_ok(&model_bytes(17, g));
    let g = &m.graph;
    // inference form: the output is the input itself
    assert_eq!(g.outputs[0], g.inputs[0]);
    let drop = g
        .nodes
        .iter()
        .find(|(_, n)| n.op.name() == "dropout")
        .expect("a dropout node");
    let json = serde_json::to_value(&drop.1.op).expect("json");
    assert_eq!(json["training"], true);
    assert_eq!(json["seed"], 1);
    assert!((json["ratio"].as_f64().expect("ratio") - 0.1).abs() < 1e-6);
}

#[test]
fn loss_is_found() {
    let g = graph(
        vec![node(
            "SoftmaxCrossEntropyLoss",
            "sce",
            &["scores", "labels"],
            &["l", "logp"],
            vec![attr_s("reduction", "mean"), attr_i("ignore_index", -100)],
        )],
        vec![],
        vec![
            f32_vi("scores", &[4, 10]),
            vi("labels", data_type::INT64, &[Dim::N(4)]),
        ],
        vec![f32_vi("l", &[]), f32_vi("logp", &[4, 10])],
    );
    let m = import_ok(&model_bytes(17, g));
    let loss = m.loss.expect("a loss");
    assert_eq!(m.graph.values[loss].name, "l");
    assert_eq!(m.graph.ty(loss).shape, Vec::<usize>::new());
}

// ---- inputs and weights ---------------------------------------------------------------------

fn dynamic_model() -> Vec<u8> {
    let g = graph(
        vec![node("Relu", "act", &["x"], &["y"], vec![])],
        vec![],
        vec![vi("x", data_type::FLOAT, &[Dim::Sym("batch"), Dim::N(16)])],
        vec![vi("y", data_type::FLOAT, &[Dim::Sym("batch"), Dim::N(16)])],
    );
    model_bytes(18, g)
}

#[test]
fn dynamic_dims_need_an_override() {
    let e = import_err(&dynamic_model());
    assert_eq!(
        e,
        "input \"x\": dim 0 (\"batch\") is dynamic; give the shape with --input x=SHAPE"
    );
    let opts = ImportOptions {
        input_overrides: vec![InputOverride::new("x", [8, 16], None)],
    };
    let m = import_onnx_bytes(&dynamic_model(), Path::new(""), &opts).expect("import");
    assert_eq!(m.graph.ty(m.graph.outputs[0]).shape, vec![8, 16]);
    let opts = ImportOptions {
        input_overrides: vec![InputOverride::new("input_ids", [8, 16], Some(DType::I64))],
    };
    let e = import_onnx_bytes(&dynamic_model(), Path::new(""), &opts).expect_err("unknown input");
    assert_eq!(
        e.to_string(),
        "input \"input_ids\": no graph input has this name (inputs: x)"
    );
}

/// A temporary directory for one test, removed when dropped.
struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("autopar-onnx-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("temp dir");
        TempDir(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn external(
    name: &str,
    dims: &[i64],
    dt: i32,
    location: &str,
    offset: u64,
    length: u64,
) -> TensorProto {
    let entry = |k: &str, v: String| StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: dt,
        data_location: Some(DATA_LOCATION_EXTERNAL),
        external_data: vec![
            entry("location", location.into()),
            entry("offset", offset.to_string()),
            entry("length", length.to_string()),
        ],
        ..Default::default()
    }
}

#[test]
fn external_data_is_located_not_read() {
    // A 4 GiB weight (65536 x 16384 f32) and a small shape tensor in one external file.
    let big: u64 = 65536 * 16384 * 4;
    let shape_off = big;
    let g = graph(
        vec![
            node("Reshape", "r", &["x", "shape"], &["xr"], vec![]),
            node("MatMul", "mm", &["xr", "w"], &["y"], vec![]),
        ],
        vec![
            external(
                "w",
                &[65536, 16384],
                data_type::FLOAT,
                "weights.bin",
                0,
                big,
            ),
            external(
                "shape",
                &[2],
                data_type::INT64,
                "weights.bin",
                shape_off,
                16,
            ),
        ],
        vec![f32_vi("x", &[2, 65536])],
        vec![f32_vi("y", &[2, 16384])],
    );
    let dir = TempDir::new("ext");
    let path = dir.0.join("model.onnx");
    std::fs::write(&path, model_bytes(18, g)).expect("write model");

    // Data file absent: the weight is planned without data; the shape cannot be read.
    let e = import_onnx(&path, &ImportOptions::default()).expect_err("shape data missing");
    assert!(
        e.to_string()
            .contains("node \"r\" (Reshape): input 1 (\"shape\") must be a constant"),
        "{e}"
    );

    // Present as a sparse file of 4 GiB + 16 bytes: the weight is recorded, the shape is read.
    let data = dir.0.join("weights.bin");
    let f = std::fs::File::create(&data).expect("data file");
    f.set_len(big + 16).expect("sparse file");
    use std::io::{Seek, SeekFrom, Write};
    let mut f = f;
    f.seek(SeekFrom::Start(shape_off)).expect("seek");
    f.write_all(&[2i64.to_le_bytes(), 65536i64.to_le_bytes()].concat())
        .expect("write shape");
    drop(f);
    let t0 = std::time::Instant::now();
    let m = import_onnx(&path, &ImportOptions::default()).expect("import");
    assert!(t0.elapsed().as_secs_f64() < 5.0, "import read the weights?");
    let w = m.graph.find_value("w").expect("w");
    match &m.graph.values[w].def {
        ValueDef::Param {
            data:
                WeightData::External {
                    path,
                    offset,
                    length,
                },
        } => {
            assert!(path.ends_with("weights.bin"), "{path}");
            assert_eq!((*offset, *length), (0, big));
        }
        other => panic!("w is {other:?}"),
    }
    assert_eq!(m.graph.param_count(), 65536 * 16384);

    // A data file too short for the tensors is an error naming the tensor.
    std::fs::File::create(&data)
        .expect("truncate")
        .set_len(100)
        .expect("len");
    let e = import_onnx(&path, &ImportOptions::default()).expect_err("short data");
    assert!(e.to_string().contains("tensor \"w\": external data"), "{e}");
}

#[test]
fn graph_only_weights_import_as_external_for_planning() {
    let g = graph(
        vec![node("MatMul", "mm", &["x", "w"], &["y"], vec![])],
        vec![external(
            "w",
            &[8, 4],
            data_type::FLOAT,
            "gone.data",
            0,
            128,
        )],
        vec![f32_vi("x", &[2, 8])],
        vec![f32_vi("y", &[2, 4])],
    );
    let m = import_ok(&model_bytes(17, g));
    let w = m.graph.find_value("w").expect("w");
    // the missing file is kept: planning never reads it, running names it
    match &m.graph.values[w].def {
        ValueDef::Param {
            data:
                WeightData::External {
                    path,
                    offset: 0,
                    length: 128,
                },
        } => assert!(path.ends_with("gone.data"), "{path}"),
        other => panic!("{other:?}"),
    }
}

// ---- errors ---------------------------------------------------------------------------------

fn small_model() -> Vec<u8> {
    let g = graph(
        vec![node("MatMul", "mm", &["x", "w"], &["y"], vec![])],
        vec![f32_tensor("w", &[4, 3], &ramp(12))],
        vec![f32_vi("x", &[2, 4])],
        vec![f32_vi("y", &[2, 3])],
    );
    model_bytes(17, g)
}

#[test]
fn malformed_protobuf_is_not_an_onnx_model() {
    let bytes = small_model();
    import_ok(&bytes);
    for cut in [bytes.len() / 2, bytes.len() - 1, 3] {
        let e = import_err(&bytes[..cut]);
        assert!(e.starts_with("not an ONNX model: "), "cut at {cut}: {e}");
    }
    let e = import_err(b"this is a text file, not a protobuf");
    assert!(e.starts_with("not an ONNX model: "), "{e}");
    let e = import_onnx(
        Path::new("/nonexistent/model.onnx"),
        &ImportOptions::default(),
    )
    .expect_err("missing file");
    assert!(
        e.to_string()
            .starts_with("/nonexistent/model.onnx: cannot read: "),
        "{e}"
    );
}

#[test]
fn unknown_op_is_named() {
    let g = graph(
        vec![node(
            "FancyAttention",
            "/blocks.0/attn",
            &["x"],
            &["y"],
            vec![],
        )],
        vec![],
        vec![f32_vi("x", &[2, 4])],
        vec![f32_vi("y", &[2, 4])],
    );
    assert_eq!(
        import_err(&model_bytes(17, g)),
        "node \"/blocks.0/attn\" (FancyAttention): unsupported op \"FancyAttention\" (opset 17)"
    );
}

#[test]
fn foreign_domain_is_named() {
    let mut n = node("FusedGelu", "fg", &["x"], &["y"], vec![]);
    n.domain = "com.microsoft".into();
    let g = graph(
        vec![n],
        vec![],
        vec![f32_vi("x", &[2])],
        vec![f32_vi("y", &[2])],
    );
    assert_eq!(
        import_err(&model_bytes(17, g)),
        "node \"fg\" (com.microsoft:FusedGelu): domain \"com.microsoft\": ops outside the \
         default ONNX domain are not supported"
    );
}

#[test]
fn dangling_edge_is_named() {
    let g = graph(
        vec![node("Add", "add", &["x", "nowhere"], &["y"], vec![])],
        vec![],
        vec![f32_vi("x", &[2])],
        vec![f32_vi("y", &[2])],
    );
    assert_eq!(
        import_err(&model_bytes(17, g)),
        "node \"add\" (Add): input \"nowhere\" is never produced (no graph input, initializer or \
         earlier node output has that name)"
    );
    let g = graph(
        vec![],
        vec![],
        vec![f32_vi("x", &[2])],
        vec![f32_vi("y", &[2])],
    );
    assert_eq!(
        import_err(&model_bytes(17, g)),
        "graph output \"y\" is never produced (no node, input or initializer has that name)"
    );
}

#[test]
fn unsupported_opset_is_rejected() {
    let g = graph(
        vec![],
        vec![],
        vec![f32_vi("x", &[2])],
        vec![f32_vi("x", &[2])],
    );
    let e = import_err(&model_bytes(11, g));
    assert!(
        e.starts_with("opset 11 of the default ONNX domain is not supported (supported: 13 to 21)"),
        "{e}"
    );
}

#[test]
fn shape_errors_name_the_onnx_node() {
    let g = graph(
        vec![node(
            "MatMul",
            "/lm_head/MatMul",
            &["x", "w"],
            &["y"],
            vec![],
        )],
        vec![f32_tensor("w", &[5, 3], &ramp(15))],
        vec![f32_vi("x", &[2, 4])],
        vec![f32_vi("y", &[2, 3])],
    );
    let e = import_err(&model_bytes(17, g));
    assert!(e.starts_with("node \"/lm_head/MatMul\" (MatMul): "), "{e}");
    assert!(e.contains("einsum"), "{e}");
    assert!(e.contains("size 4 and 5"), "{e}");
}

#[test]
fn declared_types_are_checked() {
    let g = graph(
        vec![node(
            "Transpose",
            "t",
            &["x"],
            &["y"],
            vec![attr_ints("perm", &[1, 0])],
        )],
        vec![],
        vec![f32_vi("x", &[2, 4])],
        vec![f32_vi("y", &[2, 4])],
    );
    assert_eq!(
        import_err(&model_bytes(17, g)),
        "node \"t\" (Transpose): output \"y\" is inferred as f32[4,2] but the model declares f32[2,4]"
    );
}

#[test]
fn data_dependent_shapes_are_rejected() {
    let g = graph(
        vec![node("NonZero", "nz", &["x"], &["idx"], vec![])],
        vec![],
        vec![f32_vi("x", &[2, 4])],
        vec![vi("idx", data_type::INT64, &[Dim::N(2), Dim::Sym("n")])],
    );
    let e = import_err(&model_bytes(17, g));
    assert!(
        e.starts_with("node \"nz\" (NonZero): data-dependent output shape"),
        "{e}"
    );
    let g = graph(
        vec![node("Reshape", "rs", &["x", "x_shape"], &["y"], vec![])],
        vec![],
        vec![
            f32_vi("x", &[2, 4]),
            vi("x_shape", data_type::INT64, &[Dim::N(2)]),
        ],
        vec![f32_vi("y", &[4, 2])],
    );
    assert_eq!(
        import_err(&model_bytes(17, g)),
        "node \"rs\" (Reshape): input 1 (\"x_shape\") must be a constant known at import time, \
         but it is computed from run-time data"
    );
}

// ---- every lowering -------------------------------------------------------------------------

/// One node of `op` on graph inputs `ins` and initializers `inits`, with outputs declared as
/// `outs` (dtype code, dims): the importer checks its inferred types against them.
fn one_op(
    op: &str,
    ins: &[(&str, i32, &[i64])],
    inits: Vec<TensorProto>,
    attrs: Vec<AttributeProto>,
    outs: &[(i32, &[i64])],
) -> Result<ImportedModel, AnalyzerError> {
    let mut names: Vec<&str> = ins.iter().map(|i| i.0).collect();
    names.extend(inits.iter().map(|t| t.name.as_str()));
    let out_names: Vec<String> = (0..outs.len()).map(|i| format!("y{i}")).collect();
    let out_refs: Vec<&str> = out_names.iter().map(|s| s.as_str()).collect();
    let inputs = ins
        .iter()
        .map(|(n, e, d)| vi(n, *e, &d.iter().map(|&k| Dim::N(k)).collect::<Vec<_>>()))
        .collect();
    let outputs = outs
        .iter()
        .zip(&out_names)
        .map(|((e, d), n)| vi(n, *e, &d.iter().map(|&k| Dim::N(k)).collect::<Vec<_>>()))
        .collect();
    let g = graph(
        vec![node(op, op, &names, &out_refs, attrs)],
        inits,
        inputs,
        outputs,
    );
    import(&model_bytes(20, g))
}

const F: i32 = data_type::FLOAT;
const I: i32 = data_type::INT64;
const B: i32 = data_type::BOOL;

#[test]
fn every_lowering_imports() {
    let x: (&str, i32, &[i64]) = ("x", F, &[2, 3, 4]);
    let p: (&str, i32, &[i64]) = ("p", B, &[2, 3]);
    let q: (&str, i32, &[i64]) = ("q", B, &[2, 3]);
    let img: (&str, i32, &[i64]) = ("img", F, &[2, 3, 8, 8]);
    let ids: (&str, i32, &[i64]) = ("ids", I, &[2, 3]);
    let w = |name: &str, dims: &[i64]| {
        f32_tensor(name, dims, &ramp(dims.iter().product::<i64>() as usize))
    };
    let ints = |name: &str, dims: &[i64], v: &[i64]| i64_tensor(name, dims, v);
    let scalar_f = |name: &str, v: f32| f32_tensor(name, &[], &[v]);
    let bool_t = |name: &str, v: bool| TensorProto {
        name: name.into(),
        data_type: B,
        raw_data: vec![v as u8],
        ..Default::default()
    };
    let mut cases: Vec<(&str, Result<ImportedModel, AnalyzerError>)> = vec![];
    for op in [
        "Abs",
        "Neg",
        "Exp",
        "Log",
        "Sqrt",
        "Reciprocal",
        "Sin",
        "Cos",
        "Tanh",
        "Sigmoid",
        "Relu",
        "Erf",
        "Floor",
        "Ceil",
        "Sign",
        "Softplus",
        "Gelu",
        "Identity",
    ] {
        cases.push((op, one_op(op, &[x], vec![], vec![], &[(F, &[2, 3, 4])])));
    }
    for op in ["IsNaN", "IsInf"] {
        cases.push((op, one_op(op, &[x], vec![], vec![], &[(B, &[2, 3, 4])])));
    }
    cases.push(("Not", one_op("Not", &[p], vec![], vec![], &[(B, &[2, 3])])));
    for op in ["And", "Or", "Xor"] {
        cases.push((op, one_op(op, &[p, q], vec![], vec![], &[(B, &[2, 3])])));
    }
    for op in [
        "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean",
    ] {
        cases.push((
            op,
            one_op(op, &[x], vec![w("c", &[4])], vec![], &[(F, &[2, 3, 4])]),
        ));
    }
    for op in ["Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"] {
        cases.push((
            op,
            one_op(op, &[x], vec![w("c", &[3, 1])], vec![], &[(B, &[2, 3, 4])]),
        ));
    }
    cases.push((
        "Mod",
        one_op(
            "Mod",
            &[ids],
            vec![ints("m", &[], &[3])],
            vec![],
            &[(I, &[2, 3])],
        ),
    ));
    cases.push((
        "Clip",
        one_op(
            "Clip",
            &[x],
            vec![scalar_f("lo", -0.5), scalar_f("hi", 0.5)],
            vec![],
            &[(F, &[2, 3, 4])],
        ),
    ));
    cases.push((
        "Cast",
        one_op(
            "Cast",
            &[x],
            vec![],
            vec![attr_i("to", I as i64)],
            &[(I, &[2, 3, 4])],
        ),
    ));
    cases.push((
        "CastLike",
        one_op("CastLike", &[x, ids], vec![], vec![], &[(I, &[2, 3, 4])]),
    ));
    cases.push((
        "Where",
        one_op(
            "Where",
            &[p, ("a", F, &[2, 3]), ("b", F, &[3])],
            vec![],
            vec![],
            &[(F, &[2, 3])],
        ),
    ));
    for op in [
        "ReduceSum",
        "ReduceMean",
        "ReduceMax",
        "ReduceMin",
        "ReduceSumSquare",
        "ReduceL2",
    ] {
        let axes = vec![ints("axes", &[1], &[-2])];
        cases.push((
            op,
            one_op(op, &[x], axes, vec![attr_i("keepdims", 0)], &[(F, &[2, 4])]),
        ));
    }
    // opset 17 form: axes as an attribute
    cases.push((
        "ReduceMean(attr)",
        one_op(
            "ReduceMean",
            &[x],
            vec![],
            vec![attr_ints("axes", &[-1])],
            &[(F, &[2, 3, 1])],
        ),
    ));
    for op in ["Softmax", "LogSoftmax"] {
        cases.push((
            op,
            one_op(
                op,
                &[x],
                vec![],
                vec![attr_i("axis", 1)],
                &[(F, &[2, 3, 4])],
            ),
        ));
    }
    cases.push((
        "Flatten",
        one_op(
            "Flatten",
            &[x],
            vec![],
            vec![attr_i("axis", 2)],
            &[(F, &[6, 4])],
        ),
    ));
    cases.push((
        "Squeeze",
        one_op(
            "Squeeze",
            &[("s", F, &[2, 1, 4])],
            vec![ints("a", &[1], &[1])],
            vec![],
            &[(F, &[2, 4])],
        ),
    ));
    cases.push((
        "Unsqueeze",
        one_op(
            "Unsqueeze",
            &[x],
            vec![ints("a", &[2], &[0, -1])],
            vec![],
            &[(F, &[1, 2, 3, 4, 1])],
        ),
    ));
    cases.push((
        "Transpose",
        one_op("Transpose", &[x], vec![], vec![], &[(F, &[4, 3, 2])]),
    ));
    cases.push((
        "Tile",
        one_op(
            "Tile",
            &[x],
            vec![ints("r", &[3], &[1, 2, 1])],
            vec![],
            &[(F, &[2, 6, 4])],
        ),
    ));
    cases.push((
        "Pad",
        one_op(
            "Pad",
            &[x],
            vec![ints("pads", &[6], &[0, 1, 0, 0, 2, 3]), scalar_f("v", 1.0)],
            vec![],
            &[(F, &[2, 6, 7])],
        ),
    ));
    cases.push((
        "Expand",
        one_op(
            "Expand",
            &[x],
            vec![ints("s", &[4], &[5, 1, 1, 1])],
            vec![],
            &[(F, &[5, 2, 3, 4])],
        ),
    ));
    cases.push((
        "Concat",
        one_op(
            "Concat",
            &[x, x],
            vec![],
            vec![attr_i("axis", -1)],
            &[(F, &[2, 3, 8])],
        ),
    ));
    cases.push((
        "Gather",
        one_op(
            "Gather",
            &[x, ids],
            vec![],
            vec![attr_i("axis", 1)],
            &[(F, &[2, 2, 3, 4])],
        ),
    ));
    cases.push((
        "GatherND",
        one_op(
            "GatherND",
            &[x, ("i", I, &[5, 2])],
            vec![],
            vec![],
            &[(F, &[5, 4])],
        ),
    ));
    cases.push((
        "ScatterElements",
        one_op(
            "ScatterElements",
            &[x],
            vec![ints("i", &[1, 1, 4], &[0, 2, 1, 0]), w("u", &[1, 1, 4])],
            vec![attr_i("axis", 1), attr_s("reduction", "add")],
            &[(F, &[2, 3, 4])],
        ),
    ));
    cases.push((
        "ScatterND",
        one_op(
            "ScatterND",
            &[x],
            vec![ints("i", &[2, 1], &[1, 0]), w("u", &[2, 3, 4])],
            vec![],
            &[(F, &[2, 3, 4])],
        ),
    ));
    cases.push((
        "OneHot",
        one_op(
            "OneHot",
            &[ids],
            vec![ints("depth", &[], &[5]), w("vals", &[2])],
            vec![],
            &[(F, &[2, 3, 5])],
        ),
    ));
    cases.push((
        "TopK",
        one_op(
            "TopK",
            &[x],
            vec![ints("k", &[1], &[2])],
            vec![attr_i("axis", 1)],
            &[(F, &[2, 2, 4]), (I, &[2, 2, 4])],
        ),
    ));
    cases.push((
        "NonZero",
        one_op(
            "NonZero",
            &[],
            vec![ints("c", &[2, 2], &[0, 3, 4, 0])],
            vec![],
            &[(I, &[2, 2])],
        ),
    ));
    cases.push((
        "Conv",
        one_op(
            "Conv",
            &[img],
            vec![w("k", &[6, 3, 3, 3]), w("bias", &[6])],
            vec![
                attr_ints("strides", &[2, 2]),
                attr_s("auto_pad", "SAME_UPPER"),
            ],
            &[(F, &[2, 6, 4, 4])],
        ),
    ));
    cases.push((
        "MaxPool",
        one_op(
            "MaxPool",
            &[img],
            vec![],
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_ints("pads", &[1, 1, 1, 1]),
            ],
            &[(F, &[2, 3, 4, 4])],
        ),
    ));
    cases.push((
        "AveragePool",
        one_op(
            "AveragePool",
            &[img],
            vec![],
            vec![
                attr_ints("kernel_shape", &[3, 3]),
                attr_ints("strides", &[2, 2]),
                attr_i("ceil_mode", 1),
            ],
            &[(F, &[2, 3, 4, 4])],
        ),
    ));
    for op in ["GlobalAveragePool", "GlobalMaxPool"] {
        cases.push((
            op,
            one_op(op, &[img], vec![], vec![], &[(F, &[2, 3, 1, 1])]),
        ));
    }
    let bn = || vec![w("s", &[3]), w("b", &[3]), w("mean", &[3]), w("var", &[3])];
    cases.push((
        "BatchNormalization",
        one_op(
            "BatchNormalization",
            &[img],
            bn(),
            vec![],
            &[(F, &[2, 3, 8, 8])],
        ),
    ));
    cases.push((
        "BatchNormalization(train)",
        one_op(
            "BatchNormalization",
            &[img],
            bn(),
            vec![attr_i("training_mode", 1)],
            &[(F, &[2, 3, 8, 8]), (F, &[3]), (F, &[3])],
        ),
    ));
    cases.push((
        "LayerNormalization",
        one_op(
            "LayerNormalization",
            &[x],
            vec![w("s", &[3, 4]), w("b", &[3, 4])],
            vec![attr_i("axis", 1)],
            &[(F, &[2, 3, 4]), (F, &[2, 1, 1]), (F, &[2, 1, 1])],
        ),
    ));
    cases.push((
        "Shape",
        one_op(
            "Shape",
            &[x],
            vec![],
            vec![attr_i("start", -2)],
            &[(I, &[2])],
        ),
    ));
    cases.push(("Size", one_op("Size", &[x], vec![], vec![], &[(I, &[])])));
    cases.push((
        "ConstantOfShape",
        one_op(
            "ConstantOfShape",
            &[],
            vec![ints("s", &[2], &[512, 512])],
            vec![],
            &[(F, &[512, 512])],
        ),
    ));
    cases.push((
        "Constant",
        one_op(
            "Constant",
            &[],
            vec![],
            vec![attr_ints("value_ints", &[1, 2, 3])],
            &[(I, &[3])],
        ),
    ));
    cases.push((
        "Range",
        one_op(
            "Range",
            &[],
            vec![scalar_f("a", 1.0), scalar_f("b", 2.0), scalar_f("d", 0.25)],
            vec![],
            &[(F, &[4])],
        ),
    ));
    cases.push((
        "Dropout(train)",
        one_op(
            "Dropout",
            &[x],
            vec![scalar_f("r", 0.2), bool_t("t", true)],
            vec![],
            &[(F, &[2, 3, 4]), (B, &[2, 3, 4])],
        ),
    ));
    cases.push((
        "SoftmaxCrossEntropyLoss(none)",
        one_op(
            "SoftmaxCrossEntropyLoss",
            &[x, ("lab", I, &[2, 4])],
            vec![],
            vec![attr_s("reduction", "none")],
            &[(F, &[2, 4]), (F, &[2, 3, 4])],
        ),
    ));
    cases.push((
        "Split(num_outputs)",
        one_op(
            "Split",
            &[("v", F, &[7])],
            vec![],
            vec![attr_i("num_outputs", 3)],
            &[(F, &[3]), (F, &[3]), (F, &[1])],
        ),
    ));
    cases.push((
        "MatMul",
        one_op(
            "MatMul",
            &[x],
            vec![w("m", &[4, 5])],
            vec![],
            &[(F, &[2, 3, 5])],
        ),
    ));
    cases.push((
        "Gemm",
        one_op(
            "Gemm",
            &[("a", F, &[4, 3])],
            vec![w("m", &[4, 5])],
            vec![attr_i("transA", 1)],
            &[(F, &[3, 5])],
        ),
    ));
    cases.push((
        "Einsum",
        one_op(
            "Einsum",
            &[x],
            vec![w("m", &[4, 5])],
            vec![attr_s("equation", "bsk,kn->bns")],
            &[(F, &[2, 5, 3])],
        ),
    ));
    let mut failures = vec![];
    for (name, r) in &cases {
        if let Err(e) = r {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // every entry of the dispatch table is exercised above (or by the tests before)
    let covered: Vec<&str> = cases
        .iter()
        .map(|(n, _)| n.split('(').next().unwrap_or(n))
        .collect();
    for (op, _) in autopar_analyzer::onnx::ops::TABLE {
        assert!(
            covered.contains(op) || ["Reshape", "Slice"].contains(op),
            "{op} has no case"
        );
    }
}

#[test]
fn constant_non_zero_evaluates_and_range_is_exact() {
    let m = one_op(
        "NonZero",
        &[],
        vec![i64_tensor("c", &[2, 2], &[0, 3, 4, 0])],
        vec![],
        &[(I, &[2, 2])],
    )
    .expect("import");
    let v = m.graph.outputs[0];
    let t = m.graph.const_value(v).expect("a constant");
    assert_eq!(t.to_i64_vec(), vec![0, 1, 1, 0]);
    let m = one_op(
        "Range",
        &[],
        vec![
            i64_tensor("a", &[], &[10]),
            i64_tensor("b", &[], &[1]),
            i64_tensor("d", &[], &[-3]),
        ],
        vec![],
        &[(I, &[3])],
    )
    .expect("import");
    let t = m.graph.const_value(m.graph.outputs[0]).expect("a constant");
    assert_eq!(t.to_i64_vec(), vec![10, 7, 4]);
}
