//! Culprit naming: a rank that is SIGKILLed or SIGSTOPped — rank 0 (driver), rank 1 (mesh
//! leader), rank 2 (mesh) — during the bootstrap or mid-stream is the rank the launcher's summary
//! and `lockstep fr analyze` name, with the evidence (SIGKILLed / no dump / what the witnesses
//! last completed with it and were still waiting on), never a rank that only saw it.
//!
//! The ranks run under `lockstep launch` with short settle and grace windows. A victim stopped or
//! killed "during bootstrap" is deterministic: its shell signals itself before it execs the rank
//! program, so it never registers. Mid-stream victims are signalled once the ranks are up.
mod common;

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const RUN: &str = "run --quiet --tp 2 --generator calibrated --gen-cost-ms 1";

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lockstep-diag-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Outcome {
    code: Option<i32>,
    launcher: String,
    fr: String,
}

/// `lockstep launch -n 3` of `lockstep run` with rank `victim` signalled: `during_bootstrap`, by
/// its own shell before it execs; otherwise ~0.7 s after every rank started (mid-stream).
fn launch_with_victim(name: &str, victim: u32, sig: &str, during_bootstrap: bool) -> Outcome {
    let dumps = tmp(name);
    let bin = common::lockstep_bin();
    let bin = bin.to_string_lossy();
    let rank_cmd = if during_bootstrap {
        format!(
            "if [ \"$RANK\" = {victim} ]; then kill -{sig} $$; fi; exec '{bin}' {RUN} --chunks 2"
        )
    } else {
        format!("exec '{bin}' {RUN} --chunks 1000000")
    };
    let mut child = Command::new(common::lockstep_bin())
        .args([
            "launch",
            "-n",
            "3",
            "--settle-ms",
            "200",
            "--grace-ms",
            "500",
        ])
        .arg("--dump-dir")
        .arg(&dumps)
        .args(["--", "sh", "-c", &rank_cmd])
        .env_remove("LOCKSTEP_FAULT")
        .env("LOCKSTEP_WATCHDOG_MS", "1000")
        .env("LOCKSTEP_RENDEZVOUS_MS", "1000")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn lockstep launch");
    let err = child.stderr.take().expect("stderr");
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(err)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    let mut victim_pid = None;
    if !during_bootstrap {
        let want = format!("launch: global-rank {victim} pid ");
        let mut started = 0;
        while started < 3 {
            let line = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("the launcher names every rank's pid");
            if let Some(p) = line.strip_prefix(&want) {
                victim_pid = p.trim().parse::<i32>().ok();
            }
            if line.starts_with("launch: global-rank ") && line.contains(" pid ") {
                started += 1;
            }
        }
        // Not a synchronization point: the diagnosis must be right whenever the signal lands;
        // the pause makes mid-stream the usual case.
        std::thread::sleep(Duration::from_millis(700));
        let pid = victim_pid.expect("the victim's pid");
        let signo = if sig == "KILL" {
            libc::SIGKILL
        } else {
            libc::SIGSTOP
        };
        // SAFETY: signalling a rank (a grandchild) of the launch this test started.
        unsafe { libc::kill(pid, signo) };
    }
    let until = Instant::now() + Duration::from_secs(15);
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if Instant::now() > until {
            let _ = child.kill();
            if let Some(p) = victim_pid {
                // SAFETY: as above; nothing stays pinned behind a failed test.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            panic!("{name}: the launch did not end within 15 s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let launcher = reader.join().unwrap_or_default();
    let fr = Command::new(common::lockstep_bin())
        .args(["fr", "analyze"])
        .arg(&dumps)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dumps);
    Outcome { code, launcher, fr }
}

/// The launcher and `fr analyze` both name `victim`, with evidence, and no other rank.
fn assert_named(o: &Outcome, victim: u32, sig: &str, case: &str) {
    assert!(o.code.is_some_and(|c| c != 0), "{case}: {}", o.launcher);
    let launcher_names = if sig == "KILL" {
        format!("launch: failed: global-rank {victim} killed by signal 9 (SIGKILL); no dump file")
    } else {
        format!(
            "launch: culprit: global-rank {victim}: it did not exit on SIGTERM within 500 ms \
             (stopped or wedged), was SIGKILLed and left no dump"
        )
    };
    assert!(
        o.launcher.contains(&launcher_names),
        "{case}: the launcher names global-rank {victim}:\n{}",
        o.launcher
    );
    assert!(
        o.fr.contains(&format!("culprit: global-rank {victim} (left no dump")),
        "{case}: fr analyze names global-rank {victim}:\n{}\nlauncher:\n{}",
        o.fr,
        o.launcher
    );
    assert!(
        o.fr.contains("  evidence from global-rank "),
        "{case}: fr analyze gives the witnesses' evidence:\n{}",
        o.fr
    );
    // The launcher's summary carries the same culprit and evidence.
    assert!(
        o.launcher.contains(&format!(
            "launch: fr analyze: culprit: global-rank {victim} (left no dump"
        )) && o
            .launcher
            .contains("launch: fr analyze: evidence from global-rank "),
        "{case}: the launcher's summary gives the evidence:\n{}",
        o.launcher
    );
    for other in (0..3).filter(|r| *r != victim) {
        assert!(
            !o.fr.contains(&format!("culprit: global-rank {other}")),
            "{case}: fr analyze blames global-rank {other}:\n{}",
            o.fr
        );
        assert!(
            !o.launcher
                .contains(&format!("launch: culprit: global-rank {other}")),
            "{case}: the launcher blames global-rank {other}:\n{}",
            o.launcher
        );
    }
}

#[test]
fn a_rank_sigkilled_during_bootstrap_is_named_the_culprit_for_each_role() {
    let _serial = common::serial();
    for victim in 0..3 {
        let case = format!("SIGKILL of global-rank {victim} during bootstrap");
        let o = launch_with_victim(&format!("boot-kill-{victim}"), victim, "KILL", true);
        assert_named(&o, victim, "KILL", &case);
    }
}

#[test]
fn a_rank_sigstopped_during_bootstrap_is_named_the_culprit_for_each_role() {
    let _serial = common::serial();
    for victim in 0..3 {
        let case = format!("SIGSTOP of global-rank {victim} during bootstrap");
        let o = launch_with_victim(&format!("boot-stop-{victim}"), victim, "STOP", true);
        assert_named(&o, victim, "STOP", &case);
        // The witnesses say they never got past the rendezvous with it.
        assert!(
            o.fr.contains("never got past the rendezvous with it"),
            "{case}:\n{}",
            o.fr
        );
    }
}

#[test]
fn a_stopped_driver_mid_stream_is_named_the_culprit_with_when_it_was_last_heard() {
    let _serial = common::serial();
    let o = launch_with_victim("stream-stop-0", 0, "STOP", false);
    assert_named(&o, 0, "STOP", "SIGSTOP of global-rank 0 mid-stream");
    assert!(
        o.fr.contains("evidence from global-rank 1: last heard from it"),
        "the mesh leader last heard from rank 0 (a header or a heartbeat):\n{}",
        o.fr
    );
}

#[test]
fn a_stopped_mesh_leader_mid_stream_is_named_the_culprit() {
    let _serial = common::serial();
    let o = launch_with_victim("stream-stop-1", 1, "STOP", false);
    assert_named(&o, 1, "STOP", "SIGSTOP of global-rank 1 mid-stream");
}

#[test]
fn a_sigkilled_mesh_rank_mid_stream_is_named_the_culprit_for_leader_and_member() {
    let _serial = common::serial();
    for victim in [1, 2] {
        let case = format!("SIGKILL of global-rank {victim} mid-stream");
        let o = launch_with_victim(&format!("stream-kill-{victim}"), victim, "KILL", false);
        assert_named(&o, victim, "KILL", &case);
    }
}

/// A rank that never shows up: rank 0's rendezvous times out (71) naming it, and the rank that
/// did register hears that from rank 0 and exits 77 (peer-failed) with the same words, instead
/// of blaming a token or rank 0.
#[test]
fn ranks_that_registered_hear_which_ranks_never_did() {
    let _serial = common::serial();
    let port = common::free_port().to_string();
    let dumps = tmp("never-registered");
    let spawn = |r: &str| {
        let mut c = std::process::Command::new(common::lockstep_bin());
        c.args(["run", "--quiet", "--chunks", "1", "--tp", "2"])
            .args(["--generator", "calibrated"])
            .env_remove("LOCKSTEP_FAULT")
            .envs([
                ("RANK", r),
                ("LOCAL_RANK", r),
                ("WORLD_SIZE", "3"),
                ("MASTER_ADDR", "127.0.0.1"),
                ("MASTER_PORT", port.as_str()),
                ("LOCKSTEP_JOB_TOKEN", "never-registered"),
                ("LOCKSTEP_RENDEZVOUS_MS", "800"),
            ])
            .env("LOCKSTEP_DUMP_DIR", &dumps)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        c.spawn().expect("spawn lockstep")
    };
    // Global-rank 2 is never started.
    let mut ranks = [("0", spawn("0")), ("1", spawn("1"))];
    let mut seen = Vec::new();
    for (r, c) in ranks.iter_mut() {
        let code = common::wait_bounded(c, std::time::Duration::from_secs(20));
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            use std::io::Read;
            let _ = e.read_to_string(&mut err);
        }
        seen.push((r.to_string(), code, err));
    }
    let (_, code0, err0) = &seen[0];
    assert_eq!(*code0, 71, "rank 0: {err0}");
    assert!(
        err0.contains("ranks [2] did not register"),
        "rank 0: {err0}"
    );
    let (_, code1, err1) = &seen[1];
    assert_eq!(*code1, 77, "rank 1: {err1}");
    assert!(
        err1.contains("peer-failed") && err1.contains("ranks [2] did not register"),
        "rank 1: {err1}"
    );
    assert!(!err1.contains("wrong job token"), "rank 1: {err1}");
    let _ = std::fs::remove_dir_all(&dumps);
}
