//! ggml tensor types: ids, block sizes and names.

use std::fmt;

use crate::{GgufError, Result};

/// A ggml tensor element type, with ggml's numeric id as discriminant.
///
/// Ids 4 and 5 (the removed `Q4_2`, `Q4_3`), 31 to 33 and 36 to 38 (removed repacked layouts)
/// are not types any more: [`GgmlType::from_u32`] rejects them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// IEEE 754 half float.
    F16 = 1,
    /// 32 values: f16 scale + 4-bit quants.
    Q4_0 = 2,
    /// 32 values: f16 scale and min + 4-bit quants.
    Q4_1 = 3,
    /// 32 values: f16 scale + 5-bit quants.
    Q5_0 = 6,
    /// 32 values: f16 scale and min + 5-bit quants.
    Q5_1 = 7,
    /// 32 values: f16 scale + 8-bit quants.
    Q8_0 = 8,
    /// 32 values: f16 scale and sum + 8-bit quants (an activation format).
    Q8_1 = 9,
    /// K-quant, 256 values, 2 bits.
    Q2K = 10,
    /// K-quant, 256 values, 3 bits.
    Q3K = 11,
    /// K-quant, 256 values, 4 bits.
    Q4K = 12,
    /// K-quant, 256 values, 5 bits.
    Q5K = 13,
    /// K-quant, 256 values, 6 bits.
    Q6K = 14,
    /// K-quant, 256 values, 8 bits, f32 scale (an activation format).
    Q8K = 15,
    /// i-quant `IQ2_XXS`.
    IQ2XXS = 16,
    /// i-quant `IQ2_XS`.
    IQ2XS = 17,
    /// i-quant `IQ3_XXS`.
    IQ3XXS = 18,
    /// i-quant `IQ1_S`.
    IQ1S = 19,
    /// i-quant `IQ4_NL`: 32 values, f16 scale + 4-bit indices into a non-linear table.
    IQ4NL = 20,
    /// i-quant `IQ3_S`.
    IQ3S = 21,
    /// i-quant `IQ2_S`.
    IQ2S = 22,
    /// i-quant `IQ4_XS`: 256 values, `IQ4_NL` with 6-bit sub-block scales.
    IQ4XS = 23,
    /// 8-bit signed integer.
    I8 = 24,
    /// 16-bit signed integer.
    I16 = 25,
    /// 32-bit signed integer.
    I32 = 26,
    /// 64-bit signed integer.
    I64 = 27,
    /// 64-bit float.
    F64 = 28,
    /// i-quant `IQ1_M`.
    IQ1M = 29,
    /// bfloat16.
    BF16 = 30,
    /// Ternary quant `TQ1_0`.
    TQ1_0 = 34,
    /// Ternary quant `TQ2_0`.
    TQ2_0 = 35,
    /// Microscaling FP4.
    MXFP4 = 39,
    /// NVIDIA FP4 (64-value blocks, four E4M3 scales).
    NVFP4 = 40,
    /// 1-bit quant, 128-value blocks.
    Q1_0 = 41,
}

