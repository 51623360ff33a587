//! idlemon: finds TCP connections a middlebox's idle timeout is about to
//! kill, and explains the ones it did.

use std::process::ExitCode;

use clap::Parser as _;
use monitor::{
    advise,
    cli::{Cli, Command},
    client, daemon, logging,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return cli_error(&error),
    };
    let outcome = match cli.command {
        Some(Command::Sockets(args)) => client::sockets(&args),
        Some(Command::Events(args)) => client::events(&args),
        Some(Command::Advise(args)) => advise::run(&args),
        None => logging::init(&cli.log).and_then(|()| {
            abort_on_panic();
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(anyhow::Error::from)
                .and_then(|runtime| runtime.block_on(daemon::run(cli.daemon)))
        }),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("idlemon: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A panic in any thread or task ends the daemon, so that the kubelet (or
/// the service manager) restarts it: tokio would otherwise catch a task's
/// panic and leave a half-working agent that still answers its probes.
fn abort_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!("idlemon: error: a panic is a bug; exiting so that idlemon is restarted");
        std::process::abort();
    }));
}

/// Help and version go to stdout as usual; a usage error is one line naming
/// the problem, then a pointer to --help.
fn cli_error(error: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        let _ = error.print();
        return ExitCode::SUCCESS;
    }
    let rendered = error.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    eprintln!("idlemon: error: {first} (see idlemon --help)");
    ExitCode::from(2)
}
