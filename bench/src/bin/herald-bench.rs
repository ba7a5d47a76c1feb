//! `herald-bench`: the SSE load generator. All logic lives in `herald_bench::loadgen`;
//! this file only parses the command line (the `Opt` doc comments are `--help`).

use clap::Parser;

fn main() -> anyhow::Result<()> {
    herald_bench::loadgen::main(herald_bench::loadgen::Opt::parse())
}
