//! Backends on 127.0.0.1 that the proxy forwards to: each runs a closure per connection
//! on its own thread (echo, greet, sink, stream, reply after EOF, ...).

use std::{
    io::{self, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{Arc, Mutex, mpsc},
    thread,
    time::Instant,
};

use super::{IO_TIMEOUT, read_exactly, read_to_end_hashed};

/// A backend on 127.0.0.1:0 that runs `serve` on its own thread for each connection.
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<Mutex<usize>>,
}

impl Backend {
    pub fn start<F>(serve: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        Backend::start_on(
            TcpListener::bind("127.0.0.1:0").expect("bind backend"),
            serve,
        )
    }

    /// Like [`Backend::start`], on a listener the caller prepared.
    pub fn start_on<F>(listener: TcpListener, serve: F) -> Backend
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(Mutex::new(0));
        let count = Arc::clone(&accepted);
        let serve = Arc::new(serve);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                *count.lock().unwrap() += 1;
                stream.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
                stream.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
                let serve = Arc::clone(&serve);
                thread::spawn(move || serve(stream));
            }
        });
        Backend { addr, accepted }
    }

    /// Echoes every byte, then half-closes after the client's FIN.
    pub fn echo() -> Backend {
        Backend::start(|mut stream| {
            let mut reader = stream.try_clone().unwrap();
            let _ = io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        })
    }

    /// Sends `greeting` first (a server-speaks-first protocol), then echoes.
    pub fn greeter(greeting: &'static [u8]) -> Backend {
        Backend::start(move |mut stream| {
            if stream.write_all(greeting).is_err() {
                return;
            }
            let mut reader = stream.try_clone().unwrap();
            let _ = io::copy(&mut reader, &mut stream);
            let _ = stream.shutdown(Shutdown::Write);
        })
    }

    /// Reports (bytes, hash) of everything each connection sent, through the channel.
    pub fn sink() -> (Backend, mpsc::Receiver<(u64, [u8; 32])>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            if let Ok(result) = read_to_end_hashed(&mut stream) {
                let _ = tx.lock().unwrap().send(result);
            }
        });
        (backend, rx)
    }

    pub fn accepted(&self) -> usize {
        *self.accepted.lock().unwrap()
    }

    /// Reads `trigger` bytes (the first message, and whatever the client sends to say
    /// "go"), then sends `data` and closes.
    pub fn streamer(trigger: usize, data: Arc<Vec<u8>>) -> Backend {
        Backend::start(move |mut stream| {
            if read_exactly(&mut stream, trigger).is_ok() {
                let _ = stream.write_all(&data);
            }
        })
    }

    /// Reads until the client's FIN and reports (bytes, hash) of it, then answers with
    /// `reply` and closes: the reply travels after the request direction half-closed.
    pub fn reply_after_eof(reply: Arc<Vec<u8>>) -> (Backend, mpsc::Receiver<(u64, [u8; 32])>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            if let Ok(result) = read_to_end_hashed(&mut stream) {
                let _ = tx.lock().unwrap().send(result);
                let _ = stream.write_all(&reply);
            }
        });
        (backend, rx)
    }

    /// Sends `data` and half-closes from one thread while reading until EOF on another;
    /// reports (bytes, hash) of what it read.
    pub fn send_and_sink(data: Arc<Vec<u8>>) -> (Backend, mpsc::Receiver<(u64, [u8; 32])>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            let Ok(mut writer) = stream.try_clone() else {
                return;
            };
            let data = Arc::clone(&data);
            let writing = thread::spawn(move || {
                let _ = writer.write_all(&data);
                let _ = writer.shutdown(Shutdown::Write);
            });
            let read = read_to_end_hashed(&mut stream);
            let _ = writing.join();
            if let Ok(result) = read {
                let _ = tx.lock().unwrap().send(result);
            }
        });
        (backend, rx)
    }

    /// Reads until EOF or an error and reports how it ended, and when.
    pub fn sink_outcome() -> (Backend, mpsc::Receiver<ReadOutcome>) {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let backend = Backend::start(move |mut stream| {
            let result = read_to_end_hashed(&mut stream);
            let _ = tx.lock().unwrap().send((result, Instant::now()));
        });
        (backend, rx)
    }

    /// Reads exactly `request` bytes, then sends `reply` and keeps the connection open
    /// until the client closes: a request/response server that waits for whole requests.
    pub fn request_reply(request: usize, reply: &'static [u8]) -> Backend {
        Backend::start(move |mut stream| {
            if read_exactly(&mut stream, request).is_ok() && stream.write_all(reply).is_ok() {
                let _ = read_to_end_hashed(&mut stream);
            }
        })
    }
}

/// How a read until the end went: bytes and hash at EOF, or the error, and when it ended.
pub type ReadOutcome = (io::Result<(u64, [u8; 32])>, Instant);
