//! Oracle tests: the packing against a direct GGML decoder, the scalar matmul against f32 math,
//! and every SIMD level available here (up to `level()`, so `RECOMPOSE_KERNEL=avx2` exercises
//! AVX2 on a VNNI machine) against the scalar matmul and quantiser.

use super::quant::*;
use candle_core::quantized::GgmlDType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn random_ggml(dtype: GgmlDType, rows: usize, cols: usize, rng: &mut StdRng) -> Vec<u8> {
    let mut v = vec![];
    for _ in 0..rows * cols / QK {
        v.extend_from_slice(&f16_bytes(rng.random_range(0.001..0.1)));
        let nq = match dtype {
            GgmlDType::Q4_0 => 16,
            GgmlDType::Q4_1 => {
                v.extend_from_slice(&f16_bytes(rng.random_range(-0.5..0.5)));
                16
            }
            _ => QK,
        };
        for _ in 0..nq {
            v.push(rng.random());
        }
    }
    v
}

/// GGML's definitions, written out independently of the packer.
fn ggml_row(dtype: GgmlDType, bytes: &[u8], r: usize, cols: usize) -> Vec<f32> {
    let f = |b: &[u8]| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    let bs = match dtype {
        GgmlDType::Q4_0 => 18,
        GgmlDType::Q4_1 => 20,
        _ => 34,
    };
    let mut out = vec![0f32; cols];
    for b in 0..cols / QK {
        let blk = &bytes[(r * cols / QK + b) * bs..][..bs];
        let o = &mut out[b * QK..(b + 1) * QK];
        match dtype {
            GgmlDType::Q4_0 => {
                for j in 0..16 {
                    o[j] = ((blk[2 + j] & 15) as f32 - 8.0) * f(blk);
                    o[j + 16] = ((blk[2 + j] >> 4) as f32 - 8.0) * f(blk);
                }
            }
            GgmlDType::Q4_1 => {
                for j in 0..16 {
                    o[j] = (blk[4 + j] & 15) as f32 * f(blk) + f(&blk[2..]);
                    o[j + 16] = (blk[4 + j] >> 4) as f32 * f(blk) + f(&blk[2..]);
                }
            }
            _ => {
                for j in 0..QK {
                    o[j] = blk[2 + j] as i8 as f32 * f(blk);
                }
            }
        }
    }
    out
}

fn simd_levels() -> Vec<Level> {
    match level() {
        Level::Scalar => vec![],
        Level::Avx2 => vec![Level::Avx2],
        Level::Avx512Vnni => vec![Level::Avx2, Level::Avx512Vnni],
    }
}

const KINDS: [GgmlDType; 3] = [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0];

/// Magnitude of the terms summed for output (n, r): f32 rounding is relative to this.
fn term_scale(w: &PackedWeight, r: usize, x: &Q8Acts, n: usize) -> f32 {
    let mut t = 0f32;
    for b in 0..x.blocks {
        let (q, d, m) = w.block(r, b);
        let ai = n * x.blocks + b;
        let aq = &x.qs[ai * QK..(ai + 1) * QK];
        let l1: i32 = q.iter().zip(aq).map(|(&w, &a)| (w * a as i32).abs()).sum();
        let sa: i32 = aq.iter().map(|&a| (a as i32).abs()).sum();
        t += (d * x.d[ai]).abs() * l1 as f32 + (m * x.d[ai]).abs() * sa as f32;
    }
    t
}

