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
                crate::diag!("fr analyze: {e}");
                crate::exit::ExitCode::BadInput.code()
            }
        },
        FrCmd::Dump { pids } => {
            let mut code = 0;
            for &p in pids {
                // kill(0, …) and kill(-1, …) would signal our own group or every process.
                if p <= 0 {
                    crate::diag!("fr dump: {p} is not a process id (must be > 0)");
                    code = crate::exit::ExitCode::BadInput.code();
                    continue;
                }
                // SAFETY: sending SIGUSR1 to a pid the operator named.
                if unsafe { libc::kill(p, libc::SIGUSR1) } != 0 {
                    crate::diag!("fr dump: pid {p}: {}", std::io::Error::last_os_error());
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

/// What the dumps of the other ranks say about `culprit`, a rank that left none: per witness,
/// when it last completed an op with the culprit (a header, a heartbeat, a payload, a collective
/// of a group the culprit is in) and what it was still waiting on from it when it dumped.
fn evidence_of_silence(culprit: u32, dumps: &BTreeMap<u32, RankDump>) -> String {
    let mut out = String::new();
    for (r, d) in dumps {
        let involves = |o: &OpRecord| {
            o.peer == Some(culprit)
                || o.root == Some(culprit)
                || (o.peer.is_none()
                    && d.head
                        .groups
                        .iter()
                        .any(|(g, m)| *g == o.group && m.contains(&culprit)))
        };
        let last = d
            .ops
            .iter()
            .filter(|o| involves(o) && o.state == OpState::Completed)
            .filter_map(|o| o.t_completed_us.map(|t| (t, o)))
            .max_by_key(|(t, _)| *t);
        let waiting = d
            .ops
            .iter()
            .filter(|o| involves(o) && matches!(o.state, OpState::Started | OpState::Enqueued))
            .min_by_key(|o| o.t_started_us.unwrap_or(o.t_enqueued_us));
        let ms_before = |t: u64| d.head.time_us.saturating_sub(t) / 1000;
        let heard = match last {
            Some((t, o)) => format!(
                "last heard from it {} ms before its dump ({} completed)",
                ms_before(t),
                o.describe()
            ),
            None if d.ops.is_empty() => format!(
                "never got past the rendezvous with it ({})",
                d.head.reason.lines().next().unwrap_or("")
            ),
            // A witness with no op of its own with the culprit (a mesh rank and a stopped rank
            // 0) has nothing to say about it.
            None if waiting.is_none() => continue,
            None => "no completed op with it in its ring".into(),
        };
        let wait = waiting.map_or(String::new(), |o| {
            format!(
                "; waiting on it for {} ms in {}",
                ms_before(o.t_started_us.unwrap_or(o.t_enqueued_us)),
                o.describe()
            )
        });
        out.push_str(&format!("  evidence from global-rank {r}: {heard}{wait}\n"));
    }
    out
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
    // The primary failure: the earliest dump whose exit is not a consequence of another rank's
    // (peer-lost, peer-failed, signal). An op "missing" on that rank afterwards is the effect
    // of its crash, not the cause.
    let consequence = |n: &str| matches!(n, "peer-lost" | "peer-failed" | "signal");
    if let Some((r, d)) = dumps
        .iter()
        .filter(|(_, d)| d.head.exit_name.as_deref().is_some_and(|n| !consequence(n)))
        .min_by_key(|(_, d)| d.head.time_us)
    {
        out.push_str(&format!(
            "first failure: global-rank {r} exit {} ({}) — {}\n",
            d.head.exit_code.unwrap_or(0),
            d.head.exit_name.as_deref().unwrap_or(""),
            d.head.reason.lines().next().unwrap_or("")
        ));
    }
    let missing: Vec<u32> = (0..world).filter(|r| !dumps.contains_key(r)).collect();
    if !missing.is_empty() {
        out.push_str(&format!(
            "missing rank: global-rank {missing:?} left no dump (killed hard, or never started)\n"
        ));
        // Every rank alive at a failure, a watchdog or a SIGTERM writes its dump; one that did
        // not was killed hard, stopped or wedged — the cause, not a witness. What the others'
        // dumps disagree on below is what they saw of it.
        out.push_str(&format!(
            "culprit: global-rank {} (left no dump: killed hard, stopped or wedged); the \
             disagreements below are what the other ranks saw\n",
            missing[0]
        ));
        out.push_str(&evidence_of_silence(missing[0], &dumps));
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
        // Ops are matched by key: collectives by the group's sequence number, point-to-point
        // ops by (direction, per-direction sequence number): see `Group::issue`.
        let key_of = |m: u32, o: &OpRecord| -> (String, u64) {
            match (o.op.as_ref(), o.peer) {
                ("send", Some(p)) => (format!("p2p {m}->{p}"), o.seq),
                ("recv", Some(p)) => (format!("p2p {p}->{m}"), o.seq),
                _ => (String::new(), o.seq),
            }
        };
        let per: BTreeMap<u32, BTreeMap<(String, u64), &OpRecord>> = present
            .iter()
            .map(|m| {
                let ops = dumps[m]
                    .ops
                    .iter()
                    .filter(|o| &o.group == gname)
                    .map(|o| (key_of(*m, o), o))
                    .collect();
                (*m, ops)
            })
            .collect();
        // Which ranks take part in a key's op: every member for a collective, the two ends for
        // a point-to-point channel.
        let parties = |chan: &str| -> Vec<u32> {
            match chan.strip_prefix("p2p ").and_then(|c| c.split_once("->")) {
                Some((a, b)) => present
                    .iter()
                    .copied()
                    .filter(|m| m.to_string() == a || m.to_string() == b)
                    .collect(),
                None => present.clone(),
            }
        };
        // Only compare the window every party still holds (rings wrap), per channel.
        let chans: BTreeSet<String> = per
            .values()
            .flat_map(|o| o.keys().map(|(c, _)| c.clone()))
            .collect();
        let mut keys: Vec<(String, u64)> = Vec::new();
        for c in &chans {
            let ps = parties(c);
            let lo = ps
                .iter()
                .filter_map(|m| per[m].keys().find(|(k, _)| k == c).map(|(_, s)| *s))
                .max()
                .unwrap_or(1);
            let seqs: BTreeSet<u64> = ps
                .iter()
                .flat_map(|m| per[m].keys().filter(|(k, _)| k == c).map(|(_, s)| *s))
                .filter(|&s| s >= lo)
                .collect();
            keys.extend(seqs.into_iter().map(|s| (c.clone(), s)));
        }
        // Earliest first, so the first disagreement found is the earliest in time.
        let t_of = |k: &(String, u64)| {
            present
                .iter()
                .filter_map(|m| per[m].get(k).map(|o| o.t_enqueued_us))
                .min()
                .unwrap_or(u64::MAX)
        };
        keys.sort_by_key(|k| (t_of(k), k.1));
        for key in keys {
            let s = key.1;
            let views: Vec<(u32, Option<&OpRecord>)> = parties(&key.0)
                .iter()
                .map(|m| (*m, per[m].get(&key).copied()))
                .collect();
            let sig = |o: &OpRecord| {
                let op = if o.op == "send" || o.op == "recv" {
                    "p2p".to_string()
                } else {
                    o.op.to_string()
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
            let mut evidence = None;
            for (fi, name) in names.iter().enumerate() {
                let val = |o: &OpRecord| {
                    let (op, dt, sh, by, ro) = sig(o);
                    match fi {
                        0 => op,
                        1 => dt.map(|d| d.to_string()).unwrap_or_default(),
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
                    if culprit.is_none() && fi > 0 {
                        // No majority (two ranks, or a tie): the history decides. Find the
                        // latest earlier op of this channel and kind on which every party agreed
                        // on everything; the side that still uses its value for this field kept
                        // to it, the other changed.
                        let kind = sig(first).0;
                        let agreed = per[&have[0].0]
                            .range(..(key.0.clone(), s))
                            .rev()
                            .filter(|((c, _), o)| *c == key.0 && sig(o).0 == kind)
                            .find_map(|(k, o)| {
                                let all = parties(&key.0)
                                    .iter()
                                    .all(|m| per[m].get(k).is_some_and(|p| sig(p) == sig(o)));
                                all.then(|| (k.1, val(o)))
                            });
                        if let Some((seq0, v0)) = agreed {
                            let changed: Vec<&Vec<u32>> = by_val
                                .iter()
                                .filter(|(v, _)| **v != v0)
                                .map(|(_, ms)| ms)
                                .collect();
                            if let [ms] = changed.as_slice() {
                                if let (Some(c), 1) = (ms.first().copied(), ms.len()) {
                                    culprit = Some(c);
                                    evidence = Some(format!(
                                        "global-rank {c} changed {name}: every rank used {v0} \
                                         at seq {seq0}, the latest earlier {kind} they agreed on"
                                    ));
                                }
                            }
                        }
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
            let chan = if key.0.is_empty() {
                String::new()
            } else {
                format!(" ({})", key.0)
            };
            let mut text = format!("first disagreement: group `{gname}`{chan} seq {s}:\n");
            for f in &fields {
                text.push_str(&format!("  {f}\n"));
            }
            for (m, o) in &views {
                text.push_str(&format!("  global-rank {m}: {}\n", view(*o)));
            }
            if let Some(e) = &evidence {
                text.push_str(&format!("  history: {e}\n"));
            }
            match culprit {
                Some(c) if !missing.is_empty() && !missing.contains(&c) => text.push_str(&format!(
                    "odd one out among the dumps: global-rank {c} (the culprit named above left none)\n"
                )),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: u64, seq: u64, op: &str, peer: u32, shape: &[u64], t: u64) -> String {
        format!(
            r#"{{"action":"INFER","bytes":{b},"cache_epoch":0,"call_id":1,"chunk_index":0,"dtype":"f32","group":"pp","id":{id},"kind":"op","note":null,"op":"{op}","peer":{peer},"phase":"","root":null,"seq":{seq},"shape":{shape:?},"state":"completed","t_completed_us":{t},"t_enqueued_us":{t},"t_started_us":{t}}}"#,
            b = shape.iter().product::<u64>() * 4
        )
    }

    fn write(dir: &Path, rank: u32, ops: &[String]) {
        let head = format!(
            r#"{{"kind":"rank","global_rank":{rank},"world_size":2,"reason":"test","exit_code":null,"exit_name":null,"groups":[["pp",[0,1]]],"time_us":0}}"#
        );
        let body = std::iter::once(head)
            .chain(ops.iter().cloned())
            .collect::<Vec<_>>();
        std::fs::write(dir.join(format!("rank-{rank}.jsonl")), body.join("\n")).unwrap();
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lockstep-fr-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pipelined_p2p_in_both_directions_is_not_a_disagreement() {
        // Rank 0 sends two INFER payloads, then receives a RESULT; rank 1 receives the first,
        // sends its RESULT, then receives the second: different interleavings, same channels.
        let d = tmp("pipelined");
        write(
            &d,
            0,
            &[
                op(1, 1, "send", 1, &[4], 10),
                op(2, 2, "send", 1, &[4], 11),
                op(3, 1, "recv", 1, &[2], 12),
            ],
        );
        write(
            &d,
            1,
            &[
                op(1, 1, "recv", 0, &[4], 10),
                op(2, 1, "send", 0, &[2], 11),
                op(3, 2, "recv", 0, &[4], 12),
            ],
        );
        let r = analyze(&d).unwrap();
        assert!(r.contains("no disagreement"), "{r}");
    }

    #[test]
    fn p2p_shape_mismatch_is_named_on_its_channel() {
        let d = tmp("p2p-shape");
        write(
            &d,
            0,
            &[op(1, 1, "send", 1, &[4], 10), op(2, 2, "send", 1, &[8], 11)],
        );
        write(
            &d,
            1,
            &[op(1, 1, "recv", 0, &[4], 10), op(2, 2, "recv", 0, &[4], 12)],
        );
        let r = analyze(&d).unwrap();
        assert!(
            r.contains("first disagreement: group `pp` (p2p 0->1) seq 2"),
            "{r}"
        );
        assert!(r.contains("shape mismatch"), "{r}");
    }
}
