//! The envelope lane: rank 0 ↔ mesh leader, carrying envelope frames (header + meta) and
//! `ClearToSend`. Two transports behind one reader and one writer:
//!
//! - `tcp`: the loopback/TCP connection the rendezvous opened (`TCP_NODELAY`, one frame per
//!   `write`).
//! - `shm` (default when both ends share a host): two single-producer single-consumer byte rings
//!   in one shared-memory file, one per direction. A frame is copied into the ring and published
//!   with one atomic store; a reader that is spinning sees it with no system call on either side.
//!   The TCP connection stays as the **liveness and doorbell channel**: a reader about to sleep
//!   says so in the ring's control block and blocks in `poll(2)` on the socket; a writer that sees
//!   a sleeping reader sends it one doorbell byte. The peer's death closes the socket, which
//!   wakes the reader exactly as on `tcp` (EOF → peer lost), after it drained what the ring holds.
//!
//! Contract:
//! - Frames and their order are identical on both transports (`control::read_frame` /
//!   `write_frame` run over either); the choice is negotiated at bootstrap (rank 0 offers the
//!   file, the leader maps it or declines) and needs no parity field. `LOCKSTEP_LANE=tcp` forces
//!   TCP; a host without `/dev/shm` falls back to it.
//! - One writer per direction at a time (the caller's `Outbox` mutex) and one reader (the inbox
//!   mutex): the rings are SPSC.
//! - Every wait is bounded by the caller's deadline; a full ring (the reader stopped reading)
//!   is a timeout, never a hang.
//! - The shared file is unlinked as soon as the leader answered: nothing is left in `/dev/shm`
//!   by a crash after bootstrap.
//!
//! Tripwire: a reader that wakes on EOF with bytes still in the ring reads them first, so a
//! header written just before the peer died is still seen ("mid-payload", break-it C2).
use crate::error::{Error, Result};
use memmap2::MmapMut;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes of one direction's ring (a meta is at most 1 MiB by default; frames larger than the
/// ring still pass, in pieces, as the reader drains).
pub const RING_BYTES: usize = 2 << 20;
const MAGIC: u64 = 0x6c6f_636b_7374_6c6e; // "lockstln"
const CTL: usize = 4096;
const CTL_DIR: usize = 1024;

/// Nanoseconds this process spent spinning for lane data (subtracted from thread CPU by the
/// protocol benchmark).
static SPIN_NS: AtomicU64 = AtomicU64::new(0);

/// Microseconds this process spent spinning for envelope-lane data so far.
pub fn spin_us() -> f64 {
    SPIN_NS.load(Ordering::Relaxed) as f64 / 1e3
}

/// The shared mapping: control block, then the ring of direction 0 (rank 0 → leader) and the
/// ring of direction 1 (leader → rank 0).
pub struct ShmRing {
    map: MmapMut,
}

// SAFETY: the mapping is only accessed through atomics (control words) and through the SPSC
// protocol (a byte range is written by the one writer before `tail` publishes it and read by the
// one reader before `head` releases it), so sharing it between threads is sound.
unsafe impl Send for ShmRing {}
// SAFETY: as above.
unsafe impl Sync for ShmRing {}

/// Control words of one direction, each on its own cache line.
struct Ctl<'a> {
    /// Bytes ever written (writer-owned).
    tail: &'a AtomicU64,
    /// Bytes ever read (reader-owned).
    head: &'a AtomicU64,
    /// 1 while the reader is (about to be) asleep in `poll` and wants a doorbell.
    sleeping: &'a AtomicU32,
}

impl ShmRing {
    fn len() -> usize {
        CTL + 2 * RING_BYTES
    }

    fn word<T>(&self, off: usize) -> &T {
        debug_assert!(off % 64 == 0 && off + std::mem::size_of::<T>() <= CTL);
        // SAFETY: `off` is inside the control block, 64-byte aligned (the mapping is page
        // aligned), and the atomics used here have no invalid bit patterns.
        unsafe { &*(self.map.as_ptr().add(off) as *const T) }
    }

