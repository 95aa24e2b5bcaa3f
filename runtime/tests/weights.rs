//! Weights: loading (inline, external, seeded init), shard/unshard, safetensors checkpoints.

use autopar_analyzer::{DType, TensorType, WeightData};
use autopar_runtime::weights::{
    init_weight, load_safetensors, load_weight, save_safetensors, shard, unshard, WeightError,
};
use autopar_solver::mesh::Mesh;
use autopar_solver::spec::ShardingSpec;
use autopar_solver::strategy::storage_specs;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

fn mesh(shape: &[usize]) -> Mesh {
    Mesh {
        shape: shape.to_vec(),
        links: vec![],
    }
}

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn inline_bytes_decode_in_any_dtype() {
    let ty = TensorType::new(DType::F32, vec![2, 2]);
    let vals = [1.0f32, -2.5, 3.25, 0.0];
    let data = WeightData::Inline(Arc::new(le_f32(&vals)));
    let got = load_weight("w", &ty, &data, Path::new("."), 0).unwrap();
    assert_eq!(got, vals);

    let ty = TensorType::new(DType::I64, vec![3]);
    let bytes: Vec<u8> = [7i64, -1, 42]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let got = load_weight(
        "idx",
        &ty,
        &WeightData::Inline(Arc::new(bytes)),
        Path::new("."),
        0,
    )
    .unwrap();
    assert_eq!(got, vec![7.0, -1.0, 42.0]);

    // bf16 1.0 = 0x3f80
    let ty = TensorType::new(DType::BF16, vec![1]);
    let got = load_weight(
        "b",
        &ty,
        &WeightData::Inline(Arc::new(vec![0x80, 0x3f])),
        Path::new("."),
        0,
    )
    .unwrap();
    assert_eq!(got, vec![1.0]);

    let err = load_weight(
        "short.weight",
        &TensorType::new(DType::F32, vec![4]),
        &WeightData::Inline(Arc::new(vec![0; 12])),
        Path::new("."),
        0,
    )
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::SizeMismatch { .. }), "{msg}");
    assert!(msg.contains("short.weight") && msg.contains("16"), "{msg}");
}

#[test]
fn external_data_is_read_at_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let vals = [0.5f32, 1.5, -3.0, 8.0, 9.0, 10.0];
    let mut f = std::fs::File::create(dir.path().join("model.data")).unwrap();
    f.write_all(&[0xAB; 12]).unwrap(); // another tensor before ours
    f.write_all(&le_f32(&vals)).unwrap();
    f.write_all(&[0xCD; 8]).unwrap(); // and one after
    drop(f);
    let ty = TensorType::new(DType::F32, vec![2, 3]);
    let data = WeightData::External {
        path: "model.data".into(),
        offset: 12,
        length: 24,
    };
    let got = load_weight("fc.weight", &ty, &data, dir.path(), 0).unwrap();
    assert_eq!(got, vals);
}

#[test]
fn external_errors_name_the_weight_and_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let ty = TensorType::new(DType::F32, vec![4]);

    let missing = WeightData::External {
        path: "nowhere.bin".into(),
        offset: 0,
        length: 16,
    };
    let err = load_weight("enc.bias", &ty, &missing, dir.path(), 0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::ExternalIo { .. }), "{msg}");
    assert!(
        msg.contains("enc.bias") && msg.contains("nowhere.bin"),
        "{msg}"
    );

    std::fs::write(dir.path().join("short.bin"), [0u8; 20]).unwrap();
    let short = WeightData::External {
        path: "short.bin".into(),
        offset: 8,
        length: 16,
    };
    let err = load_weight("enc.bias", &ty, &short, dir.path(), 0).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, WeightError::ShortRead { .. }), "{msg}");
    assert!(
        msg.contains("enc.bias") && msg.contains("short.bin") && msg.contains("8..24"),
        "{msg}"
    );

    let wrong_len = WeightData::External {
        path: "short.bin".into(),
        offset: 0,
        length: 12,
    };
    let err = load_weight("enc.bias", &ty, &wrong_len, dir.path(), 0).unwrap_err();
    assert!(matches!(err, WeightError::SizeMismatch { .. }), "{err}");
}

#[test]
fn seeded_init_is_deterministic_and_depends_on_name_and_seed() {
    let ty = TensorType::new(DType::F32, vec![64, 32]);
    let a = load_weight("h.0.attn.w", &ty, &WeightData::Absent, Path::new("."), 7).unwrap();
    let b = load_weight("h.0.attn.w", &ty, &WeightData::Absent, Path::new("."), 7).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, init_weight("h.1.attn.w", &ty, 7));
    assert_ne!(a, init_weight("h.0.attn.w", &ty, 8));
    // roughly N(0, 0.02)
    let n = a.len() as f64;
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    assert!(mean.abs() < 0.002, "mean {mean}");
    assert!((std - 0.02).abs() < 0.002, "std {std}");
    assert!(a.iter().all(|v| v.is_finite()));

    let v = TensorType::new(DType::F32, vec![5]);
    assert_eq!(init_weight("ln_1.bias", &v, 1), vec![0.0; 5]);
    assert_eq!(init_weight("ln_1.weight", &v, 1), vec![1.0; 5]);
    assert_eq!(init_weight("bn.running_mean", &v, 1), vec![0.0; 5]);
    assert_eq!(init_weight("bn.running_var", &v, 1), vec![1.0; 5]);
    let i = TensorType::new(DType::I64, vec![]);
    assert_eq!(init_weight("bn.num_batches_tracked", &i, 1), vec![0.0]);
}

