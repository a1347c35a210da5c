//! CPU kernels for the hot operations, each with a plain reference it is tested against.

pub mod quant;
