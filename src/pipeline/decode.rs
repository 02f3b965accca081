//! Stage 0 decoders: latent chunk → something a person (or an experiment) consumes.
//!
//! - `PreviewDecoder`: a real, cheap latent-to-RGB preview. Each latent frame's 16 channels are
//!   projected to RGB with a fixed 16×3 matrix (a stand-in for a VAE's latent-RGB factors),
//!   squashed with tanh, upscaled ×8 (nearest) and written as a PNG per frame
//!   (`frame_000000.png`, …, in emit order). The PNG writer is dependency-free: stored (level-0)
//!   deflate blocks, CRC-32 and Adler-32 — valid PNG every viewer opens, just not small.
//! - `CalibratedDecoder`: busy-waits a configured cost per chunk (optionally after an inner
//!   decoder), for imbalance and overlap experiments.
//!
//! Servers plug their VAE in through the `Decoder` trait.
use crate::model::DitConfig;
use crate::{Error, Result};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One chunk to decode: the clean latent `[frames · tokens_per_frame, latent_channels · 4]`.
pub struct DecodeInput<'a> {
    pub chunk_index: u64,
    pub cache_epoch: u64,
    pub latent: &'a [f32],
    pub frames: usize,
}

pub trait Decoder: Send {
    fn name(&self) -> String;
    fn decode(&mut self, input: &DecodeInput<'_>) -> Result<()>;
}

/// Does nothing (pure pipeline measurements).
pub struct NullDecoder;

impl Decoder for NullDecoder {
    fn name(&self) -> String {
        "null".into()
    }
    fn decode(&mut self, _input: &DecodeInput<'_>) -> Result<()> {
        Ok(())
    }
}

pub struct CalibratedDecoder {
    cost: Duration,
    inner: Option<Box<dyn Decoder>>,
}

impl CalibratedDecoder {
    pub fn new(cost: Duration, inner: Option<Box<dyn Decoder>>) -> Self {
        Self { cost, inner }
    }
}

impl Decoder for CalibratedDecoder {
    fn name(&self) -> String {
        match &self.inner {
            Some(i) => format!("{} + busy {:?}", i.name(), self.cost),
            None => format!("calibrated busy {:?}", self.cost),
        }
    }
    fn decode(&mut self, input: &DecodeInput<'_>) -> Result<()> {
        let until = Instant::now() + self.cost;
        if let Some(i) = &mut self.inner {
            i.decode(input)?;
        }
        while Instant::now() < until {
            std::hint::spin_loop();
        }
        Ok(())
    }
}

pub struct PreviewDecoder {
    dir: PathBuf,
    cfg: DitConfig,
    next_frame: u64,
}

impl PreviewDecoder {
    pub fn new(dir: PathBuf, cfg: &DitConfig) -> Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating frames dir {}", dir.display()), e))?;
        Ok(Self {
            dir,
            cfg: cfg.clone(),
            next_frame: 0,
        })
    }
}

/// Upscale factor of the preview (a latent pixel → 8 × 8 video pixels, like Wan's VAE).
pub const PREVIEW_SCALE: usize = 8;

