//! The protocol-cost benchmark (`lockstep harness protocol`) runs `Rank` end to end over the null
//! data plane and reports wall time and per-thread CPU per envelope round trip from both ranks.
mod common;

use std::process::Command;
use std::time::Duration;

#[test]
fn protocol_bench_runs_rank_over_the_null_plane_and_reports_cpu_per_round_trip() {
    let _serial = common::serial();
    // Both lane transports: shared memory (the default on one host) and TCP (forced).
    for lane in ["shm", "tcp"] {
        bench_once(lane);
    }
}

fn bench_once(lane: &str) {
    let bin = common::lockstep_bin();
    let mut cmd = Command::new(&bin);
    cmd.args(["launch", "-n", "2", "--"])
        .arg(&bin)
        .args(["harness", "protocol", "--iters", "300"])
        .env("LOCKSTEP_LANE", lane)
        .env_remove("LOCKSTEP_FAULT");
    let out = common::bounded(cmd, "harness protocol", Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for who in ["rank0", "leader"] {
        let line = stdout
            .lines()
            .find_map(|l| {
                l.strip_prefix("RESULT ")
                    .filter(|r| r.contains(&format!("\"protocol.{who}\"")))
            })
            .unwrap_or_else(|| panic!("no protocol.{who} row in:\n{stdout}"));
        let v: serde_json::Value = serde_json::from_str(line).expect("RESULT row is JSON");
        assert_eq!(v["plane"], "null", "{line}");
        if lane == "tcp" || std::path::Path::new("/dev/shm").is_dir() {
            assert_eq!(v["lane"], lane, "{line}");
        }
        assert_eq!(v["iters"], 300, "{line}");
        for k in ["wall_p50_us", "cpu_us_per_rt"] {
            let x = v[k].as_f64().unwrap_or(f64::NAN);
            assert!(x > 0.0 && x.is_finite(), "{k} = {x} in {line}");
        }
        println!("{line}");
    }
}
