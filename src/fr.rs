//! `lockstep fr`: flight-recorder tools. `fr analyze DIR` lines up every rank's dump and names
//! the first op where ranks disagree; `fr dump PID…` asks running ranks to dump (SIGUSR1).
//!
//! Contract: for every data-plane group, ops are matched by the group's sequence number across
//! its members; the first sequence number (earliest in time) where a member is missing or the
//! op, dtype, shape, byte count or root differs is reported with each rank's view, and the
//! culprit is named when it can be (the rank that is missing, or the minority value). A dump
//! that is missing altogether is reported first. Ops still in flight are listed when no
//! disagreement exists (a hang with agreeing ranks points at the peer that never arrived).
use crate::comm::recorder::{OpRecord, OpState, RankRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Clone)]
pub struct FrArgs {
    #[command(subcommand)]
    pub cmd: FrCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum FrCmd {
    /// Name the first op where the ranks' dumps disagree.
    Analyze { dir: PathBuf },
    /// Ask running ranks (by pid) to dump their flight recorder now.
    Dump { pids: Vec<i32> },
}

pub fn main(args: &FrArgs) -> i32 {
    match &args.cmd {
        FrCmd::Analyze { dir } => match analyze(dir) {
            Ok(report) => {
                print!("{report}");
                0
            }
            Err(e) => {
                eprintln!("fr analyze: {e}");
                crate::exit::ExitCode::BadInput.code()
            }
        },
        FrCmd::Dump { pids } => {
            let mut code = 0;
            for &p in pids {
                // SAFETY: sending SIGUSR1 to a pid the operator named.
                if unsafe { libc::kill(p, libc::SIGUSR1) } != 0 {
                    eprintln!("fr dump: pid {p}: {}", std::io::Error::last_os_error());
                    code = crate::exit::ExitCode::BadInput.code();
                } else {
                    println!("fr dump: asked pid {p} to dump");
                }
            }
            code
        }
    }
}

struct RankDump {
    head: RankRecord,
    ops: Vec<OpRecord>,
}

fn load(path: &Path) -> Result<RankDump, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = text.lines();
    let head: RankRecord = lines
        .next()
        .ok_or_else(|| format!("{}: empty", path.display()))
        .and_then(|l| {
            serde_json::from_str(l).map_err(|e| format!("{}: rank line: {e}", path.display()))
        })?;
    let mut ops = Vec::new();
    for (i, l) in lines.enumerate() {
        let op: OpRecord = serde_json::from_str(l)
            .map_err(|e| format!("{}: line {}: {e}", path.display(), i + 2))?;
        ops.push(op);
    }
    Ok(RankDump { head, ops })
}

fn view(op: Option<&OpRecord>) -> String {
    match op {
        None => "never issued it".into(),
        Some(o) => format!(
            "{} {} {:?} {} bytes{} — {:?} (call_id {}, chunk_index {}, phase {})",
            o.op,
            o.dtype.as_deref().unwrap_or("-"),
            o.shape,
            o.bytes,
            o.root
                .map_or(String::new(), |r| format!(" root global-rank {r}")),
            o.state,
            o.ctx.call_id.0,
            o.ctx.chunk_index.0,
            if o.ctx.phase.is_empty() {
                "-"
            } else {
                &o.ctx.phase
            }
        ),
    }
}

