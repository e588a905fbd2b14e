//! Builds the ONNX graph of the decoder, node by node.

use covey_infer::LlamaConfig;
use covey_tensors::NamedTensors;
use covey_tensors::quant::Int8Tensor;

use crate::proto::{
    AttributeProto, GraphProto, NodeProto, TensorProto, TensorShapeProto, TypeProto, ValueInfoProto, attribute_type,
    data_type, tensor_shape_proto, type_proto,
};
use crate::{OnnxError, WeightFormat};

/// Name of the graph input.
pub(crate) const INPUT: &str = "input_ids";
/// Name of the graph output.
pub(crate) const OUTPUT: &str = "logits";
/// Added to the attention scores of future positions before the softmax: far below any
/// real score, yet finite (so an all-masked row could never produce NaN).
const MASK_VALUE: f32 = -1.0e9;

/// Accumulates nodes and initializers.
struct Builder {
    opset: i64,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
}

fn attr_int(name: &str, i: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INT, i, ..Default::default() }
}

fn attr_ints(name: &str, ints: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INTS, ints: ints.to_vec(), ..Default::default() }
}

fn dims(shape: &[usize]) -> Vec<i64> {
    // Shapes come from a validated configuration: every dimension fits an i64.
    shape.iter().map(|&d| d as i64).collect()
}

impl Builder {
    /// Add a single-output node; its output value has the node's name, which is returned.
    fn node(&mut self, op: &str, name: &str, inputs: &[&str], attribute: Vec<AttributeProto>) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| (*s).to_string()).collect(),
            output: vec![name.to_string()],
            name: name.to_string(),
            op_type: op.to_string(),
            attribute,
            ..Default::default()
        });
        name.to_string()
    }

    fn initializer(&mut self, name: &str, data_type: i32, shape: &[usize], raw_data: Vec<u8>, doc: &str) -> String {
        self.initializers.push(TensorProto {
            dims: dims(shape),
            data_type,
            name: name.to_string(),
            doc_string: doc.to_string(),
            raw_data,
            ..Default::default()
        });
        name.to_string()
    }

    fn f32_init(&mut self, name: &str, shape: &[usize], data: &[f32], doc: &str) -> String {
        let raw = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(name, data_type::FLOAT, shape, raw, doc)
    }

    fn i64_init(&mut self, name: &str, shape: &[usize], data: &[i64]) -> String {
        let raw = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(name, data_type::INT64, shape, raw, "")
    }

    fn i8_init(&mut self, name: &str, shape: &[usize], data: &[i8], doc: &str) -> String {
        let raw = data.iter().map(|&x| x.to_le_bytes()[0]).collect();
        self.initializer(name, data_type::INT8, shape, raw, doc)
    }

    /// `x` with a new axis at each of `axes` (axes are an input since opset 13).
    fn unsqueeze(&mut self, name: &str, x: &str, axes: &str) -> String {
        self.node("Unsqueeze", name, &[x, axes], vec![])
    }

    /// `x / sqrt(mean(x², last axis) + eps) * weight`.
    fn rms_norm(&mut self, prefix: &str, x: &str, weight: &str, consts: &Consts) -> String {
        let sq = self.node("Mul", &format!("{prefix}.square"), &[x, x], vec![]);
        let mean = if self.opset >= 18 {
            self.node("ReduceMean", &format!("{prefix}.mean"), &[&sq, &consts.axis_last], vec![attr_int("keepdims", 1)])
        } else {
            self.node(
                "ReduceMean",
                &format!("{prefix}.mean"),
                &[&sq],
                vec![attr_ints("axes", &[-1]), attr_int("keepdims", 1)],
            )
        };
        let var = self.node("Add", &format!("{prefix}.add_eps"), &[&mean, &consts.eps], vec![]);
        let rms = self.node("Sqrt", &format!("{prefix}.sqrt"), &[&var], vec![]);
        let normed = self.node("Div", &format!("{prefix}.normalize"), &[x, &rms], vec![]);
        self.node("Mul", prefix, &[&normed, weight], vec![])
    }

    /// Rotate-half RoPE on the last axis (`head_dim`) of `x`.
    fn rope(&mut self, prefix: &str, x: &str, consts: &Consts) -> String {
        let first = self.node(
            "Slice",
            &format!("{prefix}.first_half"),
            &[x, &consts.zero, &consts.half, &consts.axis_last],
            vec![],
        );
        let second = self.node(
            "Slice",
            &format!("{prefix}.second_half"),
            &[x, &consts.half, &consts.head_dim, &consts.axis_last],
            vec![],
        );
        let neg = self.node("Neg", &format!("{prefix}.neg_second_half"), &[&second], vec![]);
        let rotated =
            self.node("Concat", &format!("{prefix}.rotate_half"), &[&neg, &first], vec![attr_int("axis", -1)]);
        let a = self.node("Mul", &format!("{prefix}.x_cos"), &[x, &consts.cos], vec![]);
        let b = self.node("Mul", &format!("{prefix}.rot_sin"), &[&rotated, &consts.sin], vec![]);
        self.node("Add", prefix, &[&a, &b], vec![])
    }
}