#[test]
fn known_small_shard() {
    let full: Vec<f32> = (0..8).map(|v| v as f32).collect();
    let m = mesh(&[2]);
    let spec: ShardingSpec = "S0R".parse().unwrap();
    assert_eq!(
        shard(&full, &[4, 2], &spec, &m, 0).unwrap(),
        vec![0.0, 1.0, 2.0, 3.0]
    );
    assert_eq!(
        shard(&full, &[4, 2], &spec, &m, 1).unwrap(),
        vec![4.0, 5.0, 6.0, 7.0]
    );
    // columns over axis 1 of a 2x2 mesh, replicated over axis 0
    let m = mesh(&[2, 2]);
    let spec: ShardingSpec = "RS1".parse().unwrap();
    assert_eq!(
        shard(&full, &[4, 2], &spec, &m, 3).unwrap(),
        vec![1.0, 3.0, 5.0, 7.0]
    );
    // dim 0 over axes [1, 0]: axis 1 major, so rank 1 (coords (0, 1)) holds block 2
    let full: Vec<f32> = (0..4).map(|v| v as f32).collect();
    let spec: ShardingSpec = "S10".parse().unwrap();
    assert_eq!(shard(&full, &[4], &spec, &m, 1).unwrap(), vec![2.0]);
    assert_eq!(shard(&full, &[4], &spec, &m, 2).unwrap(), vec![1.0]);
}

#[test]
fn shard_unshard_round_trips_for_every_storage_spec() {
    let mut checked = 0;
    for mshape in [vec![2], vec![2, 2], vec![2, 4]] {
        let m = mesh(&mshape);
        for shape in [vec![8, 12], vec![4, 6, 8], vec![16], vec![]] {
            let n: usize = shape.iter().product();
            let full: Vec<f32> = (0..n).map(|v| v as f32 * 0.5 - 3.0).collect();
            for spec in storage_specs(&shape, &m) {
                let local = spec.local_numel(&shape, &m);
                let shards: Vec<Vec<f32>> = (0..m.num_devices())
                    .map(|r| shard(&full, &shape, &spec, &m, r).unwrap())
                    .collect();
                assert!(shards.iter().all(|s| s.len() == local), "{spec} {shape:?}");
                // ranks differing only on an unused axis hold identical shards
                let distinct: std::collections::BTreeSet<Vec<u32>> = shards
                    .iter()
                    .map(|s| s.iter().map(|v| v.to_bits()).collect())
                    .collect();
                assert_eq!(distinct.len(), spec.shard_count(&m), "{spec} {shape:?}");
                let back = unshard(&shards, &shape, &spec, &m).unwrap();
                assert_eq!(back, full, "{spec} {shape:?} on {}", m.name());
                checked += 1;
            }
        }
    }
    assert!(checked > 40, "only {checked} specs checked");
}

#[test]
fn bad_layouts_are_errors() {
    let m = mesh(&[2]);
    let full = vec![0.0f32; 8];
    let partial: ShardingSpec = "RR+P0".parse().unwrap();
    let err = shard(&full, &[4, 2], &partial, &m, 0).unwrap_err();
    assert!(err.to_string().contains("partial"), "{err}");
    let spec: ShardingSpec = "S0R".parse().unwrap();
    assert!(
        shard(&full, &[4, 2], &spec, &m, 2).is_err(),
        "rank off the mesh"
    );
    assert!(
        shard(&full[..6], &[4, 2], &spec, &m, 0).is_err(),
        "wrong length"
    );
    assert!(
        shard(&full[..6], &[3, 2], &spec, &m, 0).is_err(),
        "not divisible"
    );
    let err = unshard(&[vec![0.0; 4], vec![0.0; 3]], &[4, 2], &spec, &m).unwrap_err();
    assert!(err.to_string().contains("rank 1"), "{err}");
    assert!(
        unshard(&[vec![0.0; 4]], &[4, 2], &spec, &m).is_err(),
        "too few shards"
    );
}

#[test]
fn safetensors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ckpt.safetensors");
    let tensors = vec![
        (
            "wte".to_string(),
            vec![3, 2],
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        ),
        ("ln_f.bias".to_string(), vec![2], vec![0.25, -0.5]),
        ("scale".to_string(), vec![], vec![7.0]),
    ];
    save_safetensors(&path, &tensors).unwrap();
    let mut want = tensors.clone();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(load_safetensors(&path).unwrap(), want);

    let bad = vec![("x".to_string(), vec![2, 2], vec![1.0])];
    let err = save_safetensors(&path, &bad).unwrap_err();
    assert!(err.to_string().contains("\"x\""), "{err}");
}

#[test]
fn corrupt_safetensors_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    let err = load_safetensors(&path).unwrap_err();
    assert!(err.to_string().contains("bad.safetensors"), "{err}");

    // a valid file cut short
    let good = dir.path().join("good.safetensors");
    save_safetensors(&good, &[("w".to_string(), vec![4], vec![1.0; 4])]).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    assert!(load_safetensors(&path).is_err());

    let err = load_safetensors(&dir.path().join("absent.safetensors")).unwrap_err();
    assert!(err.to_string().contains("absent.safetensors"), "{err}");
}