fn check(w: &PackedWeight, x: &[f32], n: usize, what: &str) {
    let (rows, cols) = (w.rows(), w.cols());
    let acts = quantize_acts_with(x, n, cols, Level::Scalar);
    let mut reference = vec![f32::NAN; n * rows];
    matmul(w, &acts, &mut reference, Level::Scalar);
    // The scalar path against plain f32 math on dequantised values (quantisation error only).
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        w.dequantize_row(r, &mut row);
        for i in 0..n {
            let exact: f32 = row.iter().zip(&x[i * cols..(i + 1) * cols]).map(|(a, b)| a * b).sum();
            let got = reference[i * rows + r];
            let scale: f32 = row.iter().map(|v| v.abs()).sum::<f32>() * 2.0 / 127.0 + 1e-3;
            assert!((exact - got).abs() <= scale, "{what} r{r} n{i}: {exact} vs {got}");
        }
    }
    for lvl in simd_levels() {
        let mut out = vec![f32::NAN; n * rows];
        matmul(w, &acts, &mut out, lvl);
        for (j, (a, b)) in out.iter().zip(&reference).enumerate() {
            let tol = 1e-5 * term_scale(w, j % rows, &acts, j / rows) + 1e-6;
            assert!((a - b).abs() <= tol, "{what} {lvl:?} n{} r{}: {a} vs {b}", j / rows, j % rows);
        }
    }
}

#[test]
fn packing_matches_ggml_decoding() {
    let mut rng = StdRng::seed_from_u64(1);
    for dtype in KINDS {
        for &(rows, cols) in &[(1, 32), (15, 64), (16, 32), (17, 96), (48, 576)] {
            let bytes = random_ggml(dtype, rows, cols, &mut rng);
            let w = PackedWeight::from_ggml(dtype, &bytes, rows, cols).unwrap();
            assert_eq!((w.rows(), w.cols(), w.tiles()), (rows, cols, rows.div_ceil(TR)));
            let mut got = vec![0f32; cols];
            for r in 0..rows {
                w.dequantize_row(r, &mut got);
                assert_eq!(got, ggml_row(dtype, &bytes, r, cols), "{dtype:?} row {r}");
            }
            w.dequantize_row(rows, &mut got);
            assert!(got.iter().all(|&v| v == 0.0));
        }
        assert!(PackedWeight::from_ggml(dtype, &[0; 7], 1, 32).is_none());
        assert!(PackedWeight::from_ggml(dtype, &[], 1, 31).is_none());
    }
    assert!(PackedWeight::from_ggml(GgmlDType::Q4K, &[0; 144], 1, 256).is_none());
}

#[test]
fn simd_kernels_match_scalar_oracle() {
    let mut rng = StdRng::seed_from_u64(0);
    for dtype in KINDS {
        for &(rows, cols) in &[(1, 32), (16, 64), (37, 64), (70, 576), (130, 1536)] {
            let bytes = random_ggml(dtype, rows, cols, &mut rng);
            let w = PackedWeight::from_ggml(dtype, &bytes, rows, cols).unwrap();
            for n in 1..=9 {
                let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-2.0..2.0)).collect();
                check(&w, &x, n, &format!("{dtype:?} {rows}x{cols} n{n}"));
            }
        }
    }
}

#[test]
fn parallel_matmul_matches_scalar_oracle() {
    // Big enough to be split over the pool; the pool has several threads even on one core.
    let mut rng = StdRng::seed_from_u64(2);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    for dtype in KINDS {
        let (rows, cols, n) = (1000, 576, 17);
        let bytes = random_ggml(dtype, rows, cols, &mut rng);
        let w = PackedWeight::from_ggml(dtype, &bytes, rows, cols).unwrap();
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        pool.install(|| check(&w, &x, n, &format!("{dtype:?} parallel")));
    }
}

#[test]
fn q8_handles_minus_128() {
    // -128 is the one i8 whose absolute value does not fit, and the +128 offset of the VNNI path
    // maps it to 0: every path must still be exact. Activations at +-127, rows around a tile.
    for rows in [1, 16, 17] {
        let mut bytes = vec![];
        for r in 0..rows {
            bytes.extend_from_slice(&f16_bytes(1.0));
            bytes.extend((0..QK).map(|j| if (r + j) % 3 == 0 { 0x7F } else { 0x80 }));
        }
        let w = PackedWeight::from_ggml(GgmlDType::Q8_0, &bytes, rows, QK).unwrap();
        for n in 1..=9 {
            let x: Vec<f32> = (0..n * QK).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
            let acts = quantize_acts_with(&x, n, QK, Level::Scalar);
            let mut a = vec![0f32; n * rows];
            matmul(&w, &acts, &mut a, Level::Scalar);
            for lvl in simd_levels() {
                let mut b = vec![0f32; n * rows];
                matmul(&w, &acts, &mut b, lvl);
                assert_eq!(a, b, "{lvl:?} rows {rows} n {n}");
            }
        }
    }
    let mut bytes = f16_bytes(1.0).to_vec();
    bytes.extend(std::iter::repeat_n(0x80u8, 32));
    let w = PackedWeight::from_ggml(GgmlDType::Q8_0, &bytes, 1, 32).unwrap();
    let acts = quantize_acts(&[1.0; 32], 1, 32);
    let mut a = vec![0f32];
    matmul(&w, &acts, &mut a, level());
    assert!((a[0] + 128.0 * 32.0).abs() < 1e-3);
}

