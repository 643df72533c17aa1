//! `fedveil keygen`: server certificates and client identities
//! (protocols/federation.md §2.1).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Subcommand};
use fedveil_fed::net::{ClientIdentity, ServerIdentity};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    what: Identity,
}

#[derive(Subcommand)]
enum Identity {
    /// A self-signed server certificate: writes DIR/cert.pem, DIR/key.pem
    /// and DIR/fingerprint.txt, and prints the fingerprint clients pin.
    Server {
        /// Directory to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Host names or IP addresses the certificate names (repeatable).
        #[arg(long = "name", default_value = "localhost")]
        names: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
    /// A client identity: writes the private key to FILE and prints the
    /// public key the server's allow-list needs.
    Client {
        /// File for the private key (mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Also append the public key to this allow-list file.
        #[arg(long)]
        allow_list: Option<PathBuf>,
        /// Replace an existing key file.
        #[arg(long)]
        force: bool,
    },
}

pub fn run(args: &Args) -> anyhow::Result<ExitCode> {
    match &args.what {
        Identity::Server { dir, names, force } => {
            for f in ["cert.pem", "key.pem", "fingerprint.txt"] {
                let p = dir.join(f);
                if p.exists() && !force {
                    bail!("{} exists; pass --force to replace it", p.display());
                }
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let id = ServerIdentity::generate(names)?;
            id.save(dir)?;
            let fingerprint = dir.join("fingerprint.txt");
            crate::write_file(&fingerprint, format!("{}\n", id.fingerprint()).as_bytes())?;
            println!("{}", id.fingerprint());
            eprintln!(
                "wrote {}, {} and {}; clients pin the fingerprint above \
                 (client.fingerprint, or client.fingerprint_file with a copy of {})",
                dir.join("cert.pem").display(),
                dir.join("key.pem").display(),
                fingerprint.display(),
                fingerprint.display()
            );
        }
        Identity::Client {
            out,
            allow_list,
            force,
        } => {
            if out.exists() && !force {
                bail!("{} exists; pass --force to replace it", out.display());
            }
            let id = ClientIdentity::generate(&mut rand_core::OsRng);
            id.save(out)?;
            let key = id.public();
            println!("{key}");
            if let Some(list) = allow_list {
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(list)
                    .with_context(|| format!("opening {}", list.display()))?;
                writeln!(f, "{key}").with_context(|| format!("writing {}", list.display()))?;
                eprintln!(
                    "wrote {}; appended the public key to {}",
                    out.display(),
                    list.display()
                );
            } else {
                eprintln!(
                    "wrote {}; add the public key above to the server's allow-list",
                    out.display()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
