//! `trustql demo`: a whole federation on loopback and a few showcase queries.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use trustql_client::Client;
use trustql_demo::{DP_SHOWCASE, DemoDp, DemoOptions, POOL_SHOWCASE, SHOWCASE, launch};

use crate::query::{Format, print_result};

/// `trustql demo` arguments.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Number of trusts.
    #[arg(long, default_value_t = 3)]
    trusts: usize,
    /// Patients across the federation.
    #[arg(long, default_value_t = 20_000)]
    patients: u64,
    /// Seed for the synthetic data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Use this federation directory (DIR/<TRUST>/<table>.parquet) instead of generating one.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Minimum count 1 and no rounding at every node: for correctness checks only.
    #[arg(long)]
    unprotected: bool,
    /// Run the demo project in differential-privacy mode at every trust (OpenDP noise,
    /// durable budgets) instead of the cell-key method.
    #[arg(long, conflicts_with = "unprotected")]
    dp: bool,
    /// Protect the demo project by suppression and rounding of counts to 5 at every trust
    /// instead of the cell-key method (sums and means are then exact).
    #[arg(long, conflicts_with_all = ["unprotected", "dp"])]
    rounding: bool,
    /// Pool the demo project across every trust: the trusts add their exact counts under
    /// pairwise masks and the minimum and the rounding or cell-key perturbation apply once, to
    /// the total (counts only, grouped by coded columns).
    #[arg(long, conflicts_with_all = ["unprotected", "dp"])]
    pool: bool,
    /// With --dp: the ε a query spends at each trust.
    #[arg(long, default_value_t = DemoDp::default().epsilon_per_query, requires = "dp")]
    epsilon_per_query: f64,
    /// With --dp: the ε the demo project may spend at each trust in all.
    #[arg(long, default_value_t = DemoDp::default().epsilon_budget, requires = "dp")]
    epsilon_budget: f64,
    /// Keep running after the showcase until interrupted.
    #[arg(long)]
    serve: bool,
    /// Write the connection details (url, token, project, ca, data_dir, trusts, and with --dp
    /// epsilon_per_query and epsilon_budget; pooled) as JSON here.
    #[arg(long)]
    info: Option<PathBuf>,
}

/// Launches the federation, runs the showcase, optionally keeps serving.
pub(crate) fn demo(args: &DemoArgs) -> Result<bool> {
    let options = DemoOptions {
        trusts: args.trusts,
        patients: args.patients,
        seed: args.seed,
        data: args.data.clone(),
        unprotected: args.unprotected,
        rounding: args.rounding,
        pool: args.pool,
        dp: args.dp.then_some(DemoDp {
            epsilon_per_query: args.epsilon_per_query,
            epsilon_budget: args.epsilon_budget,
        }),
        ..DemoOptions::default()
    };
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        if args.unprotected {
            eprintln!(
                "WARNING: --unprotected runs every node with minimum count 1 and no rounding.\n\
                 WARNING: results are NOT disclosure-controlled. Use it only for correctness checks."
            );
        }
        match &args.data {
            Some(dir) => println!("Using the federation in {}", dir.display()),
            None => println!(
                "Generating {} synthetic patients across {} trusts (seed {})…",
                args.patients, args.trusts, args.seed
            ),
        }
        let federation = launch(&options).await?;
        let info = &federation.info;
        println!(
            "Started {} node(s) ({}) and a coordinator at {}",
            federation.nodes.len(),
            info.trusts.join(", "),
            info.url
        );
        if let Some(dp) = options.dp {
            println!(
                "Differential privacy: project {} spends ε {} per query at each trust, {} in all \
                 (see each answer's coverage for what is left)",
                info.project, dp.epsilon_per_query, dp.epsilon_budget
            );
        } else if options.pool {
            println!(
                "Pooled: the trusts add their exact counts under pairwise masks (the coordinator \
                 sees only the total), and the pool withholds cells of fewer than 10 patients \
                 and {} the total once",
                if options.rounding {
                    "rounds to 5"
                } else {
                    "perturbs by the cell-key method"
                }
            );
        } else if options.rounding {
            println!(
                "Suppression and rounding: each trust withholds groups of fewer than 10 patients \
                 and rounds every count to the nearest 5 (sums and means are exact)"
            );
        } else if !options.unprotected {
            println!(
                "Cell-key method: each trust withholds groups of fewer than 10 patients and \
                 perturbs every count (by at most 3) and every sum; the same patients always \
                 get the same adjustment, so rewording or repeating a query changes nothing \
                 (--rounding: suppression and rounding to 5 instead)"
            );
        }
        if let Some(path) = &args.info {
            let json = serde_json::to_string_pretty(info).context("cannot write the info file")?;
            // Written whole then renamed, so a script polling for the file never reads half.
            let partial = path.with_extension("partial");
            std::fs::write(&partial, json)
                .and_then(|()| std::fs::rename(&partial, path))
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!("Connection details written to {}", path.display());
        }

        let ca = std::fs::read(&info.ca).context("cannot read the demo CA")?;
        let mut client = Client::connect(&info.url, Some(&ca), &info.token, Some(&info.project)).await?;
        let showcase = if args.dp {
            DP_SHOWCASE
        } else if args.pool {
            POOL_SHOWCASE
        } else {
            SHOWCASE
        };
        for (title, sql) in showcase {
            println!("\n== {title}\n{sql}\n");
            match client.query(sql).await {
                Ok(result) => print_result(&result, Format::Table)?,
                Err(e) => println!("Not answered: {e}"),
            }
        }

        if args.serve {
            println!(
                "\nServing. Connect any Flight SQL client over TLS:\n  url      {}\n  token    {}\n  \
                 project  {} (gRPC header x-trustql-project)\n  CA       {}\n\
                 e.g. trustql query --coordinator {} --ca {} --token {} \"SELECT COUNT(*) FROM sim_av_patient\"\n\
                 Press Ctrl-C to stop.",
                info.url,
                info.token,
                info.project,
                info.ca.display(),
                info.url,
                info.ca.display(),
                info.token
            );
            crate::node::shutdown_signal().await;
            println!("Stopping.");
        }
        Ok(true)
    })
}
