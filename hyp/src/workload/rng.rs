//! A small, fast, seedable generator (splitmix64): workloads must be reproducible.

/// Deterministic pseudo-random numbers.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The generator's whole state: `Rng::new(r.state())` continues exactly where `r` is.
    pub fn state(&self) -> u64 {
        self.0
    }

    /// The next 64 random bits.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n` > 0).
    #[inline]
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A value in `0..n` skewed towards small values: about 80% of draws fall in the
    /// first 20% of the range (a hot set, as in web and kernel heaps).
    #[inline]
    pub fn skewed(&mut self, n: u64) -> u64 {
        if self.below(5) < 4 {
            self.below(n.div_ceil(5).max(1))
        } else {
            self.below(n)
        }
    }

    /// Fills `out` with random bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let mut words = out.chunks_exact_mut(8);
        for w in &mut words {
            w.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let tail = words.into_remainder();
        let last = self.next_u64().to_le_bytes();
        tail.copy_from_slice(&last[..tail.len()]);
    }

    /// Fills `out` with text-like bytes: words from a small vocabulary, spaces and
    /// markup, compressible about 2:1 like HTML or log lines.
    pub fn fill_text(&mut self, out: &mut [u8]) {
        const WORDS: [&[u8]; 16] = [
            b"<div class=\"item\">",
            b"</div>",
            b"GET /index.html",
            b"HTTP/1.1 200 OK",
            b"Content-Length: ",
            b"user",
            b"session",
            b"cache",
            b"the",
            b"request",
            b"response",
            b"<a href=\"/p/",
            b"\">",
            b"</a>",
            b"2026-11-25T13:54:17Z",
            b"\n",
        ];
        let mut at = 0;
        while at < out.len() {
            let r = self.next_u64();
            let word: &[u8] = if r % 7 == 0 {
                let n = (r >> 8) % 100_000;
                let digits = n.to_string();
                let len = digits.len().min(out.len() - at);
                out[at..at + len].copy_from_slice(&digits.as_bytes()[..len]);
                at += len;
                continue;
            } else {
                WORDS[((r >> 16) % 16) as usize]
            };
            let len = word.len().min(out.len() - at);
            out[at..at + len].copy_from_slice(&word[..len]);
            at += len;
            if at < out.len() {
                out[at] = b' ';
                at += 1;
            }
        }
    }
}