    fn ctl(&self, dir: usize) -> Ctl<'_> {
        let base = 64 + dir * CTL_DIR;
        Ctl {
            tail: self.word(base),
            head: self.word(base + 64),
            sleeping: self.word(base + 128),
        }
    }

    fn data(&self, dir: usize) -> *mut u8 {
        // SAFETY: in bounds of the mapping (CTL + dir × RING_BYTES < len()).
        unsafe { self.map.as_ptr().add(CTL + dir * RING_BYTES) as *mut u8 }
    }

    /// Creates and maps a fresh ring file (rank 0), readable by this user only, named after the
    /// job (`tag`) so that the launcher can remove what a crash during bootstrap left behind.
    /// Returns the ring and the file's path.
    pub fn create(dir: &std::path::Path, tag: &str) -> Result<(Arc<ShmRing>, std::path::PathBuf)> {
        use std::os::unix::fs::OpenOptionsExt as _;
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let path = dir.join(format!(
            "{}{}-{nonce}",
            ring_file_prefix(tag),
            std::process::id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        let ring = (|| {
            f.set_len(Self::len() as u64)
                .map_err(|e| Error::io("size the lane ring", e))?;
            // Reserve every page now: writing into a mapping of a full tmpfs would be SIGBUS on
            // the hot path; here it is an error value and the lane falls back to TCP. It also
            // keeps first-touch page faults off the hot path.
            use std::os::fd::AsRawFd as _;
            // SAFETY: posix_fallocate on a file descriptor this function owns.
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, Self::len() as libc::off_t) };
            if rc != 0 {
                return Err(Error::io(
                    "reserve the lane ring in /dev/shm",
                    std::io::Error::from_raw_os_error(rc),
                ));
            }
            // SAFETY: a file this process just created and sized; the peer maps it only after
            // the header below is written, and both sides follow the SPSC protocol.
            let map =
                unsafe { MmapMut::map_mut(&f) }.map_err(|e| Error::io("map the lane ring", e))?;
            let r = ShmRing { map };
            r.word::<AtomicU64>(0).store(MAGIC, Ordering::Release);
            Ok(Arc::new(r))
        })();
        if ring.is_err() {
            let _ = std::fs::remove_file(&path);
        }
        Ok((ring?, path))
    }

    /// Maps the ring file rank 0 offered (the leader), checking its size and magic.
    pub fn open(path: &std::path::Path) -> Result<Arc<ShmRing>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let len = f
            .metadata()
            .map_err(|e| Error::io("stat the lane ring", e))?
            .len();
        if len != Self::len() as u64 {
            return Err(Error::BadInput(format!(
                "lane ring {} has {len} bytes, expected {}",
                path.display(),
                Self::len()
            )));
        }
        // SAFETY: a file of the expected size that rank 0 created for this lane.
        let map = unsafe { MmapMut::map_mut(&f) }.map_err(|e| Error::io("map the lane ring", e))?;
        let r = ShmRing { map };
        if r.word::<AtomicU64>(0).load(Ordering::Acquire) != MAGIC {
            return Err(Error::BadInput(format!(
                "{} is not a lockstep lane ring",
                path.display()
            )));
        }
        Ok(Arc::new(r))
    }

    /// Bytes the reader of `dir` has not consumed yet.
    pub fn unread(&self, dir: usize) -> u64 {
        let c = self.ctl(dir);
        c.tail
            .load(Ordering::Acquire)
            .saturating_sub(c.head.load(Ordering::Acquire))
    }
}

/// Where ring files live.
pub const SHM_DIR: &str = "/dev/shm";

/// The name prefix of the ring files of job `tag`.
pub fn ring_file_prefix(tag: &str) -> String {
    format!("lockstep-lane-{tag}-")
}

/// Removes ring files of job `tag` left in `dir` (a rank killed between creating its ring and
/// the leader's answer); returns how many. Never fails: cleanup is best effort.
pub fn remove_stale(dir: &std::path::Path, tag: &str) -> usize {
    let prefix = ring_file_prefix(tag);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

/// `poll(2)` for input on `fd` until `deadline` (None: no bound). True when readable (data, EOF
/// or an error: the next read reports which).
fn poll_in(fd: i32, deadline: Option<Instant>) -> bool {
    loop {
        // poll takes milliseconds: round up, so a wait never ends before its deadline.
        let ms = match deadline {
            None => -1,
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000)
                .min(i32::MAX as u128) as i32,
        };
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return true;
        }
        if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        if n < 0 {
            // poll itself failed: let the read report what is wrong with the socket.
            return true;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
    }
}

/// What a non-blocking one-byte peek at a socket saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peek {
    Data,
    Eof,
    Empty,
    Error,
}

