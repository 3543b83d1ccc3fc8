//! The API thread: one epoll set over the listening socket, every client connection, the
//! answers coming back from the main thread, and the stop event. Connections are
//! non-blocking; each holds at most one request in the main thread at a time (answers keep
//! their order), and a connection that sends nothing for [`IDLE`] is closed, so a slow or
//! silent client costs one descriptor and never holds another client up.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::http::{self, Parse, MAX_BODY, MAX_HEAD};
use crate::routes::route;
use crate::{Call, Reply};

/// Most connections open at once; one more is answered 503 and closed.
const MAX_CONNS: usize = 64;
/// A connection that sends nothing for this long (and waits for no answer) is closed.
const IDLE: Duration = Duration::from_secs(10);
/// How long an answer may wait for the main thread before the client is told so.
const ANSWER: Duration = Duration::from_secs(60);
/// How long writing the last answers may take when rhyve stops.
const FLUSH: Duration = Duration::from_secs(2);

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const REPLIES: u64 = 2;
const FIRST_CONN: u64 = 16;

struct Conn {
    stream: UnixStream,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// A request of this connection is with the main thread: until when it may answer, and
    /// how long that was.
    waiting: Option<(Instant, Duration)>,
    /// `100 Continue` was sent for the request being read.
    continued: bool,
    /// Close once `out` is written.
    close: bool,
    last: Instant,
    /// EPOLLOUT is armed.
    want_out: bool,
}

pub struct Server {
    listener: UnixListener,
    epoll: Epoll,
    calls: Sender<Call>,
    ready: EventFd,
    stop: Arc<EventFd>,
    replies_tx: Sender<(u64, Reply)>,
    replies: Receiver<(u64, Reply)>,
    replies_evt: Arc<EventFd>,
    conns: HashMap<u64, Conn>,
    next: u64,
}

fn reply_bytes(r: &Reply, close: bool) -> Vec<u8> {
    let body = r
        .body
        .as_ref()
        .map(|b| serde_json::to_vec(b).unwrap_or_default())
        .unwrap_or_default();
    let mut extra = Vec::new();
    if let Some(m) = r.allow {
        extra.push(("Allow", m));
    }
    http::response(r.status, &body, close, &extra)
}

impl Server {
    pub fn new(
        listener: UnixListener,
        calls: Sender<Call>,
        ready: EventFd,
        stop: Arc<EventFd>,
    ) -> std::io::Result<Server> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let (replies_tx, replies) = std::sync::mpsc::channel();
        let replies_evt = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        for (fd, token) in [
            (listener.as_raw_fd(), LISTENER),
            (stop.as_raw_fd(), STOP),
            (replies_evt.as_raw_fd(), REPLIES),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(Server {
            listener,
            epoll,
            calls,
            ready,
            stop,
            replies_tx,
            replies,
            replies_evt,
            conns: HashMap::new(),
            next: FIRST_CONN,
        })
    }

