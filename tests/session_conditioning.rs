//! The caller's conditioning tensor reaches the mesh as values (issue 11): the model embeds a
//! text encoder's output, not a seed derived from its digest; the same tensor gives the same
//! latents run after run and at TP=1 and TP=2; every mesh rank's copy is checked by its digest
//! at every chunk end; a Wan-sized tensor (512 × 4096 f32 = 8 MiB) goes through the envelope
//! path.
mod common;

use lockstep::exit::ExitCode;
use lockstep::model::DitConfig;
use lockstep::pipeline::{GeneratorKind, RunArgs};
use lockstep::session::{Conditioning, Session, SessionConfig, Submit};
use lockstep::wire::DType;
use std::process::Command;
use std::time::Duration;

fn config(generator: GeneratorKind, tp: u32) -> SessionConfig {
    SessionConfig {
        run: RunArgs {
            generator,
            tp,
            gen_cost_ms: 1.0,
            timeout: 8.0,
            quiet: true,
            ..RunArgs::default()
        },
        exe: Some(common::lockstep_bin()),
        dump_dir: Some(common::tmp("dumps")),
        ..SessionConfig::default()
    }
}

/// A text encoder's output stand-in: smooth values of both signs, deterministic.
fn text_values(cfg: &DitConfig, phase: f32) -> Vec<f32> {
    (0..cfg.text_tokens * cfg.text_dim)
        .map(|i| ((i as f32) * 0.37 + phase).sin() * 1.3)
        .collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// The latents of the first `n` chunks of a stream with prompt `c`, then of one chunk after a
/// hard cut back to the same prompt (the values travel again with the new epoch's first chunk).
fn latents(cfg: &SessionConfig, c: &Conditioning, n: usize) -> Vec<Vec<f32>> {
    let mut s = Session::open(cfg).expect("open");
    s.set_conditioning(c).expect("conditioning");
    let mut out = Vec::new();
    while out.len() < n {
        if let (_, Some(r)) = s.submit_and_recv(Duration::from_secs(20)).expect("stream") {
            out.push(r.latent);
        }
    }
    s.cut(Some(c)).expect("cut to the same prompt");
    assert!(matches!(s.submit().expect("submit"), Submit::Sent(_)));
    let r = s
        .recv(Duration::from_secs(20))
        .expect("recv")
        .expect("result after the cut");
    assert_eq!(r.ids.cache_epoch.get(), 1);
    out.push(r.latent);
    s.close().expect("close");
    out
}

#[test]
fn a_caller_tensor_reaches_the_model_as_values_same_tensor_same_latents_at_tp1_and_tp2() {
    let Some(_serial) = common::start("conditioning_values") else {
        return;
    };
    let model = DitConfig::preset("tiny").expect("tiny");
    let shape = [model.text_tokens as u64, model.text_dim as u64];
    let vals = text_values(&model, 0.0);
    let t = Conditioning::from_tensor(&model, DType::F32, &shape, &f32_bytes(&vals)).expect("t");
    let tp2 = config(GeneratorKind::Dit, 2);
    let a = latents(&tp2, &t, 2);
    // Same tensor, same latents, bit for bit: the first chunk (values sent), the second (text
    // K/V kept on the mesh) and the first after a cut (values sent again).
    assert_eq!(a, latents(&tp2, &t, 2), "same tensor, other latents");
    // The values are what the model uses: the seed its digest named before gives other latents.
    let by_digest = latents(&tp2, &Conditioning::from_seed(t.seed()), 2);
    assert!(
        rel_l2(&by_digest[0], &a[0]) > 1e-3,
        "the tensor's digest as a seed gave the tensor's latents"
    );
    // Another tensor, other latents.
    let other = text_values(&model, 0.5);
    let u = Conditioning::from_tensor(&model, DType::F32, &shape, &f32_bytes(&other)).expect("u");
    assert!(rel_l2(&latents(&tp2, &u, 1)[0], &a[0]) > 1e-3);
    // TP=1 computes the same function (the TP tests' f32 tolerance).
    let one = latents(&config(GeneratorKind::Dit, 1), &t, 2);
    for (i, (x, y)) in one.iter().zip(&a).enumerate() {
        let e = rel_l2(x, y);
        assert!(e < 1e-5, "chunk {i}: TP=1 vs TP=2 rel L2 {e}");
    }
    // A half-precision encoder output is converted on the mesh: bf16 of the same values is
    // the same prompt up to bf16 rounding, and a prompt of its own (another digest).
    let bf: Vec<u8> = vals
        .iter()
        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
        .collect();
    let tb = Conditioning::from_tensor(&model, DType::Bf16, &shape, &bf).expect("bf16");
    assert_ne!(tb.seed(), t.seed());
    let b = latents(&tp2, &tb, 1);
    let e = rel_l2(&b[0], &a[0]);
    assert!(e > 0.0 && e < 0.05, "bf16 vs f32 prompt: rel L2 {e}");
}

fn save_prompt(path: &std::path::Path, cfg: &DitConfig, phase: f32) {
    let bytes = f32_bytes(&text_values(cfg, phase));
    let view = safetensors::tensor::TensorView::new(
        safetensors::Dtype::F32,
        vec![cfg.text_tokens, cfg.text_dim],
        &bytes,
    )
    .expect("view");
    safetensors::serialize_to_file([("text", view)], &None, path).expect("save");
}

fn run(args: &[&str], fault: Option<&str>) -> (Option<i32>, String) {
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args(["run", "--quiet"]).args(args);
    cmd.env("LOCKSTEP_DUMP_DIR", common::tmp("dumps"));
    match fault {
        Some(f) => cmd.env("LOCKSTEP_FAULT", f),
        None => cmd.env_remove("LOCKSTEP_FAULT"),
    };
    let out = common::bounded(cmd, "lockstep run", Duration::from_secs(60));
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_mesh_rank_checks_the_conditioning_it_received_by_its_digest_at_chunk_end() {
    let Some(_serial) = common::start("conditioning_parity") else {
        return;
    };
    let model = DitConfig::preset("tiny").expect("tiny");
    let file = common::tmp("run-prompt.safetensors");
    save_prompt(&file, &model, 0.25);
    let f = file.to_str().expect("utf-8 path");
    let base = [
        "--chunks",
        "3",
        "--generator",
        "calibrated",
        "--gen-cost-ms",
        "1",
        "--tp",
        "2",
        "--conditioning",
        f,
    ];
    let (code, err) = run(&base, None);
    assert_eq!(code, Some(0), "{err}");
    // One mesh rank's copy changes on arrival: the chunk-end digest names the field and both
    // values, before any result is accepted (exit 70, invariant).
    let (code, err) = run(&base, Some("pipeline.corrupt_conditioning@2"));
    assert_eq!(
        code,
        Some(ExitCode::InvariantViolation.code()),
        "corrupted conditioning was not caught: {err}"
    );
    assert!(
        err.contains("state digest drift across the mesh") && err.contains("prompt: group-rank 0="),
        "{err}"
    );
    // A file that is not a prompt for this preset is refused before any rank starts.
    let wrong = common::tmp("wrong-prompt.safetensors");
    save_prompt(&wrong, &DitConfig::preset("wan-1.3b").expect("wan"), 0.0);
    let w = wrong.to_str().expect("utf-8 path");
    let (code, err) = run(&["--chunks", "1", "--conditioning", w], None);
    assert_eq!(code, Some(ExitCode::BadInput.code()), "{err}");
    assert!(err.contains("conditioning tensor: shape"), "{err}");
    assert!(!err.contains("launch:"), "a rank started: {err}");
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_file(&wrong);
}

#[test]
fn a_wan_sized_conditioning_tensor_travels_to_every_mesh_rank_each_epoch() {
    let Some(_serial) = common::start("conditioning_wan_size") else {
        return;
    };
    let model = DitConfig::preset("wan-1.3b").expect("wan");
    assert_eq!((model.text_tokens, model.text_dim), (512, 4096));
    let bytes = f32_bytes(&text_values(&model, 0.0));
    assert_eq!(bytes.len(), 8 << 20);
    let t = Conditioning::from_tensor(&model, DType::F32, &[512, 4096], &bytes).expect("t");
    let mut cfg = config(GeneratorKind::Calibrated, 2);
    cfg.run.preset = "wan-1.3b".into();
    let mut s = Session::open(&cfg).expect("open");
    s.set_conditioning(&t).expect("8 MiB conditioning");
    // The calibrated generator ignores the prompt, but each mesh rank digests what it received
    // and Stage 0 checks that digest with every result: a result is the proof of arrival.
    let mut got = 0;
    for epoch in 0..2u64 {
        let mut in_epoch = 0;
        while in_epoch < 2 {
            if let (_, Some(r)) = s.submit_and_recv(Duration::from_secs(20)).expect("stream") {
                assert_eq!(r.ids.cache_epoch.get(), epoch);
                in_epoch += 1;
                got += 1;
            }
        }
        if epoch == 0 {
            s.cut(Some(&t)).expect("cut: the values travel again");
        }
    }
    assert_eq!(got, 4);
    s.close().expect("close");
}