fn peek(s: &TcpStream) -> Peek {
    let mut b = [0u8; 1];
    loop {
        // SAFETY: recv into a valid 1-byte buffer on an open socket; MSG_PEEK consumes nothing.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                b.as_mut_ptr().cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        return match n {
            1.. => Peek::Data,
            0 => Peek::Eof,
            _ => match std::io::Error::last_os_error().kind() {
                std::io::ErrorKind::Interrupted => continue,
                std::io::ErrorKind::WouldBlock => Peek::Empty,
                _ => Peek::Error,
            },
        };
    }
}

/// True when a read on `s` would return at once (data, EOF or an error).
pub fn tcp_has_input(s: &TcpStream) -> bool {
    peek(s) != Peek::Empty
}

/// Spins until `ready()` or `spin` passes (or `deadline`), checking about once a microsecond.
fn spin_until(ready: &mut dyn FnMut() -> bool, spin: Duration, deadline: Option<Instant>) -> bool {
    if spin.is_zero() {
        return ready();
    }
    let start = Instant::now();
    let until = start + spin;
    let hit = loop {
        if ready() {
            break true;
        }
        let now = Instant::now();
        if now >= until || deadline.is_some_and(|d| now >= d) {
            break false;
        }
        let next = now + Duration::from_micros(1);
        while Instant::now() < next {
            std::hint::spin_loop();
        }
    };
    SPIN_NS.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
    hit
}

/// What a wait for lane input found.
enum Input {
    Ready,
    Closed,
    TimedOut,
}

/// The receiving end of the lane.
pub struct LaneReader {
    /// Names the lane in diagnostics ("envelope lane from global-rank N").
    pub what: String,
    sock: TcpStream,
    shm: Option<(Arc<ShmRing>, usize)>,
    /// The read timeout last set on `sock` (tcp): an unchanged timeout costs no syscall.
    timeout: Option<Option<Duration>>,
    /// Bounds `Read::read` while a frame is being read (the op timeout).
    read_bound: Duration,
    spin: Duration,
    /// The doorbell socket reported EOF (shm): the peer is gone once the ring is drained.
    closed: bool,
}

impl LaneReader {
    pub fn transport(&self) -> &'static str {
        if self.shm.is_some() {
            "shm"
        } else {
            "tcp"
        }
    }

    /// Waits until there is something to read (data, EOF or an error) or `deadline` passes
    /// (None: no local bound; the watchdog still applies); consumes nothing.
    pub fn readable_by(&mut self, deadline: Option<Instant>) -> bool {
        !matches!(self.wait_input(deadline), Input::TimedOut)
    }

    fn wait_input(&mut self, deadline: Option<Instant>) -> Input {
        let Some((ring, dir)) = self.shm.clone() else {
            let s = &self.sock;
            if spin_until(&mut || tcp_has_input(s), self.spin, deadline) {
                return Input::Ready;
            }
            return if poll_in(self.sock.as_raw_fd(), deadline) {
                Input::Ready
            } else {
                Input::TimedOut
            };
        };
        if spin_until(&mut || ring.unread(dir) > 0, self.spin, deadline) {
            return Input::Ready;
        }
        let ctl = ring.ctl(dir);
        loop {
            if self.closed {
                return if ring.unread(dir) > 0 {
                    Input::Ready
                } else {
                    Input::Closed
                };
            }
            // Announce the sleep, then re-check: the writer publishes its tail before it reads
            // `sleeping` (both SeqCst), so either we see the data or it rings the doorbell.
            ctl.sleeping.store(1, Ordering::SeqCst);
            // Orders the flag before the re-check (the re-check's loads are Acquire, not SeqCst;
            // the writer pairs a SeqCst tail store with a SeqCst load of the flag).
            std::sync::atomic::fence(Ordering::SeqCst);
            if ring.unread(dir) > 0 {
                ctl.sleeping.store(0, Ordering::SeqCst);
                return Input::Ready;
            }
            let woke = poll_in(self.sock.as_raw_fd(), deadline);
            ctl.sleeping.store(0, Ordering::SeqCst);
            if woke {
                self.drain_doorbells();
            }
            if ring.unread(dir) > 0 {
                return Input::Ready;
            }
            if !woke {
                return Input::TimedOut;
            }
        }
    }

    /// Consumes doorbell bytes; notes EOF (the peer closed the lane or died).
    fn drain_doorbells(&mut self) {
        let mut b = [0u8; 64];
        loop {
            // SAFETY: recv into a valid buffer on an open socket, non-blocking.
            let n = unsafe {
                libc::recv(
                    self.sock.as_raw_fd(),
                    b.as_mut_ptr().cast(),
                    b.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 {
                continue;
            }
            if n == 0 {
                self.closed = true;
            } else {
                let e = std::io::Error::last_os_error().kind();
                if e == std::io::ErrorKind::Interrupted {
                    continue;
                }
                if e != std::io::ErrorKind::WouldBlock {
                    self.closed = true;
                }
            }
            return;
        }
    }

    /// Before reading a frame: bound the reads of its bytes by `op_timeout`.
    pub fn bound_reads(&mut self, op_timeout: Duration) {
        self.read_bound = op_timeout;
        if self.shm.is_none() && self.timeout != Some(Some(op_timeout)) {
            let _ = self.sock.set_read_timeout(Some(op_timeout));
            self.timeout = Some(Some(op_timeout));
        }
    }
}

impl Read for LaneReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some((ring, dir)) = self.shm.clone() else {
            return self.sock.read(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        if ring.unread(dir) == 0 {
            match self.wait_input(Some(Instant::now() + self.read_bound)) {
                Input::Ready => {}
                Input::Closed => return Ok(0),
                Input::TimedOut => return Err(std::io::ErrorKind::TimedOut.into()),
            }
        }
        let ctl = ring.ctl(dir);
        let head = ctl.head.load(Ordering::Relaxed);
        let tail = ctl.tail.load(Ordering::Acquire);
        let n = (tail - head).min(buf.len() as u64) as usize;
        let at = (head % RING_BYTES as u64) as usize;
        let first = n.min(RING_BYTES - at);
        let data = ring.data(dir);
        // SAFETY: [at, at+first) and [0, n-first) are inside this direction's ring, published by
        // the writer (`tail` Acquire) and not yet released by us (`head`), so no one writes them.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(at), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, buf.as_mut_ptr().add(first), n - first);
        }
        ctl.head.store(head + n as u64, Ordering::Release);
        Ok(n)
    }
}

