//! recompose-vision: robust CNNs and MoE CNNs on the CPU with candle autograd. Image data sets
//! (Fashion-MNIST, CIFAR-10 test split), CIFAR-10-C style corruptions, dense and MoE ResNet/VGG
//! with expert-grouped inference, FGSM/PGD attacks, and standard / PGD-AT / TRADES / AdvMoE training.

pub mod attack;
pub mod conv;
pub mod corrupt;
pub mod data;
pub mod error;
pub mod model;
pub mod nn;
pub mod norm;
pub mod train;

pub use corrupt::Corruption;
pub use data::{Dataset, Split};
pub use error::{Error, Result};

/// Seeded uniform f64 tensors for the unit tests' oracles.
#[cfg(test)]
pub(crate) fn test_tensor(shape: &[usize], seed: u64, range: f64) -> candle_core::Tensor {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| r.random_range(-range..range)).collect();
    candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
}
