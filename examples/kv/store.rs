//! The key-value store's layout in one flat byte region, addressed by offsets only,
//! so that a copy of the region (a replica) is a complete store.
//!
//! ```text
//! header   magic, region length, table and arena bounds, key and mutation counts,
//!          one free-list head per size class                      (HEADER_LEN bytes)
//! table    `slots` entries of 16 bytes: key hash, entry offset (0: empty)
//! arena    blocks of a size class: class, key length, value length, key, value
//!          (a free block holds its class, FREE, and the next free block's offset)
//! ```
//!
//! The table is open addressing with linear probing and backward-shift deletion (no
//! tombstones), at most three quarters full. Blocks come from per-class free lists,
//! else from the untouched end of the arena; size classes step by quarters of a
//! power of two from 32 bytes, so a block wastes at most a fifth of itself. Freed
//! blocks are reused only by entries of the same class.
//!
//! Every read of the region is bounds-checked, so a corrupt region gives
//! [`StoreError::Corrupt`], never a panic; [`Store::open`] checks a whole region
//! before it is used.

use thiserror::Error;
use xxhash_rust::xxh3::xxh3_64;

/// Longest key accepted, in bytes.
pub const MAX_KEY: usize = 512 << 10;
/// Longest value accepted, in bytes.
pub const MAX_VALUE: usize = 512 << 10;
/// Smallest region a store can be laid out in.
pub const MIN_REGION: usize = 64 << 10;

const MAGIC: u64 = u64::from_le_bytes(*b"FGBIKV01");
const SLOT: u64 = 16;
const ENTRY_HEADER: u64 = 12;
const FREE: u32 = u32::MAX;
/// Enough classes for an entry holding the longest key and the longest value.
const CLASSES: usize = 62;
const HEADER_LEN: u64 = 8 * (Field::FreeHeads as u64 + CLASSES as u64);

/// Header fields, each a little-endian u64 at `8 * field`.
#[derive(Clone, Copy)]
enum Field {
    Magic,
    RegionLen,
    Slots,
    ArenaEnd,
    Keys,
    Mutations,
    FreeHeads,
}

/// Why a store operation failed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StoreError {
    /// The key is longer than [`MAX_KEY`].
    #[error("key of {0} bytes is longer than the {MAX_KEY}-byte limit")]
    KeyTooLong(usize),
    /// The value is longer than [`MAX_VALUE`].
    #[error("value of {0} bytes is longer than the {MAX_VALUE}-byte limit")]
    ValueTooLong(usize),
    /// No free block and no untouched arena space for an entry.
    #[error(
        "store full: no room for a {0}-byte entry; delete keys, FLUSHALL, or restart with a larger --mem"
    )]
    ArenaFull(u64),
    /// The hash table holds as many keys as it may.
    #[error(
        "store full: the table holds its limit of {0} keys; delete keys, FLUSHALL, or restart with a larger --mem"
    )]
    TableFull(u64),
    /// The region is too small to hold a store.
    #[error("a store needs at least {MIN_REGION} bytes, the region has {0}")]
    RegionTooSmall(usize),
    /// The region does not hold a consistent store.
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

fn corrupt<T>(what: impl Into<String>) -> Result<T, StoreError> {
    Err(StoreError::Corrupt(what.into()))
}

/// Block size of size class `class`: 32, 40, 48, 56, 64, 80, 96, 112, 128, ...
fn class_size(class: usize) -> u64 {
    (4 + class as u64 % 4) << (class / 4 + 3)
}

/// The smallest class whose blocks hold `bytes`.
fn class_for(bytes: u64) -> Option<usize> {
    (0..CLASSES).find(|&c| class_size(c) >= bytes)
}

/// Where the head of class `class`'s free list lies: after the fixed header fields.
fn free_head_at(class: usize) -> u64 {
    8 * (Field::FreeHeads as u64 + class as u64)
}

