// The dequantize pass of fused_kernel.cpp (serving: packed codes back to float32 values), which includes
// this inside its anonymous namespace after the AVX2 helpers. Every value is numpy's float32 product
// levels[code] * scale, so the compiled and numpy paths give the same bits.
#pragma once

// Blocks [0, n_blocks) of `block` codes (BITS-bit, eight codes packed little-endian into BITS bytes) to
// levels[code] * scales[b]: one float32 product each, rounded as numpy's float32 multiply. levels holds at
// least 16 entries (the AVX2 path reads two registers of it) and one per code.
template <int BITS>
void dequantize_blocks(const uint8_t* packed, int64_t n_blocks, int64_t block, const float* levels,
                       const float* scales, float* out) {
    constexpr uint64_t mask = (uint64_t{1} << BITS) - 1;
#ifdef __AVX2__
    if constexpr (BITS <= 4) {  // eight codes fit 32 bits: shift them into lanes, look up in registers
        const __m256 low = _mm256_loadu_ps(levels), high = _mm256_loadu_ps(levels + 8);  // 16 entries
        const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS,
                                                 7 * BITS);
        const __m256i lane_mask = _mm256_set1_epi32(static_cast<int>(mask));
        for (int64_t b = 0; b < n_blocks; ++b) {
            const __m256 scale = _mm256_set1_ps(scales[b]);
            const uint8_t* source = packed + b * block / 8 * BITS;
            float* target = out + b * block;
            for (int64_t i = 0; i < block; i += 8) {
                uint32_t word = 0;
                // 3-bit groups: a whole 4-byte load (a 3-byte copy stalls on store forwarding), except
                // the matrix's last group, whose fourth byte may lie past the codes' end
                const bool whole = BITS != 3 || b + 1 < n_blocks || i + 8 < block;
                std::memcpy(&word, source + i / 8 * BITS, whole && BITS == 3 ? 4 : BITS);
                const __m256i code = _mm256_and_si256(
                    _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(word)), shifts), lane_mask);
                const __m256 level = BITS == 4 ? lookup16(low, high, code) : _mm256_permutevar8x32_ps(low, code);
                _mm256_storeu_ps(target + i, _mm256_mul_ps(level, scale));
            }
        }
        return;
    }
#endif
    for (int64_t b = 0; b < n_blocks; ++b) {
        const float scale = scales[b];
        const uint8_t* source = packed + b * block / 8 * BITS;
        float* target = out + b * block;
        for (int64_t i = 0; i < block; i += 8) {
            uint64_t word = 0;
            std::memcpy(&word, source + i / 8 * BITS, BITS);
            for (int k = 0; k < 8; ++k) target[i + k] = levels[(word >> (BITS * k)) & mask] * scale;
        }
    }
}
