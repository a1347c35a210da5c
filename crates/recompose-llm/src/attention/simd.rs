//! Building blocks of the attention kernels, written as plain loops over fixed-size lanes so the
//! compiler vectorises them, and the run-time choice of instruction set: every kernel body is
//! compiled three times (baseline, AVX2+FMA, AVX-512) by `isa_variants!` and picked by the CPU
//! level `kernels::quant::level()` detected (`RECOMPOSE_KERNEL` lowers it).

use crate::kernels::quant::{level, Level};

/// The instruction set a kernel body is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

pub(crate) fn isa() -> Isa {
    match level() {
        Level::Scalar => Isa::Scalar,
        Level::Avx2 => Isa::Avx2,
        Level::Avx512Vnni => Isa::Avx512,
    }
}

/// Defines `fn name(isa: Isa, args..)` running `body` compiled for that instruction set. Inside
/// the body, `FMA` (fused multiply-adds available) and `WIDE` (512-bit vectors) are constants.
macro_rules! isa_variants {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name(isa: $crate::attention::simd::Isa, $($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body<const FMA: bool, const WIDE: bool>($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2($($arg: $ty),*) {
                body::<true, false>($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512($($arg: $ty),*) {
                body::<true, true>($($arg),*)
            }
            match isa {
                // SAFETY: `isa()` reports a level only when the CPU has its features.
                #[cfg(target_arch = "x86_64")]
                $crate::attention::simd::Isa::Avx2 => unsafe { avx2($($arg),*) },
                // SAFETY: as above (AVX-512 F/VL/BW, AVX2 and FMA detected).
                #[cfg(target_arch = "x86_64")]
                $crate::attention::simd::Isa::Avx512 => unsafe { avx512($($arg),*) },
                _ => body::<false, false>($($arg),*),
            }
        }
    };
}
pub(crate) use isa_variants;

/// `e^x` to about 1 ulp (Cephes' polynomial), branch-free so loops over it vectorise; exactly 0
/// below -87.3 (masked scores, -inf).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_54;
    const HI: f32 = 88.0;
    // 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LO, HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let r = xc - n * C1 - n * C2;
    let z = r * r;
    let p =
        ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 1.666_666_5e-1) * r + 0.5;
    let y = p * z + r + 1.0;
    let pow = f32::from_bits(((ni + 127) as u32) << 23);
    if x < LO {
        0.0
    } else {
        y * pow
    }
}

#[inline(always)]
fn larger(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

/// The largest value (-inf for none).
#[inline(always)]
pub(crate) fn max_of(x: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let tail = c.remainder().iter().fold(f32::NEG_INFINITY, |a, &b| larger(a, b));
    for ch in c {
        for i in 0..8 {
            m[i] = larger(m[i], ch[i]);
        }
    }
    m.iter().fold(tail, |a, &b| larger(a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp_and_underflows_to_zero() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 87.0 {
            let (want, got) = (x.exp(), exp(x));
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
        for x in [-88.0, -1e30, f32::NEG_INFINITY] {
            assert_eq!(exp(x), 0.0);
        }
        assert_eq!(exp(0.0), 1.0);
    }
}
