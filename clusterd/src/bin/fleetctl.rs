//! `fleetctl`: fleet's command-line client. Talks to the cluster's keys API (like CoreOS's fleetctl did) and,
//! for `status` and `journal`, to the machine that runs the unit.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use keel_clusterd::client::{enc, request};
use keel_clusterd::fleet::registry::{Kv, Snapshot};
use keel_clusterd::fleet::text_hash;
use keel_clusterd::fleet::units::parse_unit;
use keel_model::fleet::{self, DesiredState, DrainRecord, Rollout, UnitRecord, UnitState};
use keel_model::UnitName;
use serde_json::{json, Value};

const LONG_ABOUT: &str = "\
Schedule units across a Keel cluster, like CoreOS's fleetctl.

Units are systemd unit files with an optional [X-Fleet] section (MachineID=, MachineOf=, MachineMetadata=, Conflicts=, Global=, Replaces=; see docs/fleet.md). A unit's desired state is inactive (known to the cluster), loaded (assigned to a machine, its file written there) or launched (running); list-units shows it beside the state the machine reports. fleetctl writes to the cluster's keys API under /_keel/fleet/; the engine on the Raft leader places units and each machine's agent runs them on its init.

UNIT arguments are unit names (web.service, web@1.service; a bare `web` means web.service) or paths to unit files, which are submitted first. An instance of a submitted template (web@.service) needs no file of its own.

EXAMPLES
  fleetctl list-machines -l
  fleetctl start ./web@.service web@1.service web@2.service web@3.service
  fleetctl list-units
  fleetctl status web@1.service
  fleetctl journal -f --lines 20 web@1.service
  fleetctl replace ./web@.service          # roll the new text over web@1..3, one at a time
  fleetctl drain 1a2b3c --reason 'kernel update' --wait
  fleetctl undrain 1a2b3c
  fleetctl stop web@1.service; fleetctl destroy web@1.service
  fleetctl --endpoint http://10.0.0.1:2379,http://10.0.0.2:2379 --json list-units";