/// The sending end of the lane.
pub struct LaneWriter {
    sock: TcpStream,
    shm: Option<(Arc<ShmRing>, usize)>,
    /// Bounds a wait for ring space (the reader stopped reading).
    write_bound: Duration,
}

impl Write for LaneWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let Some((ring, dir)) = self.shm.clone() else {
            return self.sock.write(buf);
        };
        if buf.is_empty() {
            return Ok(0);
        }
        let ctl = ring.ctl(dir);
        let tail = ctl.tail.load(Ordering::Relaxed);
        let room = |c: &Ctl| RING_BYTES as u64 - (tail - c.head.load(Ordering::Acquire));
        if room(&ctl) == 0 {
            // The reader is behind by a whole ring: wait (bounded) for it to drain.
            let until = Instant::now() + self.write_bound;
            let mut backoff = Duration::from_micros(1);
            while room(&ctl) == 0 {
                if Instant::now() >= until || !tcp_alive(&self.sock) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "envelope lane ring full: the peer stopped reading",
                    ));
                }
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(1));
            }
        }
        let n = room(&ctl).min(buf.len() as u64) as usize;
        let at = (tail % RING_BYTES as u64) as usize;
        let first = n.min(RING_BYTES - at);
        let data = ring.data(dir);
        // SAFETY: [at, at+first) and [0, n-first) are free ring bytes (released by the reader's
        // `head`, not yet published by our `tail`), written only by this single writer.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), data.add(at), first);
            std::ptr::copy_nonoverlapping(buf.as_ptr().add(first), data, n - first);
        }
        ctl.tail.store(tail + n as u64, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
        if ctl.sleeping.load(Ordering::SeqCst) != 0 {
            self.ring_doorbell();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LaneWriter {
    fn ring_doorbell(&self) {
        let b = [1u8];
        // SAFETY: send of a valid 1-byte buffer; MSG_NOSIGNAL: a dead peer is an error value,
        // not SIGPIPE. A failed doorbell is not reported here: the reader learns of a dead peer
        // from the socket's EOF.
        let _ = unsafe {
            libc::send(
                self.sock.as_raw_fd(),
                b.as_ptr().cast(),
                1,
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
    }
}

/// False once the peer closed the connection (a non-blocking peek reads EOF).
fn tcp_alive(s: &TcpStream) -> bool {
    peek(s) != Peek::Eof
}

/// What the control reader thread of a rank peeks at when the peer is lost: whether the lane
/// still holds bytes the receiving thread has not taken.
pub enum LanePeek {
    Tcp(TcpStream),
    Shm(Arc<ShmRing>, usize),
}

impl LanePeek {
    pub fn has_unread(&self) -> bool {
        match self {
            LanePeek::Tcp(s) => peek(s) == Peek::Data,
            LanePeek::Shm(r, dir) => r.unread(*dir) > 0,
        }
    }
}

/// The lane of one rank, split into its reader, writer and peek handle.
pub struct Lane {
    pub reader: LaneReader,
    pub writer: LaneWriter,
    pub peek: LanePeek,
    /// The ring file rank 0 offered (already unlinked), for diagnostics; None on the leader or
    /// when nothing was offered.
    pub offered: Option<std::path::PathBuf>,
}

/// Which transport `LOCKSTEP_LANE` asks for (`shm` by default, `tcp` to force TCP).
pub fn want_shm() -> Result<bool> {
    match std::env::var("LOCKSTEP_LANE") {
        Err(_) => Ok(true),
        Ok(v) if v.is_empty() || v == "shm" => Ok(true),
        Ok(v) if v == "tcp" => Ok(false),
        Ok(v) => Err(Error::BadInput(format!(
            "LOCKSTEP_LANE={v:?} is not a lane transport (shm or tcp)"
        ))),
    }
}

/// Frame kind of the bootstrap negotiation (rank 0's offer, the leader's answer), carried on the
/// TCP lane before either side reads envelopes.
const OFFER: crate::comm::control::FrameKind = crate::comm::control::FrameKind::LaneOffer;

/// How a lane is set up: the job's tag (names the ring file), this rank's side, the bounds.
#[derive(Clone, Debug)]
pub struct LaneSetup {
    /// The job id (`rank::job_id`): ring files are named after it.
    pub tag: String,
    /// This is rank 0 (it offers the ring); else the mesh leader (it answers).
    pub driver: bool,
    /// The other end's global rank, for diagnostics.
    pub peer: u32,
    pub op_timeout: Duration,
    pub spin: Duration,
    /// This side wants shared memory (`want_shm`).
    pub shm: bool,
}

/// Bootstrap: settles the lane's transport over the fresh TCP lane `sock` and splits it. Bounded
/// by `deadline`.
pub fn establish(sock: TcpStream, setup: &LaneSetup, deadline: Instant) -> Result<Lane> {
    let LaneSetup {
        tag,
        driver,
        peer,
        op_timeout,
        spin,
        shm,
    } = setup.clone();
    use crate::comm::control::{read_frame, write_frame};
    let what = format!("envelope lane to global-rank {peer}");
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    let _ = sock.set_read_timeout(Some(left()));
    let mut s = sock
        .try_clone()
        .map_err(|e| Error::io("clone envelope lane", e))?;
    let mut offered = None;
    let negotiated: Option<(Arc<ShmRing>, usize)> = if driver {
        let offer = if shm {
            match ShmRing::create(std::path::Path::new(SHM_DIR), &tag) {
                Ok(r) => Some(r),
                Err(e) => {
                    crate::diag!("lockstep: envelope lane: no shared memory ({e}); using tcp");
                    None
                }
            }
        } else {
            None
        };
        let body = offer
            .as_ref()
            .map(|(_, p)| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let sent = write_frame(&mut s, OFFER, &[body.as_bytes()])
            .map_err(|e| Error::PeerLost(format!("{what}: send the lane offer: {e}")));
        if offer.is_some() && crate::fault::hit(crate::fault::points::LANE_KILL_AFTER_OFFER) {
            crate::diag!("lockstep: fault: SIGKILL after offering the lane ring");
            // SAFETY: sending a signal to our own pid.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        let answer = sent.and_then(|_| read_frame(&mut s, 64, &what));
        if let Some((_, p)) = &offer {
            // Mapped by both (or declined): the name is no longer needed.
            let _ = std::fs::remove_file(p);
            offered = Some(p.clone());
        }
        match answer? {
            Some((k, b)) if k == OFFER => match (offer, b.first()) {
                // Rank 0 reads direction 1 (leader → rank 0).
                (Some((r, _)), Some(1)) => Some((r, 1)),
                _ => None,
            },
            Some((k, _)) => {
                return Err(Error::Decode(format!(
                    "{what}: expected the lane answer, got a {k:?} frame"
                )))
            }
            None => {
                return Err(Error::PeerLost(format!(
                    "{what}: closed during the lane negotiation"
                )))
            }
        }
    } else {
        let offer = match read_frame(&mut s, 4096, &what)? {
            Some((k, b)) if k == OFFER => b,
            Some((k, _)) => {
                return Err(Error::Decode(format!(
                    "{what}: expected the lane offer, got a {k:?} frame"
                )))
            }
            None => {
                return Err(Error::PeerLost(format!(
                    "{what}: closed during the lane negotiation"
                )))
            }
        };
        let mapped = if offer.is_empty() || !shm {
            None
        } else {
            let path = String::from_utf8_lossy(&offer).into_owned();
            match ShmRing::open(std::path::Path::new(&path)) {
                // The leader reads direction 0 (rank 0 → leader).
                Ok(r) => Some((r, 0)),
                Err(e) => {
                    crate::diag!(
                        "lockstep: envelope lane: cannot map rank 0's ring ({e}); using tcp"
                    );
                    None
                }
            }
        };
        let yes = [u8::from(mapped.is_some())];
        write_frame(&mut s, OFFER, &[&yes])
            .map_err(|e| Error::PeerLost(format!("{what}: send the lane answer: {e}")))?;
        mapped
    };
    let _ = sock.set_read_timeout(None);
    // `negotiated` holds the direction this rank reads; it writes the other one.
    let (read_shm, write_shm, peek) = match negotiated {
        Some((r, read_dir)) => (
            Some((r.clone(), read_dir)),
            Some((r.clone(), 1 - read_dir)),
            LanePeek::Shm(r, read_dir),
        ),
        None => (
            None,
            None,
            LanePeek::Tcp(
                sock.try_clone()
                    .map_err(|e| Error::io("clone envelope lane", e))?,
            ),
        ),
    };
    let writer = LaneWriter {
        sock: sock
            .try_clone()
            .map_err(|e| Error::io("clone envelope lane", e))?,
        shm: write_shm,
        write_bound: op_timeout,
    };
    Ok(Lane {
        reader: LaneReader {
            what: format!("envelope lane from global-rank {peer}"),
            sock,
            shm: read_shm,
            timeout: None,
            read_bound: op_timeout,
            spin,
            closed: false,
        },
        writer,
        peek,
        offered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::control::{read_frame, write_frame, FrameKind};
    use std::net::TcpListener;

    fn setup(driver: bool, spin: Duration, shm: bool) -> LaneSetup {
        LaneSetup {
            tag: format!("test{}", std::process::id()),
            driver,
            peer: u32::from(driver),
            op_timeout: Duration::from_secs(2),
            spin,
            shm,
        }
    }

    #[test]
    fn ring_files_are_private_and_the_launcher_can_sweep_a_jobs_leftovers() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = std::env::temp_dir().join(format!("lockstep-lane-sweep-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("tmp dir");
        let (_r, p) = ShmRing::create(&dir, "jobA").expect("create");
        let (_r2, p2) = ShmRing::create(&dir, "jobB").expect("create");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "ring file mode {mode:o}");
        assert_eq!(remove_stale(&dir, "jobA"), 1);
        assert!(!p.exists() && p2.exists(), "only job A's ring is swept");
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn pair(shm: bool) -> (Lane, Lane) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let d = Instant::now() + Duration::from_secs(5);
        let spin = Duration::from_micros(20);
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).expect("connect");
            establish(s, &setup(false, spin, shm), d)
        });
        let (s, _) = l.accept().expect("accept");
        let a = establish(s, &setup(true, spin, shm), d);
        let b = t.join().expect("join");
        (a.expect("rank 0 lane"), b.expect("leader lane"))
    }

    #[test]
    fn shm_lane_carries_frames_both_ways_in_order_including_ones_larger_than_the_ring() {
        if !std::path::Path::new("/dev/shm").is_dir() {
            println!("SKIP shm lane test: no /dev/shm here");
            return;
        }
        let (mut a, mut b) = pair(true);
        assert_eq!(a.reader.transport(), "shm");
        assert_eq!(b.reader.transport(), "shm");
        let offered = a.offered.clone().expect("rank 0 offered a ring file");
        assert!(
            !offered.exists(),
            "ring file left behind: {}",
            offered.display()
        );
        let big: Vec<u8> = (0..(RING_BYTES * 2 + 17))
            .map(|i| (i % 251) as u8)
            .collect();
        let big2 = big.clone();
        let t = std::thread::spawn(move || {
            for i in 0..100u32 {
                write_frame(&mut a.writer, FrameKind::Envelope, &[&i.to_le_bytes()]).expect("w");
            }
            write_frame(&mut a.writer, FrameKind::Envelope, &[&big2]).expect("big");
            // And the answer comes back on the other ring.
            let got = read_frame(&mut a.reader, u32::MAX, "a")
                .expect("r")
                .expect("frame");
            assert_eq!(got.1, b"pong");
            a
        });
        for i in 0..100u32 {
            let (k, body) = read_frame(&mut b.reader, 1 << 20, "b")
                .expect("r")
                .expect("frame");
            assert_eq!(k, FrameKind::Envelope);
            assert_eq!(body, i.to_le_bytes());
        }
        let (_, body) = read_frame(&mut b.reader, u32::MAX, "b")
            .expect("r")
            .expect("frame");
        assert!(body == big, "large frame corrupted");
        write_frame(&mut b.writer, FrameKind::Envelope, &[b"pong"]).expect("pong");
        let _a = t.join().expect("join");
    }

    #[test]
    fn leader_that_declines_the_ring_leaves_both_ends_on_tcp_and_no_file_behind() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("addr");
        let d = Instant::now() + Duration::from_secs(5);
        let (bound, spin) = (Duration::from_secs(2), Duration::ZERO);
        // The leader does not want shared memory (another host, or LOCKSTEP_LANE=tcp there).
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).expect("connect");
            establish(s, &setup(false, spin, false), d)
        });
        let (s, _) = l.accept().expect("accept");
        let mut a = establish(s, &setup(true, spin, true), d).expect("rank 0 lane");
        let mut b = t.join().expect("join").expect("leader lane");
        assert_eq!((a.reader.transport(), b.reader.transport()), ("tcp", "tcp"));
        if let Some(p) = &a.offered {
            assert!(!p.exists(), "ring file left behind: {}", p.display());
        }
        write_frame(&mut b.writer, FrameKind::Envelope, &[b"over tcp"]).expect("w");
        a.reader.bound_reads(bound);
        let (_, body) = read_frame(&mut a.reader, 64, "a")
            .expect("r")
            .expect("frame");
        assert_eq!(body, b"over tcp");
    }

    #[test]
    fn shm_lane_reader_sees_peer_close_after_draining_the_ring() {
        if !std::path::Path::new("/dev/shm").is_dir() {
            println!("SKIP shm lane test: no /dev/shm here");
            return;
        }
        let (a, mut b) = pair(true);
        let Lane {
            mut writer,
            reader,
            peek,
            ..
        } = a;
        write_frame(&mut writer, FrameKind::Envelope, &[b"last words"]).expect("w");
        drop((writer, reader, peek));
        let t = Instant::now();
        let (_, body) = read_frame(&mut b.reader, 1024, "b")
            .expect("r")
            .expect("frame");
        assert_eq!(body, b"last words");
        // Then EOF: the peer's socket closed.
        assert!(b
            .reader
            .readable_by(Some(Instant::now() + Duration::from_secs(2))));
        assert!(matches!(read_frame(&mut b.reader, 1024, "b"), Ok(None)));
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t.elapsed()
        );
    }

    #[test]
    fn shm_lane_wait_times_out_quietly_and_tcp_lane_still_works() {
        if std::path::Path::new("/dev/shm").is_dir() {
            let (_a, mut b) = pair(true);
            let t = Instant::now();
            assert!(!b
                .reader
                .readable_by(Some(Instant::now() + Duration::from_millis(30))));
            assert!(t.elapsed() >= Duration::from_millis(30));
        }
        let (mut a, mut b) = pair(false);
        assert_eq!(a.reader.transport(), "tcp");
        write_frame(
            &mut a.writer,
            FrameKind::ClearToSend,
            &[&7u64.to_le_bytes()],
        )
        .expect("w");
        b.reader.bound_reads(Duration::from_secs(1));
        assert!(b.reader.readable_by(None));
        let (k, body) = read_frame(&mut b.reader, 64, "b")
            .expect("r")
            .expect("frame");
        assert_eq!(
            (k, body),
            (FrameKind::ClearToSend, 7u64.to_le_bytes().to_vec())
        );
    }
}
