use anyhow::Result;
#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand { Ppl }
pub fn run(_a: EvalCommand, _q: bool) -> Result<()> { anyhow::bail!("not yet") }
