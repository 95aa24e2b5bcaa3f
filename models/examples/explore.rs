use autopar_analyzer::onnx::{import_onnx, ImportOptions};
use autopar_analyzer::{ValueDef, WeightData};
fn main() {
    for p in std::env::args().skip(1) {
        let m = import_onnx(std::path::Path::new(&p), &ImportOptions::default()).unwrap();
        println!("== {p}: {} nodes", m.graph.nodes.len());
        for (v, d) in m.graph.values.iter() {
            match &d.def {
                ValueDef::Param { data } | ValueDef::Buffer { data } => println!("{v} {:?} {} {}", d.name, d.ty, matches!(data, WeightData::Inline(_))),
                ValueDef::Input => println!("{v} input {:?} {}", d.name, d.ty),
                _ => {}
            }
        }
    }
}