fn key_hash(key: &[u8]) -> u64 {
    xxh3_64(key)
}

/// A store laid out in the bytes of `B`: a live region (`B: AsMut<[u8]>`) or a
/// replica's read-only copy.
pub struct Store<B> {
    mem: B,
    slots: u64,
    arena_start: u64,
}

impl<B: AsRef<[u8]>> Store<B> {
    /// Opens the store held in `mem`, checking all of it: header, every table slot,
    /// every entry and every free list.
    pub fn open(mem: B) -> Result<Self, StoreError> {
        let bytes = mem.as_ref();
        let len = bytes.len() as u64;
        let field = |f: Field| read_u64(bytes, 8 * f as u64);
        if field(Field::Magic)? != MAGIC {
            return corrupt("no store magic at offset 0: the region was never formatted");
        }
        if field(Field::RegionLen)? != len {
            return corrupt(format!(
                "the header says {} bytes, the region has {len}",
                field(Field::RegionLen)?
            ));
        }
        let slots = field(Field::Slots)?;
        if !slots.is_power_of_two() || slots.saturating_mul(SLOT) > len {
            return corrupt(format!("table of {slots} slots does not fit the region"));
        }
        let store = Self {
            mem,
            slots,
            arena_start: HEADER_LEN + slots * SLOT,
        };
        store.validate()?;
        Ok(store)
    }

    fn bytes(&self) -> &[u8] {
        self.mem.as_ref()
    }

    /// The memory the store lives in.
    pub fn into_memory(self) -> B {
        self.mem
    }

    fn field(&self, f: Field) -> Result<u64, StoreError> {
        read_u64(self.bytes(), 8 * f as u64)
    }

    /// Number of keys.
    pub fn keys(&self) -> Result<u64, StoreError> {
        self.field(Field::Keys)
    }

    /// Mutations applied since the store was created (sets, deletions, flushes).
    pub fn mutations(&self) -> Result<u64, StoreError> {
        self.field(Field::Mutations)
    }

    fn max_keys(&self) -> u64 {
        self.slots / 4 * 3
    }

    fn slot(&self, index: u64) -> Result<(u64, u64), StoreError> {
        let at = HEADER_LEN + index * SLOT;
        Ok((read_u64(self.bytes(), at)?, read_u64(self.bytes(), at + 8)?))
    }

    /// The class, key and value of the entry at `at`, bounds-checked.
    fn entry(&self, at: u64) -> Result<(usize, &[u8], &[u8]), StoreError> {
        let bytes = self.bytes();
        let class = read_u32(bytes, at)? as usize;
        let key_len = u64::from(read_u32(bytes, at + 4)?);
        let value_len = u64::from(read_u32(bytes, at + 8)?);
        if class >= CLASSES || key_len == u64::from(FREE) {
            return corrupt(format!("offset {at} is not an entry"));
        }
        if ENTRY_HEADER + key_len + value_len > class_size(class) {
            return corrupt(format!("entry at {at} overflows its block"));
        }
        let key_at = at + ENTRY_HEADER;
        let value_at = key_at + key_len;
        Ok((
            class,
            read(bytes, key_at, key_len)?,
            read(bytes, value_at, value_len)?,
        ))
    }

    /// Where `key` is: `Ok(Ok((slot, entry)))` if present, `Ok(Err(slot))` with the
    /// empty slot that ends its probe sequence if not.
    fn find(&self, key: &[u8], hash: u64) -> Result<Result<(u64, u64), u64>, StoreError> {
        let mask = self.slots - 1;
        let mut index = hash & mask;
        for _ in 0..self.slots {
            let (slot_hash, entry) = self.slot(index)?;
            if entry == 0 {
                return Ok(Err(index));
            }
            if slot_hash == hash && self.entry(entry)?.1 == key {
                return Ok(Ok((index, entry)));
            }
            index = (index + 1) & mask;
        }
        corrupt("the hash table has no empty slot")
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &[u8]) -> Result<Option<&[u8]>, StoreError> {
        match self.find(key, key_hash(key))? {
            Ok((_, entry)) => Ok(Some(self.entry(entry)?.2)),
            Err(_) => Ok(None),
        }
    }

