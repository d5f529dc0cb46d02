//! For the tests' stand-ins for Redis (the unit tests of `redis_conn` and the
//! integration tests): not used by the server itself.

/// The name (upper-cased) of the first whole RESP command in `buf` and the bytes it
/// takes; `None` while `buf` holds less than a whole command.
pub fn resp_command(buf: &[u8]) -> Option<(String, usize)> {
    fn line(buf: &[u8], from: usize, tag: u8) -> Option<(usize, usize)> {
        let end = from + buf.get(from..)?.windows(2).position(|w| w == b"\r\n")?;
        if buf.get(from) != Some(&tag) {
            return None;
        }
        let n = std::str::from_utf8(&buf[from + 1..end])
            .ok()?
            .parse()
            .ok()?;
        Some((n, end + 2))
    }
    let (args, mut pos) = line(buf, 0, b'*')?;
    let mut name = String::new();
    for i in 0..args {
        let (len, start) = line(buf, pos, b'$')?;
        let arg = buf.get(start..start + len)?;
        if i == 0 {
            name = String::from_utf8_lossy(arg).to_uppercase();
        }
        pos = start + len + 2;
        if buf.len() < pos {
            return None;
        }
    }
    Some((name, pos))
}