#[test]
fn q4_0_repacks_as_offset_q4() {
    let mut bytes = f16_bytes(0.5).to_vec();
    bytes.extend(std::iter::repeat_n(0x3Au8, 16)); // low nibble 10, high nibble 3
    let w = PackedWeight::from_ggml(GgmlDType::Q4_0, &bytes, 1, 32).unwrap();
    let mut row = vec![0f32; 32];
    w.dequantize_row(0, &mut row);
    assert_eq!(row[0], (10.0 - 8.0) * 0.5);
    assert_eq!(row[16], (3.0 - 8.0) * 0.5);
}

#[test]
fn simd_quantiser_matches_scalar_bit_for_bit() {
    let mut rng = StdRng::seed_from_u64(3);
    let specials =
        [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e-40, -1e-40, f32::MAX, 0.5, -0.5, 2.5, 127.0];
    let mut x: Vec<f32> = vec![];
    for b in 0..64 {
        for j in 0..QK {
            x.push(match b % 8 {
                0 => 0.0,
                1 => specials[(b + j) % specials.len()],
                2 if j == 5 => f32::NAN,
                3 => (j as f32 - 16.0) * 0.5, // exact .5 ties after scaling by 127/8
                4 => rng.random_range(-1e-38..1e-38),
                5 => 1e-44 * j as f32, // subnormal amax: 1/d overflows
                _ => rng.random_range(-3.0..3.0),
            });
        }
    }
    let (rows, cols) = (8, x.len() / 8);
    let reference = quantize_acts_with(&x, rows, cols, Level::Scalar);
    assert!(reference.qs.iter().all(|&q| q != -128));
    for lvl in simd_levels() {
        let got = quantize_acts_with(&x, rows, cols, lvl);
        assert_eq!(got.qs, reference.qs, "{lvl:?}");
        assert_eq!(got.isum, reference.isum, "{lvl:?}");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.d), bits(&reference.d), "{lvl:?}");
        assert_eq!(bits(&got.s), bits(&reference.s), "{lvl:?}");
    }
}

#[test]
fn matmul_group_equals_each_weight_alone() {
    // Q, K and V of a decode step: each too small to run parallel alone, the group big enough.
    // Every weight's output must equal its own matmul bit for bit, on every level, parallel or not.
    let mut rng = StdRng::seed_from_u64(3);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let cols = 576;
    let kinds = [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0];
    let shapes = [576, 200, 193];
    let ws: Vec<PackedWeight> = kinds
        .iter()
        .zip(shapes)
        .map(|(&k, rows)| PackedWeight::from_ggml(k, &random_ggml(k, rows, cols, &mut rng), rows, cols).unwrap())
        .collect();
    for n in [1, 3, 9] {
        let x: Vec<f32> = (0..n * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        let acts = quantize_acts(&x, n, cols);
        for lvl in std::iter::once(Level::Scalar).chain(simd_levels()) {
            let alone: Vec<Vec<f32>> = ws
                .iter()
                .map(|w| {
                    let mut o = vec![0f32; n * w.rows()];
                    matmul(w, &acts, &mut o, lvl);
                    o
                })
                .collect();
            let mut bufs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; n * w.rows()]).collect();
            let refs: Vec<&PackedWeight> = ws.iter().collect();
            pool.install(|| {
                let mut outs: Vec<&mut [f32]> = bufs.iter_mut().map(Vec::as_mut_slice).collect();
                matmul_group(&refs, &acts, &mut outs, lvl)
            });
            assert!(bufs == alone, "{lvl:?} n {n}: the group differs from the weights alone");
        }
    }
}

