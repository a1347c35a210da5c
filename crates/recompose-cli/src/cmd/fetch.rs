//! `recompose fetch`: download assets by name.

use anyhow::Result;
use recompose_assets as assets;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Asset names (see --list).
    names: Vec<String>,
    /// List the known assets and whether they are cached.
    #[arg(long)]
    list: bool,
    /// Download again even when cached.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.list || a.names.is_empty() {
        for asset in assets::ASSETS {
            let cached = assets::home().join(asset.name).is_dir();
            println!("{:<14} {:<8} {}", asset.name, if cached { "cached" } else { "-" }, asset.about);
        }
        return Ok(());
    }
    for name in &a.names {
        let asset = assets::find(name).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown asset '{name}' (known: {})",
                assets::ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
            )
        })?;
        let dir = assets::home().join(asset.name);
        if dir.is_dir() && !a.force {
            eprintln!("{name}: cached at {}", dir.display());
            continue;
        }
        if a.force {
            assets::remove(asset)?;
        }
        eprintln!("{name}: fetching ...");
        let dir = assets::fetch(asset)?;
        eprintln!("{name}: ready at {}", dir.display());
    }
    Ok(())
}
