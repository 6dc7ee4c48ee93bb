// The AVX2 path of fused_kernel.cpp, which includes this inside its anonymous namespace when the compiler
// targets AVX2: quantize_scalar's loop with eight weights to a vector and 32 to a round of packing, over
// whole rounds (the caller passes what is left to the scalar loop). Each intrinsic is the float32
// operation the scalar loop performs on each lane, so the two agree bit for bit.
#pragma once

constexpr int ROUND = 32;

// Level (or threshold) i of a table of up to 16 held in two registers: bit 3 of i picks the register.
inline __m256 lookup16(__m256 low, __m256 high, __m256i i) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, i), _mm256_permutevar8x32_ps(high, i),
                            _mm256_castsi256_ps(_mm256_slli_epi32(i, 28)));
}

// bin_of for eight values
inline __m256i bins8(__m256 x, const Search& s) {
    const __m256 half_bins = _mm256_set1_ps(s.half_bins);
    __m256 position = _mm256_add_ps(_mm256_mul_ps(x, half_bins), half_bins);
    position = _mm256_min_ps(_mm256_max_ps(position, _mm256_setzero_ps()), _mm256_set1_ps(s.last_bin));
    return _mm256_cvttps_epi32(position);
}

// COUNT > 0 and COUNT < 0 (see Search)
template <int COUNT>
inline __m256i codes8(__m256 x, const Search& s, const __m256* thresholds, __m256i nibbles) {
    const auto above = [&x](__m256 t) { return _mm256_castps_si256(_mm256_cmp_ps(x, t, _CMP_GT_OQ)); };
    if constexpr (COUNT > 0) {
        __m256i code = _mm256_setzero_si256();
        for (int t = 0; t < COUNT; ++t) code = _mm256_sub_epi32(code, above(thresholds[t]));  // true is -1
        return code;
    } else {  // the bin's 4-bit field, then one compare
        const __m256i bin = bins8(x, s);
        const __m256i word = _mm256_permutevar8x32_epi32(nibbles, _mm256_srli_epi32(bin, 3));
        const __m256i shift = _mm256_slli_epi32(_mm256_and_si256(bin, _mm256_set1_epi32(7)), 2);
        const __m256i below = _mm256_and_si256(_mm256_srlv_epi32(word, shift), _mm256_set1_epi32(15));
        return _mm256_sub_epi32(below, above(lookup16(thresholds[0], thresholds[1], below)));
    }
}

// COUNT == 0: each lane's bin entry (one 16-byte load), transposed into four vectors; the code is the
// midpoints below plus one if above the bin's midpoint, and its level the entry's level below or above.
inline __m256i codes_and_levels8(__m256 x, const Search& s, __m256& level) {
    alignas(32) int32_t bin[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(bin), bins8(x, s));
    const auto entries = [&s, &bin](int a, int b) {
        return _mm256_set_m128(_mm_loadu_ps(s.bins + 4 * bin[b]), _mm_loadu_ps(s.bins + 4 * bin[a]));
    };
    const __m256 r0 = entries(0, 4), r1 = entries(1, 5), r2 = entries(2, 6), r3 = entries(3, 7);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
    const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
    const __m256 below = _mm256_shuffle_ps(t0, t2, 0x44), midpoint = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 up = _mm256_cmp_ps(x, midpoint, _CMP_GT_OQ);
    level = _mm256_blendv_ps(_mm256_shuffle_ps(t1, t3, 0x44), _mm256_shuffle_ps(t1, t3, 0xEE), up);
    return _mm256_sub_epi32(_mm256_castps_si256(below), _mm256_castps_si256(up));  // true is -1
}