    pub fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(1000, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("API server: epoll: {e}; the API stops answering");
                    return;
                }
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    LISTENER => self.accept(),
                    STOP => {
                        self.finish();
                        return;
                    }
                    REPLIES => self.take_replies(),
                    id => self.serve(id, ev.event_set()),
                }
            }
            self.sweep();
        }
    }

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: the listener stays, the client is not taken.
                    log::warn!("API server: accept: {e}");
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNS {
                let r = Reply::error(503, "too many API connections; try again");
                let _ = stream.set_nonblocking(true);
                let _ = (&stream).write(&reply_bytes(&r, true));
                continue;
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next;
            self.next = self.next.wrapping_add(1).max(FIRST_CONN);
            let ev = EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, id);
            if self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                .is_err()
            {
                continue;
            }
            self.conns.insert(
                id,
                Conn {
                    stream,
                    inbuf: Vec::new(),
                    out: Vec::new(),
                    waiting: None,
                    continued: false,
                    close: false,
                    last: Instant::now(),
                    want_out: false,
                },
            );
        }
    }

    fn serve(&mut self, id: u64, set: EventSet) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if set.contains(EventSet::IN) || set.contains(EventSet::READ_HANG_UP) {
            let mut buf = [0u8; 8192];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        // The client is done sending. Answer what it asked, then close.
                        c.close = true;
                        break;
                    }
                    Ok(n) => {
                        c.last = Instant::now();
                        c.inbuf.extend_from_slice(buf.get(..n).unwrap_or_default());
                        if c.inbuf.len() > MAX_HEAD.saturating_add(MAX_BODY).saturating_add(8192) {
                            // More than one whole request can hold: the parse refuses it.
                            break;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        self.drop_conn(id);
                        return;
                    }
                }
            }
        }
        if set.contains(EventSet::HANG_UP) || set.contains(EventSet::ERROR) {
            self.drop_conn(id);
            return;
        }
        self.advance(id);
    }

    /// Parses the next request of connection `id` if none is with the main thread, writes
    /// what is pending, and closes the connection when it is done.
    fn advance(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        if c.waiting.is_none() && !(c.close && c.out.is_empty() && c.inbuf.is_empty()) {
            match http::parse(&c.inbuf) {
                Ok(Parse::Incomplete { expect_continue }) => {
                    if expect_continue && !c.continued {
                        c.continued = true;
                        c.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    if c.close {
                        // The client stopped sending in the middle of a request.
                        c.inbuf.clear();
                    }
                }
                Ok(Parse::Done(req, used)) => {
                    c.inbuf.drain(..used.min(c.inbuf.len()));
                    c.continued = false;
                    c.close |= req.close;
                    match route(&req.method, &req.path, &req.body) {
                        Ok(endpoint) => {
                            let limit = endpoint.answer_within().unwrap_or(ANSWER);
                            let call = Call {
                                endpoint,
                                conn: id,
                                replies: Some((self.replies_tx.clone(), self.replies_evt.clone())),
                            };
                            let now = Instant::now();
                            c.waiting = Some((now.checked_add(limit).unwrap_or(now), limit));
                            if self.calls.send(call).is_ok() {
                                let _ = self.ready.write(1);
                            }
                        }
                        Err(r) => c.out.extend_from_slice(&reply_bytes(&r, c.close)),
                    }
                }
                Err(e) => {
                    c.inbuf.clear();
                    c.close = true;
                    c.out
                        .extend_from_slice(&reply_bytes(&Reply::error(e.status, e.msg), true));
                }
            }
        }
        self.flush(id);
    }

    fn flush(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n.min(c.out.len()));
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.drop_conn(id);
                    return;
                }
            }
        }
        let pending = !c.out.is_empty();
        if !pending && c.close && c.waiting.is_none() && c.inbuf.is_empty() {
            self.drop_conn(id);
            return;
        }
        if pending != c.want_out {
            c.want_out = pending;
            let mut set = EventSet::IN | EventSet::READ_HANG_UP;
            if pending {
                set |= EventSet::OUT;
            }
            let _ = self.epoll.ctl(
                ControlOperation::Modify,
                c.stream.as_raw_fd(),
                EpollEvent::new(set, id),
            );
        }
    }

    fn take_replies(&mut self) {
        let _ = self.replies_evt.read();
        while let Ok((id, r)) = self.replies.try_recv() {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.waiting.take().is_none() {
                continue;
            }
            c.last = Instant::now();
            c.out.extend_from_slice(&reply_bytes(&r, c.close));
            // A pipelined request may be waiting behind this one.
            self.advance(id);
        }
    }

    /// Closes connections idle for too long, and answers for a main thread that is late.
    fn sweep(&mut self) {
        let now = Instant::now();
        let mut late = Vec::new();
        let mut idle = Vec::new();
        for (id, c) in &self.conns {
            match c.waiting {
                Some((until, limit)) if now > until => late.push((*id, limit)),
                Some(_) => {}
                None if now.duration_since(c.last) > IDLE => idle.push(*id),
                None => {}
            }
        }
        for (id, limit) in late {
            if let Some(c) = self.conns.get_mut(&id) {
                // The answer, if it ever comes, goes nowhere: this connection closes.
                c.waiting = None;
                c.close = true;
                let r = Reply::error(
                    503,
                    format!("the VMM did not answer within {} s", limit.as_secs()),
                );
                c.out.extend_from_slice(&reply_bytes(&r, true));
                self.flush(id);
            }
        }
        for id in idle {
            if let Some(c) = self.conns.get_mut(&id) {
                if !c.inbuf.is_empty() && c.out.is_empty() {
                    let r = Reply::error(408, "the request was not completed within 10 s");
                    let _ = c.stream.write(&reply_bytes(&r, true));
                }
            }
            self.drop_conn(id);
        }
    }

    fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    /// rhyve is stopping: write the answers the main thread gave, for at most [`FLUSH`].
    fn finish(&mut self) {
        let _ = self.stop.read();
        self.take_replies();
        let deadline = Instant::now()
            .checked_add(FLUSH)
            .unwrap_or_else(Instant::now);
        for c in self.conns.values_mut() {
            if c.out.is_empty() {
                continue;
            }
            let _ = c.stream.set_nonblocking(false);
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || c.stream.set_write_timeout(Some(left)).is_err() {
                continue;
            }
            let _ = c.stream.write_all(&c.out);
        }
    }
}
