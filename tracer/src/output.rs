//! Lines out: a writer thread behind a bounded queue, so a stalled consumer never stops the
//! ring buffer or the capture from being drained. What does not fit is counted (the main loop
//! reports it as a `lost` line with `source: "output"` once the queue has room again). Lines are
//! handed over in batches (one wakeup of the writer per batch, not per line), written whole and
//! flushed at least every 100 ms.
//!
//! A write that fails (a full disk) does not end the writing: the batch is dropped and
//! counted like the lines the queue had no room for, the user is told once on stderr, and
//! each following batch is tried again until one is written.

use std::{
    cell::RefCell,
    fmt,
    fs::{File, OpenOptions},
    io::{self, Seek, Write},
    os::{fd::AsFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        mpsc::{Receiver, RecvTimeoutError, Sender, channel},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Lines that may wait for a slow consumer before new ones are dropped (and counted): about
/// 4 MB of JSON at most.
pub const QUEUE_LINES: usize = 8192;
/// A batch goes to the writer once it holds this much, even within one turn of the main loop:
/// a turn that drained a full ring buffer made one batch of ~5 MB, and the next batch kept
/// that capacity.
const BATCH_BYTES: usize = 256 * 1024;
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// How many loss sources `lost` lines can count (the caller numbers them).
pub const LOSS_SOURCES: usize = crate::stats::Lost::SOURCES.len();

/// Where lines go.
#[derive(Clone, Debug)]
pub enum Destination {
    Stdout,
    /// Appended to; created with mode 0600; reopened on SIGHUP (log rotation).
    File(PathBuf),
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stdout => f.write_str("stdout"),
            Self::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// Shared between the producer and the writer thread.
#[derive(Default)]
pub struct OutputState {
    /// Lines dropped because the queue was full or writing them failed.
    pub dropped: AtomicU64,
    /// Lines handed to the writer and not written yet: the queue's bound is on this.
    queued: AtomicUsize,
    /// The consumer closed its end (EPIPE): the run should end quietly.
    pub consumer_gone: AtomicBool,
    /// Set by SIGHUP: reopen the output file before the next write.
    pub reopen: AtomicBool,
    /// The last write failed: lines handed over now are likely to be dropped too.
    failing: AtomicBool,
    /// By loss source: the counts of `lost` lines the writer could not write, for the caller
    /// to say again (else the summary would count losses that no line in the output shows).
    returned: [AtomicU64; LOSS_SOURCES],
    /// What the end of the run drops and what the writer is writing, decided under one lock
    /// (see `Output::discard_unwritten`).
    ending: std::sync::Mutex<Ending>,
}

/// Between the main loop dropping what the consumer did not take at the end of the run and
/// the writer taking its next batch: each batch is then either written or counted as dropped,
/// never both, never neither, even while the writer is stuck in a write.
#[derive(Default)]
struct Ending {
    /// Batches up to this number (from 1, in hand-over order) are dropped, not written: the
    /// main loop counted them (they were queued, not being written) when it set this.
    discard_through: u64,
    /// The lines of the batch being written, if one is.
    writing: usize,
    /// Lines of batches counted as dropped that the writer has not skipped yet.
    discarded_waiting: usize,
}

/// Lines as one text, each ending in a newline: encoded in place by the main loop, written
/// with one call by the writer, and no allocation per line on either side.
#[derive(Default)]
struct Batch {
    text: String,
    lines: usize,
    /// Its number in hand-over order, from 1 (see `OutputState::discard_through`).
    seq: u64,
    /// What the `lost` lines among them count, by source.
    lost: [u64; LOSS_SOURCES],
}

enum Message {
    Lines(Batch),
    /// Answer once everything before this is written.
    Written(Sender<()>),
    Stop,
}

/// The producer's handle (used from the main loop only).
pub struct Output {
    tx: Sender<Message>,
    /// Lines accepted since the last hand-over.
    pending: RefCell<Batch>,
    pub state: Arc<OutputState>,
    thread: Option<JoinHandle<io::Result<()>>>,
    /// Batches handed over so far.
    handed: std::cell::Cell<u64>,
}

/// Opens an output file the way log-writing daemons do: append, create 0600.
pub fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Creates (or truncates) a file only its owner can read: packet headers name hosts and ports.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

impl Output {
    pub fn start(dest: Destination) -> io::Result<Self> {
        let sink = Sink::open(&dest)?;
        // Unbounded as a channel; bounded in lines by `queued` (see has_room).
        let (tx, rx) = channel();
        let state = Arc::new(OutputState::default());
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("tracer-output".into())
            .spawn(move || write_loop(rx, sink, dest, thread_state))?;
        Ok(Self {
            tx,
            pending: RefCell::new(Batch::default()),
            state,
            thread: Some(thread),
            handed: std::cell::Cell::new(0),
        })
    }

    fn has_room(&self) -> bool {
        self.state.queued.load(Ordering::Relaxed) + self.pending.borrow().lines < QUEUE_LINES
    }

    /// Queues a line; when the queue is full the line is dropped and counted. Returns whether
    /// the line was queued.
    pub fn try_line(&self, line: String) -> bool {
        self.try_write(|text| text.push_str(&line))
    }

    /// Queues the line `write` appends (without its newline), encoded straight into the batch;
    /// when the queue is full nothing is written and the line is counted as dropped.
    pub fn try_write(&self, write: impl FnOnce(&mut String)) -> bool {
        if !self.has_room() {
            self.state.dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        self.push(write);
        true
    }

    /// Queues a `lost` line counting `count` losses of `source` if there is room, without counting a drop when
    /// there is none (it is offered again until it fits);
    /// if writing it fails, the count comes back through take_returned.
    pub fn offer_lost(&self, line: String, source: usize, count: u64) -> bool {
        if !self.has_room() {
            return false;
        }
        self.line_lost(line, source, count);
        true
    }

    /// Queues a `lost` line past the bound (at the end of the run), like line.
    pub fn line_lost(&self, line: String, source: usize, count: u64) {
        // Before the push: a push that fills the batch hands it over.
        self.pending.borrow_mut().lost[source] += count;
        self.push(|text| text.push_str(&line));
    }

    /// The counts of `source`'s `lost` lines that could not be written, since the last call.
    pub fn take_returned(&self, source: usize) -> u64 {
        self.state.returned[source].swap(0, Ordering::Relaxed)
    }

    /// Queues a line that must not be lost (`ready`, `summary`), past the bound if need be, and
    /// hands everything over.
    pub fn line(&self, line: String) {
        self.push(|text| text.push_str(&line));
        self.hand_over();
    }

    fn push(&self, write: impl FnOnce(&mut String)) {
        let full = {
            let mut batch = self.pending.borrow_mut();
            write(&mut batch.text);
            batch.text.push('\n');
            batch.lines += 1;
            batch.text.len() >= BATCH_BYTES
        };
        if full {
            self.hand_over();
        }
    }

    /// Hands the lines accepted so far to the writer: the main loop calls this once per turn.
    pub fn hand_over(&self) {
        let mut pending = self.pending.borrow_mut();
        if pending.lines == 0 {
            return;
        }
        // The next batch starts with room for as much as this one held (up to a full one).
        let next = Batch {
            text: String::with_capacity(pending.text.len().min(BATCH_BYTES + 1024)),
            ..Batch::default()
        };
        let mut batch = std::mem::replace(&mut *pending, next);
        self.handed.set(self.handed.get() + 1);
        batch.seq = self.handed.get();
        self.state.queued.fetch_add(batch.lines, Ordering::Relaxed);
        let _ = self.tx.send(Message::Lines(batch)); // fails only when the writer ended (EPIPE)
    }

    /// Whether the last write failed (then a line handed over now would likely be dropped).
    pub fn is_failing(&self) -> bool {
        self.state.failing.load(Ordering::Relaxed)
    }

    /// Hands everything over and asks the writer to say when it has written it or counted it
    /// as dropped: the end of the run counts the losses after that, so none escapes the
    /// summary. None: the writer ended (a closed stdout) and has nothing left to write; the
    /// receiver also says so (disconnected) if it ends before answering.
    pub fn request_written(&self) -> Option<Receiver<()>> {
        self.hand_over();
        let (done, written) = channel();
        self.tx.send(Message::Written(done)).ok()?;
        Some(written)
    }

    /// Hands everything over and waits until it is written or counted as dropped (see
    /// `request_written`), however long the consumer takes.
    #[cfg(test)]
    pub fn wait_written(&self) {
        if let Some(written) = self.request_written() {
            let _ = written.recv();
        }
    }

    /// What is handed over and not written yet is dropped and counted as lost output now
    /// (the run is ending and the consumer did not take it in time), except the batch being
    /// written; lines handed over later (the summary) are written.
    pub fn discard_unwritten(&self) {
        self.hand_over();
        let mut ending = self.state.ending.lock().expect("not poisoned");
        ending.discard_through = self.handed.get();
        let queued = self.state.queued.load(Ordering::Relaxed);
        let dropped = queued.saturating_sub(ending.writing + ending.discarded_waiting);
        ending.discarded_waiting += dropped;
        self.state
            .dropped
            .fetch_add(dropped as u64, Ordering::Relaxed);
    }

    /// Gives up on what the writer still has (it is stuck writing to a consumer that takes
    /// nothing): counts those lines as lost output (those `discard_unwritten` did not count
    /// already), and returns how many are not written. The process is about to exit.
    pub fn abandon(&self) -> u64 {
        self.hand_over();
        let ending = self.state.ending.lock().expect("not poisoned");
        let unwritten = self.state.queued.load(Ordering::Relaxed);
        let uncounted = unwritten.saturating_sub(ending.discarded_waiting) as u64;
        self.state.dropped.fetch_add(uncounted, Ordering::Relaxed);
        unwritten as u64
    }

    /// Writes everything queued, then stops the writer; an error if writing still fails.
    pub fn finish(mut self) -> io::Result<()> {
        self.hand_over();
        let _ = self.tx.send(Message::Stop);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(io::Error::other("output thread panicked")),
            None => Ok(()),
        }
    }
}

/// The open destination, written with one call per batch and no buffer of its own: a buffer
/// keeps what a failed write left unwritten and writes it later, a line cut in two.
struct Sink {
    file: File,
    /// A regular file: what a failed write wrote of its batch is cut off again, so that no
    /// half line stays (pipes, terminals and devices cannot be cut back).
    regular: bool,
}

impl Sink {
    fn open(dest: &Destination) -> io::Result<Self> {
        let file = match dest {
            // Its own descriptor for the same stdout, written without std's line buffer.
            Destination::Stdout => File::from(io::stdout().as_fd().try_clone_to_owned()?),
            Destination::File(path) => open_append(path)?,
        };
        let regular = matches!(dest, Destination::File(_)) && file.metadata()?.is_file();
        Ok(Self { file, regular })
    }

    /// Whether the destination is a pipe whose reader has closed it (poll says POLLERR on
    /// the writing end), without writing to it.
    fn reader_gone(&self) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: one valid pollfd; a zero timeout only asks.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        !self.regular && ready > 0 && pfd.revents & libc::POLLERR != 0
    }

    /// Writes the batch whole or, on an error, leaves nothing of it in a regular file.
    fn write_batch(&mut self, text: &[u8]) -> io::Result<()> {
        write_counting(&mut self.file, text).map_err(|(written, e)| {
            if self.regular && written > 0 {
                // Best effort: if even this fails, the half line stays (nothing better to do).
                let _ = cut_back(&mut self.file, written);
            }
            e
        })
    }
}

/// Writes all of `bytes`; on an error, also says how many of them were written before it.
fn write_counting(out: &mut impl Write, bytes: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut written = 0;
    while written < bytes.len() {
        match out.write(&bytes[written..]) {
            Ok(0) => return Err((written, io::ErrorKind::WriteZero.into())),
            Ok(n) => written += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err((written, e)),
        }
    }
    Ok(())
}

/// Removes the last `written` bytes this descriptor wrote. The file is O_APPEND: each write
/// leaves the offset at the end of what it wrote, so the failed batch began `written` bytes
/// before the offset (even if someone truncated the file since the previous batch).
fn cut_back(file: &mut File, written: usize) -> io::Result<()> {
    let end = file.stream_position()?;
    file.set_len(end.saturating_sub(written as u64))
}

/// The writer thread's side: the destination, and whether writing to it fails.
struct Writer {
    sink: Sink,
    dest: Destination,
    state: Arc<OutputState>,
    /// Since the last write failed: its error and the lines dropped since.
    failing: Option<Failing>,
}

struct Failing {
    error: io::Error,
    lines_lost: u64,
}

impl Writer {
    /// Writes each batch, or drops and counts it; a closed stdout (EPIPE) ends the writing.
    fn write(&mut self, batches: &[Batch]) -> Result<(), ConsumerGone> {
        for batch in batches {
            {
                let mut ending = self.state.ending.lock().expect("not poisoned");
                if batch.seq <= ending.discard_through {
                    // Counted as dropped by the main loop already (`discard_unwritten`).
                    ending.discarded_waiting = ending.discarded_waiting.saturating_sub(batch.lines);
                    self.state.queued.fetch_sub(batch.lines, Ordering::Relaxed);
                    continue;
                }
                ending.writing = batch.lines;
            }
            let written = self.sink.write_batch(batch.text.as_bytes());
            {
                let mut ending = self.state.ending.lock().expect("not poisoned");
                ending.writing = 0;
                self.state.queued.fetch_sub(batch.lines, Ordering::Relaxed);
            }
            match written {
                Ok(()) => self.worked(),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(ConsumerGone),
                Err(e) => self.failed(e, batch),
            }
        }
        Ok(())
    }

    fn worked(&mut self) {
        if let Some(failing) = self.failing.take() {
            self.state.failing.store(false, Ordering::Relaxed);
            eprintln!("{}", recovered_message(&self.dest, failing.lines_lost));
        }
    }

    /// Counts the batch's lines as lost output and returns the counts of its `lost` lines.
    fn count_unwritten(&self, batch: &Batch) {
        self.state
            .dropped
            .fetch_add(batch.lines as u64, Ordering::Relaxed);
        for (returned, count) in self.state.returned.iter().zip(batch.lost) {
            returned.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// Counts the batch as unwritten (`count_unwritten`); says so once per failure episode.
    fn failed(&mut self, error: io::Error, batch: &Batch) {
        let lines = batch.lines;
        self.count_unwritten(batch);
        match &mut self.failing {
            Some(failing) => {
                failing.lines_lost += lines as u64;
                failing.error = error;
            }
            None => {
                eprintln!("{}", failing_message(&self.dest, &error));
                self.state.failing.store(true, Ordering::Relaxed);
                self.failing = Some(Failing {
                    error,
                    lines_lost: lines as u64,
                });
            }
        }
    }

    /// On SIGHUP (log rotation): the file under its name again. If that cannot be opened,
    /// the file already open is kept: its lines are found under its new name, not lost.
    fn reopen_if_asked(&mut self) {
        if !self.state.reopen.swap(false, Ordering::Relaxed) {
            return;
        }
        match Sink::open(&self.dest) {
            Ok(sink) => self.sink = sink,
            Err(e) => eprintln!("{}", reopen_failed_message(&self.dest, &e)),
        }
    }

    /// How the run's writing ended: an error if the last write failed (the summary, the last
    /// line, is lost with it).
    fn end(self) -> io::Result<()> {
        match self.failing {
            None => Ok(()),
            Some(Failing { error, lines_lost }) => Err(io::Error::new(
                error.kind(),
                format!(
                    "{}: {error}; {lines_lost} lines were lost, the summary among them: {}",
                    self.dest,
                    advice(&error)
                ),
            )),
        }
    }
}

/// The consumer closed its end of stdout.
struct ConsumerGone;

/// Said when writing starts failing.
fn failing_message(dest: &Destination, error: &io::Error) -> String {
    format!(
        "tracer: writing output to {dest}: {error}; lines are dropped and counted as lost \
         (source output) until writing works again: {}",
        advice(error)
    )
}

/// Said when writing works again after failing.
fn recovered_message(dest: &Destination, lines_lost: u64) -> String {
    format!("tracer: writing output to {dest} works again; {lines_lost} lines were lost")
}

fn reopen_failed_message(dest: &Destination, error: &io::Error) -> String {
    format!(
        "tracer: reopening {dest} on SIGHUP: {error}; still writing to the file already open \
         (under its old name): {}, then send SIGHUP again",
        match error.kind() {
            // The writer has given its capabilities up: it opens as a plain user of its uid.
            io::ErrorKind::PermissionDenied => {
                "make the directory writable by the tracer's user (it has no capabilities left)"
            }
            _ => advice(error),
        }
    )
}

/// What the user can do about a write error.
fn advice(error: &io::Error) -> &'static str {
    match error.raw_os_error() {
        Some(libc::ENOSPC) => "free space on its file system",
        Some(libc::EDQUOT) => "free space or raise the disk quota",
        Some(libc::EFBIG) => "rotate the file (it reached the size limit)",
        Some(libc::EACCES | libc::EPERM | libc::EROFS) => "make it writable by the tracer",
        _ => "check the output's file system or device",
    }
}

fn write_loop(
    rx: Receiver<Message>,
    sink: Sink,
    dest: Destination,
    state: Arc<OutputState>,
) -> io::Result<()> {
    // Writing needs no privilege: give this thread's capabilities up at once (they are per
    // thread; the main thread drops its own once the probes are attached).
    crate::privileges::drop_all()?;
    let mut writer = Writer {
        sink,
        dest,
        state,
        failing: None,
    };
    loop {
        let (batches, then) = next_batches(&rx);
        writer.reopen_if_asked();
        let written = writer.write(&batches);
        // A closed stdout (`tracer | head -3`) is a normal way to end: no error, no message.
        // It is also seen with nothing to write (a quiet host would otherwise keep a finished
        // `| head -1` pipeline waiting for the next event).
        if written.is_err() || (batches.is_empty() && writer.sink.reader_gone()) {
            writer.state.consumer_gone.store(true, Ordering::Relaxed);
            return Ok(());
        }
        match then {
            Then::Continue => {}
            Then::Tell(done) => _ = done.send(()),
            Then::Stop => return writer.end(),
        }
    }
}

/// What the writer does once the batches taken are written.
enum Then {
    Continue,
    /// Tell the main loop that everything it handed over is written (or counted as lost).
    Tell(Sender<()>),
    Stop,
}

/// Waits up to 100 ms for a batch, then takes whatever else is already queued (up to 100 ms
/// worth of writing), so a busy stream is written in large chunks and a quiet one at once.
fn next_batches(rx: &Receiver<Message>) -> (Vec<Batch>, Then) {
    let mut batches = Vec::new();
    match rx.recv_timeout(FLUSH_EVERY) {
        Ok(Message::Lines(batch)) => batches.push(batch),
        Ok(Message::Written(done)) => return (batches, Then::Tell(done)),
        Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return (batches, Then::Stop),
        Err(RecvTimeoutError::Timeout) => return (batches, Then::Continue),
    }
    let started = Instant::now();
    while started.elapsed() < FLUSH_EVERY {
        match rx.try_recv() {
            Ok(Message::Lines(batch)) => batches.push(batch),
            Ok(Message::Written(done)) => return (batches, Then::Tell(done)),
            Ok(Message::Stop) => return (batches, Then::Stop),
            Err(_) => break,
        }
    }
    (batches, Then::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_output_appends_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("tracer-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.jsonl");
        let _ = std::fs::remove_file(&path);
        for text in ["first", "second"] {
            let out = Output::start(Destination::File(path.clone())).unwrap();
            out.line(format!("{{\"x\":\"{text}\"}}"));
            out.finish().unwrap();
        }
        let content = std::fs::read_to_string(&path).unwrap();
        assert_eq!(content, "{\"x\":\"first\"}\n{\"x\":\"second\"}\n");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Takes `room` bytes, then fails like a full disk.
    struct FillsUp {
        room: usize,
        taken: Vec<u8>,
    }

    impl Write for FillsUp {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.room - self.taken.len());
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_failed_write_says_how_much_of_it_was_written() {
        let mut out = FillsUp {
            room: 10,
            taken: Vec::new(),
        };
        let (written, e) = write_counting(&mut out, b"0123456789abcdef").unwrap_err();
        assert_eq!(written, 10);
        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
        let mut out = FillsUp {
            room: 10,
            taken: Vec::new(),
        };
        assert!(write_counting(&mut out, b"0123").is_ok());
    }

    #[test]
    fn cutting_back_removes_the_failed_writes_part_only() {
        let path = std::env::temp_dir().join(format!("tracer-cut-{}", std::process::id()));
        std::fs::write(&path, "before\n").unwrap();
        let mut file = open_append(&path).unwrap();
        file.write_all(b"whole\n").unwrap();
        // What a write cut short by a full disk leaves: part of its first line.
        file.write_all(b"{\"half").unwrap();
        cut_back(&mut file, 6).unwrap();
        file.write_all(b"next\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "before\nwhole\nnext\n"
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn lines_that_cannot_be_written_are_counted_and_the_end_is_an_error() {
        let out = Output::start(Destination::File("/dev/full".into())).unwrap();
        out.line("{\"x\":1}".into());
        out.line("{\"x\":2}".into());
        out.wait_written();
        assert_eq!(out.state.dropped.load(Ordering::Relaxed), 2);
        assert!(out.is_failing());
        let err = out.finish().unwrap_err();
        assert_eq!(err.raw_os_error(), None, "a message of its own: {err}");
        assert_eq!(err.kind(), io::ErrorKind::StorageFull);
        let text = err.to_string();
        assert!(
            text.contains("/dev/full") && text.contains("2 lines"),
            "{text}"
        );
    }

    #[test]
    fn a_lost_line_that_cannot_be_written_gives_its_count_back() {
        let out = Output::start(Destination::File("/dev/full".into())).unwrap();
        assert!(out.offer_lost("{\"event\":\"lost\"}".into(), 2, 5));
        out.wait_written();
        assert_eq!(out.take_returned(2), 5);
        assert_eq!(out.take_returned(2), 0, "given back once");
        assert_eq!(out.take_returned(0), 0);
        assert!(out.finish().is_err());
    }

    #[test]
    fn the_advice_fits_the_error() {
        let advice_for = |errno| advice(&io::Error::from_raw_os_error(errno));
        assert!(advice_for(libc::ENOSPC).contains("free space"));
        assert!(advice_for(libc::EACCES).contains("writable"));
        assert!(advice_for(libc::EIO).contains("check"));
    }
}