impl GgmlType {
    /// Every known type, in id order.
    pub const ALL: [GgmlType; 34] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q8_1,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
        GgmlType::Q8K,
        GgmlType::IQ2XXS,
        GgmlType::IQ2XS,
        GgmlType::IQ3XXS,
        GgmlType::IQ1S,
        GgmlType::IQ4NL,
        GgmlType::IQ3S,
        GgmlType::IQ2S,
        GgmlType::IQ4XS,
        GgmlType::I8,
        GgmlType::I16,
        GgmlType::I32,
        GgmlType::I64,
        GgmlType::F64,
        GgmlType::IQ1M,
        GgmlType::BF16,
        GgmlType::TQ1_0,
        GgmlType::TQ2_0,
        GgmlType::MXFP4,
        GgmlType::NVFP4,
        GgmlType::Q1_0,
    ];

    /// The type with ggml id `raw`; [`GgufError::UnknownTensorType`] for ids ggml does not (or
    /// no longer) define.
    pub fn from_u32(raw: u32) -> Result<Self> {
        Self::ALL.into_iter().find(|t| t.id() == raw).ok_or(GgufError::UnknownTensorType { raw, tensor: None })
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Values per block (1 for plain scalar types).
    pub fn block_size(self) -> u64 {
        self.layout().0
    }

    /// Bytes per block (for plain scalar types, bytes per value).
    pub fn type_size(self) -> u64 {
        self.layout().1
    }

    /// Whether this crate can dequantize the type ([`crate::codec::dequantize`]).
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | F64
                | I8
                | I16
                | I32
                | I64
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2K
                | Q3K
                | Q4K
                | Q5K
                | Q6K
                | Q8K
                | IQ4NL
                | IQ4XS
        )
    }

    /// Whether this crate can quantize to the type ([`crate::codec::quantize`]).
    pub fn can_quantize(self) -> bool {
        use GgmlType::*;
        matches!(self, F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0)
    }

    /// Bytes for `n_elements` values, or `None` if `n_elements` is not a whole number of blocks
    /// or the size overflows.
    pub fn bytes_for(self, n_elements: u64) -> Option<u64> {
        let (block, size) = self.layout();
        if !n_elements.is_multiple_of(block) {
            return None;
        }
        (n_elements / block).checked_mul(size)
    }

    /// (block size, type size) as in ggml's `type_traits` table.
    fn layout(self) -> (u64, u64) {
        use GgmlType::*;
        const QK_K: u64 = 256;
        match self {
            F32 => (1, 4),
            F16 => (1, 2),
            Q4_0 => (32, 2 + 16),
            Q4_1 => (32, 2 + 2 + 16),
            Q5_0 => (32, 2 + 4 + 16),
            Q5_1 => (32, 2 + 2 + 4 + 16),
            Q8_0 => (32, 2 + 32),
            // ggml's block_q8_1 is two f16 (d, s) + 32 quants (gguf-py still says 40: stale).
            Q8_1 => (32, 2 + 2 + 32),
            Q2K => (QK_K, QK_K / 16 + QK_K / 4 + 2 + 2),
            Q3K => (QK_K, QK_K / 8 + QK_K / 4 + 12 + 2),
            Q4K => (QK_K, 2 + 2 + 12 + QK_K / 2),
            Q5K => (QK_K, 2 + 2 + 12 + QK_K / 8 + QK_K / 2),
            Q6K => (QK_K, QK_K / 2 + QK_K / 4 + QK_K / 16 + 2),
            Q8K => (QK_K, 4 + QK_K + 2 * QK_K / 16),
            IQ2XXS => (QK_K, 2 + QK_K / 4),
            IQ2XS => (QK_K, 2 + QK_K / 4 + QK_K / 32),
            IQ3XXS => (QK_K, 2 + 3 * QK_K / 8),
            IQ1S => (QK_K, 2 + QK_K / 8 + QK_K / 16),
            IQ4NL => (32, 2 + 16),
            IQ3S => (QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4),
            IQ2S => (QK_K, 2 + QK_K / 4 + QK_K / 16),
            IQ4XS => (QK_K, 2 + 2 + QK_K / 64 + QK_K / 2),
            I8 => (1, 1),
            I16 => (1, 2),
            I32 => (1, 4),
            I64 => (1, 8),
            F64 => (1, 8),
            IQ1M => (QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32),
            BF16 => (1, 2),
            TQ1_0 => (QK_K, 2 + 4 * 13),
            TQ2_0 => (QK_K, 2 + 64),
            MXFP4 => (32, 1 + 16),
            NVFP4 => (64, 4 + 32),
            Q1_0 => (128, 2 + 16),
        }
    }

    /// llama.cpp's name for the type (`"Q4_1"`, `"Q6_K"`, `"BF16"`, `"IQ2_XXS"`).
    pub fn name(self) -> &'static str {
        use GgmlType::*;
        match self {
            F32 => "F32",
            F16 => "F16",
            Q4_0 => "Q4_0",
            Q4_1 => "Q4_1",
            Q5_0 => "Q5_0",
            Q5_1 => "Q5_1",
            Q8_0 => "Q8_0",
            Q8_1 => "Q8_1",
            Q2K => "Q2_K",
            Q3K => "Q3_K",
            Q4K => "Q4_K",
            Q5K => "Q5_K",
            Q6K => "Q6_K",
            Q8K => "Q8_K",
            IQ2XXS => "IQ2_XXS",
            IQ2XS => "IQ2_XS",
            IQ3XXS => "IQ3_XXS",
            IQ1S => "IQ1_S",
            IQ4NL => "IQ4_NL",
            IQ3S => "IQ3_S",
            IQ2S => "IQ2_S",
            IQ4XS => "IQ4_XS",
            I8 => "I8",
            I16 => "I16",
            I32 => "I32",
            I64 => "I64",
            F64 => "F64",
            IQ1M => "IQ1_M",
            BF16 => "BF16",
            TQ1_0 => "TQ1_0",
            TQ2_0 => "TQ2_0",
            MXFP4 => "MXFP4",
            NVFP4 => "NVFP4",
            Q1_0 => "Q1_0",
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_removed_ids_are_rejected() {
        for t in GgmlType::ALL {
            assert_eq!(GgmlType::from_u32(t.id()).expect("known id"), t);
        }
        for raw in [4, 5, 31, 32, 33, 36, 37, 38, 42, 1000, u32::MAX] {
            let err = GgmlType::from_u32(raw).expect_err("unknown id");
            assert!(matches!(err, GgufError::UnknownTensorType { raw: r, tensor: None } if r == raw));
        }
    }

    #[test]
    fn sizes_match_ggml() {
        // Values from ggml's type_traits (sizeof of each block struct).
        let expected: [(GgmlType, u64, u64); 12] = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q2K, 256, 84),
            (GgmlType::Q3K, 256, 110),
            (GgmlType::Q4K, 256, 144),
            (GgmlType::Q5K, 256, 176),
            (GgmlType::Q6K, 256, 210),
            (GgmlType::Q8K, 256, 292),
            (GgmlType::IQ4XS, 256, 136),
        ];
        for (t, block, size) in expected {
            assert_eq!((t.block_size(), t.type_size()), (block, size), "{t}");
        }
        assert_eq!(GgmlType::Q4_1.bytes_for(64), Some(40));
        assert_eq!(GgmlType::Q4_1.bytes_for(33), None);
        assert_eq!(GgmlType::F32.bytes_for(u64::MAX), None);
    }

    #[test]
    fn names_are_llama_cpp_names() {
        assert_eq!(GgmlType::Q4_1.to_string(), "Q4_1");
        assert_eq!(GgmlType::Q6K.to_string(), "Q6_K");
        assert_eq!(GgmlType::BF16.to_string(), "BF16");
        assert_eq!(GgmlType::IQ2XXS.to_string(), "IQ2_XXS");
        assert_eq!(GgmlType::from_u32(30).expect("bf16"), GgmlType::BF16);
    }
}
