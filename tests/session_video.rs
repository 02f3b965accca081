//! `lockstep run --video-out FILE.y4m` (issue 11): the preview decoder's frames as a Y4M video
//! any player opens, beside the PNGs; and a bad path refused before any rank starts.
mod common;

use std::process::Command;
use std::time::Duration;

#[test]
fn run_video_out_writes_a_y4m_with_every_emitted_frame() {
    let Some(_serial) = common::start("run_video_out") else {
        return;
    };
    let dir = common::fresh_tmp("video");
    std::fs::create_dir_all(&dir).expect("dir");
    let video = dir.join("preview.y4m");
    let frames = dir.join("png");
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--chunks",
        "3",
        "--generator",
        "calibrated",
    ])
    .args(["--gen-cost-ms", "1"])
    .arg("--video-out")
    .arg(&video)
    .arg("--frames-out")
    .arg(&frames)
    .env("LOCKSTEP_DUMP_DIR", dir.join("dumps"))
    .env_remove("LOCKSTEP_FAULT");
    let out = common::bounded(cmd, "lockstep run --video-out", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let bytes = std::fs::read(&video).expect("video written");
    let nl = bytes.iter().position(|b| *b == b'\n').expect("header line");
    let header = std::str::from_utf8(&bytes[..nl]).expect("ascii header");
    assert!(header.starts_with("YUV4MPEG2 W"), "{header}");
    assert!(header.contains(" C420jpeg"), "{header}");
    let dim = |tag: char| -> usize {
        header
            .split(' ')
            .find_map(|f| f.strip_prefix(tag))
            .and_then(|v| v.parse().ok())
            .expect("dimension")
    };
    let (w, h) = (dim('W'), dim('H'));
    let model = lockstep::model::DitConfig::preset("tiny").expect("tiny");
    let n = 3 * model.frames_per_chunk;
    let frame = b"FRAME\n".len() + w * h + 2 * (w / 2) * (h / 2);
    assert_eq!(bytes.len(), nl + 1 + n * frame, "{n} frames of {w}x{h}");
    // The same frames as the PNG preview.
    let pngs = std::fs::read_dir(&frames).expect("png dir").count();
    assert_eq!(pngs, n);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn run_video_out_to_a_missing_directory_is_bad_input_before_any_rank_starts() {
    let mut cmd = Command::new(common::lockstep_bin());
    cmd.args([
        "run",
        "--quiet",
        "--chunks",
        "1",
        "--generator",
        "calibrated",
    ])
    .arg("--video-out")
    .arg("/nonexistent-lockstep-dir/x.y4m");
    let out = common::bounded(cmd, "lockstep run --video-out bad", Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(74), "{stderr}");
    assert!(
        stderr.contains("--video-out /nonexistent-lockstep-dir/x.y4m"),
        "{stderr}"
    );
    assert!(!stderr.contains("launch:"), "a rank started: {stderr}");
}