    /// Every key and value, in table order.
    pub fn entries(&self) -> impl Iterator<Item = Result<(&[u8], &[u8]), StoreError>> {
        (0..self.slots).filter_map(move |index| match self.slot(index) {
            Ok((_, 0)) => None,
            Ok((_, entry)) => Some(self.entry(entry).map(|(_, k, v)| (k, v))),
            Err(e) => Some(Err(e)),
        })
    }

    /// True when `other` holds the same keys with the same values.
    pub fn same_contents<C: AsRef<[u8]>>(&self, other: &Store<C>) -> Result<bool, StoreError> {
        if self.keys()? != other.keys()? {
            return Ok(false);
        }
        for pair in self.entries() {
            let (key, value) = pair?;
            if other.get(key)? != Some(value) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn validate(&self) -> Result<(), StoreError> {
        let len = self.bytes().len() as u64;
        let end = self.field(Field::ArenaEnd)?;
        if end < self.arena_start || end > len {
            return corrupt(format!(
                "arena end {end} outside {}..={len}",
                self.arena_start
            ));
        }
        let in_arena = |at: u64, class: usize| {
            at >= self.arena_start && at.checked_add(class_size(class)).is_some_and(|e| e <= end)
        };
        let mut keys = 0u64;
        for index in 0..self.slots {
            let (hash, entry) = self.slot(index)?;
            if entry == 0 {
                continue;
            }
            let (class, key, _) = self.entry(entry)?;
            if !in_arena(entry, class) || hash != key_hash(key) {
                return corrupt(format!("slot {index} points at a bad entry ({entry})"));
            }
            if self.find(key, hash)? != Ok((index, entry)) {
                return corrupt(format!("slot {index} is not reachable by probing"));
            }
            keys += 1;
        }
        if keys != self.keys()? || keys > self.max_keys() {
            return corrupt(format!(
                "the header counts {} keys, the table holds {keys}",
                self.keys()?
            ));
        }
        for class in 0..CLASSES {
            let mut at = read_u64(self.bytes(), free_head_at(class))?;
            let mut steps = 0u64;
            while at != 0 {
                steps += 1;
                let free = read_u32(self.bytes(), at + 4)?;
                if !in_arena(at, class)
                    || read_u32(self.bytes(), at)? as usize != class
                    || free != FREE
                    || steps > (end - self.arena_start) / class_size(class)
                {
                    return corrupt(format!("free list of class {class} is broken at {at}"));
                }
                at = read_u64(self.bytes(), at + 8)?;
            }
        }
        Ok(())
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Store<B> {
    /// Lays out an empty store over all of `mem`.
    pub fn create(mut mem: B) -> Result<Self, StoreError> {
        let len = mem.as_mut().len();
        if len < MIN_REGION {
            return Err(StoreError::RegionTooSmall(len));
        }
        // An eighth of the region for the table, a power of two of slots.
        let slots = 1u64 << (len as u64 / 8 / SLOT).ilog2();
        let mut store = Self {
            mem,
            slots,
            arena_start: HEADER_LEN + slots * SLOT,
        };
        store.format(0)?;
        Ok(store)
    }

    fn format(&mut self, mutations: u64) -> Result<(), StoreError> {
        let arena_start = self.arena_start;
        let header = [
            (Field::Magic, MAGIC),
            (Field::RegionLen, self.bytes().len() as u64),
            (Field::Slots, self.slots),
            (Field::ArenaEnd, arena_start),
            (Field::Keys, 0),
            (Field::Mutations, mutations),
        ];
        for (f, value) in header {
            self.set_field(f, value)?;
        }
        match self
            .mem
            .as_mut()
            .get_mut(8 * Field::FreeHeads as usize..arena_start as usize)
        {
            // Zero only pages that hold something: writing zeros over zeros would
            // dirty pages (and replicate them) for nothing.
            Some(rest) => rest
                .chunks_mut(4096)
                .filter(|page| page.iter().any(|&b| b != 0))
                .for_each(|page| page.fill(0)),
            None => return corrupt("the table does not fit the region"),
        }
        Ok(())
    }

    fn set_field(&mut self, f: Field, value: u64) -> Result<(), StoreError> {
        write(self.mem.as_mut(), 8 * f as u64, &value.to_le_bytes())
    }

    fn bump(&mut self, f: Field, up: bool) -> Result<(), StoreError> {
        let value = self.field(f)?;
        match if up {
            value.checked_add(1)
        } else {
            value.checked_sub(1)
        } {
            Some(v) => self.set_field(f, v),
            None => corrupt("a header counter wrapped around"),
        }
    }

    fn set_slot(&mut self, index: u64, hash: u64, entry: u64) -> Result<(), StoreError> {
        let at = HEADER_LEN + index * SLOT;
        let mem = self.mem.as_mut();
        write(mem, at, &hash.to_le_bytes())?;
        write(mem, at + 8, &entry.to_le_bytes())
    }

    /// A block of class `class`: from its free list, else from the arena's end.
    fn allocate(&mut self, class: usize) -> Result<u64, StoreError> {
        let head_at = free_head_at(class);
        let head = read_u64(self.bytes(), head_at)?;
        if head != 0 {
            let next = read_u64(self.bytes(), head + 8)?;
            write(self.mem.as_mut(), head_at, &next.to_le_bytes())?;
            return Ok(head);
        }
        let end = self.field(Field::ArenaEnd)?;
        let size = class_size(class);
        if end + size > self.bytes().len() as u64 {
            return Err(StoreError::ArenaFull(size));
        }
        self.set_field(Field::ArenaEnd, end + size)?;
        Ok(end)
    }

    fn release(&mut self, at: u64, class: usize) -> Result<(), StoreError> {
        let head_at = free_head_at(class);
        let head = read_u64(self.bytes(), head_at)?;
        let mem = self.mem.as_mut();
        write(mem, at + 4, &FREE.to_le_bytes())?;
        write(mem, at + 8, &head.to_le_bytes())?;
        write(mem, head_at, &at.to_le_bytes())
    }

    fn write_entry(
        &mut self,
        at: u64,
        class: usize,
        key: &[u8],
        value: &[u8],
    ) -> Result<(), StoreError> {
        let mem = self.mem.as_mut();
        write(mem, at, &(class as u32).to_le_bytes())?;
        write(mem, at + 4, &(key.len() as u32).to_le_bytes())?;
        write(mem, at + 8, &(value.len() as u32).to_le_bytes())?;
        write(mem, at + ENTRY_HEADER, key)?;
        write(mem, at + ENTRY_HEADER + key.len() as u64, value)
    }

    /// Sets `key` to `value`. On error the store is unchanged.
    pub fn set(&mut self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if key.len() > MAX_KEY {
            return Err(StoreError::KeyTooLong(key.len()));
        }
        if value.len() > MAX_VALUE {
            return Err(StoreError::ValueTooLong(value.len()));
        }
        let needed = ENTRY_HEADER + key.len() as u64 + value.len() as u64;
        let class = class_for(needed).ok_or(StoreError::ArenaFull(needed))?;
        let hash = key_hash(key);
        match self.find(key, hash)? {
            Ok((index, old)) => {
                let old_class = self.entry(old)?.0;
                // Rewrite in place unless the block is more than twice what is needed.
                if old_class >= class && old_class < class + 4 {
                    self.write_entry(old, old_class, key, value)?;
                } else {
                    let at = self.allocate(class)?;
                    self.write_entry(at, class, key, value)?;
                    self.set_slot(index, hash, at)?;
                    self.release(old, old_class)?;
                }
            }
            Err(index) => {
                if self.keys()? >= self.max_keys() {
                    return Err(StoreError::TableFull(self.max_keys()));
                }
                let at = self.allocate(class)?;
                self.write_entry(at, class, key, value)?;
                self.set_slot(index, hash, at)?;
                self.bump(Field::Keys, true)?;
            }
        }
        self.bump(Field::Mutations, true)
    }

    /// Deletes `key`; true if it was present.
    pub fn delete(&mut self, key: &[u8]) -> Result<bool, StoreError> {
        let Ok((mut hole, entry)) = self.find(key, key_hash(key))? else {
            return Ok(false);
        };
        let class = self.entry(entry)?.0;
        self.release(entry, class)?;
        // Backward shift: move later entries of the probe run into the hole when their
        // home slot does not lie cyclically between the hole and where they sit.
        let mask = self.slots - 1;
        let mut next = hole;
        loop {
            next = (next + 1) & mask;
            let (hash, at) = self.slot(next)?;
            if at == 0 {
                break;
            }
            let home = hash & mask;
            let stays = if hole <= next {
                hole < home && home <= next
            } else {
                hole < home || home <= next
            };
            if !stays {
                self.set_slot(hole, hash, at)?;
                hole = next;
            }
        }
        self.set_slot(hole, 0, 0)?;
        self.bump(Field::Keys, false)?;
        self.bump(Field::Mutations, true)?;
        Ok(true)
    }

    /// Deletes every key.
    pub fn clear(&mut self) -> Result<(), StoreError> {
        let mutations = self.mutations()?;
        self.format(mutations + 1)
    }
}

fn read(bytes: &[u8], at: u64, len: u64) -> Result<&[u8], StoreError> {
    let range = usize::try_from(at)
        .ok()
        .zip(usize::try_from(at.saturating_add(len)).ok())
        .and_then(|(start, end)| bytes.get(start..end));
    match range {
        Some(slice) => Ok(slice),
        None => corrupt(format!("{len} bytes at offset {at} lie outside the region")),
    }
}

fn read_u32(bytes: &[u8], at: u64) -> Result<u32, StoreError> {
    let mut word = [0; 4];
    word.copy_from_slice(read(bytes, at, 4)?);
    Ok(u32::from_le_bytes(word))
}

fn read_u64(bytes: &[u8], at: u64) -> Result<u64, StoreError> {
    let mut word = [0; 8];
    word.copy_from_slice(read(bytes, at, 8)?);
    Ok(u64::from_le_bytes(word))
}

fn write(bytes: &mut [u8], at: u64, data: &[u8]) -> Result<(), StoreError> {
    let end = at.saturating_add(data.len() as u64);
    match usize::try_from(at)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(start, end)| bytes.get_mut(start..end))
    {
        Some(slice) => {
            slice.copy_from_slice(data);
            Ok(())
        }
        None => corrupt(format!(
            "write of {} bytes at {at} outside the region",
            data.len()
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use fgbi_hyp::workload::Rng;

    use super::*;

    /// A key from a small space (so sets overwrite and deletes hit), some long.
    fn key(rng: &mut Rng) -> Vec<u8> {
        let id = rng.below(400);
        let len = if id % 50 == 0 { 3000 } else { 8 };
        let mut key = format!("k{id}").into_bytes();
        key.resize(len, b'.');
        key
    }

    #[test]
    fn sets_gets_and_deletes_agree_with_a_map_and_reopen_cleanly() {
        let mut region = vec![0u8; 4 << 20];
        let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut rng = Rng::new(7);
        let mut store = Store::create(&mut region).unwrap();
        for step in 0..20_000u64 {
            let key = key(&mut rng);
            if rng.below(3) == 0 {
                assert_eq!(store.delete(&key).unwrap(), model.remove(&key).is_some());
            } else {
                let len = [0, 1, 20, 100, 5000][rng.below(5) as usize];
                let mut value = vec![0; len];
                rng.fill(&mut value);
                store.set(&key, &value).unwrap();
                model.insert(key.clone(), value);
            }
            assert_eq!(store.get(&key).unwrap(), model.get(&key).map(Vec::as_slice));
            if step % 5000 == 0 {
                store.clear().unwrap();
                model.clear();
            }
        }
        assert_eq!(store.keys().unwrap(), model.len() as u64);
        let mutations = store.mutations().unwrap();
        let copy = region.clone();
        let reopened = Store::open(copy.as_slice()).unwrap();
        assert_eq!(reopened.mutations().unwrap(), mutations);
        for (key, value) in &model {
            assert_eq!(reopened.get(key).unwrap(), Some(value.as_slice()));
        }
        assert!(
            reopened
                .same_contents(&Store::open(&region).unwrap())
                .unwrap()
        );
    }

    #[test]
    fn a_full_store_refuses_and_stays_intact() {
        let mut region = vec![0u8; MIN_REGION];
        let mut store = Store::create(&mut region).unwrap();
        let big = vec![7u8; 4000];
        let mut stored = 0;
        let err = loop {
            match store.set(format!("big{stored}").as_bytes(), &big) {
                Ok(()) => stored += 1,
                Err(e) => break e,
            }
        };
        assert!(matches!(err, StoreError::ArenaFull(_)), "{err}");
        assert!(err.to_string().contains("--mem"));
        assert_eq!(store.keys().unwrap(), stored);
        // Small entries fill the table's limit, not the arena.
        store.clear().unwrap();
        let err = (0..)
            .find_map(|i: u32| store.set(&i.to_le_bytes(), b"").err())
            .unwrap();
        assert_eq!(err, StoreError::TableFull(store.max_keys()));
        assert!(store.delete(&0u32.to_le_bytes()).unwrap());
        store.set(b"again", b"fits").unwrap();
        // Refusals left a consistent store: it reopens with every check passing.
        let mut store = Store::open(&mut region).unwrap();
        assert_eq!(
            store.set(&vec![0; MAX_KEY + 1], b""),
            Err(StoreError::KeyTooLong(MAX_KEY + 1))
        );
        assert_eq!(
            store.set(b"k", &vec![0; MAX_VALUE + 1]),
            Err(StoreError::ValueTooLong(MAX_VALUE + 1))
        );
        assert_eq!(store.get(b"again").unwrap(), Some(&b"fits"[..]));
    }

    #[test]
    fn a_corrupt_region_is_an_error_not_a_panic() {
        let mut region = vec![0u8; 256 << 10];
        let mut store = Store::create(&mut region).unwrap();
        for i in 0..300u32 {
            store.set(&i.to_le_bytes(), &[i as u8; 50]).unwrap();
        }
        for i in 0..100u32 {
            store.delete(&i.to_le_bytes()).unwrap();
        }
        assert!(Store::open(&region[..]).is_ok());
        assert!(
            Store::open(&vec![0u8; 4096][..]).is_err(),
            "never formatted"
        );
        assert!(
            Store::open(&region[..region.len() - 8]).is_err(),
            "truncated"
        );
        let mut rng = Rng::new(3);
        let mut refused = 0;
        for _ in 0..2000 {
            let mut bad = region.clone();
            // Corrupt the header, the table, or the arena's first blocks.
            let at = rng.below(HEADER_LEN + 1024 * SLOT + 64 * 1024) as usize;
            bad[at] ^= 1 << rng.below(8);
            if let Ok(store) = Store::open(&bad[..]) {
                // A flipped bit that leaves a consistent store (a value byte, an
                // unused slot's hash) reads without error.
                for pair in store.entries() {
                    pair.unwrap();
                }
            } else {
                refused += 1;
            }
        }
        assert!(refused > 100, "only {refused} corruptions detected");
    }
}
