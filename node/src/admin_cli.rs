//! `cfs admin query` and the report shortcuts: the gateway's engine run
//! in this process over a lakehouse directory (a local cluster's, found
//! with `--dir`, or any with `--index`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use cfs_admin::{Engine, Format, Limits, Report};

/// Where the index is and how to answer.
#[derive(clap::Args, Debug)]
pub struct IndexArgs {
    /// A local cluster made by `cfs up` (its lakehouse is found there).
    #[arg(long, conflicts_with = "index")]
    pub dir: Option<PathBuf>,
    /// A lakehouse directory (the node's `lakehouse_dir`).
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// table, csv or json (arrow over HTTP only).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// A file queries may read besides the index (e.g. a CSV to join
    /// with); repeat for more.
    #[arg(long)]
    pub allow: Vec<PathBuf>,
    /// Rows printed at most.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Seconds a query may run.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

/// What to run.
pub enum Ask {
    Sql(String),
    Report(Report),
}

pub fn run(a: &IndexArgs, ask: Ask) -> anyhow::Result<()> {
    let dir = match (&a.dir, &a.index) {
        (Some(d), None) => crate::cluster::lakehouse_dir(d)?,
        (None, Some(i)) => i.clone(),
        _ => anyhow::bail!("give --dir (a local cluster) or --index (a lakehouse directory)"),
    };
    let format: Format = a.format.parse()?;
    if format == Format::Arrow {
        anyhow::bail!(
            "--format arrow is served by the gateway's HTTP API (/api/query?format=arrow)"
        );
    }
    let limits = Limits {
        time: Duration::from_secs(a.timeout.max(1)),
        rows: a.limit.unwrap_or(Limits::default().rows),
        ..Limits::default()
    };
    let engine = Engine::open(&dir, &a.allow, limits)
        .with_context(|| format!("opening the index in {}", dir.display()))?;
    let answer = match ask {
        Ask::Sql(sql) => engine.query(&sql, None)?,
        Ask::Report(r) => engine.report(&r)?,
    };
    match format {
        Format::Table => {
            print!("{}", answer.to_table()?);
            println!();
            if let Some(n) = &answer.note {
                println!("{n}");
            }
            println!("{}", answer.freshness_line());
        }
        Format::Csv => {
            use std::io::Write;
            std::io::stdout().write_all(&answer.to_csv()?)?;
            eprintln!("{}", answer.freshness_line());
        }
        Format::Json => println!("{}", serde_json::to_string_pretty(&answer.to_json()?)?),
        Format::Arrow => unreachable!("refused above"),
    }
    Ok(())
}
