//! `dataplane-agent`: wiring only. See lib.rs (and cli.rs for the flags) for the logic.
use clap::Parser;
use dataplane_agent::{
    cli::{Cli, Cmd, InspectWhat},
    cleanup, inspect, trace,
};

/// Structured logs: `key=value` text or one JSON object per line, filtered by RUST_LOG.
fn init_logs(default_level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().flatten_event(true).init();
    } else {
        b.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run(mut args) => {
            let notes = args.read_config_file()?;
            init_logs("info", args.logging_format == "json");
            if let Some((file, notes)) = notes {
                notes.log(&file);
            }
            if args.cleanup {
                // Held until everything is removed, so no agent starts on the directory meanwhile.
                let _lock = if args.pin_dir.exists() {
                    match dataplane_agent::loader::PinLock::try_acquire(&args.pin_dir).map_err(|e| anyhow::anyhow!("--cleanup: {}: {e}", args.pin_dir.display()))? {
                        Some(l) => Some(l),
                        None => anyhow::bail!(
                            "--cleanup: an agent is running on {} (it holds the directory's lock): stop it first (delete the DaemonSet), or it attaches again",
                            args.pin_dir.display()
                        ),
                    }
                } else {
                    None
                };
                let (links, maps) = dataplane_agent::attach::remove_all(&args.pin_dir).map_err(|e| anyhow::anyhow!("--cleanup: {}: {e}", args.pin_dir.display()))?;
                println!("{}: detached {} links ({}), removed {} pinned maps", args.pin_dir.display(), links.len(), if links.is_empty() { "-".into() } else { links.join(", ") }, maps.len());
                return Ok(());
            }
            let print = args.print_config;
            let cfg = args.config()?;
            if print {
                print!("{}", dataplane_agent::cli::describe(&cfg));
                return Ok(());
            }
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(dataplane_agent::agent::run(cfg))
        }
        Cmd::Trace { scenario, from, to, pin_dir, nodeport_acceleration } => {
            // trace prints its report on stdout; keep its logs to warnings.
            init_logs("warn", false);
            if let (Some(from), Some(to)) = (from, to) {
                let (to, proto) = trace::live::parse_to(&to).map_err(anyhow::Error::msg)?;
                print!("{}", trace::live::explain(&pin_dir, from, to, proto).map_err(anyhow::Error::msg)?);
                return Ok(());
            }
            if scenario.is_empty() {
                anyhow::bail!("give --scenario FILE... or --from IP --to IP:PORT/PROTO");
            }
            if !trace::run_files(&scenario, nodeport_acceleration == "xdp") {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Inspect { what, pin_dir } => {
            init_logs("warn", false);
            let out = match what {
                InspectWhat::Services => inspect::services(&pin_dir),
                InspectWhat::Backends => inspect::backends(&pin_dir),
                InspectWhat::Conntrack => inspect::conntrack(&pin_dir),
                InspectWhat::Policies => inspect::policies(&pin_dir),
                InspectWhat::PolicyConntrack => inspect::policy_conntrack(&pin_dir),
                InspectWhat::Links => inspect::links(&pin_dir),
            };
            print!("{}", out.map_err(|e| anyhow::anyhow!("{}: {e}", pin_dir.display()))?);
            Ok(())
        }
        Cmd::Monitor { pin_dir, count, denied } => {
            init_logs("warn", false);
            dataplane_agent::monitor::run(&pin_dir, count, denied, &mut std::io::stdout().lock()).map_err(|e| anyhow::anyhow!("{}: {e}", pin_dir.display()))
        }
        Cmd::CleanupKubeProxy { dry_run } => {
            init_logs("info", false);
            let report = cleanup::cleanup_kube_proxy(dry_run)?;
            print!("{report}");
            Ok(())
        }
        Cmd::SockProbe { args } => Ok(trace::probe::probe_main(&args)?),
    }
}
