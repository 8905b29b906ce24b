//! `web`: an Apache/SPECweb-like server. Small scattered updates to session objects
//! on a skewed hot set, log lines appended to a ring, and responses assembled in
//! buffers from a header and a chunk of a cached static file (popular files are sent
//! many times per epoch).

use super::{PAGE, Region, Rng, Workload, WorkloadError, layout, load_rng, touch, write_at};

const OBJECT: usize = 256;
const BUFFER: usize = 16 << 10;

/// The `web` workload.
pub struct Web {
    rng: Rng,
    heap: Region,
    log: Region,
    buffers: Region,
    files: Region,
    log_at: usize,
}

impl Web {
    /// Lays out `pages` pages: 40% heap, 10% log, 20% buffers, 30% static files.
    pub fn new(pages: usize, rng: Rng) -> Self {
        let [heap, log, buffers, files] = layout(pages, [400, 100, 200, 300]);
        Self {
            rng,
            heap,
            log,
            buffers,
            files,
            log_at: 0,
        }
    }
}

impl Workload for Web {
    fn name(&self) -> &'static str {
        "web"
    }

    fn populate(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        let heap = &mut memory[self.heap.start()..self.heap.start() + self.heap.len()];
        for object in heap.chunks_mut(OBJECT) {
            // Half the object is fields (ids, pointers), half is text (names, paths).
            let (fields, text) = object.split_at_mut(OBJECT / 2);
            self.rng.fill(&mut fields[..32]);
            self.rng.fill_text(text);
        }
        touch(self.heap.start(), self.heap.len(), written);
        let files = &mut memory[self.files.start()..self.files.start() + self.files.len()];
        self.rng.fill_text(files);
        touch(self.files.start(), self.files.len(), written);
    }

    fn step(&mut self, memory: &mut [u8], written: &mut Vec<u64>) {
        // Session and connection state: a few fields of hot objects.
        let objects = self.heap.len() / OBJECT;
        for _ in 0..400 {
            let object = self.rng.skewed(objects as u64) as usize;
            let field = self.rng.below(OBJECT as u64 / 16) as usize * 8;
            let len = 8 * (1 + self.rng.below(4) as usize);
            let mut value = [0u8; 32];
            self.rng.fill(&mut value[..len]);
            write_at(
                memory,
                self.heap.start() + object * OBJECT + field,
                &value[..len],
                written,
            );
        }
        // Access log lines appended to a ring.
        for _ in 0..60 {
            let mut line = [0u8; 160];
            let len = 80 + self.rng.below(80) as usize;
            self.rng.fill_text(&mut line[..len]);
            if self.log_at + len > self.log.len() {
                self.log_at = 0;
            }
            write_at(
                memory,
                self.log.start() + self.log_at,
                &line[..len],
                written,
            );
            self.log_at += len;
        }
        // Responses: header text, then a chunk of a (popular) static file.
        let slots = (self.buffers.len() / BUFFER).max(1);
        let files = (self.files.len() / (16 * PAGE)).max(1);
        for _ in 0..30 {
            let slot = self.buffers.start() + self.rng.below(slots as u64) as usize * BUFFER;
            let mut header = [0u8; 192];
            self.rng.fill_text(&mut header);
            write_at(memory, slot, &header, written);
            let file = self.rng.skewed(files as u64) as usize;
            let len = (2 + self.rng.below(10) as usize) * 1024;
            let from = self.files.start() + file * 16 * PAGE;
            let len = len.min(BUFFER - header.len()).min(memory.len() - from);
            memory.copy_within(from..from + len, slot + header.len());
            touch(slot + header.len(), len, written);
        }
    }

    fn save(&self) -> Vec<u64> {
        vec![self.rng.state(), self.log_at as u64]
    }

    fn load(&mut self, words: &[u64]) -> Result<(), WorkloadError> {
        self.rng = load_rng(self.name(), words, 2)?;
        self.log_at = usize::try_from(words[1])
            .unwrap_or(usize::MAX)
            .min(self.log.len());
        Ok(())
    }
}