/// The analysis as text.
pub fn analyze(dir: &Path) -> Result<String, String> {
    let mut dumps: BTreeMap<u32, RankDump> = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with("rank-") && name.ends_with(".jsonl") {
            let d = load(&e.path())?;
            dumps.insert(d.head.global_rank, d);
        }
    }
    let Some(any) = dumps.values().next() else {
        return Err(format!("no rank-*.jsonl dumps in {}", dir.display()));
    };
    let world = any.head.world_size;
    let groups = any.head.groups.clone();
    let mut out = format!(
        "fr analyze: {} dump(s) in {} (world size {world})\n",
        dumps.len(),
        dir.display()
    );
    for (r, d) in &dumps {
        out.push_str(&format!(
            "  global-rank {r}: {} — {}\n",
            d.head
                .exit_name
                .as_ref()
                .map_or("dump on request".to_string(), |n| format!(
                    "exit {} ({n})",
                    d.head.exit_code.unwrap_or(0)
                )),
            d.head.reason.lines().next().unwrap_or("")
        ));
    }
    let missing: Vec<u32> = (0..world).filter(|r| !dumps.contains_key(r)).collect();
    if !missing.is_empty() {
        out.push_str(&format!(
            "missing rank: global-rank {missing:?} left no dump (killed hard, or never started)\n"
        ));
    }

    // First disagreement per group, by sequence number.
    let mut findings: Vec<(u64, String)> = Vec::new();
    for (gname, members) in &groups {
        let present: Vec<u32> = members
            .iter()
            .copied()
            .filter(|m| dumps.contains_key(m))
            .collect();
        if present.len() < 2 {
            continue;
        }
        let per: BTreeMap<u32, BTreeMap<u64, &OpRecord>> = present
            .iter()
            .map(|m| {
                let ops = dumps[m]
                    .ops
                    .iter()
                    .filter(|o| &o.group == gname)
                    .map(|o| (o.seq, o))
                    .collect();
                (*m, ops)
            })
            .collect();
        // Only compare the window every rank still holds (rings wrap).
        let lo = per
            .values()
            .filter_map(|o| o.keys().next().copied())
            .max()
            .unwrap_or(1);
        let seqs: BTreeSet<u64> = per
            .values()
            .flat_map(|o| o.keys().copied())
            .filter(|&s| s >= lo)
            .collect();
        for s in seqs {
            let views: Vec<(u32, Option<&OpRecord>)> = present
                .iter()
                .map(|m| (*m, per[m].get(&s).copied()))
                .collect();
            let sig = |o: &OpRecord| {
                let op = if o.op == "send" || o.op == "recv" {
                    "p2p".to_string()
                } else {
                    o.op.clone()
                };
                (op, o.dtype.clone(), o.shape.clone(), o.bytes, o.root)
            };
            let mut fields: Vec<String> = Vec::new();
            let missing_here: Vec<u32> = views
                .iter()
                .filter(|(_, o)| o.is_none())
                .map(|(m, _)| *m)
                .collect();
            let have: Vec<(u32, &OpRecord)> = views
                .iter()
                .filter_map(|(m, o)| o.map(|o| (*m, o)))
                .collect();
            let Some(&(_, first)) = have.first() else {
                continue;
            };
            let mut culprit = None;
            if !missing_here.is_empty() {
                fields.push(format!(
                    "missing rank: global-rank {missing_here:?} never issued it"
                ));
                culprit = missing_here.first().copied();
            }
            let names = ["op", "dtype", "shape", "bytes", "root"];
            for (fi, name) in names.iter().enumerate() {
                let val = |o: &OpRecord| {
                    let (op, dt, sh, by, ro) = sig(o);
                    match fi {
                        0 => op,
                        1 => dt.unwrap_or_default(),
                        2 => format!("{sh:?}"),
                        3 => by.to_string(),
                        _ => format!("{ro:?}"),
                    }
                };
                let mut by_val: BTreeMap<String, Vec<u32>> = BTreeMap::new();
                for (m, o) in &have {
                    by_val.entry(val(o)).or_default().push(*m);
                }
                if by_val.len() > 1 {
                    let shown: Vec<String> = by_val
                        .iter()
                        .map(|(v, ms)| format!("global-rank {ms:?} = {v}"))
                        .collect();
                    fields.push(format!("{name} mismatch: {}", shown.join("; ")));
                    if culprit.is_none() {
                        culprit = by_val
                            .values()
                            .min_by_key(|ms| ms.len())
                            .filter(|ms| ms.len() * 2 < have.len())
                            .and_then(|ms| ms.first().copied());
                    }
                }
            }
            if fields.is_empty() {
                continue;
            }
            let t = have
                .iter()
                .map(|(_, o)| o.t_enqueued_us)
                .min()
                .unwrap_or(first.t_enqueued_us);
            let mut text = format!("first disagreement: group `{gname}` seq {s}:\n");
            for f in &fields {
                text.push_str(&format!("  {f}\n"));
            }
            for (m, o) in &views {
                text.push_str(&format!("  global-rank {m}: {}\n", view(*o)));
            }
            match culprit {
                Some(c) => text.push_str(&format!("culprit: global-rank {c}\n")),
                None => text.push_str(
                    "culprit: ambiguous between two ranks; compare their call paths at this op\n",
                ),
            }
            findings.push((t, text));
            break;
        }
    }
    findings.sort_by_key(|(t, _)| *t);
    match findings.first() {
        Some((_, text)) => out.push_str(text),
        None => {
            out.push_str("no disagreement between the dumps\n");
            for (r, d) in &dumps {
                for o in d
                    .ops
                    .iter()
                    .filter(|o| matches!(o.state, OpState::Started | OpState::Enqueued))
                {
                    out.push_str(&format!(
                        "  in flight on global-rank {r}: {}\n",
                        o.describe()
                    ));
                }
            }
        }
    }
    Ok(out)
}
