//! CPU kernels for the hot operations, each with a plain reference it is tested against.

pub mod quant;
#[cfg(target_arch = "x86_64")]
mod x86;

#[cfg(test)]
mod tests;
