//! The exported ONNX files run in tract and agree with `covey-infer`.

use covey_infer::{LlamaConfig, Model, Precision, random_tensors};
use covey_onnx::{ExportOptions, OnnxError, WeightFormat, export, export_to_file};
use covey_tensors::NamedTensors;
use covey_tensors::quant::Int8Tensor;
use tract_onnx::prelude::*;

/// Logits of `ids` (batch 1) from ONNX `bytes`, loaded with a concrete `[1, len]` input.
fn tract_logits(bytes: &[u8], ids: &[u32]) -> TractResult<Vec<Vec<f32>>> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])?
        .with_input_fact(0, InferenceFact::dt_shape(i64::datum_type(), tvec![1, ids.len()]))?
        .into_optimized()?
        .into_runnable()?;
    run(&model, ids)
}

fn run(model: &Arc<TypedRunnableModel>, ids: &[u32]) -> TractResult<Vec<Vec<f32>>> {
    let input =
        tract_ndarray::Array2::<i64>::from_shape_vec((1, ids.len()), ids.iter().map(|&i| i64::from(i)).collect())?;
    let out = model.run(tvec!(input.into_tensor().into_tvalue()))?;
    let view = out[0].to_plain_array_view::<f32>()?;
    let shape = view.shape().to_vec();
    assert_eq!(shape[..2], [1, ids.len()], "logits shape {shape:?}");
    let values: Vec<f32> = view.iter().copied().collect();
    Ok(values.chunks(shape[2]).map(<[f32]>::to_vec).collect())
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

fn ids(len: usize) -> Vec<u32> {
    (0..len).map(|i| ((i * 89 + 7) % 256) as u32).collect()
}

/// `covey-infer`'s model at `precision`, as an ONNX export computes it: ONNX's int8 weights
/// are dequantized to f32 (`DequantizeLinear`) and multiply f32 activations, where
/// covey-infer's int8 engine also rounds the activations to int8. So the int8 reference
/// is covey-infer's f32 engine on covey-infer's int8 codes (every matrix quantized and
/// dequantized per output channel, as its int8 engine holds them).
fn reference(config: &LlamaConfig, tensors: &NamedTensors, precision: Precision) -> Model {
    let tensors: NamedTensors = match precision {
        Precision::F32 => tensors.clone(),
        Precision::Int8 => tensors
            .iter()
            .map(|(name, t)| {
                let t =
                    if t.shape.len() == 2 { Int8Tensor::quantize(t).expect("finite").dequantize() } else { t.clone() };
                (name.clone(), t)
            })
            .collect(),
        Precision::Int4 => unreachable!("ONNX export has no int4"),
    };
    Model::from_tensors(config.clone(), &tensors, Precision::F32).expect("covey-infer model")
}

/// Export with `options`, run at sequence lengths 1 and 7 from the same bytes, and compare
/// with `covey-infer` at `precision`. Returns the byte count and the largest difference.
fn check(config: &LlamaConfig, tensors: &NamedTensors, options: &ExportOptions, precision: Precision) -> (usize, f32) {
    let bytes = export(config, tensors, options).expect("export");
    let reference = reference(config, tensors, precision);
    let mut worst = 0.0f32;
    for len in [1, 7] {
        let ids = ids(len);
        let want = reference.logits(&ids).expect("covey-infer logits");
        let got = tract_logits(&bytes, &ids).expect("tract runs the export");
        let diff = max_abs_diff(&got, &want);
        eprintln!(
            "weights {:?} (opset {}) vs covey-infer {precision:?}, tied={}, len {len}: max |Δ| = {diff:e}",
            options.weights, options.opset, config.tie_word_embeddings
        );
        assert!(diff <= 1e-3, "len {len}: max abs difference {diff}");
        worst = worst.max(diff);
    }
    (bytes.len(), worst)
}

fn untied() -> LlamaConfig {
    LlamaConfig { tie_word_embeddings: false, ..LlamaConfig::tiny() }
}

#[test]
fn f32_export_matches_covey_infer_tied_and_untied() {
    for config in [LlamaConfig::tiny(), untied()] {
        let tensors = random_tensors(&config, 5);
        check(&config, &tensors, &ExportOptions::default(), Precision::F32);
    }
}

#[test]
fn int8_export_matches_covey_infer_int8_and_is_small() {
    for config in [LlamaConfig::tiny(), untied()] {
        let tensors = random_tensors(&config, 6);
        let (f32_len, _) = check(&config, &tensors, &ExportOptions::default(), Precision::F32);
        let int8 = ExportOptions { weights: WeightFormat::Int8, ..ExportOptions::default() };
        let (int8_len, _) = check(&config, &tensors, &int8, Precision::Int8);
        eprintln!("tied={}: f32 {f32_len} bytes, int8 {int8_len} bytes", config.tie_word_embeddings);
        // The tiny model's ~20 KB of graph structure (names, attributes) weighs as much as
        // its int8 weights, so the ratio is only ~0.45 here; see the student-size test.
        assert!(int8_len * 2 < f32_len, "int8 {int8_len} bytes vs f32 {f32_len}");
    }
}

#[test]
fn int8_file_is_about_a_quarter_of_f32_at_student_size() {
    // The default configuration is the ~3.2 M parameter student; export only (no run).
    let config = LlamaConfig::default();
    let tensors = random_tensors(&config, 13);
    let f32_len = export(&config, &tensors, &ExportOptions::default()).expect("f32").len();
    let int8 = ExportOptions { weights: WeightFormat::Int8, ..ExportOptions::default() };
    let int8_len = export(&config, &tensors, &int8).expect("int8").len();
    eprintln!("student: f32 {f32_len} bytes, int8 {int8_len} bytes ({:.3})", int8_len as f64 / f32_len as f64);
    assert!(int8_len * 10 < f32_len * 3, "int8 {int8_len} bytes vs f32 {f32_len}");
}

#[test]
fn newer_opsets_run_too() {
    // From opset 18 ReduceMean takes its axes as an input.
    let config = LlamaConfig::tiny();
    let tensors = random_tensors(&config, 8);
    for opset in [18, 21] {
        let options = ExportOptions { opset, weights: WeightFormat::Int8, ..ExportOptions::default() };
        check(&config, &tensors, &options, Precision::Int8);
    }
}

#[test]
fn one_symbolic_model_serves_every_length() {
    let config = LlamaConfig::tiny();
    let tensors = random_tensors(&config, 9);
    let bytes = export(&config, &tensors, &ExportOptions::default()).expect("export");
    let model = tract_onnx::onnx().model_for_read(&mut &bytes[..]).expect("load");
    let seq = model.symbols.sym("S");
    let fact = InferenceFact::dt_shape(i64::datum_type(), tvec![1.to_dim(), seq.to_dim()]);
    let runnable = model
        .with_input_fact(0, fact)
        .expect("fact")
        .into_optimized()
        .expect("optimize with a symbolic sequence")
        .into_runnable()
        .expect("runnable");
    let reference = Model::from_tensors(config, &tensors, Precision::F32).expect("model");
    for len in [1, 3, 7, 16] {
        let ids = ids(len);
        let got = run(&runnable, &ids).expect("run");
        let diff = max_abs_diff(&got, &reference.logits(&ids).expect("logits"));
        assert!(diff <= 1e-3, "len {len}: {diff}");
    }
}

#[test]
fn batches_of_several_sequences_run_row_by_row() {
    let config = untied();
    let tensors = random_tensors(&config, 14);
    let int8 = ExportOptions { weights: WeightFormat::Int8, ..ExportOptions::default() };
    let bytes = export(&config, &tensors, &int8).expect("export");
    let (batch, len) = (3, 5);
    let rows: Vec<Vec<u32>> =
        (0..batch).map(|b| (0..len).map(|i| ((b * 31 + i * 7 + 1) % 256) as u32).collect()).collect();
    let model = tract_onnx::onnx()
        .model_for_read(&mut &bytes[..])
        .expect("load")
        .with_input_fact(0, InferenceFact::dt_shape(i64::datum_type(), tvec![batch, len]))
        .expect("fact")
        .into_optimized()
        .expect("optimize")
        .into_runnable()
        .expect("runnable");
    let flat: Vec<i64> = rows.iter().flatten().map(|&i| i64::from(i)).collect();
    let input = tract_ndarray::Array2::<i64>::from_shape_vec((batch, len), flat).expect("input");
    let out = model.run(tvec!(input.into_tensor().into_tvalue())).expect("run");
    let view = out[0].to_plain_array_view::<f32>().expect("f32 logits");
    assert_eq!(view.shape(), [batch, len, config.vocab_size]);
    let reference = reference(&config, &tensors, Precision::Int8);
    for (b, ids) in rows.iter().enumerate() {
        let want = reference.logits(ids).expect("logits");
        for (t, row) in want.iter().enumerate() {
            for (v, &w) in row.iter().enumerate() {
                let got = view[[b, t, v]];
                assert!((got - w).abs() <= 1e-3, "batch {b} position {t} token {v}: {got} vs {w}");
            }
        }
    }
}

#[test]
fn export_to_file_writes_the_same_bytes() {
    let config = LlamaConfig::tiny();
    let tensors = random_tensors(&config, 10);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tiny.onnx");
    let n = export_to_file(&config, &tensors, &ExportOptions::default(), &path).expect("write");
    let on_disk = std::fs::read(&path).expect("read back");
    assert_eq!(n, on_disk.len());
    assert_eq!(on_disk, export(&config, &tensors, &ExportOptions::default()).expect("export"));
}

#[test]
fn missing_and_misshapen_tensors_and_old_opsets_are_refused() {
    let config = LlamaConfig::tiny();
    let mut tensors = random_tensors(&config, 12);

    let err =
        export(&config, &tensors, &ExportOptions { opset: 16, ..ExportOptions::default() }).expect_err("opset 16");
    assert!(matches!(err, OnnxError::UnsupportedOpset { opset: 16, .. }), "{err}");
    assert!(err.to_string().contains("16"), "{err}");

    let name = "model.layers.1.self_attn.k_proj.weight";
    tensors.insert(name.into(), covey_tensors::HostTensor::zeros(&[32, 32]));
    let err = export(&config, &tensors, &ExportOptions::default()).expect_err("wrong shape");
    assert!(matches!(&err, OnnxError::ShapeMismatch { name: n, .. } if n == name), "{err}");
    let text = err.to_string();
    assert!(text.contains(name) && text.contains("[16, 32]"), "{text}");

    tensors.remove(name);
    let err = export(&config, &tensors, &ExportOptions::default()).expect_err("missing");
    assert!(matches!(&err, OnnxError::MissingTensor(n) if n == name), "{err}");
    assert!(err.to_string().contains(name), "{err}");

    let untied = untied();
    let tensors = random_tensors(&LlamaConfig::tiny(), 12);
    let err = export(&untied, &tensors, &ExportOptions::default()).expect_err("no lm_head");
    assert!(err.to_string().contains("lm_head.weight"), "{err}");
}
