//! The Redis commands the service understands, applied to a [`Store`].

use std::ops::Range;

use fgbi_hyp::resp::Reply;

use super::store::{Store, StoreError};

/// What the connection does after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Read the next command.
    Continue,
    /// Close the connection (QUIT).
    Close,
    /// Close the connection and shut the service down (SHUTDOWN).
    Shutdown,
}

/// One request's arguments, as ranges of the connection's input buffer.
pub struct Request<'a> {
    /// The input buffer.
    pub buf: &'a [u8],
    /// The arguments' positions in `buf`; the first is the command name.
    pub args: &'a [Range<usize>],
}

impl<'a> Request<'a> {
    fn arg(&self, index: usize) -> &'a [u8] {
        &self.buf[self.args[index].clone()]
    }

    fn rest(&self, from: usize) -> impl Iterator<Item = &'a [u8]> + '_ {
        self.args[from..].iter().map(|r| &self.buf[r.clone()])
    }
}

/// What a command needs from the store's memory: the live store's.
pub type LiveStore = Store<super::memory::StoreMemory>;

/// Whether `count` arguments suit a command taking `min` or more (`max` or fewer if
/// given), its name included.
fn arity(count: usize, min: usize, max: Option<usize>) -> bool {
    count >= min && max.is_none_or(|m| count <= m)
}

/// Runs one request against `store`, appending its reply to `reply`.
pub fn execute(store: &mut LiveStore, request: &Request<'_>, reply: &mut Reply<'_>) -> Next {
    let name = request.arg(0).to_ascii_uppercase();
    let count = request.args.len();
    let fits = match name.as_slice() {
        b"PING" => arity(count, 1, Some(2)),
        b"ECHO" | b"GET" | b"INCR" | b"DECR" => arity(count, 2, Some(2)),
        b"SET" => arity(count, 3, None),
        b"DEL" | b"EXISTS" | b"MGET" | b"CONFIG" => arity(count, 2, None),
        b"INCRBY" | b"DECRBY" => arity(count, 3, Some(3)),
        b"MSET" => count >= 3 && count % 2 == 1,
        _ => true,
    };
    if !fits {
        reply.error(&format!(
            "ERR wrong number of arguments for '{}' command",
            String::from_utf8_lossy(&name).to_lowercase()
        ));
        return Next::Continue;
    }
    // Commands of the connection, not the store.
    match name.as_slice() {
        b"PING" if count == 2 => reply.bulk(Some(request.arg(1))),
        b"PING" => reply.simple("PONG"),
        b"ECHO" => reply.bulk(Some(request.arg(1))),
        b"CONFIG" => config(request, reply),
        // redis-cli asks for command docs on connect; it does without them.
        b"COMMAND" => reply.array(0),
        b"QUIT" => {
            reply.simple("OK");
            return Next::Close;
        }
        // A successful SHUTDOWN has no reply: the connection closes.
        b"SHUTDOWN" => return Next::Shutdown,
        _ => {
            if let Err(e) = data_command(store, &name, request, reply) {
                reply.error(&format!("ERR {e}"));
            }
        }
    }
    Next::Continue
}

/// Runs a command that reads or writes the store.
fn data_command(
    store: &mut LiveStore,
    name: &[u8],
    request: &Request<'_>,
    reply: &mut Reply<'_>,
) -> Result<(), StoreError> {
    match name {
        b"GET" => reply.bulk(store.get(request.arg(1))?),
        b"SET" => set(store, request, reply)?,
        b"DEL" => reply.integer(count_keys(request, |key| store.delete(key))?),
        b"EXISTS" => reply.integer(count_keys(request, |key| Ok(store.get(key)?.is_some()))?),
        b"INCR" => add(store, request.arg(1), Ok(1), reply)?,
        b"DECR" => add(store, request.arg(1), Ok(-1), reply)?,
        b"INCRBY" => add(store, request.arg(1), integer(request.arg(2)), reply)?,
        b"DECRBY" => add(
            store,
            request.arg(1),
            integer(request.arg(2)).and_then(|d| d.checked_neg().ok_or(NOT_INTEGER)),
            reply,
        )?,
        b"MGET" => mget(store, request, reply)?,
        b"MSET" => mset(store, request, reply)?,
        b"DBSIZE" => reply.integer(i64::try_from(store.keys()?).unwrap_or(i64::MAX)),
        b"FLUSHALL" | b"FLUSHDB" => {
            store.clear()?;
            reply.simple("OK");
        }
        _ => reply.error(&format!(
            "ERR unknown command '{}'",
            String::from_utf8_lossy(request.arg(0))
        )),
    }
    Ok(())
}