/// RGB of one latent frame at latent resolution (h × w × 3 bytes).
fn frame_rgb(c: &DitConfig, tokens: &[f32]) -> (usize, usize, Vec<u8>) {
    let (h, w) = c.latent_hw();
    let ch = c.latent_channels;
    let mut rgb = vec![0u8; h * w * 3];
    for y in 0..h {
        for x in 0..w {
            // Token (y/2, x/2); within the token, patch position (y%2, x%2) for each channel.
            let tok = (y / 2) * c.grid_w + x / 2;
            let p = (y % 2) * 2 + x % 2;
            let feat = &tokens[tok * c.in_dim()..(tok + 1) * c.in_dim()];
            for (k, out) in rgb[(y * w + x) * 3..][..3].iter_mut().enumerate() {
                let mut acc = 0.0f32;
                for ci in 0..ch {
                    // Fixed projection: a smooth, distinct weight per (channel, colour).
                    let wgt = (((ci * 3 + k) as f32) * 0.7).sin() * 0.6;
                    acc += feat[ci * 4 + p] * wgt;
                }
                *out = ((acc.tanh() * 0.5 + 0.5) * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    (h, w, rgb)
}

/// The preview decoder's frames of one chunk's clean latent: `(height, width, frames)`, each
/// frame `height × width × 3` RGB bytes at `PREVIEW_SCALE` × the latent resolution.
pub fn preview_frames(cfg: &DitConfig, latent: &[f32]) -> Result<(u32, u32, Vec<Vec<u8>>)> {
    let per = cfg.tokens_per_frame() * cfg.in_dim();
    let frames = cfg.frames_per_chunk;
    if latent.len() != frames * per {
        return Err(Error::Invariant(format!(
            "preview decoder: latent of {} values is not {frames} frames",
            latent.len()
        )));
    }
    let s = PREVIEW_SCALE;
    let (h, w) = cfg.latent_hw();
    let (bh, bw) = (h * s, w * s);
    let mut out = Vec::with_capacity(frames);
    for f in 0..frames {
        let (h, w, rgb) = frame_rgb(cfg, &latent[f * per..(f + 1) * per]);
        let mut big = vec![0u8; bh * bw * 3];
        for y in 0..bh {
            for x in 0..bw {
                let src = ((y / s) * w + x / s) * 3;
                big[(y * bw + x) * 3..][..3].copy_from_slice(&rgb[src..src + 3]);
            }
        }
        debug_assert_eq!(h * s, bh);
        out.push(big);
    }
    Ok((bh as u32, bw as u32, out))
}

impl Decoder for PreviewDecoder {
    fn name(&self) -> String {
        format!("preview png → {}", self.dir.display())
    }
    fn decode(&mut self, input: &DecodeInput<'_>) -> Result<()> {
        if input.frames != self.cfg.frames_per_chunk {
            return Err(Error::Invariant(format!(
                "preview decoder: {} frames per chunk, the model makes {}",
                input.frames, self.cfg.frames_per_chunk
            )));
        }
        let (bh, bw, frames) = preview_frames(&self.cfg, input.latent)?;
        for big in frames {
            let path = self.dir.join(format!("frame_{:06}.png", self.next_frame));
            std::fs::write(&path, png_rgb(bw, bh, &big))
                .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
            self.next_frame += 1;
        }
        Ok(())
    }
}

/// Writes the preview frames as a Y4M video (`--video-out`): 4:2:0 (`C420jpeg`, full-range
/// BT.601), one video frame per latent frame at 4 frames/s — Wan's 16 frames/s over its
/// temporal stride of 4, so the preview lasts as long as the video it stands for. Any player
/// (ffplay, mpv, VLC) opens it. Runs an optional inner decoder first (the PNG preview).
pub struct Y4mDecoder {
    path: PathBuf,
    out: std::io::BufWriter<std::fs::File>,
    cfg: DitConfig,
    header: bool,
    inner: Option<Box<dyn Decoder>>,
}

impl Y4mDecoder {
    pub fn new(path: PathBuf, cfg: &DitConfig, inner: Option<Box<dyn Decoder>>) -> Result<Self> {
        let f = std::fs::File::create(&path)
            .map_err(|e| Error::io(format!("creating video {}", path.display()), e))?;
        Ok(Self {
            path,
            out: std::io::BufWriter::new(f),
            cfg: cfg.clone(),
            header: false,
            inner,
        })
    }
}

/// One RGB frame as Y4M 4:2:0 planes (`h`, `w` even), full-range BT.601.
pub fn y4m_frame(w: usize, h: usize, rgb: &[u8]) -> Vec<u8> {
    let mut y = Vec::with_capacity(w * h);
    let (mut u, mut v) = (vec![0f32; (w / 2) * (h / 2)], vec![0f32; (w / 2) * (h / 2)]);
    for py in 0..h {
        for px in 0..w {
            let p = &rgb[(py * w + px) * 3..][..3];
            let (r, g, b) = (f32::from(p[0]), f32::from(p[1]), f32::from(p[2]));
            y.push(
                (0.299 * r + 0.587 * g + 0.114 * b)
                    .round()
                    .clamp(0.0, 255.0) as u8,
            );
            let i = (py / 2) * (w / 2) + px / 2;
            u[i] += (-0.168_736 * r - 0.331_264 * g + 0.5 * b + 128.0) / 4.0;
            v[i] += (0.5 * r - 0.418_688 * g - 0.081_312 * b + 128.0) / 4.0;
        }
    }
    let q = |x: f32| x.round().clamp(0.0, 255.0) as u8;
    let mut out = b"FRAME\n".to_vec();
    out.extend_from_slice(&y);
    out.extend(u.into_iter().map(q));
    out.extend(v.into_iter().map(q));
    out
}

impl Decoder for Y4mDecoder {
    fn name(&self) -> String {
        let me = format!("preview y4m → {}", self.path.display());
        match &self.inner {
            Some(i) => format!("{} + {me}", i.name()),
            None => me,
        }
    }
    fn decode(&mut self, input: &DecodeInput<'_>) -> Result<()> {
        use std::io::Write;
        if let Some(i) = &mut self.inner {
            i.decode(input)?;
        }
        let (h, w, frames) = preview_frames(&self.cfg, input.latent)?;
        let io = |e| Error::io(format!("writing video {}", self.path.display()), e);
        if !self.header {
            writeln!(self.out, "YUV4MPEG2 W{w} H{h} F4:1 Ip A1:1 C420jpeg").map_err(io)?;
            self.header = true;
        }
        for f in &frames {
            self.out
                .write_all(&y4m_frame(w as usize, h as usize, f))
                .map_err(io)?;
        }
        // Whole frames reach the file at every chunk: a run that crashes later leaves a
        // playable video of what it emitted.
        self.out.flush().map_err(io)
    }
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = 0xffff_ffffu32;
    for b in bytes {
        c ^= u32::from(*b);
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    !c
}

fn adler32(bytes: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for x in bytes {
        a = (a + u32::from(*x)) % 65521;
        b = (b + a) % 65521;
    }
    (b << 16) | a
}

/// An 8-bit RGB PNG with stored (uncompressed) deflate blocks.
pub fn png_rgb(w: u32, h: u32, rgb: &[u8]) -> Vec<u8> {
    let mut raw = Vec::with_capacity((w as usize * 3 + 1) * h as usize);
    for row in rgb.chunks_exact(w as usize * 3) {
        raw.push(0); // filter: none
        raw.extend_from_slice(row);
    }
    let mut z = vec![0x78, 0x01];
    let mut blocks = raw.chunks(65535).peekable();
    if blocks.peek().is_none() {
        z.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(b) = blocks.next() {
        z.push(u8::from(blocks.peek().is_none()));
        let n = b.len() as u16;
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&(!n).to_le_bytes());
        z.extend_from_slice(b);
    }
    z.extend_from_slice(&adler32(&raw).to_be_bytes());
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut c = kind.to_vec();
        c.extend_from_slice(data);
        out.extend_from_slice(&c);
        out.extend_from_slice(&crc32(&c).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    chunk(b"IDAT", &z);
    chunk(b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_and_adler_match_known_vectors() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn png_has_signature_chunks_and_exact_payload() {
        let p = png_rgb(2, 1, &[255, 0, 0, 0, 255, 0]);
        assert_eq!(&p[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&p[12..16], b"IHDR");
        assert_eq!(&p[p.len() - 8..p.len() - 4], b"IEND");
        // Stored block holds the raw scanline: filter byte + 6 colour bytes.
        let idat = p.windows(4).position(|w| w == b"IDAT").unwrap();
        assert_eq!(&p[idat + 4..idat + 6], &[0x78, 0x01]);
        assert_eq!(
            &p[idat + 6 + 5..idat + 6 + 5 + 7],
            &[0, 255, 0, 0, 0, 255, 0]
        );
    }

    #[test]
    fn preview_decoder_writes_one_png_per_frame() {
        let cfg = DitConfig::tiny();
        let dir = std::env::temp_dir().join(format!("lockstep-preview-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut d = PreviewDecoder::new(dir.clone(), &cfg).unwrap();
        let latent: Vec<f32> = (0..cfg.tokens_per_chunk() * cfg.in_dim())
            .map(|i| ((i % 97) as f32 / 48.0) - 1.0)
            .collect();
        d.decode(&DecodeInput {
            chunk_index: 0,
            cache_epoch: 0,
            latent: &latent,
            frames: 3,
        })
        .unwrap();
        let (h, w) = cfg.latent_hw();
        for f in 0..3 {
            let b = std::fs::read(dir.join(format!("frame_{f:06}.png"))).unwrap();
            assert_eq!(&b[..8], b"\x89PNG\r\n\x1a\n");
            assert_eq!(
                u32::from_be_bytes([b[16], b[17], b[18], b[19]]),
                (w * 8) as u32
            );
            assert_eq!(
                u32::from_be_bytes([b[20], b[21], b[22], b[23]]),
                (h * 8) as u32
            );
        }
        assert!(d
            .decode(&DecodeInput {
                chunk_index: 1,
                cache_epoch: 0,
                latent: &[0.0],
                frames: 3
            })
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