// 32 codes (four vectors of int32, in order) packed into 32 * BITS / 8 bytes at out.
template <int BITS>
inline void pack32(const __m256i* code, uint8_t* out) {
    const __m256i words = _mm256_packus_epi32(code[0], code[1]), more = _mm256_packus_epi32(code[2], code[3]);
    __m256i v = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words, more),
                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // 32 bytes, in order
    if constexpr (BITS == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), v);
        return;
    }
    constexpr int shifts[3] = {8 - BITS, 16 - 2 * BITS, 32 - 4 * BITS};  // squeeze<BITS>, four words at once
    constexpr uint64_t masks[3][3] = {{0x000f000f000f000full, 0x000000ff000000ffull, 0xffffull},
                                      {0x003f003f003f003full, 0x00000fff00000fffull, 0xffffffull},
                                      {0x00ff00ff00ff00ffull, 0x0000ffff0000ffffull, 0xffffffffull}};
    for (int k = 0; k < 3; ++k) {
        const __m256i mask = _mm256_set1_epi64x(static_cast<int64_t>(masks[BITS - 2][k]));
        v = _mm256_and_si256(_mm256_or_si256(v, _mm256_srli_epi64(v, shifts[k])), mask);
    }
    if constexpr (BITS == 4) {  // four bytes at the bottom of each word
        v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 2, 4, 6, 0, 0, 0, 0));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(v));
    } else if constexpr (BITS == 2) {  // two bytes each
        v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 1, 8, 9, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                    0, 1, 8, 9, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1));
        v = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 4, 0, 0, 0, 0, 0, 0));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm256_castsi256_si128(v));
    } else {  // three bytes each: 12 in all, gathered into dwords 0..2
        v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 1, 2, 8, 9, 10, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                                    -1, -1, -1, -1, -1, -1, 0, 1, 2, 8, 9, 10, -1, -1, -1, -1));
        // dword 3 (bytes 12..15) is all zero: the spare index for lanes that must stay empty
        const __m256i low = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(0, 1, 3, 3, 3, 3, 3, 3));
        const __m256i high = _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(3, 5, 6, 3, 3, 3, 3, 3));
        const __m128i both = _mm256_castsi256_si128(_mm256_or_si256(low, high));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(out), both);
        const int last = _mm_extract_epi32(both, 2);
        std::memcpy(out + 8, &last, 4);
    }
}

template <int BITS, int BLOCK, int COUNT, bool DENSE>
void quantize_avx2(const Job& job, const Search& s, int64_t first, int64_t stop) {
    constexpr int T = COUNT > 0 ? COUNT : 2;
    __m256 thresholds[T];
    for (int t = 0; t < T; ++t) {  // COUNT < 0: the 16-entry table in two registers
        if constexpr (COUNT > 0) thresholds[t] = _mm256_set1_ps(s.thresholds[t]);
        else thresholds[t] = COUNT < 0 ? _mm256_loadu_ps(s.thresholds + 8 * t) : _mm256_setzero_ps();
    }
    const __m256i nibbles = COUNT < 0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.lower))
                                      : _mm256_setzero_si256();
    const __m256 levels_low = BITS <= 4 ? _mm256_loadu_ps(s.levels) : _mm256_setzero_ps();
    const __m256 levels_high = BITS == 4 ? _mm256_loadu_ps(s.levels + 8) : _mm256_setzero_ps();
    const float* __restrict w = job.w;
    const float* __restrict scales = job.scales;
    float* __restrict dense = job.dense;
    uint8_t* __restrict packed = job.packed;
    for (int64_t start = first * BLOCK; start < stop * BLOCK; start += ROUND) {
        __m256i code[4];
        for (int v = 0; v < 4; ++v) {
            const int64_t at = start + 8 * v;
            const __m256 scale = _mm256_broadcast_ss(scales + at / BLOCK);
            const __m256 positive = _mm256_cmp_ps(scale, _mm256_setzero_ps(), _CMP_GT_OQ);
            const __m256 divisor = _mm256_blendv_ps(_mm256_set1_ps(1.0f), scale, positive);
            const __m256 x = _mm256_div_ps(_mm256_loadu_ps(w + at), divisor);
            __m256 level;
            if constexpr (COUNT == 0) code[v] = codes_and_levels8(x, s, level);
            else code[v] = codes8<COUNT>(x, s, thresholds, nibbles);
            if constexpr (DENSE) {
                if constexpr (BITS == 4) level = lookup16(levels_low, levels_high, code[v]);
                else if constexpr (BITS < 4) level = _mm256_permutevar8x32_ps(levels_low, code[v]);
                _mm256_storeu_ps(dense + at, _mm256_mul_ps(level, scale));
            }
        }
        pack32<BITS>(code, packed + start / 8 * BITS);
    }
}