/// Values shared by every layer.
struct Consts {
    /// `[-1]`: the last axis, as an `axes` input.
    axis_last: String,
    /// `[0]`, `[head_dim / 2]`, `[head_dim]`: slice bounds on the last axis.
    zero: String,
    half: String,
    head_dim: String,
    /// `rms_norm_eps` as an f32 scalar.
    eps: String,
    /// `1 / sqrt(head_dim)` as an f32 scalar.
    scale: String,
    /// Large negative f32 scalar for masked scores.
    mask_value: String,
    /// `[seq, head_dim]` cos and sin of the RoPE angles.
    cos: String,
    sin: String,
    /// `[seq, seq]` bool, true where the key is after the query.
    future: String,
    /// Reshape targets `[0, 0, kv_heads, group, head_dim]`, `[0, 0, kv_heads, 1, head_dim]`,
    /// `[0, 0, heads · head_dim]`.
    q_shape: String,
    kv_shape: String,
    merged_shape: String,
}

/// A 2-D weight's value as a `[in, out]` f32 matrix ready for `MatMul`, read from the
/// initializer `name` (stored as Hugging Face `[out, in]`).
fn matmul_weight(
    b: &mut Builder,
    tensors: &NamedTensors,
    name: &str,
    format: WeightFormat,
) -> Result<String, OnnxError> {
    let dense = dequantized(b, tensors, name, format)?;
    Ok(b.node("Transpose", &format!("{name}.transposed"), &[&dense], vec![attr_ints("perm", &[1, 0])]))
}

/// A 2-D weight as an f32 `[out, in]` value: the initializer itself (f32), or the int8
/// initializer through `DequantizeLinear` with per-row scales `<name>.qscale`.
fn dequantized(b: &mut Builder, tensors: &NamedTensors, name: &str, format: WeightFormat) -> Result<String, OnnxError> {
    let t = tensors.get(name).ok_or_else(|| OnnxError::MissingTensor(name.into()))?;
    match format {
        WeightFormat::F32 => Ok(b.f32_init(name, &t.shape, &t.data, "")),
        WeightFormat::Int8 => {
            let q = Int8Tensor::quantize(t).map_err(|source| OnnxError::Quantization { name: name.into(), source })?;
            let values = b.i8_init(
                name,
                &q.shape,
                &q.values,
                "int8, symmetric per output row: value = q * scale[row] (scales in <name>.qscale)",
            );
            let scales = b.f32_init(&format!("{name}.qscale"), &[q.scales.len()], &q.scales, "");
            Ok(b.node(
                "DequantizeLinear",
                &format!("{name}.dequantized"),
                &[&values, &scales],
                vec![attr_int("axis", 0)],
            ))
        }
    }
}

fn vector(b: &mut Builder, tensors: &NamedTensors, name: &str) -> Result<String, OnnxError> {
    let t = tensors.get(name).ok_or_else(|| OnnxError::MissingTensor(name.into()))?;
    Ok(b.f32_init(name, &t.shape, &t.data, ""))
}