/// Schedule units across a Keel cluster (fleet's verbs).
#[derive(Parser, Debug)]
#[command(name = "fleetctl", version, about, long_about = LONG_ABOUT)]
struct Cli {
    /// Comma-separated client URLs of cluster members (tried in order).
    #[arg(long, global = true, default_value = "http://127.0.0.1:2379", env = "FLEETCTL_ENDPOINT")]
    endpoint: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Request timeout in seconds.
    #[arg(long, global = true, default_value_t = 10)]
    request_timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List machines with a live heartbeat: id, address, metadata, and STATE: `schedulable` (new units may
    /// land there) or `draining` (with the reason under -l; `fleetctl undrain` ends it).
    ListMachines {
        /// Full machine ids.
        #[arg(short = 'l', long = "full")]
        full: bool,
    },
    /// List scheduled units: machine, desired state, current state (one row per machine for Global units).
    ListUnits {
        /// Full machine ids.
        #[arg(short = 'l', long = "full")]
        full: bool,
    },
    /// List submitted unit files: content hash, desired and current state, target machine.
    ListUnitFiles {
        /// Full machine ids and hashes.
        #[arg(short = 'l', long = "full")]
        full: bool,
    },
    /// Submit unit files to the cluster (desired state inactive).
    Submit {
        /// Unit files; the file name is the unit name (web.service, web@.service).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Schedule units onto machines without starting them.
    Load(Transition),
    /// Schedule and start units; waits until each runs (unless --no-block).
    Start(Transition),
    /// Stop units, keeping them scheduled (desired state loaded).
    Stop(Transition),
    /// Stop units and take them off their machines (desired state inactive).
    Unload(Transition),
    /// Remove units from the cluster (their machines stop them).
    Destroy {
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Fleet's view of units plus init's status from the machine running them.
    Status {
        /// Unit names.
        #[arg(required = true)]
        units: Vec<String>,
        /// Journal lines to include.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// For a Global unit: which machine (id or prefix); default: every machine running it.
        #[arg(long)]
        machine: Option<String>,
    },
    /// Print a unit's file as submitted.
    Cat {
        /// Unit name.
        unit: String,
    },
    /// Print a unit's journal from the machine running it.
    Journal {
        /// Unit name.
        unit: String,
        /// Lines to show.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: usize,
        /// Keep printing new lines.
        #[arg(short, long)]
        follow: bool,
        /// For a Global unit: which machine (id or prefix).
        #[arg(long)]
        machine: Option<String>,
    },
    /// Mark a machine as draining: nothing new is scheduled there and its launched units move elsewhere.
    Drain {
        /// Machine id or unique prefix.
        machine: String,
        /// Why (shown in list-machines -l and to the reboot manager).
        #[arg(long, default_value = "fleetctl drain")]
        reason: String,
        /// Wait until every unit that has to move runs elsewhere.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// End a drain (units that moved stay where they are).
    Undrain {
        /// Machine id or unique prefix.
        machine: String,
    },
    /// Roll a changed unit file over its instances (or a plain/Global unit) one at a time, waiting for each
    /// to run the new text before touching the next.
    Replace {
        /// The changed unit file (web@.service rolls every web@N instance).
        file: PathBuf,
        /// Seconds to wait for each instance.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

#[derive(clap::Args, Debug)]
struct Transition {
    /// Unit names or unit files (files are submitted first).
    #[arg(required = true)]
    units: Vec<String>,
    /// Return once the desired state is recorded, without waiting for the machines.
    #[arg(long)]
    no_block: bool,
    /// Seconds to wait for the machines.
    #[arg(long, default_value_t = 60)]
    block_timeout: u64,
}

struct Ctl {
    kv: Kv,
    json: bool,
    timeout: Duration,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let ctl = Ctl {
        kv: Kv::new(cli.endpoint.split(',').map(|s| s.trim().trim_end_matches('/').to_string()).collect(), Duration::from_secs(cli.request_timeout)),
        json: cli.json,
        timeout: Duration::from_secs(cli.request_timeout),
    };
    keel_model::report::exit("fleetctl", run(&ctl, cli.cmd))
}

fn run(ctl: &Ctl, cmd: Cmd) -> anyhow::Result<()> {
    match cmd {
        Cmd::ListMachines { full } => list_machines(ctl, full),
        Cmd::ListUnits { full } => list_units(ctl, full),
        Cmd::ListUnitFiles { full } => list_unit_files(ctl, full),
        Cmd::Submit { files } => {
            for f in files {
                let name = submit_file(ctl, &f)?;
                println!("Unit {name} submitted");
            }
            Ok(())
        }
        Cmd::Load(t) => transition(ctl, t, DesiredState::Loaded),
        Cmd::Start(t) => transition(ctl, t, DesiredState::Launched),
        Cmd::Stop(t) => transition(ctl, t, DesiredState::Loaded),
        Cmd::Unload(t) => transition(ctl, t, DesiredState::Inactive),
        Cmd::Destroy { units } => destroy(ctl, &units),
        Cmd::Status { units, lines, machine } => status(ctl, &units, lines, machine.as_deref()),
        Cmd::Cat { unit } => {
            let snap = ctl.snapshot()?;
            let name = unit_name_arg(&unit);
            let u = snap.units.get(&name).with_context(|| not_found(&snap, &name))?;
            print!("{}", u.text);
            Ok(())
        }
        Cmd::Journal { unit, lines, follow, machine } => journal(ctl, &unit, lines, follow, machine.as_deref()),
        Cmd::Drain { machine, reason, wait, timeout } => drain(ctl, &machine, &reason, wait, Duration::from_secs(timeout)),
        Cmd::Undrain { machine } => {
            let snap = ctl.snapshot()?;
            let id = resolve_machine(&snap, &machine, true)?;
            ctl.kv.delete(&fleet::drain_key(&id), None)?;
            println!("Machine {id} is no longer draining");
            Ok(())
        }
        Cmd::Replace { file, timeout } => replace(ctl, &file, Duration::from_secs(timeout)),
    }
}

impl Ctl {
    fn snapshot(&self) -> anyhow::Result<Snapshot> {
        self.kv.snapshot().context("reading fleet state from the cluster (is clusterd running? check --endpoint)")
    }

    fn put_unit(&self, u: &UnitRecord) -> anyhow::Result<()> {
        let json = serde_json::to_string(u)?;
        self.kv.set(&fleet::unit_key(&u.name), &json, None).with_context(|| format!("writing unit {}", u.name))
    }
}

/// `web` → `web.service`; a path → its file name.
fn unit_name_arg(arg: &str) -> String {
    let base = Path::new(arg).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| arg.to_string());
    if base.ends_with(".service") || base.ends_with(".target") {
        base
    } else {
        format!("{base}.service")
    }
}

fn not_found(snap: &Snapshot, name: &str) -> String {
    let close: Vec<&String> = snap.units.keys().filter(|k| k.starts_with(name.split(['@', '.']).next().unwrap_or(name))).take(5).collect();
    if close.is_empty() {
        format!("unit {name} not found; submit its file first (fleetctl submit ./{name})")
    } else {
        format!("unit {name} not found (did you mean {}?)", close.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "))
    }
}

fn validate(name: &str, text: &str) -> anyhow::Result<()> {
    let parsed = UnitName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    // Templates are checked as an instance would be.
    let check_name = if parsed.is_template() { parsed.instantiate("check").map_err(|e| anyhow::anyhow!("{e}"))?.full } else { name.to_string() };
    match parse_unit(&check_name, text) {
        Ok(spec) => {
            for w in &spec.warnings {
                eprintln!("fleetctl: warning: {w}");
            }
            Ok(())
        }
        Err(errs) => bail!("{name} has errors:\n  {}", errs.join("\n  ")),
    }
}

/// Submit a file; an identical existing unit is fine, a different one must go through `replace`.
fn submit_file(ctl: &Ctl, path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading unit file {}", path.display()))?;
    let name = unit_name_arg(&path.to_string_lossy());
    validate(&name, &text)?;
    let rec = UnitRecord { name: name.clone(), text: text.clone(), desired: DesiredState::Inactive };
    if !ctl.kv.create(&fleet::unit_key(&name), &serde_json::to_string(&rec)?)? {
        let snap = ctl.snapshot()?;
        if snap.units.get(&name).is_some_and(|u| u.text != text) {
            bail!("unit {name} was already submitted with different content; use `fleetctl replace {}` to change it", path.display());
        }
    }
    Ok(name)
}

/// Make sure `arg` names a submitted unit (submitting a file, or instantiating a template); returns its name.
fn ensure_unit(ctl: &Ctl, arg: &str) -> anyhow::Result<String> {
    if Path::new(arg).is_file() {
        return submit_file(ctl, Path::new(arg));
    }
    let name = unit_name_arg(arg);
    let snap = ctl.snapshot()?;
    if snap.units.contains_key(&name) {
        return Ok(name);
    }
    let parsed = UnitName::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
    if parsed.is_instance() {
        if let Some(t) = parsed.template_name().and_then(|t| snap.units.get(&t)) {
            let rec = UnitRecord { name: name.clone(), text: t.text.clone(), desired: DesiredState::Inactive };
            ctl.kv.create(&fleet::unit_key(&name), &serde_json::to_string(&rec)?)?;
            return Ok(name);
        }
    }
    bail!("{}", not_found(&snap, &name))
}

fn transition(ctl: &Ctl, t: Transition, desired: DesiredState) -> anyhow::Result<()> {
    let mut names = Vec::new();
    for arg in &t.units {
        let name = ensure_unit(ctl, arg)?;
        if name.contains("@.") && Path::new(arg).is_file() {
            // `fleetctl start ./web@.service web@1.service`: the template file is submitted for the instances
            // named after it; a template itself never runs.
            continue;
        }
        if name.contains("@.") {
            bail!("{name} is a template; start its instances instead (e.g. {})", name.replace("@.", "@1."));
        }
        names.push(name);
    }
    let snap = ctl.snapshot()?;
    for name in &names {
        let mut rec = snap.units.get(name).cloned().with_context(|| not_found(&snap, name))?;
        if rec.desired != desired {
            rec.desired = desired;
            ctl.put_unit(&rec)?;
        }
    }
    if t.no_block {
        for n in &names {
            println!("Triggered unit {n} {}", desired.as_str());
        }
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(t.block_timeout);
    let mut pending = names.clone();
    while !pending.is_empty() {
        let snap = ctl.snapshot()?;
        pending.retain(|n| match reached(&snap, n, desired) {
            Some(place) => {
                println!("Unit {n} {}{place}", desired.as_str());
                false
            }
            None => true,
        });
        if pending.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let why: Vec<String> = pending.iter().map(|n| format!("{n}: {}", explain(&snap, n))).collect();
            bail!("timed out after {} s waiting for units to be {}:\n  {}", t.block_timeout, desired.as_str(), why.join("\n  "));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn is_running(s: &UnitState) -> bool {
    s.active == "active"
}

/// `Some(" on MACHINE")` once `name` reached `desired` everywhere it should.
fn reached(snap: &Snapshot, name: &str, desired: DesiredState) -> Option<String> {
    let global = snap.units.get(name).is_some_and(|u| u.is_global());
    if global {
        let states = snap.global_states.get(name);
        let machines: Vec<&String> = states.map(|s| s.keys().collect()).unwrap_or_default();
        let ok = match desired {
            DesiredState::Launched => !machines.is_empty() && states.is_some_and(|s| s.values().all(is_running)),
            DesiredState::Loaded => !machines.is_empty() && states.is_some_and(|s| s.values().all(|s| !is_running(s) && s.active != "activating")),
            DesiredState::Inactive => machines.is_empty(),
        };
        return ok.then(|| format!(" on {} machine(s)", machines.len()));
    }
    let sched = snap.schedule.get(name);
    let st = snap.states.get(name).filter(|s| Some(&s.machine) == sched);
    match desired {
        DesiredState::Launched => st.filter(|s| is_running(s)).map(|s| format!(" on {}", machine_label(snap, &s.machine, false))),
        DesiredState::Loaded => st
            .filter(|s| s.load == "loaded" && matches!(s.active.as_str(), "inactive" | "failed"))
            .map(|s| format!(" on {}", machine_label(snap, &s.machine, false))),
        DesiredState::Inactive => (sched.is_none() && !snap.states.get(name).is_some_and(is_running)).then(String::new),
    }
}

fn explain(snap: &Snapshot, name: &str) -> String {
    match (snap.schedule.get(name), snap.states.get(name)) {
        (None, _) if snap.units.get(name).is_some_and(|u| u.is_global()) => "no machine reported it yet".into(),
        (None, _) => "not scheduled: no live machine satisfies its [X-Fleet] constraints and requests".into(),
        (Some(m), Some(s)) if &s.machine == m => format!("on {m}: {} {} ({})", s.active, s.sub, s.load),
        (Some(m), _) => format!("scheduled on {m}, which has not reported it yet"),
    }
}

fn destroy(ctl: &Ctl, units: &[String]) -> anyhow::Result<()> {
    for u in units {
        let name = unit_name_arg(u);
        ctl.kv.delete(&fleet::unit_key(&name), None)?;
        println!("Destroyed {name}");
    }
    Ok(())
}

fn short(id: &str, full: bool) -> String {
    if full || id.len() <= 8 {
        id.to_string()
    } else {
        format!("{}...", &id[..8])
    }
}

fn machine_label(snap: &Snapshot, id: &str, full: bool) -> String {
    match snap.machines.get(id).and_then(|m| m.record.addresses.first()) {
        Some(ip) => format!("{}/{ip}", short(id, full)),
        None => short(id, full),
    }
}

fn table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn list_machines(ctl: &Ctl, full: bool) -> anyhow::Result<()> {
    let snap = ctl.snapshot()?;
    if ctl.json {
        let v: Vec<Value> = snap
            .machines
            .values()
            .map(|m| {
                let mut j = serde_json::to_value(&m.record).unwrap_or_default();
                j["draining"] = json!(snap.drains.get(&m.record.id));
                j
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut rows = vec![vec!["MACHINE".into(), "IP".into(), "METADATA".into(), "STATE".into()]];
    for (id, m) in &snap.machines {
        let md: Vec<String> = m.record.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let state = match snap.drains.get(id) {
            Some(d) if full => format!("draining ({})", d.reason),
            Some(_) => "draining".into(),
            None => "schedulable".into(),
        };
        rows.push(vec![
            short(id, full),
            m.record.addresses.first().cloned().unwrap_or_else(|| "-".into()),
            if md.is_empty() { "-".into() } else { md.join(",") },
            state,
        ]);
    }
    table(&rows);
    Ok(())
}

fn current_state(s: Option<&UnitState>) -> &'static str {
    match s {
        Some(s) if matches!(s.active.as_str(), "active" | "activating" | "deactivating") => "launched",
        Some(s) if s.load == "loaded" => "loaded",
        _ => "inactive",
    }
}

/// One row per (unit, machine): (unit, machine, desired, state).
fn unit_rows(snap: &Snapshot) -> Vec<(String, Option<String>, DesiredState, Option<UnitState>)> {
    let mut out = Vec::new();
    for (name, u) in &snap.units {
        if name.contains("@.") {
            continue;
        }
        if u.is_global() {
            for (m, st) in snap.global_states.get(name).into_iter().flatten() {
                out.push((name.clone(), Some(m.clone()), u.desired, Some(st.clone())));
            }
            continue;
        }
        let m = snap.schedule.get(name).cloned();
        let st = snap.states.get(name).filter(|s| Some(&s.machine) == m.as_ref()).cloned();
        if m.is_some() || u.desired != DesiredState::Inactive {
            out.push((name.clone(), m, u.desired, st));
        }
    }
    out
}

fn list_units(ctl: &Ctl, full: bool) -> anyhow::Result<()> {
    let snap = ctl.snapshot()?;
    let rows = unit_rows(&snap);
    if ctl.json {
        let v: Vec<Value> = rows
            .iter()
            .map(|(n, m, d, st)| json!({"unit": n, "machine": m, "desired": d, "state": current_state(st.as_ref()), "current": st}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut t = vec![vec!["UNIT".into(), "MACHINE".into(), "DSTATE".into(), "STATE".into(), "ACTIVE".into(), "SUB".into()]];
    for (n, m, d, st) in rows {
        t.push(vec![
            n,
            m.map(|m| machine_label(&snap, &m, full)).unwrap_or_else(|| "-".into()),
            d.as_str().into(),
            current_state(st.as_ref()).into(),
            st.as_ref().map(|s| s.active.clone()).unwrap_or_else(|| "-".into()),
            st.as_ref().map(|s| s.sub.clone()).unwrap_or_else(|| "-".into()),
        ]);
    }
    table(&t);
    Ok(())
}

fn list_unit_files(ctl: &Ctl, full: bool) -> anyhow::Result<()> {
    let snap = ctl.snapshot()?;
    let mut rows = Vec::new();
    for (name, u) in &snap.units {
        let hash = text_hash(&u.text);
        let global = u.is_global();
        let (state, target) = if global {
            let n = snap.global_states.get(name).map(|s| s.len()).unwrap_or(0);
            let st = snap.global_states.get(name).and_then(|s| s.values().next());
            (if n > 0 { current_state(st) } else { "inactive" }, format!("global ({n} machines)"))
        } else {
            let m = snap.schedule.get(name);
            let st = snap.states.get(name).filter(|s| Some(&s.machine) == m);
            (current_state(st), m.map(|m| machine_label(&snap, m, full)).unwrap_or_else(|| "-".into()))
        };
        rows.push((name.clone(), hash, u.desired, state, target));
    }
    if ctl.json {
        let v: Vec<Value> = rows.iter().map(|(n, h, d, s, t)| json!({"unit": n, "hash": h, "desired": d, "state": s, "target": t})).collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let mut t = vec![vec!["UNIT".into(), "HASH".into(), "DSTATE".into(), "STATE".into(), "TARGET".into()]];
    for (n, h, d, s, tg) in rows {
        t.push(vec![n, if full { h } else { h[..7].to_string() }, d.as_str().into(), s.into(), tg]);
    }
    table(&t);
    Ok(())
}

fn resolve_machine(snap: &Snapshot, arg: &str, allow_unknown: bool) -> anyhow::Result<String> {
    let matches: Vec<&String> = snap.machines.keys().chain(snap.drains.keys()).filter(|id| id.starts_with(arg)).collect();
    let mut uniq: Vec<&String> = matches.clone();
    uniq.sort();
    uniq.dedup();
    match uniq.as_slice() {
        [one] => Ok((*one).clone()),
        [] if allow_unknown => Ok(arg.to_string()),
        [] => bail!("no live machine matches {arg:?} (see fleetctl list-machines -l)"),
        many => bail!("{arg:?} matches several machines: {}", many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
    }
}

/// Machines running `name` (one unless Global), optionally narrowed to `want`.
fn machines_of(snap: &Snapshot, name: &str, want: Option<&str>) -> anyhow::Result<Vec<String>> {
    let u = snap.units.get(name).with_context(|| not_found(snap, name))?;
    let list: Vec<String> = if u.is_global() {
        snap.global_states.get(name).map(|s| s.keys().cloned().collect()).unwrap_or_default()
    } else {
        snap.schedule.get(name).cloned().into_iter().collect()
    };
    let list: Vec<String> = list.into_iter().filter(|m| want.is_none_or(|w| m.starts_with(w))).collect();
    if list.is_empty() {
        bail!("unit {name} is not running on any machine ({})", explain(snap, name));
    }
    Ok(list)
}

fn endpoint_of(snap: &Snapshot, machine: &str) -> anyhow::Result<String> {
    let m = snap.machines.get(machine).with_context(|| format!("machine {machine} has no live record (is it down?)"))?;
    if m.record.endpoint.is_empty() {
        bail!("machine {machine} did not publish an endpoint for journals");
    }
    Ok(m.record.endpoint.trim_end_matches('/').to_string())
}

fn remote(ctl: &Ctl, url: &str) -> anyhow::Result<Value> {
    let r = request("GET", url, None, ctl.timeout).with_context(|| format!("asking {url}"))?;
    let v = r.json().with_context(|| format!("{url}: answer is not JSON"))?;
    if r.status != 200 {
        bail!("{url}: {}", v["message"].as_str().unwrap_or(&r.body));
    }
    Ok(v)
}

fn print_record(r: &Value) {
    let ts = r["ts_us"].as_u64().unwrap_or(0);
    let secs = ts / 1_000_000;
    let (h, m, s) = ((secs / 3600) % 24, (secs / 60) % 60, secs % 60);
    println!("{h:02}:{m:02}:{s:02} {}: {}", r["unit"].as_str().unwrap_or("?"), r["message"].as_str().unwrap_or(""));
}

fn status(ctl: &Ctl, units: &[String], lines: usize, machine: Option<&str>) -> anyhow::Result<()> {
    let snap = ctl.snapshot()?;
    let mut all = Vec::new();
    for u in units {
        let name = unit_name_arg(u);
        let rec = snap.units.get(&name).with_context(|| not_found(&snap, &name))?;
        for m in machines_of(&snap, &name, machine)? {
            let url = format!("{}/keel/fleet/status?unit={}&lines={lines}", endpoint_of(&snap, &m)?, enc(&name));
            let init = remote(ctl, &url)?;
            if ctl.json {
                all.push(json!({"unit": name, "desired": rec.desired, "machine": m, "init": init}));
                continue;
            }
            let st = &init["status"];
            println!("● {} - {}", name, st["description"].as_str().unwrap_or(""));
            println!("   Machine: {} (desired: {})", machine_label(&snap, &m, true), rec.desired.as_str());
            println!("    Loaded: {}", st["load"].as_str().unwrap_or("?"));
            println!("    Active: {} ({})", st["active"].as_str().unwrap_or("?"), st["sub"].as_str().unwrap_or("?"));
            if let Some(pid) = st["main_pid"].as_i64() {
                println!("  Main PID: {pid}");
            }
            for r in init["logs"].as_array().into_iter().flatten() {
                print_record(r);
            }
            println!();
        }
    }
    if ctl.json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(())
}

fn journal(ctl: &Ctl, unit: &str, lines: usize, follow: bool, machine: Option<&str>) -> anyhow::Result<()> {
    let name = unit_name_arg(unit);
    let mut last_seq: Option<u64> = None;
    let mut current: Option<String> = None;
    loop {
        let snap = ctl.snapshot()?;
        let m = machines_of(&snap, &name, machine)?.into_iter().next().unwrap_or_default();
        if current.as_deref() != Some(m.as_str()) {
            if current.is_some() {
                eprintln!("-- {name} moved to {} --", machine_label(&snap, &m, false));
            }
            current = Some(m.clone());
            last_seq = None;
        }
        let base = format!("{}/keel/fleet/journal?unit={}", endpoint_of(&snap, &m)?, enc(&name));
        let url = match last_seq {
            Some(s) => format!("{base}&after_seq={s}"),
            None => format!("{base}&lines={lines}"),
        };
        let v = remote(ctl, &url)?;
        for r in v["records"].as_array().into_iter().flatten() {
            if ctl.json {
                println!("{r}");
            } else {
                print_record(r);
            }
            last_seq = r["seq"].as_u64().or(last_seq);
        }
        if !follow {
            return Ok(());
        }
        if last_seq.is_none() {
            last_seq = Some(0);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn drain(ctl: &Ctl, machine: &str, reason: &str, wait: bool, timeout: Duration) -> anyhow::Result<()> {
    let snap = ctl.snapshot()?;
    let id = resolve_machine(&snap, machine, false)?;
    let rec = DrainRecord { reason: reason.to_string(), since: keel_clusterd::fleet::unix_now() };
    ctl.kv.set(&fleet::drain_key(&id), &serde_json::to_string(&rec)?, None)?;
    println!("Machine {id} is draining");
    if !wait {
        return Ok(());
    }
    let deadline = Instant::now() + timeout;
    let mut last: Vec<String> = Vec::new();
    let mut p = snap.drain_progress(&id);
    loop {
        p = ctl.snapshot()?.drain_progress_after(&id, &p);
        if p.is_drained() {
            println!("Machine {id} is drained");
            return Ok(());
        }
        if p.pending != last {
            println!("waiting for {} unit(s): {}", p.pending.len(), p.pending.join(" "));
            last = p.pending.clone();
        }
        if Instant::now() > deadline {
            bail!("machine {id} not drained after {} s; still there: {}", timeout.as_secs(), p.pending.join(" "));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The running instances/units a new text for `name` applies to.
fn replace_targets(snap: &Snapshot, name: &UnitName) -> Vec<String> {
    if name.is_template() {
        snap.units.keys().filter(|k| UnitName::parse(k).ok().and_then(|u| if u.is_instance() { u.template_name() } else { None }).as_deref() == Some(name.full.as_str())).cloned().collect()
    } else {
        snap.units.contains_key(&name.full).then(|| name.full.clone()).into_iter().collect()
    }
}

fn replace(ctl: &Ctl, file: &Path, per_unit: Duration) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading unit file {}", file.display()))?;
    let name = unit_name_arg(&file.to_string_lossy());
    validate(&name, &text)?;
    let parsed = UnitName::parse(&name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let snap = ctl.snapshot()?;
    if let Some(old) = snap.units.get(&name).filter(|u| u.is_global() && fleet::is_global_text(&text)) {
        return replace_global(ctl, &snap, old, &text, per_unit);
    }
    // The template (or unit) itself first: new instances get the new text.
    let desired = snap.units.get(&name).map(|u| u.desired).unwrap_or_default();
    ctl.put_unit(&UnitRecord { name: name.clone(), text: text.clone(), desired })?;
    let hash = text_hash(&text);
    let targets = if parsed.is_template() { replace_targets(&snap, &parsed) } else { Vec::new() };
    let mut results = Vec::new();
    for t in &targets {
        let Some(mut rec) = snap.units.get(t).cloned() else { continue };
        if rec.text == text {
            continue;
        }
        rec.text = text.clone();
        ctl.put_unit(&rec)?;
        let waited = wait_replaced(ctl, t, &hash, rec.desired, per_unit)?;
        println!("Replaced {t} ({:.1} s)", waited.as_secs_f64());
        results.push(json!({"unit": t, "seconds": waited.as_secs_f64()}));
    }
    if !parsed.is_template() {
        let waited = wait_replaced(ctl, &name, &hash, desired, per_unit)?;
        println!("Replaced {name} ({:.1} s)", waited.as_secs_f64());
        results.push(json!({"unit": name, "seconds": waited.as_secs_f64()}));
    }
    if ctl.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

/// Roll a Global unit machine by machine: machines not yet in the rollout's `done` list keep the old text.
/// An interrupted roll is resumed by running the same replace again.
fn replace_global(ctl: &Ctl, snap: &Snapshot, old: &UnitRecord, text: &str, per_machine: Duration) -> anyhow::Result<()> {
    let name = old.name.clone();
    let key = fleet::rollout_key(&name);
    let mut rollout = snap.rollouts.get(&name).cloned().unwrap_or_else(|| Rollout { old: old.text.clone(), done: Vec::new() });
    let machines: Vec<String> = snap
        .global_states
        .get(&name)
        .map(|m| m.keys().filter(|id| snap.machines.contains_key(*id)).cloned().collect())
        .unwrap_or_default();
    ctl.kv.set(&key, &serde_json::to_string(&rollout)?, None)?;
    ctl.put_unit(&UnitRecord { name: name.clone(), text: text.to_string(), desired: old.desired })?;
    let hash = text_hash(text);
    let mut results = Vec::new();
    for m in machines.iter().filter(|m| !rollout.done.contains(m)).cloned().collect::<Vec<_>>() {
        rollout.done.push(m.clone());
        ctl.kv.set(&key, &serde_json::to_string(&rollout)?, None)?;
        let start = Instant::now();
        loop {
            let snap = ctl.snapshot()?;
            let st = snap.global_states.get(&name).and_then(|s| s.get(&m));
            if st.is_some_and(|s| s.hash == hash && (old.desired != DesiredState::Launched || s.active == "active")) {
                break;
            }
            if start.elapsed() > per_machine {
                bail!(
                    "{name} on {m} did not come back with the new text within {} s ({}); the roll stops here, machines not yet done keep the old text. Run the same replace again to resume",
                    per_machine.as_secs(),
                    st.map(|s| format!("{} {}", s.active, s.sub)).unwrap_or_else(|| "no report".into())
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("Replaced {name} on {} ({:.1} s)", machine_label(&ctl.snapshot()?, &m, false), start.elapsed().as_secs_f64());
        results.push(json!({"unit": name, "machine": m, "seconds": start.elapsed().as_secs_f64()}));
    }
    ctl.kv.delete(&key, None)?;
    if ctl.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

/// Wait until every machine running `name` reports the text `hash` (and, when launched, active).
fn wait_replaced(ctl: &Ctl, name: &str, hash: &str, desired: DesiredState, timeout: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    if desired == DesiredState::Inactive {
        return Ok(start.elapsed());
    }
    loop {
        let snap = ctl.snapshot()?;
        let states: Vec<UnitState> = if snap.units.get(name).is_some_and(|u| u.is_global()) {
            snap.global_states.get(name).map(|m| m.values().cloned().collect()).unwrap_or_default()
        } else {
            snap.states.get(name).filter(|s| snap.schedule.get(name) == Some(&s.machine)).cloned().into_iter().collect()
        };
        let done = !states.is_empty()
            && states.iter().all(|s| s.hash == hash && (desired != DesiredState::Launched || s.active == "active"));
        if done {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            let seen: BTreeMap<String, String> = states.iter().map(|s| (s.machine.clone(), format!("{} {}", s.active, if s.hash == hash { "new text" } else { "old text" }))).collect();
            bail!("{name} did not come back with the new text within {} s ({seen:?}); stopping the roll here", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
