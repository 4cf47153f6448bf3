//! Lines out: a writer thread behind a bounded queue, so a stalled consumer never stops the
//! ring buffer or the capture from being drained. What does not fit is counted (the main loop
//! reports it as a `lost` line with `source: "output"` once the queue has room again). Lines are
//! handed over in batches (one wakeup of the writer per batch, not per line), written whole and
//! flushed at least every 100 ms.

use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io::{self, BufWriter, Write},
    os::unix::fs::OpenOptionsExt,
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

/// Where lines go.
#[derive(Clone, Debug)]
pub enum Destination {
    Stdout,
    /// Appended to; created with mode 0600; reopened on SIGHUP (log rotation).
    File(PathBuf),
}

/// Shared between the producer and the writer thread.
#[derive(Default)]
pub struct OutputState {
    /// Lines dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Lines handed to the writer and not written yet: the queue's bound is on this.
    queued: AtomicUsize,
    /// The consumer closed its end (EPIPE): the run should end quietly.
    pub consumer_gone: AtomicBool,
    /// Set by SIGHUP: reopen the output file before the next write.
    pub reopen: AtomicBool,
}

/// Lines as one text, each ending in a newline: encoded in place by the main loop, written
/// with one call by the writer, and no allocation per line on either side.
#[derive(Default)]
struct Batch {
    text: String,
    lines: usize,
}

enum Message {
    Lines(Batch),
    Stop,
}

/// The producer's handle (used from the main loop only).
pub struct Output {
    tx: Sender<Message>,
    /// Lines accepted since the last hand-over.
    pending: RefCell<Batch>,
    pub state: Arc<OutputState>,
    thread: Option<JoinHandle<io::Result<()>>>,
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

    /// Queues a line if there is room, without counting a drop when there is none (for `lost`
    /// lines, which are offered again until they fit).
    pub fn offer(&self, line: String) -> bool {
        if !self.has_room() {
            return false;
        }
        self.push(|text| text.push_str(&line));
        true
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
            lines: 0,
        };
        let batch = std::mem::replace(&mut *pending, next);
        self.state.queued.fetch_add(batch.lines, Ordering::Relaxed);
        let _ = self.tx.send(Message::Lines(batch)); // fails only when the writer ended (EPIPE)
    }

    /// Writes everything queued, then stops the writer.
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

/// The open destination.
struct Sink {
    out: BufWriter<Box<dyn Write + Send>>,
}

impl Sink {
    fn open(dest: &Destination) -> io::Result<Self> {
        let inner: Box<dyn Write + Send> = match dest {
            Destination::Stdout => Box::new(io::stdout()),
            Destination::File(path) => Box::new(open_append(path)?),
        };
        Ok(Self {
            out: BufWriter::with_capacity(256 * 1024, inner),
        })
    }
}

fn write_loop(
    rx: Receiver<Message>,
    mut sink: Sink,
    dest: Destination,
    state: Arc<OutputState>,
) -> io::Result<()> {
    // Writing needs no privilege: give this thread's capabilities up at once (they are per
    // thread; the main thread drops its own once the probes are attached).
    crate::privileges::drop_all()?;
    loop {
        let (batches, stop) = next_batches(&rx);
        let result = write_batches(&mut sink, &batches).and_then(|_| sink.out.flush());
        let lines: usize = batches.iter().map(|b| b.lines).sum();
        state.queued.fetch_sub(lines, Ordering::Relaxed);
        let result = result.and_then(|_| {
            if state.reopen.swap(false, Ordering::Relaxed) {
                sink = Sink::open(&dest)?;
            }
            Ok(())
        });
        if result.is_err() || stop {
            return ignore_broken_pipe(result, &state);
        }
    }
}

/// Waits up to 100 ms for a batch, then takes whatever else is already queued (up to 100 ms
/// worth of writing), so a busy stream is written in large chunks and a quiet one at once.
fn next_batches(rx: &Receiver<Message>) -> (Vec<Batch>, bool) {
    let mut batches = Vec::new();
    match rx.recv_timeout(FLUSH_EVERY) {
        Ok(Message::Lines(batch)) => batches.push(batch),
        Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return (batches, true),
        Err(RecvTimeoutError::Timeout) => return (batches, false),
    }
    let started = Instant::now();
    while started.elapsed() < FLUSH_EVERY {
        match rx.try_recv() {
            Ok(Message::Lines(batch)) => batches.push(batch),
            Ok(Message::Stop) => return (batches, true),
            Err(_) => break,
        }
    }
    (batches, false)
}

fn write_batches(sink: &mut Sink, batches: &[Batch]) -> io::Result<()> {
    batches
        .iter()
        .try_for_each(|b| sink.out.write_all(b.text.as_bytes()))
}

/// A closed stdout (`tracer | head -3`) is a normal way to end: no error, no message.
fn ignore_broken_pipe(result: io::Result<()>, state: &OutputState) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
            state.consumer_gone.store(true, Ordering::Relaxed);
            Ok(())
        }
        other => other,
    }
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
}
