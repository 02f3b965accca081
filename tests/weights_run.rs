//! `lockstep run --weights FILE` over real rank processes: a saved file streams, a file that does
//! not fit the preset fails before any rank starts (naming the tensors), and ranks given
//! different files fail the parity handshake at startup with the digest diff.
//! Backend: whatever `LOCKSTEP_BACKEND` names (on nccl without 2 GPUs every test prints
//! `SKIP <test>: …` and returns).
mod common;

use lockstep::model::weights::param_specs;
use lockstep::model::DitConfig;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// `common::bounded` with no fault injection inherited from the environment.
fn bounded(mut cmd: Command, what: &str, bound: Duration) -> Output {
    cmd.env_remove("LOCKSTEP_FAULT");
    common::bounded(cmd, what, bound)
}

/// `lockstep weights save` (the operator's way to get a file).
fn save(path: &Path, seed: u64) {
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["weights", "save"])
        .arg(path)
        .args(["--seed", &seed.to_string(), "--dtype", "bf16"]);
    let out = bounded(cmd, "lockstep weights save", Duration::from_secs(10));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{:?}", out.stderr);
    assert!(stdout.contains("69 tensors, Bf16, preset tiny"), "{stdout}");
}

#[test]
fn run_with_weights_file_streams_over_rank_processes() {
    let Some(_serial) = common::start("run_with_weights_file_streams_over_rank_processes") else {
        return;
    };
    let w = common::tmp("stream.safetensors");
    save(&w, 3);
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--chunks",
        "2",
        "--seed",
        "3",
        "--weights",
    ])
    .arg(&w)
    .env("LOCKSTEP_DUMP_DIR", common::tmp("stream-dumps"));
    let out = bounded(cmd, "lockstep run --weights", Duration::from_secs(60));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("generator tiny DiT (CPU), weights fnv64 ")
            && stdout.contains("chunks emitted             2 / 2"),
        "{stdout}"
    );
    for r in 0..3 {
        assert!(
            stderr.contains(&format!("launch: global-rank {r} exit 0 (clean)")),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_file(&w);
}

#[test]
fn weights_file_missing_a_tensor_or_misshaped_fails_before_any_rank_starts() {
    let Some(_serial) =
        common::start("weights_file_missing_a_tensor_or_misshaped_fails_before_any_rank_starts")
    else {
        return;
    };
    // The tiny preset's tensors (zeros), minus one, and one with rows and columns swapped.
    let specs = param_specs(&DitConfig::tiny());
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = specs
        .iter()
        .filter(|s| s.name != "blocks.1.cross_attn.v.bias")
        .map(|s| {
            let shape = if s.name == "blocks.0.ffn.2.weight" {
                vec![s.shape[1], s.shape[0]]
            } else {
                s.shape.clone()
            };
            (s.name.clone(), shape, vec![0u8; s.numel() * 4])
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = data
        .iter()
        .map(|(n, s, b)| {
            let v = TensorView::new(Dtype::F32, s.clone(), b).expect("view");
            (n.clone(), v)
        })
        .collect();
    let w = common::tmp("bad.safetensors");
    safetensors::serialize_to_file(views, &None, &w).expect("write bad file");

    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["run", "--quiet", "--chunks", "2", "--weights"])
        .arg(&w);
    let out = bounded(cmd, "lockstep run --weights bad", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("do not fit preset tiny (2 problems)")
            && stderr.contains("missing tensor blocks.1.cross_attn.v.bias (expected shape [128])")
            && stderr
                .contains("tensor blocks.0.ffn.2.weight has shape [384, 128], expected [128, 384]"),
        "{stderr}"
    );
    // Refused in the parent: no rank process was started.
    assert!(!stderr.contains("launch: global-rank"), "{stderr}");
    let _ = std::fs::remove_file(&w);
}

#[test]
fn ranks_given_different_weights_files_fail_parity_at_startup() {
    let Some(_serial) = common::start("ranks_given_different_weights_files_fail_parity_at_startup")
    else {
        return;
    };
    let (a, b) = (
        common::tmp("parity-a.safetensors"),
        common::tmp("parity-b.safetensors"),
    );
    save(&a, 0);
    save(&b, 7);
    // Launch the ranks by hand so that global-rank 2 gets the other file.
    let bin = common::lockstep_bin();
    let script = format!(
        "if [ \"$RANK\" = 2 ]; then w='{}'; else w='{}'; fi; exec '{}' run --quiet --chunks 2 \
         --weights \"$w\"",
        b.display(),
        a.display(),
        bin.display()
    );
    let mut cmd = Command::new(&bin);
    cmd.args(["launch", "-n", "3", "--dump-dir"])
        .arg(common::tmp("parity-dumps"))
        .args(["--", "sh", "-c", &script])
        .env("LOCKSTEP_RENDEZVOUS_MS", "5000");
    let out = bounded(cmd, "lockstep launch", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(
        stderr.contains("parity mismatch between ranks")
            && stderr.contains("startup parity handshake failed before inference")
            && stderr.contains("pipeline.weights: global-rank 0,1 = \"fnv64 ")
            && stderr.contains("; global-rank 2 = \"fnv64 "),
        "{stderr}"
    );
    assert!(!stderr.contains("generate"), "{stderr}");
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
}

#[test]
fn weights_with_the_calibrated_generator_is_refused_before_launch() {
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--generator",
        "calibrated",
        "--weights",
        "/nonexistent/w.safetensors",
    ]);
    let out = bounded(
        cmd,
        "lockstep run --generator calibrated --weights",
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("--weights loads the DiT; it means nothing with --generator calibrated"),
        "{stderr}"
    );
    assert!(!stderr.contains("launch: global-rank"), "{stderr}");
}