const NOT_INTEGER: &str = "value is not an integer or out of range";

fn integer(text: &[u8]) -> Result<i64, &'static str> {
    std::str::from_utf8(text)
        .ok()
        .filter(|t| !t.starts_with('+'))
        .and_then(|t| t.parse().ok())
        .ok_or(NOT_INTEGER)
}

fn set(
    store: &mut LiveStore,
    request: &Request<'_>,
    reply: &mut Reply<'_>,
) -> Result<(), StoreError> {
    let (key, value) = (request.arg(1), request.arg(2));
    let (mut nx, mut xx) = (false, false);
    for option in request.rest(3) {
        match option.to_ascii_uppercase().as_slice() {
            b"NX" => nx = true,
            b"XX" => xx = true,
            b"EX" | b"PX" | b"EXAT" | b"PXAT" | b"KEEPTTL" => {
                reply.error("ERR expiry (EX, PX, EXAT, PXAT, KEEPTTL) is not supported: keys in this store never expire; SET without it");
                return Ok(());
            }
            _ => {
                reply.error("ERR syntax error: SET key value [NX|XX]");
                return Ok(());
            }
        }
    }
    if nx && xx {
        reply.error("ERR syntax error: NX and XX exclude each other");
        return Ok(());
    }
    let exists = store.get(key)?.is_some();
    if (nx && exists) || (xx && !exists) {
        reply.bulk(None);
        return Ok(());
    }
    store.set(key, value)?;
    reply.simple("OK");
    Ok(())
}

/// How many of the request's keys `test` holds for.
fn count_keys(
    request: &Request<'_>,
    mut test: impl FnMut(&[u8]) -> Result<bool, StoreError>,
) -> Result<i64, StoreError> {
    let mut n = 0;
    for key in request.rest(1) {
        n += i64::from(test(key)?);
    }
    Ok(n)
}

/// INCR, DECR, INCRBY, DECRBY: adds `delta` to the integer held by `key` (0 if absent).
fn add(
    store: &mut LiveStore,
    key: &[u8],
    delta: Result<i64, &'static str>,
    reply: &mut Reply<'_>,
) -> Result<(), StoreError> {
    let old = match store.get(key)? {
        Some(text) => integer(text),
        None => Ok(0),
    };
    let new = delta.and_then(|d| {
        old?.checked_add(d)
            .ok_or("increment or decrement would overflow")
    });
    match new {
        Ok(value) => {
            store.set(key, value.to_string().as_bytes())?;
            reply.integer(value);
        }
        Err(message) => reply.error(&format!("ERR {message}")),
    }
    Ok(())
}

fn mget(store: &LiveStore, request: &Request<'_>, reply: &mut Reply<'_>) -> Result<(), StoreError> {
    // Look every key up before replying, so an error leaves no half-written array.
    let values = request
        .rest(1)
        .map(|key| store.get(key))
        .collect::<Result<Vec<_>, _>>()?;
    reply.array(values.len());
    for value in values {
        reply.bulk(value);
    }
    Ok(())
}

/// MSET: sets every pair in order; on a full store the pairs before the failing one
/// stay set (the error says so).
fn mset(
    store: &mut LiveStore,
    request: &Request<'_>,
    reply: &mut Reply<'_>,
) -> Result<(), StoreError> {
    let pairs: Vec<_> = request.rest(1).collect();
    for (done, pair) in pairs.chunks_exact(2).enumerate() {
        if let Err(e) = store.set(pair[0], pair[1]) {
            reply.error(&format!("ERR {e} (the first {done} pairs were set)"));
            return Ok(());
        }
    }
    reply.simple("OK");
    Ok(())
}

/// CONFIG GET, as redis-benchmark asks for `save` and `appendonly`: the store is
/// never written to disk. Other parameters match nothing.
fn config(request: &Request<'_>, reply: &mut Reply<'_>) {
    if !request.arg(1).eq_ignore_ascii_case(b"GET") {
        reply.error("ERR only CONFIG GET is supported");
        return;
    }
    let known: [(&[u8], &[u8]); 2] = [(b"save", b""), (b"appendonly", b"no")];
    let found: Vec<_> = request
        .rest(2)
        .flat_map(|pattern| {
            known
                .iter()
                .filter(move |(name, _)| pattern.eq_ignore_ascii_case(name) || pattern == b"*")
        })
        .collect();
    reply.array(found.len() * 2);
    for (name, value) in found {
        reply.bulk(Some(name));
        reply.bulk(Some(value));
    }
}