fn tensor_value(name: &str, elem_type: i32, shape: &[tensor_shape_proto::dimension::Value]) -> ValueInfoProto {
    let dim =
        shape.iter().map(|v| tensor_shape_proto::Dimension { value: Some(v.clone()), ..Default::default() }).collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The decoder graph. `tensors` must already have been validated against `config`.
pub(crate) fn build(
    config: &LlamaConfig,
    tensors: &NamedTensors,
    format: WeightFormat,
    opset: i64,
) -> Result<GraphProto, OnnxError> {
    let mut b = Builder { opset, nodes: Vec::new(), initializers: Vec::new() };
    let (heads, kv_heads, hd) = (config.num_attention_heads, config.num_key_value_heads, config.head_dim());
    let group = heads / kv_heads;
    let half = hd / 2;

    // Shared constants.
    let consts_axis_last = b.i64_init("const.axes_last", &[1], &[-1]);
    let axes0 = b.i64_init("const.axes_0", &[1], &[0]);
    let axes1 = b.i64_init("const.axes_1", &[1], &[1]);
    let zero = b.i64_init("const.slice_0", &[1], &[0]);
    let half_c = b.i64_init("const.slice_half_head", &[1], &[half as i64]);
    let hd_c = b.i64_init("const.slice_head_dim", &[1], &[hd as i64]);
    let eps = b.f32_init("const.rms_norm_eps", &[], &[config.rms_norm_eps as f32], "");
    let scale = b.f32_init("const.attn_scale", &[], &[1.0 / (hd as f32).sqrt()], "1 / sqrt(head_dim)");
    let mask_value = b.f32_init("const.mask_value", &[], &[MASK_VALUE], "score of masked (future) positions");
    let q_shape = b.i64_init("const.q_heads_shape", &[5], &[0, 0, kv_heads as i64, group as i64, hd as i64]);
    let kv_shape = b.i64_init("const.kv_heads_shape", &[5], &[0, 0, kv_heads as i64, 1, hd as i64]);
    let merged_shape = b.i64_init("const.merged_heads_shape", &[3], &[0, 0, (heads * hd) as i64]);

    // Positions 0..sequence, from the input's shape.
    let shape = b.node("Shape", "positions.input_shape", &[INPUT], vec![]);
    let one_scalar = b.i64_init("const.scalar_1", &[], &[1]);
    let zero_scalar = b.i64_init("const.scalar_0", &[], &[0]);
    let seq = b.node("Gather", "positions.sequence_length", &[&shape, &one_scalar], vec![attr_int("axis", 0)]);
    let positions = b.node("Range", "positions", &[&zero_scalar, &seq, &one_scalar], vec![]);

    // RoPE tables: angles[p, j] = p * inv_freq[j], duplicated to head_dim, then cos / sin.
    let inv_freq: Vec<f32> =
        (0..half).map(|j| (1.0 / config.rope_theta.powf(2.0 * j as f64 / hd as f64)) as f32).collect();
    let inv_freq = b.f32_init("rope.inv_freq", &[half], &inv_freq, "rope_theta^(-2j/head_dim)");
    let pos_f = b.node("Cast", "rope.positions_f32", &[&positions], vec![attr_int("to", i64::from(data_type::FLOAT))]);
    let pos_col = b.unsqueeze("rope.positions_column", &pos_f, &axes1);
    let freqs = b.node("Mul", "rope.freqs", &[&pos_col, &inv_freq], vec![]);
    let angles = b.node("Concat", "rope.angles", &[&freqs, &freqs], vec![attr_int("axis", -1)]);
    let cos = b.node("Cos", "rope.cos", &[&angles], vec![]);
    let sin = b.node("Sin", "rope.sin", &[&angles], vec![]);

    // Causal mask: key position > query position.
    let q_pos = b.unsqueeze("mask.query_positions", &positions, &axes1);
    let k_pos = b.unsqueeze("mask.key_positions", &positions, &axes0);
    let future = b.node("Greater", "mask.future", &[&k_pos, &q_pos], vec![]);

    let consts = Consts {
        axis_last: consts_axis_last,
        zero,
        half: half_c,
        head_dim: hd_c,
        eps,
        scale,
        mask_value,
        cos,
        sin,
        future,
        q_shape,
        kv_shape,
        merged_shape,
    };

    // Token embedding.
    let embed_name = "model.embed_tokens.weight";
    let embed = dequantized(&mut b, tensors, embed_name, format)?;
    let mut x = b.node("Gather", "model.embed_tokens", &[&embed, INPUT], vec![attr_int("axis", 0)]);

    let perm_heads = [0, 2, 3, 1, 4];
    for i in 0..config.num_hidden_layers {
        let p = format!("model.layers.{i}");
        let attn_norm_w = vector(&mut b, tensors, &format!("{p}.input_layernorm.weight"))?;
        let normed = b.rms_norm(&format!("{p}.input_layernorm"), &x, &attn_norm_w, &consts);

        let a = format!("{p}.self_attn");
        let proj = |b: &mut Builder, part: &str, input: &str| -> Result<String, OnnxError> {
            let w = matmul_weight(b, tensors, &format!("{a}.{part}.weight"), format)?;
            Ok(b.node("MatMul", &format!("{a}.{part}"), &[input, &w], vec![]))
        };
        let q = proj(&mut b, "q_proj", &normed)?;
        let k = proj(&mut b, "k_proj", &normed)?;
        let v = proj(&mut b, "v_proj", &normed)?;
        // [batch, seq, kv_heads, group, head_dim] → [batch, kv_heads, group, seq, head_dim]:
        // query head h = kv * group + g shares KV head kv (grouped-query attention).
        let q = b.node("Reshape", &format!("{a}.q_split_heads"), &[&q, &consts.q_shape], vec![]);
        let q = b.node("Transpose", &format!("{a}.q_heads"), &[&q], vec![attr_ints("perm", &perm_heads)]);
        let k = b.node("Reshape", &format!("{a}.k_split_heads"), &[&k, &consts.kv_shape], vec![]);
        let k = b.node("Transpose", &format!("{a}.k_heads"), &[&k], vec![attr_ints("perm", &perm_heads)]);
        let v = b.node("Reshape", &format!("{a}.v_split_heads"), &[&v, &consts.kv_shape], vec![]);
        let v = b.node("Transpose", &format!("{a}.v_heads"), &[&v], vec![attr_ints("perm", &perm_heads)]);
        let q = b.rope(&format!("{a}.q_rope"), &q, &consts);
        let k = b.rope(&format!("{a}.k_rope"), &k, &consts);
        let k_t = b.node("Transpose", &format!("{a}.k_transposed"), &[&k], vec![attr_ints("perm", &[0, 1, 2, 4, 3])]);
        // [batch, kv_heads, group, seq, seq]; the KV axis of size 1 broadcasts over the group.
        let scores = b.node("MatMul", &format!("{a}.scores"), &[&q, &k_t], vec![]);
        let scores = b.node("Mul", &format!("{a}.scaled_scores"), &[&scores, &consts.scale], vec![]);
        let scores =
            b.node("Where", &format!("{a}.causal_mask"), &[&consts.future, &consts.mask_value, &scores], vec![]);
        let probs = b.node("Softmax", &format!("{a}.softmax"), &[&scores], vec![attr_int("axis", -1)]);
        let ctx = b.node("MatMul", &format!("{a}.context"), &[&probs, &v], vec![]);
        let ctx =
            b.node("Transpose", &format!("{a}.context_seq_first"), &[&ctx], vec![attr_ints("perm", &[0, 3, 1, 2, 4])]);
        let ctx = b.node("Reshape", &format!("{a}.merge_heads"), &[&ctx, &consts.merged_shape], vec![]);
        let o = proj(&mut b, "o_proj", &ctx)?;
        let h = b.node("Add", &format!("{p}.attn_residual"), &[&x, &o], vec![]);

        let mlp_norm_w = vector(&mut b, tensors, &format!("{p}.post_attention_layernorm.weight"))?;
        let normed = b.rms_norm(&format!("{p}.post_attention_layernorm"), &h, &mlp_norm_w, &consts);
        let m = format!("{p}.mlp");
        let mlp = |b: &mut Builder, part: &str, input: &str| -> Result<String, OnnxError> {
            let w = matmul_weight(b, tensors, &format!("{m}.{part}.weight"), format)?;
            Ok(b.node("MatMul", &format!("{m}.{part}"), &[input, &w], vec![]))
        };
        let gate = mlp(&mut b, "gate_proj", &normed)?;
        let up = mlp(&mut b, "up_proj", &normed)?;
        let sig = b.node("Sigmoid", &format!("{m}.gate_sigmoid"), &[&gate], vec![]);
        let silu = b.node("Mul", &format!("{m}.gate_silu"), &[&gate, &sig], vec![]);
        let act = b.node("Mul", &format!("{m}.gate_times_up"), &[&silu, &up], vec![]);
        let down = mlp(&mut b, "down_proj", &act)?;
        x = b.node("Add", &format!("{p}.mlp_residual"), &[&h, &down], vec![]);
    }

    let norm_w = vector(&mut b, tensors, "model.norm.weight")?;
    let normed = b.rms_norm("model.norm", &x, &norm_w, &consts);
    let head = if config.tie_word_embeddings {
        // Tied: logits = h · embed^T, reusing the (dequantized) embedding value.
        b.node("Transpose", "lm_head.weight.tied_to_embed_tokens", &[&embed], vec![attr_ints("perm", &[1, 0])])
    } else {
        matmul_weight(&mut b, tensors, "lm_head.weight", format)?
    };
    b.node("MatMul", OUTPUT, &[&normed, &head], vec![]);

    use tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    let input = tensor_value(INPUT, data_type::INT64, &[DimParam("batch".into()), DimParam("sequence".into())]);
    let output = tensor_value(
        OUTPUT,
        data_type::FLOAT,
        &[DimParam("batch".into()), DimParam("sequence".into()), DimValue(config.vocab_size as i64)],
    );
    Ok(GraphProto {
        node: b.nodes,
        name: "covey_llama".into(),
        initializer: b.initializers,
        doc_string: "Llama-style decoder: input_ids [batch, sequence] -> logits [batch, sequence, vocab]; \
                     full causal attention over the whole input, no KV cache."
            .into(),
        input: vec![input],
        output: vec![output],
        value_info: Vec::new(),
    })
}