#[test]
fn selected_rows_are_the_source_rows_bit_for_bit_then_zero() {
    let mut rng = StdRng::seed_from_u64(7);
    let (rows, cols) = (37, 96);
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let w = PackedWeight::from_ggml(dtype, &random_ggml(dtype, rows, cols, &mut rng), rows, cols).unwrap();
        let idx = [36u32, 0, 17, 17, 5, 20, 33];
        let s = w.select_rows(&idx, 19).unwrap();
        assert_eq!((s.rows(), s.cols(), s.kind()), (19, cols, w.kind()));
        let (mut a, mut b) = (vec![0f32; cols], vec![0f32; cols]);
        for (i, &r) in idx.iter().enumerate() {
            s.dequantize_row(i, &mut a);
            w.dequantize_row(r as usize, &mut b);
            assert_eq!(a, b, "{dtype:?} row {i}");
        }
        for i in idx.len()..19 {
            s.dequantize_row(i, &mut a);
            assert!(a.iter().all(|&v| v == 0.0), "{dtype:?} padding row {i}");
        }
        // The kernels agree: a selected weight times x is the source's rows times x.
        let x: Vec<f32> = (0..2 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        check(&s, &x, 2, &format!("{dtype:?} selected"));
        assert!(w.select_rows(&[37], 1).is_none() && w.select_rows(&idx, 3).is_none());
    }
}

#[test]
fn q8_0_from_f32_rounds_each_value_within_half_a_step() {
    let mut rng = StdRng::seed_from_u64(8);
    let (rows, cols) = (21, 64);
    let v: Vec<f32> = (0..rows * cols).map(|i| if i % 97 == 0 { 0.0 } else { rng.random_range(-2.0..2.0) }).collect();
    let w = PackedWeight::q8_0_from_f32(&v, rows, cols).unwrap();
    let mut row = vec![0f32; cols];
    for r in 0..rows {
        w.dequantize_row(r, &mut row);
        for (b, (got, want)) in row.chunks(QK).zip(v[r * cols..(r + 1) * cols].chunks(QK)).enumerate() {
            let amax = want.iter().fold(0f32, |m, x| x.abs().max(m));
            let step = half::f16::from_f32(amax / 127.0).to_f32();
            for (g, x) in got.iter().zip(want) {
                assert!((g - x).abs() <= 0.5 * step + 1e-7, "row {r} block {b}: {g} for {x}");
            }
        }
    }
    assert!(PackedWeight::q8_0_from_f32(&v, rows, cols - 1).is_none());
    assert!(PackedWeight::q8_0_from_f32(&v[1..], rows, cols).is_none());
}

#[test]
fn raw_arrays_read_back_bit_for_bit_and_wrong_lengths_are_refused() {
    let mut rng = StdRng::seed_from_u64(9);
    let (rows, cols) = (37, 96);
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1, GgmlDType::Q8_0] {
        let w = PackedWeight::from_ggml(dtype, &random_ggml(dtype, rows, cols, &mut rng), rows, cols).unwrap();
        let (qs, sc) = w.raw();
        assert_eq!(PackedWeight::raw_sizes(w.kind(), rows, cols), Some((qs.len(), sc.len())));
        let back = PackedWeight::from_raw(w.kind(), rows, cols, qs, sc).unwrap();
        assert_eq!(back.raw(), w.raw(), "{dtype:?}");
        let x: Vec<f32> = (0..2 * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
        check(&back, &x, 2, &format!("{dtype:?} from raw"));
        assert!(PackedWeight::from_raw(w.kind(), rows + 16, cols, qs, sc).is_none());
        assert!(PackedWeight::from_raw(w.kind(), rows, cols, &qs[64..], sc).is_none());
        assert!(PackedWeight::raw_sizes(w.kind(), rows, cols + 1).is_none());
    }
}
