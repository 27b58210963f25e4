//! `initctl run`: a one-off container in the foreground, through init's API.
//!
//! Owns: asking init for a transient unit (`Request::Run`), relaying its journal lines (stdout to stdout, stderr
//! to stderr) while it runs, and exiting with the container's status (128+N when killed by signal N, 125 when it
//! could not start, like docker). Does not: start anything itself — init does, so the container is a unit like
//! any other (cgroup, journal, `initctl status`).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::api::client::Client;
use crate::api::{Reply, Request};
use crate::journal::{Query, Stream};
use crate::supervisor::Active;

use super::unit::RunSpec;

#[derive(clap::Args, Debug)]
#[command(after_help = "EXAMPLES\n  initctl run busybox echo hello\n  initctl run --rm --net private -v /srv:/srv:ro busybox sh -c 'ls /srv; wget -qO- $KEEL_KV_URL/v2/keys'")]
pub struct RunArgs {
    /// Forget the transient unit once it exited (else it stays in `initctl list` until the next reload).
    #[arg(long)]
    pub rm: bool,
    /// `host` (default) or `private` (own netns on the keel0 bridge).
    #[arg(long, value_name = "host|private")]
    pub net: Option<String>,
    /// HOST:CONTAINER[:ro] bind mount; repeatable. A device file (`-v /dev/fuse:/dev/fuse`) also lets the
    /// container open that device (read-only with :ro); no other host device opens inside.
    #[arg(short = 'v', long = "volume")]
    pub volumes: Vec<String>,
    /// NAME=value; repeatable.
    #[arg(short = 'e', long = "env")]
    pub env: Vec<String>,
    /// An image in the store (`initctl image list`).
    pub image: String,
    /// The command and its arguments (default: the image's).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

fn print_new(client: &mut Client, unit: &str, after: &mut Option<u64>) -> anyhow::Result<()> {
    let q = Query { unit: Some(unit.to_string()), after_seq: *after, ..Query::default() };
    if let Reply::Records { records } = client.call(&Request::Logs { query: q, follow: false })? {
        let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
        for r in records {
            *after = Some(r.seq);
            match r.stream {
                Stream::Stdout => writeln!(out, "{}", r.message)?,
                Stream::Stderr => writeln!(err, "{}", r.message)?,
                Stream::Init => {}
            }
        }
        out.flush()?;
    }
    Ok(())
}

/// The seq of the journal's newest record, if it has any.
fn journal_end(client: &mut Client) -> anyhow::Result<Option<u64>> {
    let q = Query { last: Some(1), ..Query::default() };
    Ok(match client.call(&Request::Logs { query: q, follow: false })? {
        Reply::Records { records } => records.last().map(|r| r.seq),
        _ => None,
    })
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Ctrl-C (or SIGTERM) stops the container instead of leaving it running without a terminal.
fn catch_interrupts() {
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_interrupt),
        nix::sys::signal::SaFlags::SA_RESTART,
        nix::sys::signal::SigSet::empty(),
    );
    for sig in [nix::sys::signal::Signal::SIGINT, nix::sys::signal::Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let _ = unsafe { nix::sys::signal::sigaction(sig, &action) };
    }
}

/// Run the container; returns the exit code for initctl.
pub fn run(socket: &Path, args: &RunArgs) -> anyhow::Result<i32> {
    let spec = RunSpec {
        image: args.image.clone(),
        command: args.command.clone(),
        network: args.net.clone(),
        volumes: args.volumes.clone(),
        environment: args.env.clone(),
    };
    let mut client = Client::connect(socket)?;
    // `--rm` frees the name, so an earlier run's output may be in the journal under it: show only what is newer.
    let mut after = journal_end(&mut client)?;
    let (unit, ok, message) = match client.call(&Request::Run { spec })? {
        Reply::Job { unit, ok, message, .. } => (unit, ok, message),
        Reply::Error { message, .. } => {
            eprintln!("initctl: {message}");
            return Ok(125);
        }
        other => anyhow::bail!("unexpected reply from init: {other:?}"),
    };
    if !ok {
        print_new(&mut client, &unit, &mut after)?;
        eprintln!("initctl: {unit}: {message}");
        if args.rm {
            let _ = client.call(&Request::Forget { unit: unit.clone() });
        }
        return Ok(125);
    }
    catch_interrupts();
    let mut stop_sent = false;
    let mut finished_at: Option<Instant> = None;
    let code = loop {
        if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) && !stop_sent {
            eprintln!("initctl: stopping {unit}");
            let _ = client.call(&Request::Stop { unit: unit.clone(), wait: false });
            stop_sent = true;
        }
        print_new(&mut client, &unit, &mut after)?;
        let status = match client.call(&Request::Status { unit: unit.clone(), lines: 0 })? {
            Reply::Status { status, .. } => status,
            other => anyhow::bail!("unexpected reply from init: {other:?}"),
        };
        let done = status.job.is_none() && matches!(status.active, Active::Inactive | Active::Failed);
        if done {
            // The last output lines may still be in the pipe when the exit is seen: one more round after a beat.
            match finished_at {
                None => finished_at = Some(Instant::now()),
                Some(t) if t.elapsed() >= Duration::from_millis(50) => {
                    break match status.last_exit {
                        Some(e) => e.code.unwrap_or_else(|| 128 + e.signal.unwrap_or(0)),
                        None => {
                            eprintln!("initctl: {unit}: {}", status.error.unwrap_or_else(|| "ended without an exit status".into()));
                            125
                        }
                    };
                }
                Some(_) => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    print_new(&mut client, &unit, &mut after)?;
    if args.rm {
        let _ = client.call(&Request::Forget { unit: unit.clone() });
    }
    Ok(code)
}
