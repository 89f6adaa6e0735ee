//! `mailroom`: the one binary. `serve` runs listeners and the embedded queue in one process;
//! `check` validates a config; `queue` inspects the local spool; `crd` prints the operator's
//! CustomResourceDefinitions. This is the edge where errors become `anyhow` messages for a
//! person.

mod backend;
mod operator_cmd;
mod queue_cmd;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Mailroom: a Kubernetes-native mail transfer system.
#[derive(Debug, Parser)]
#[command(name = "mailroom", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the listeners and the embedded on-disk queue in one process.
    Serve {
        /// Config file; without it the embedded default (config/mailroom.yaml) is used.
        #[arg(long, short, env = "MAILROOM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the inbound listeners of a pod against the cluster queue (queue.jetstream).
    Inbound {
        /// Config file (rendered by the operator into the pod's ConfigMap).
        #[arg(long, short, env = "MAILROOM_CONFIG")]
        config: PathBuf,
    },
    /// Run the delivery workers of a pod against the cluster queue (queue.jetstream).
    Outbound {
        /// Config file (rendered by the operator into the pod's ConfigMap).
        #[arg(long, short, env = "MAILROOM_CONFIG")]
        config: PathBuf,
        /// Run only this policy's workers (default: every policy in the file).
        #[arg(long)]
        policy: Option<String>,
    },
    /// Validate a config file (syntax, fields, TLS files, users file, plugins) and exit.
    Check {
        /// Config file; without it the embedded default is checked.
        #[arg(long, short, env = "MAILROOM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Run the Kubernetes operator: reconcile MailListeners and DeliveryPolicies into inbound
    /// pods and delivery workers.
    Operator(Box<operator_cmd::OperatorArgs>),
    /// Print the CustomResourceDefinitions (MailListener, DeliveryPolicy) as multi-document
    /// YAML, or write them into a directory.
    Crd {
        /// Write one file per CRD into this directory (default `crds`) instead of printing.
        #[arg(long, num_args = 0..=1, default_missing_value = "crds", value_name = "DIR")]
        write: Option<PathBuf>,
    },
    /// Inspect the local spool.
    Queue {
        /// Config file naming the spool (queue.local.path).
        #[arg(long, short, env = "MAILROOM_CONFIG")]
        config: Option<PathBuf>,
        /// Spool directory; overrides the config.
        #[arg(long)]
        spool: Option<PathBuf>,
        #[command(subcommand)]
        action: queue_cmd::QueueAction,
    },
}

/// Loads the config file, or the embedded default.
pub(crate) fn load_config(
    path: Option<&std::path::Path>,
) -> anyhow::Result<mailroom_config::Config> {
    let loaded = match path {
        Some(p) => mailroom_config::load_file(p),
        None => mailroom_config::load_str(
            mailroom_config::DEFAULT_CONFIG,
            "embedded default config (config/mailroom.yaml)",
        ),
    };
    loaded.map_err(|e| anyhow::anyhow!("{e}"))
}

/// `mailroom crd`: prints every CRD, or writes them into `dir`.
fn crd(dir: Option<&std::path::Path>) -> anyhow::Result<()> {
    use anyhow::Context;
    match dir {
        None => {
            print!("{}", mailroom_operator::generate::all_yaml()?);
        }
        Some(dir) => {
            let written = mailroom_operator::generate::write_files(dir)
                .with_context(|| format!("writing CRDs into {}", dir.display()))?;
            for path in written {
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve::run(config.as_deref()),
        Command::Inbound { config } => serve::run_inbound(&config),
        Command::Outbound { config, policy } => serve::run_outbound(&config, policy.as_deref()),
        Command::Check { config } => serve::check(config.as_deref()),
        Command::Crd { write } => crd(write.as_deref()),
        Command::Operator(args) => operator_cmd::run(*args),
        Command::Queue {
            config,
            spool,
            action,
        } => queue_cmd::run(config.as_deref(), spool, action),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mailroom: {e:#}");
            ExitCode::FAILURE
        }
    }
}
