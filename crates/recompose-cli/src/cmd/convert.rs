//! `recompose convert`.
use anyhow::Result;
#[derive(clap::Args, Debug)]
pub struct Args {}
pub fn run(_a: Args, _q: bool) -> Result<()> { anyhow::bail!("not yet") }
