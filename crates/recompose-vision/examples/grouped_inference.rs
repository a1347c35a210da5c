//! Does skipping the unchosen experts make MoE CNN inference faster, not only cheaper on paper?
//! Builds dense and 2-expert MoE versions of both networks at CIFAR size, checks that the
//! expert-grouped path gives the masked path's logits, and times both against the dense model.
//!
//! Also times a training step and a PGD step (forward + backward), and the fused CPU ops
//! (im2col conv, training-mode batch norm) against candle's own ops on the VGG's layer shapes.
//!
//!   cargo run --release -p recompose-vision --example grouped_inference [-- BATCH REPEATS]

use candle_core::{DType, Device, Tensor, Var};
use recompose_vision::model::{Arch, Exec, Model, ModelConfig};
use recompose_vision::nn::{cross_entropy, Ctx, Track};
use recompose_vision::{conv, norm};

fn main() -> recompose_vision::Result<()> {
    let args: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let (batch, repeats) = (args.first().copied().unwrap_or(256), args.get(1).copied().unwrap_or(5));
    let x = Tensor::rand(0f32, 1f32, (batch, 3, 32, 32), &Device::Cpu)?;
    println!("batch {batch}, median of {repeats} runs, {} threads", rayon::current_num_threads());
    let y = Tensor::zeros(batch, DType::U32, &Device::Cpu)?;
    println!(
        "{:<7} {:<7} {:>8} {:>9} {:>12} {:>13} {:>10} {:>15} {:>16}",
        "arch",
        "model",
        "M MACs",
        "@28px",
        "ms (masked)",
        "ms (grouped)",
        "images/s",
        "ms train step",
        "ms attack step"
    );
    for arch in [Arch::Vgg, Arch::Resnet] {
        for experts in [1, 2] {
            let cfg = ModelConfig {
                arch,
                width: 16,
                experts,
                router_width: 8,
                in_channels: 3,
                image_size: 32,
                classes: 10,
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            };
            // The Fashion-MNIST shape (1 x 28 x 28) has its own cost per image.
            let fashion =
                ModelConfig { in_channels: 1, image_size: 28, mean: vec![0.5], std: vec![0.25], ..cfg.clone() };
            let fashion_macs = Model::new(fashion, 0, DType::F32)?.macs();
            let m = Model::new(cfg, 0, DType::F32)?;
            // One training-mode pass so batch norm has real running statistics.
            m.forward(&x, &Ctx { train: true, track: Track::None }, Exec::Masked)?;
            let time = |exec| {
                median_ms(repeats, || {
                    m.forward(&x, &Ctx::eval(), exec)?;
                    Ok(())
                })
            };
            let masked = time(Exec::Masked)?;
            // A training step (forward + backward, all parameters) and a PGD step (input only).
            let step = |train: bool| {
                median_ms(repeats, || {
                    let v = candle_core::Var::from_tensor(&x)?;
                    let ctx = if train { Ctx { train: true, track: Track::All } } else { Ctx::eval() };
                    let logits = m.forward(v.as_tensor(), &ctx, Exec::Masked)?.logits;
                    cross_entropy(&logits, &y)?.backward()?;
                    Ok(())
                })
            };
            let (train_ms, attack_ms) = (step(true)?, step(false)?);
            let (grouped, check) = if experts > 1 {
                let a = m.forward(&x, &Ctx::eval(), Exec::Masked)?.logits;
                let b = m.forward(&x, &Ctx::eval(), Exec::Grouped)?.logits;
                let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                (time(Exec::Grouped)?, format!("  max |grouped - masked| {d:.1e}"))
            } else {
                (masked, String::new())
            };
            let name = if experts == 1 { "dense" } else { "moe-2" };
            println!(
                "{:<7} {:<7} {:>8.2} {:>9.2} {:>12.1} {:>13.1} {:>10.0} {:>15.0} {:>16.0}{check}",
                format!("{arch:?}").to_lowercase(),
                name,
                m.macs() as f64 / 1e6,
                fashion_macs as f64 / 1e6,
                masked,
                grouped,
                batch as f64 / grouped * 1e3,
                train_ms,
                attack_ms
            );
        }
    }
    fused_against_candle(batch.min(128), repeats)
}

/// Median milliseconds of `f` over `repeats` runs.
fn median_ms(repeats: usize, mut f: impl FnMut() -> recompose_vision::Result<()>) -> recompose_vision::Result<f64> {
    let mut t = vec![];
    for _ in 0..repeats {
        let s = std::time::Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Forward + backward (input and weight gradients) of one layer, fused op against candle's.
fn fused_against_candle(batch: usize, repeats: usize) -> recompose_vision::Result<()> {
    println!("\nbatch {batch}, forward + backward, median ms");
    println!("{:<24} {:>10} {:>10} {:>8}", "layer", "candle", "fused", "speedup");
    let row = |name: String, candle: f64, fused: f64| {
        println!("{name:<24} {candle:>10.1} {fused:>10.1} {:>7.1}x", candle / fused)
    };
    // The VGG's 3x3 convs at width 16 on CIFAR (stride 1, pad 1).
    for (cin, cout, hw) in [(3, 16, 32), (16, 16, 32), (32, 32, 16), (64, 64, 8)] {
        let x = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (batch, cin, hw, hw), &Device::Cpu)?)?;
        let w = Var::from_tensor(&Tensor::rand(-0.1f32, 0.1f32, (cout, cin, 3, 3), &Device::Cpu)?)?;
        let run = |fused: bool| {
            median_ms(repeats, || {
                let y = if fused {
                    conv::conv2d(x.as_tensor(), w.as_tensor(), 1, 1)?
                } else {
                    x.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1)?
                };
                y.sum_all()?.backward()?;
                Ok(())
            })
        };
        row(format!("conv {cin}->{cout} @{hw}x{hw}"), run(false)?, run(true)?);
    }
    for (c, hw) in [(16, 32), (64, 8)] {
        let x = Var::from_tensor(&Tensor::rand(-1f32, 1f32, (batch, c, hw, hw), &Device::Cpu)?)?;
        let g = Var::from_tensor(&Tensor::ones(c, DType::F32, &Device::Cpu)?)?;
        let b = Var::from_tensor(&Tensor::zeros(c, DType::F32, &Device::Cpu)?)?;
        let run = |fused: bool| {
            median_ms(repeats, || {
                let y = if fused {
                    norm::batch_norm_train(x.as_tensor(), g.as_tensor(), b.as_tensor())?
                } else {
                    norm::batch_norm_train_candle_ops(x.as_tensor(), g.as_tensor(), b.as_tensor())?
                };
                y.sum_all()?.backward()?;
                Ok(())
            })
        };
        row(format!("batch norm {c} @{hw}x{hw}"), run(false)?, run(true)?);
    }
    Ok(())
}
