//! `kubectl umstore`: a kubectl plugin for `UserMetadataStore` resources
//! (`umstore.io/v1alpha1`). It shows a store's status and makes the three day-2
//! changes the operator acts on: approving manual migrations, asking for a key
//! rotation, and raising the tier. Each change is one JSON merge patch of only the
//! annotation or `spec.tier` it is about, under the field manager `kubectl-umstore`,
//! and one line saying what changed; a change the operator or the CRD would refuse
//! is refused first, in their words, and nothing is sent.
//!
//! Installed by putting the binary on `PATH` (kubectl finds `kubectl-umstore`).

mod change;
mod connect;
mod error;
mod status;
mod store;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use k8s_openapi::jiff::Timestamp;
use umstore_migrations::Runner;

use crate::change::{Plan, Refusal};
use crate::connect::{Stores, Target};
use crate::error::Error;
use crate::status::Format;

/// Show a UserMetadataStore's status and make its day-2 changes.
#[derive(Debug, Parser)]
#[command(name = "kubectl umstore", bin_name = "kubectl umstore", version)]
struct Cli {
    /// The namespace of the store (default: the kubeconfig context's namespace).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig context to use (default: the current context).
    #[arg(long, global = true)]
    context: Option<String>,
    /// The kubeconfig file (default: $KUBECONFIG, else ~/.kube/config, else in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Tier, phase, conditions, components, endpoints, schema and keys, regions,
    /// replica lag.
    Status {
        /// The store's name.
        store: String,
        /// `table` (readable), or `json`/`yaml`: the `.status` object as stored.
        #[arg(short, long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Approve the pending migrations up to VERSION (spec.migrations.policy: Manual),
    /// by setting the annotation umstore.io/approve-migrations.
    ApproveMigrations {
        /// The store's name.
        store: String,
        /// A migration version this operator has; migrations up to it are applied.
        version: String,
    },
    /// Ask for a rotation of the store's transit key and a rewrap of every data key,
    /// by setting the annotation umstore.io/rotate-keys to the current time.
    RotateKeys {
        /// The store's name.
        store: String,
    },
    /// Raise spec.tier (1 to 4; never lowered).
    Promote {
        /// The store's name.
        store: String,
        /// The tier to run.
        #[arg(allow_negative_numbers = true)]
        tier: i32,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let target = Target {
        kubeconfig: cli.kubeconfig,
        context: cli.context,
        namespace: cli.namespace,
    };
    let stores = target.connect().await?;
    match cli.command {
        Command::Status { store, output } => {
            let found = stores.get(&store).await?;
            print!("{}", status::print(&found, output, Timestamp::now())?);
        }
        Command::ApproveMigrations { store, version } => {
            let what = format!(
                "approve migrations up to \"{version}\" on {}/{store}",
                stores.namespace
            );
            let found = stores.get(&store).await?;
            let plan = change::approve(&found, &version, &Runner::default());
            apply(&stores, &store, what, plan).await?;
        }
        Command::RotateKeys { store } => {
            let what = format!("rotate the keys of {}/{store}", stores.namespace);
            let found = stores.get(&store).await?;
            let plan = change::rotate(&found, Timestamp::now());
            apply(&stores, &store, what, Ok(plan)).await?;
        }
        Command::Promote { store, tier } => {
            let what = format!("promote {}/{store} to tier {tier}", stores.namespace);
            // The tier's range needs no store: refused before any request.
            let found = if (1..=4).contains(&tier) {
                stores.get(&store).await?
            } else {
                return Err(Error::Refused {
                    what,
                    message: umstore_crds::refusals::TIER_RANGE.to_string(),
                }
                .into());
            };
            let plan = change::promote(&found, tier);
            apply(&stores, &store, what, plan).await?;
        }
    }
    Ok(())
}

/// Sends the planned patch and says what changed, or why nothing did.
async fn apply(
    stores: &Stores,
    name: &str,
    what: String,
    plan: Result<Plan, Refusal>,
) -> Result<(), Error> {
    let who = format!("{}/{name}", stores.namespace);
    match plan {
        Err(Refusal(message)) => Err(Error::Refused { what, message }),
        Ok(Plan::Unchanged(why)) => {
            println!("{who}: {why}");
            Ok(())
        }
        Ok(Plan::Patch(change)) => {
            for warning in &change.warnings {
                eprintln!("warning: {warning}");
            }
            stores.merge_patch(name, &change.patch, &what).await?;
            println!("{who}: {}", change.summary);
            for note in &change.notes {
                println!("  {note}");
            }
            Ok(())
        }
    }
}
